// Ragged paged attention for the CPU, as an XLA FFI custom call.
//
// Same contract as pallas_kernels/reference.py::ragged_paged_attention_ref:
//   q:            [T, Hq, D] float32 (already RoPE'd)
//   k/v cache:    [L, NP, P, Hkv, D] float32, or bfloat16 bits (uint16/bf16)
//   layer:        [] int32, the layer of the stacked cache to read
//   block_tables: [S, W] int32; seq_lens: [S] int32; query_start_loc: [S+1]
//   out:          [T, Hq, D] float32; rows past query_start_loc[S] are zero.
// Attributes: sm_scale, sliding_window (0 = none), soft_cap (0 = none).
//
// Why a kernel: XLA on the CPU runs the reference's page gather as an
// element loop and its per-(sequence, head) einsums as tiny batched matmuls
// (~200 ms for 30 layers of 32 decode rows at 256 tokens of context, where
// reading the 377 MB of K/V takes ~15 ms). This reads each page in place, once
// per block of queries, with a page-granular online softmax (flash attention
// with the page as the key block), and splits (sequence, kv head, query
// block) items over XLA's intra-op thread pool. Each item's arithmetic
// depends only on its own rows, so results do not depend on the batch.
// With AVX-512 and a head dim of 64/128/256 (page_row), keys go 16 at a time:
// 16 dot products reduced by one transpose-and-add tree into a score vector,
// the online softmax on that vector, P.V accumulated in registers; the next
// page is prefetched a share of its lines per row.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kQueryBlock = 16;  // query tokens per work item
constexpr int kPrefetchPages = 1;  // pages ahead whose lines are prefetched
constexpr float kNegInf = -INFINITY;

struct Problem {
  const float* q;
  const void* k;
  const void* v;
  bool bf16;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  const int32_t* qsl;
  float* out;
  int64_t num_seqs, pages_per_seq, num_pages, page_size, num_kv_heads, head_dim;
  int64_t num_q_heads, group, layer, qblocks_per_seq, head_chunks, heads_per_chunk;
  float sm_scale, soft_cap;
  int64_t sliding_window;
};

// Cache elements as float: float32 as is, bfloat16 bits widened (exact).
inline float as_float(float v) { return v; }
inline float as_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Dot product of a float row and a cache row; 16 independent lanes (one
// AVX-512 FMA per step when vectorised), then a fixed-order tree sum, so the
// result does not depend on anything but the two rows.
template <typename KV>
inline float dot_generic(const float* a, const KV* b, int64_t n) {
  float lanes[16] = {0};
  int64_t d = 0;
  for (; d + 16 <= n; d += 16)
    for (int k = 0; k < 16; ++k) lanes[k] += a[d + k] * as_float(b[d + k]);
  for (int64_t k = 0; d < n; ++d, ++k) lanes[k] += a[d] * as_float(b[d]);
  for (int w = 8; w >= 1; w /= 2)
    for (int k = 0; k < w; ++k) lanes[k] += lanes[k + w];
  return lanes[0];
}

// exp of scores[0, n) minus `shift`, in place; returns their sum. Masked
// scores (-inf) become exactly 0.
inline float exp_shifted_generic(float* scores, int64_t n, float shift) {
  float sum = 0.0f;
  for (int64_t t = 0; t < n; ++t) {
    scores[t] = std::exp(scores[t] - shift);
    sum += scores[t];
  }
  return sum;
}

#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Fixed-order vector dot (two accumulators, then a fixed lane reduction).
template <typename KV>
inline float dot(const float* a, const KV* b, int64_t n) {
  if (n % 16) return dot_generic(a, b, n);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= n; d += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), load16(b + d), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d + 16), load16(b + d + 16), acc1);
  }
  if (d < n) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), load16(b + d), acc0);
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// e^x for 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor
// polynomial (relative error ~1e-7), scaled by 2^n; x < -87 gives 0.
inline __m512 exp16(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}

inline float exp_shifted(float* scores, int64_t n, float shift) {
  __m512 sum = _mm512_setzero_ps();
  const __m512 sh = _mm512_set1_ps(shift);
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 m = static_cast<__mmask16>(n - t >= 16 ? 0xFFFF : (1u << (n - t)) - 1u);
    const __m512 e = _mm512_maskz_mov_ps(
        m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + t), sh)));
    _mm512_mask_storeu_ps(scores + t, m, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// Sums of 16 vectors at once: lane t of the result is the sum of the lanes of
// the input at kTokenSlot[t] (a transpose-and-add tree, 15 shuffle/add pairs
// for 16 dot products instead of a horizontal reduction each).
constexpr int kTokenSlot[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

inline __m512 transpose_sum16(const __m512* p) {
  __m512 q[8], r[4], s[2];
  for (int i = 0; i < 8; ++i)
    q[i] = _mm512_add_ps(_mm512_shuffle_f32x4(p[i], p[i + 8], 0x44),
                         _mm512_shuffle_f32x4(p[i], p[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)
    r[i] = _mm512_add_ps(_mm512_shuffle_f32x4(q[i], q[i + 4], 0x88),
                         _mm512_shuffle_f32x4(q[i], q[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(r[i], r[i + 2]), _mm512_unpackhi_ps(r[i], r[i + 2]));
  const __m512d s0 = _mm512_castps_pd(s[0]), s1 = _mm512_castps_pd(s[1]);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(s0, s1)),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(s0, s1)));
}

// One row's pass over one page (up to 16 tokens), all in registers: the
// scores of the page's tokens as one vector (masked lanes -inf), the online
// softmax update of (m, l), and acc = acc * c + sum_t p_t v_t. NV = D / 16.
// The arithmetic depends only on the row and the page, never on the batch.
template <int NV, typename KV>
inline void page_row(const float* q, const KV* K, const KV* V, int64_t stride, int64_t nt,
                     __mmask16 visible, float soft_cap, float& m, float& l, float* acc) {
  __m512 part[16];
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    if (t < nt) {
      const KV* k = K + t * stride;
      for (int v = 0; v + 1 < NV; v += 2) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * v), load16(k + 16 * v), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * v + 16), load16(k + 16 * v + 16), a1);
      }
      if (NV % 2) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * (NV - 1)),
                                       load16(k + 16 * (NV - 1)), a0);
    }
    part[kTokenSlot[t]] = _mm512_add_ps(a0, a1);
  }
  __m512 s = transpose_sum16(part);
  if (soft_cap != 0.0f) {
    alignas(64) float tmp[16];
    _mm512_store_ps(tmp, s);
    for (int t = 0; t < 16; ++t) tmp[t] = soft_cap * std::tanh(tmp[t] / soft_cap);
    s = _mm512_load_ps(tmp);
  }
  s = _mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), visible, s);
  const float page_max = _mm512_reduce_max_ps(s);
  const float m_new = std::max(m, page_max);
  if (m_new == kNegInf) return;  // nothing visible yet
  const float c = std::exp(m - m_new);  // exp(-inf) = 0 on the first page
  const __m512 e = exp16(_mm512_sub_ps(s, _mm512_set1_ps(m_new)));  // masked lanes: 0
  l = l * c + _mm512_reduce_add_ps(e);
  m = m_new;
  alignas(64) float w[16];
  _mm512_store_ps(w, e);
  __m512 o[NV];
  const __m512 cv = _mm512_set1_ps(c);
  for (int v = 0; v < NV; ++v) o[v] = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * v), cv);
  for (int64_t t = 0; t < nt; ++t) {
    const __m512 wt = _mm512_set1_ps(w[t]);
    const KV* vt = V + t * stride;
    for (int v = 0; v < NV; ++v) o[v] = _mm512_fmadd_ps(wt, load16(vt + 16 * v), o[v]);
  }
  for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc + 16 * v, o[v]);
}
#define JAX_SERVE_PAGE_ROW 1
#else
template <typename KV>
inline float dot(const float* a, const KV* b, int64_t n) { return dot_generic(a, b, n); }
inline float exp_shifted(float* scores, int64_t n, float shift) {
  return exp_shifted_generic(scores, n, shift);
}
#endif

// One work item: the queries [i0, i0 + nq) of sequence s, for kv heads
// [h0, h0 + nh) and their query-head groups. Pages are read whole (all kv
// heads of a token are contiguous), once per item. DT is the head dim when
// known at compile time (0: read it from the problem), so the per-row
// accumulator lives in registers.
template <int DT, typename KV>
void run_item(const Problem& p, int64_t item) {
  const int64_t hc = item % p.head_chunks;
  const int64_t qb = (item / p.head_chunks) % p.qblocks_per_seq;
  const int64_t s = item / (p.head_chunks * p.qblocks_per_seq);
  const int64_t q_start = p.qsl[s];
  const int64_t q_len = p.qsl[s + 1] - q_start;
  const int64_t i0 = qb * kQueryBlock;
  if (i0 >= q_len) return;
  const int64_t nq = std::min<int64_t>(kQueryBlock, q_len - i0);
  const int64_t seq_len = p.seq_lens[s];
  const int64_t D = DT > 0 ? DT : p.head_dim;
  const int64_t G = p.group, P = p.page_size, Hkv = p.num_kv_heads;
  const int64_t h0 = hc * p.heads_per_chunk;
  const int64_t nh = std::min<int64_t>(p.heads_per_chunk, Hkv - h0);
  const int64_t rows = nh * nq * G;  // row r = (head hl, query i, group g)

  // Positions of this block's queries and the key range they can see.
  const int64_t pos0 = seq_len - q_len + i0;  // position of query i0
  int64_t kv_lo = 0;
  if (p.sliding_window > 0) kv_lo = std::max<int64_t>(0, pos0 - p.sliding_window + 1);
  const int64_t kv_hi = std::min<int64_t>(pos0 + nq, seq_len);  // exclusive

  std::vector<float> qrows(rows * D), acc(rows * D, 0.0f), m(rows, kNegInf), l(rows, 0.0f);
  std::vector<float> scores(P);
  std::vector<int64_t> row_head(rows), row_pos(rows);
  for (int64_t hl = 0; hl < nh; ++hl)
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = (hl * nq + i) * G + g;
        row_head[r] = h0 + hl;
        row_pos[r] = pos0 + i;
        const float* src = p.q + ((q_start + i0 + i) * p.num_q_heads + (h0 + hl) * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qrows[r * D + d] = src[d] * p.sm_scale;
      }

  const int32_t* table = p.block_tables + s * p.pages_per_seq;
  const int64_t row_stride = Hkv * D;  // between tokens of a page
  const int64_t layer_base = p.layer * p.num_pages * P * row_stride;
  for (int64_t j = kv_lo / P; j * P < kv_hi; ++j) {
    const int64_t t0 = std::max<int64_t>(j * P, kv_lo), t1 = std::min<int64_t>(j * P + P, kv_hi);
    const int64_t nt = t1 - t0;
    const int64_t offset = layer_base + (table[j] * P + (t0 - j * P)) * row_stride;
    // The next page streams in while this one is used: its cache lines are
    // prefetched a share per row, interleaved with the arithmetic (all at once
    // stalled on the full miss buffers).
    const char* kn = nullptr;
    const char* vn = nullptr;
    const int64_t page_bytes = P * row_stride * static_cast<int64_t>(sizeof(KV));
    const int64_t lines_per_row = (page_bytes / 64 + rows - 1) / rows;
    const int64_t ahead = j + kPrefetchPages;
    if (ahead * P < kv_hi) {
      const int64_t next = (layer_base + table[ahead] * P * row_stride) * sizeof(KV);
      kn = static_cast<const char*>(p.k) + next;
      vn = static_cast<const char*>(p.v) + next;
    }
    const KV* K = static_cast<const KV*>(p.k) + offset;
    const KV* V = static_cast<const KV*>(p.v) + offset;
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = qrows.data() + r * D;
      const KV* kh = K + row_head[r] * D;
      const KV* vh = V + row_head[r] * D;
      const int64_t qpos = row_pos[r];
      if (kn != nullptr) {
        const int64_t end = std::min(page_bytes, (r + 1) * lines_per_row * 64);
        for (int64_t b = r * lines_per_row * 64; b < end; b += 64) {
          __builtin_prefetch(kn + b);
          __builtin_prefetch(vn + b);
        }
      }
#ifdef JAX_SERVE_PAGE_ROW
      if constexpr (DT > 0 && DT % 16 == 0) {
        // 16 tokens at a time; visible lanes: causal and inside the window.
        for (int64_t b = 0; b < nt; b += 16) {
          const int64_t nb = std::min<int64_t>(16, nt - b), kpos0 = t0 + b;
          const int64_t hi = std::min<int64_t>(nb, qpos - kpos0 + 1);
          int64_t lo = 0;
          if (p.sliding_window > 0)
            lo = std::max<int64_t>(0, qpos - p.sliding_window + 1 - kpos0);
          __mmask16 vis = 0;
          if (hi > lo)
            vis = static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << std::min<int64_t>(lo, 16)) - 1u));
          page_row<DT / 16, KV>(qr, kh + b * row_stride, vh + b * row_stride, row_stride, nb,
                                vis, p.soft_cap, m[r], l[r], acc.data() + r * D);
        }
        continue;
      }
#endif
      // scores[t] = q_r . k_t, masked causally / by the window.
      float page_max = kNegInf;
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t kpos = t0 + t;
        float x = kNegInf;
        if (kpos <= qpos && (p.sliding_window <= 0 || qpos - kpos < p.sliding_window)) {
          x = dot(qr, kh + t * row_stride, D);
          if (p.soft_cap != 0.0f) x = p.soft_cap * std::tanh(x / p.soft_cap);
        }
        scores[t] = x;
        page_max = std::max(page_max, x);
      }
      // Online softmax, one page at a time.
      const float m_new = std::max(m[r], page_max);
      if (m_new == kNegInf) continue;  // nothing visible yet
      const float c = std::exp(m[r] - m_new);  // exp(-inf) = 0 on the first page
      const float sum = exp_shifted(scores.data(), nt, m_new);
      l[r] = l[r] * c + sum;
      m[r] = m_new;
      float a[DT > 0 ? DT : 1];
      float* ar = DT > 0 ? a : acc.data() + r * D;
      const float* acc_r = acc.data() + r * D;
      for (int64_t d = 0; d < D; ++d) ar[d] = acc_r[d] * c;
      for (int64_t t = 0; t < nt; ++t) {
        const float w = scores[t];
        const KV* vt = vh + t * row_stride;
        for (int64_t d = 0; d < D; ++d) ar[d] += w * as_float(vt[d]);
      }
      if (DT > 0) std::memcpy(acc.data() + r * D, ar, D * sizeof(float));
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = row_pos[r] - pos0, g = r % G;
    float* dst = p.out + ((q_start + i0 + i) * p.num_q_heads + row_head[r] * G + g) * D;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    for (int64_t d = 0; d < D; ++d) dst[d] = acc[r * D + d] * inv;
  }
}

template <typename KV>
void run_dim(const Problem& p, int64_t item) {
  switch (p.head_dim) {
    case 64: run_item<64, KV>(p, item); return;
    case 128: run_item<128, KV>(p, item); return;
    case 256: run_item<256, KV>(p, item); return;
    default: run_item<0, KV>(p, item); return;
  }
}

void run_any(const Problem& p, int64_t item) {
  if (p.bf16) run_dim<uint16_t>(p, item);
  else run_dim<float>(p, item);
}

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                              ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                              ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> block_tables,
                              ffi::Buffer<ffi::S32> seq_lens, ffi::Buffer<ffi::S32> qsl,
                              ffi::ResultBuffer<ffi::F32> out, float sm_scale,
                              int64_t sliding_window, float soft_cap) {
  auto qd = q.dimensions();
  auto kd = k_cache.dimensions();
  auto bd = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || bd.size() != 2)
    return ffi::Error::InvalidArgument("paged_attention_cpu: bad ranks");
  const auto kt = k_cache.element_type();
  const bool bf16 = kt == ffi::DataType::BF16 || kt == ffi::DataType::U16;
  if (!bf16 && kt != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("paged_attention_cpu: cache must be f32 or bf16 bits");
  if (v_cache.element_type() != kt)
    return ffi::Error::InvalidArgument("paged_attention_cpu: k/v cache dtypes differ");

  Problem p;
  p.q = q.typed_data();
  p.k = k_cache.untyped_data();
  p.v = v_cache.untyped_data();
  p.bf16 = bf16;
  p.block_tables = block_tables.typed_data();
  p.seq_lens = seq_lens.typed_data();
  p.qsl = qsl.typed_data();
  p.out = out->typed_data();
  const int64_t num_tokens = qd[0];
  p.num_q_heads = qd[1];
  p.head_dim = qd[2];
  p.num_pages = kd[1];
  p.page_size = kd[2];
  p.num_kv_heads = kd[3];
  p.group = p.num_q_heads / p.num_kv_heads;
  p.num_seqs = bd[0];
  p.pages_per_seq = bd[1];
  p.layer = layer.typed_data()[0];
  p.sm_scale = sm_scale;
  p.soft_cap = soft_cap;
  p.sliding_window = sliding_window;
  if (p.layer < 0 || p.layer >= kd[0])
    return ffi::Error::InvalidArgument("paged_attention_cpu: layer out of range");

  // Padding rows (past the last sequence's queries) are zero, as in the reference.
  const int64_t used = std::min<int64_t>(p.qsl[p.num_seqs], num_tokens);
  std::memset(p.out + used * p.num_q_heads * p.head_dim, 0,
              (num_tokens - used) * p.num_q_heads * p.head_dim * sizeof(float));

  int64_t max_q = 0;
  for (int64_t s = 0; s < p.num_seqs; ++s) max_q = std::max<int64_t>(max_q, p.qsl[s + 1] - p.qsl[s]);
  p.qblocks_per_seq = std::max<int64_t>(1, (max_q + kQueryBlock - 1) / kQueryBlock);
  // Whole pages per item unless that leaves threads idle (few sequences).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const bool split_heads = p.num_seqs * p.qblocks_per_seq < 2 * threads;
  p.heads_per_chunk = split_heads ? 1 : p.num_kv_heads;
  p.head_chunks = p.num_kv_heads / p.heads_per_chunk;
  const int64_t num_items = p.num_seqs * p.qblocks_per_seq * p.head_chunks;

  jax_serve::parallel_for(pool, num_items, [p](int64_t i) { run_any(p, i); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedAttentionCpu, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("sm_scale")
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<float>("soft_cap"));
