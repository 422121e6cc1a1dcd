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
// With AVX-512 or AVX2 and a head dim of 64/128/256 (page_row), keys go 16
// at a time: 16 dot products reduced by one transpose-and-add tree into a
// score vector (two 8-lane halves on AVX2), the online softmax on that
// vector, P.V accumulated in registers; the next page is prefetched a share
// of its lines per row. The path is chosen per call from the CPU's features
// (cpu_isa.h; JAX_SERVE_CPU_ISA forces one), not from the build's flags.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_isa.h"
#ifdef JAX_SERVE_X86
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

// One copy of the kernel per code path (paged_attention_body.inc), each in
// its own namespace and compiled for its instruction set; baseline code
// around them (the handler, std::vector's members) runs on any CPU.
namespace scalar {
#include "paged_attention_body.inc"
}  // namespace scalar

#ifdef JAX_SERVE_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define JAX_SERVE_BODY_AVX2 1
#include "paged_attention_body.inc"
#undef JAX_SERVE_BODY_AVX2
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace avx512 {
#define JAX_SERVE_BODY_AVX512 1
#include "paged_attention_body.inc"
#undef JAX_SERVE_BODY_AVX512
}  // namespace avx512
#pragma GCC pop_options
#endif

using ItemFn = void (*)(const Problem&, int64_t);

ItemFn item_fn(jax_serve::Isa isa) {
#ifdef JAX_SERVE_X86
  if (isa.level == jax_serve::kAvx512) return avx512::run_any;
  if (isa.level == jax_serve::kAvx2) return avx2::run_any;
#endif
  (void)isa;
  return scalar::run_any;
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

  const ItemFn run = item_fn(jax_serve::current_isa());
  jax_serve::parallel_for(pool, num_items, [p, run](int64_t i) { run(p, i); });
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
