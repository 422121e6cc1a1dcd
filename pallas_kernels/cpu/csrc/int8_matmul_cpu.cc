// W8A8 int8 matmul for the CPU, as an XLA FFI custom call.
//
//   y[M, N] = float(quant(x) @ W) * x_scale[m] * w_scale[n]
//
//   x:       [M, K] float32 activations, quantized here per row (symmetric
//            int8, scale = max|x_m| / 127, round half to even), as
//            model/quant.py's XLA path does.
//   w:       [N/16, K/4, 16, 4] int8 (N, K padded up to 16 and 4 with zeros):
//            16 output columns x 4 reduction steps per 64-byte vector, the
//            operand layout of AVX-512 VNNI's vpdpbusd, packed once at load
//            time (pack_int8_weight in pallas_kernels/cpu/int8.py).
//   colsum:  [N/16 * 16] int32, sum over k of w[k, n]: vpdpbusd multiplies
//            unsigned by signed bytes, so x goes in as x + 128 and 128 *
//            colsum comes off the int32 result (exact integer arithmetic).
//   w_scale: [N] float32 per-output-channel scale.
//
// Why a kernel: XLA's CPU dot (YNNPACK) repacks the int8 weight on every
// call; at one or two rows that repacking cost more than the product itself
// (a third of a SmolLM2 decode step). Here weights are read once, in place.
// Work is split over 64-column tiles on XLA's intra-op pool; every output
// element's arithmetic is exact integers plus a fixed float epilogue, so it
// does not depend on the batch or the split.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define JAX_SERVE_VNNI 1
#endif

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;     // output columns per packed block
constexpr int kTileBlocks = 4;  // blocks per work item (64 columns)
constexpr int kRowTile = 4;     // rows sharing each weight load
constexpr int kWoRowTile = 6;   // the same for the weight-only kernel

struct Problem {
  const uint8_t* xq;     // [M, Kq * 4] x + 128
  const float* xs;       // [M]
  const int8_t* w;       // [Nb, Kq, 64]
  const int32_t* colsum;  // [Nb * 16]
  const float* ws;       // [N]
  float* y;              // [M, N]
  int64_t m, n, kq, nb;
};

// Rows [0, m) in tiles of RowTile, then one tile of the 1-(RowTile - 1) left over:
// tile(std::integral_constant<int, R>{}, r0) handles rows [r0, r0 + R).
template <int RowTile = kRowTile, typename Tile>
inline void for_row_tiles(int64_t m, Tile tile) {
  static_assert(RowTile >= 4 && RowTile <= 8, "remainder tiles cover 1-7 rows");
  int64_t r = 0;
  for (; r + RowTile <= m; r += RowTile) tile(std::integral_constant<int, RowTile>{}, r);
  switch (m - r) {
    case 7: if constexpr (RowTile > 7) tile(std::integral_constant<int, 7>{}, r); break;
    case 6: if constexpr (RowTile > 6) tile(std::integral_constant<int, 6>{}, r); break;
    case 5: if constexpr (RowTile > 5) tile(std::integral_constant<int, 5>{}, r); break;
    case 4: if constexpr (RowTile > 4) tile(std::integral_constant<int, 4>{}, r); break;
    case 3: tile(std::integral_constant<int, 3>{}, r); break;
    case 2: tile(std::integral_constant<int, 2>{}, r); break;
    case 1: tile(std::integral_constant<int, 1>{}, r); break;
    default: break;
  }
}

#ifdef JAX_SERVE_VNNI
template <int R, int B>
inline void micro_tile(const Problem& p, int64_t r0, int64_t b0) {
  __m512i acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_si512();
  const int8_t* wb[B];
  for (int b = 0; b < B; ++b) wb[b] = p.w + (b0 + b) * p.kq * 64;
  const int64_t xstride = p.kq * 4;
  for (int64_t kk = 0; kk < p.kq; ++kk) {
    __m512i wv[B];
    for (int b = 0; b < B; ++b) wv[b] = _mm512_loadu_si512(wb[b] + kk * 64);
    for (int r = 0; r < R; ++r) {
      int32_t xv;
      std::memcpy(&xv, p.xq + (r0 + r) * xstride + kk * 4, 4);
      const __m512i xb = _mm512_set1_epi32(xv);
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], xb, wv[b]);
    }
  }
  for (int b = 0; b < B; ++b) {
    const int64_t col = (b0 + b) * kLanes;
    const int64_t valid = std::min<int64_t>(kLanes, p.n - col);
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
    const __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512(p.colsum + col), 7);  // 128 * colsum
    const __m512 ws = _mm512_maskz_loadu_ps(mask, p.ws + col);
    for (int r = 0; r < R; ++r) {
      const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][b], offset));
      const __m512 out = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(p.xs[r0 + r])), ws);
      _mm512_mask_storeu_ps(p.y + (r0 + r) * p.n + col, mask, out);
    }
  }
}

template <int B>
inline void rows_tile(const Problem& p, int64_t b0) {
  for_row_tiles(p.m, [&](auto rows, int64_t r0) { micro_tile<decltype(rows)::value, B>(p, r0, b0); });
}
#endif

// Portable fallback: the same integer arithmetic, one block at a time.
void generic_tile(const Problem& p, int64_t b0, int64_t blocks) {
  const int64_t xstride = p.kq * 4;
  for (int64_t b = b0; b < b0 + blocks; ++b) {
    const int8_t* wb = p.w + b * p.kq * 64;
    for (int64_t r = 0; r < p.m; ++r) {
      int32_t acc[kLanes] = {0};
      const uint8_t* xr = p.xq + r * xstride;
      for (int64_t kk = 0; kk < p.kq; ++kk)
        for (int l = 0; l < kLanes; ++l)
          for (int j = 0; j < 4; ++j)
            acc[l] += static_cast<int32_t>(xr[kk * 4 + j]) * wb[kk * 64 + l * 4 + j];
      for (int l = 0; l < kLanes; ++l) {
        const int64_t col = b * kLanes + l;
        if (col >= p.n) break;
        const float v = static_cast<float>(acc[l] - 128 * p.colsum[col]);
        p.y[r * p.n + col] = v * p.xs[r] * p.ws[col];
      }
    }
  }
}

void run_tile(const Problem& p, int64_t tile) {
  const int64_t b0 = tile * kTileBlocks;
  const int64_t blocks = std::min<int64_t>(kTileBlocks, p.nb - b0);
#ifdef JAX_SERVE_VNNI
  switch (blocks) {
    case 4: rows_tile<4>(p, b0); return;
    case 3: rows_tile<3>(p, b0); return;
    case 2: rows_tile<2>(p, b0); return;
    case 1: rows_tile<1>(p, b0); return;
    default: return;
  }
#else
  generic_tile(p, b0, blocks);
#endif
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::S32> colsum,
                          ffi::Buffer<ffi::F32> w_scale, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != 64)
    return ffi::Error::InvalidArgument("int8_matmul_cpu: x must be [M, K], w [N/16, K/4, 64]");
  const int64_t m = xd[0], k = xd[1], nb = wd[0], kq = wd[1];
  const int64_t n = w_scale.dimensions()[0];
  if (kq * 4 < k || kq * 4 >= k + 4 || nb * kLanes < n || nb * kLanes >= n + kLanes ||
      colsum.dimensions()[0] != nb * kLanes)
    return ffi::Error::InvalidArgument("int8_matmul_cpu: packed weight does not match x / scale");

  // Per-row symmetric int8 (round half to even), stored as x + 128.
  std::vector<uint8_t> xq(m * kq * 4, 128);
  std::vector<float> xs(m);
  const float* xp = x.typed_data();
  for (int64_t r = 0; r < m; ++r) {
    const float* row = xp + r * k;
    float amax = 0.0f;
    for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(row[i]));
    const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
    xs[r] = scale;
    uint8_t* dst = xq.data() + r * kq * 4;
    for (int64_t i = 0; i < k; ++i) {
      const float q = std::min(127.0f, std::max(-127.0f, std::nearbyint(row[i] / scale)));
      dst[i] = static_cast<uint8_t>(static_cast<int32_t>(q) + 128);
    }
  }
  Problem p{xq.data(), xs.data(), w.typed_data(), colsum.typed_data(), w_scale.typed_data(),
            y->typed_data(), m, n, kq, nb};
  const int64_t tiles = (nb + kTileBlocks - 1) / kTileBlocks;
  jax_serve::parallel_for(pool, tiles, [&p](int64_t t) { run_tile(p, t); });
  return ffi::Error::Success();
}

// ---- weight-only int8 (float32 activations) ---------------------------------
//
//   y[M, N] = (x @ float(W)) * w_scale[n]
//
//   x: [M, K] float32; W: [K, Np] int8 row-major, Np = N rounded up to 16
//   (zero columns); w_scale: [N] float32.
// For projections whose inputs do not survive per-token int8 (attention's):
// the weight still streams at a quarter of float32's bytes, each 16-column
// row slice widened to float32 in registers and shared by a tile of rows.

struct WoProblem {
  const float* x;  // [M, K]
  const int8_t* w;  // [K, Np]
  const float* ws;  // [N]
  float* y;  // [M, N]
  int64_t m, k, n, np;
};

template <int R, int B>
inline void wo_tile(const WoProblem& p, int64_t r0, int64_t b0) {
#ifdef JAX_SERVE_VNNI
  __m512 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_ps();
  const int8_t* wcol = p.w + b0 * kLanes;
  for (int64_t kk = 0; kk < p.k; ++kk) {
    __m512 wv[B];
    for (int b = 0; b < B; ++b)
      wv[b] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(wcol + kk * p.np + b * kLanes))));
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(p.x[(r0 + r) * p.k + kk]);
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_fmadd_ps(xb, wv[b], acc[r][b]);
    }
  }
  for (int b = 0; b < B; ++b) {
    const int64_t col = (b0 + b) * kLanes;
    const int64_t valid = std::min<int64_t>(kLanes, p.n - col);
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
    const __m512 ws = _mm512_maskz_loadu_ps(mask, p.ws + col);
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(p.y + (r0 + r) * p.n + col, mask, _mm512_mul_ps(acc[r][b], ws));
  }
#else
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b)
      for (int l = 0; l < kLanes; ++l) {
        const int64_t col = (b0 + b) * kLanes + l;
        if (col >= p.n) continue;
        float a = 0.0f;
        for (int64_t kk = 0; kk < p.k; ++kk)
          a += p.x[(r0 + r) * p.k + kk] * static_cast<float>(p.w[kk * p.np + col]);
        p.y[(r0 + r) * p.n + col] = a * p.ws[col];
      }
#endif
}

template <int B>
inline void wo_rows(const WoProblem& p, int64_t b0) {
  // 6 rows x 4 blocks: 24 accumulators; each widened weight vector feeds 6 FMAs
  for_row_tiles<kWoRowTile>(p.m, [&](auto rows, int64_t r0) {
    wo_tile<decltype(rows)::value, B>(p, r0, b0);
  });
}

ffi::Error Int8WeightMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> w_scale,
                                ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2)
    return ffi::Error::InvalidArgument("int8_weight_matmul_cpu: x must be [M, K], w [K, Np]");
  const int64_t n = w_scale.dimensions()[0];
  if (wd[0] != xd[1] || wd[1] % kLanes != 0 || wd[1] < n || wd[1] >= n + kLanes)
    return ffi::Error::InvalidArgument("int8_weight_matmul_cpu: w does not match x / scale");
  WoProblem p{x.typed_data(), w.typed_data(), w_scale.typed_data(), y->typed_data(),
              xd[0], xd[1], n, wd[1]};
  const int64_t nb = wd[1] / kLanes;
  const int64_t tiles = (nb + kTileBlocks - 1) / kTileBlocks;
  jax_serve::parallel_for(pool, tiles, [&p, nb](int64_t t) {
    const int64_t b0 = t * kTileBlocks;
    switch (std::min<int64_t>(kTileBlocks, nb - b0)) {
      case 4: wo_rows<4>(p, b0); return;
      case 3: wo_rows<3>(p, b0); return;
      case 2: wo_rows<2>(p, b0); return;
      case 1: wo_rows<1>(p, b0); return;
      default: return;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Int8MatmulCpu, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Int8WeightMatmulCpu, Int8WeightMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
