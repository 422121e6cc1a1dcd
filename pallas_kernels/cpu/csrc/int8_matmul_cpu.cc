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
// does not depend on the batch, the split or the code path. The path is
// chosen per call from the CPU's features (cpu_isa.h; JAX_SERVE_CPU_ISA forces
// one): AVX-512 with VNNI's vpdpbusd (or AVX512-BW's vpmaddubsw), AVX2 with
// AVX-VNNI's ymm vpdpbusd (or vpmaddubsw), or portable loops.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#ifdef JAX_SERVE_X86
#include <immintrin.h>
#endif

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;     // output columns per packed block
constexpr int kTileBlocks = 4;  // blocks per work item (64 columns)

struct Problem {
  const uint8_t* xq;     // [M, Kq * 4] x + 128 (VNNI, portable) or x (int8 bits)
  const float* xs;       // [M]
  const int8_t* w;       // [Nb, Kq, 64]
  const int32_t* colsum;  // [Nb * 16]
  const float* ws;       // [N]
  float* y;              // [M, N]
  int64_t m, n, kq, nb;
};

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

// The weight columns of one work item: block b's column l at row kk is
// block(b)[kk * stride + l]. Either W itself (stride Np) or a copy of the
// item's columns, rows packed back to back (see Int8WeightMatmulImpl).
struct WoPanel {
  const int8_t* w;  // column b0 * 16 of row 0
  int64_t stride;   // bytes between rows
  int64_t b0;
  const int8_t* block(int64_t b) const { return w + (b - b0) * kLanes; }
};

// One copy of the kernels per code path (int8_matmul_body.inc), each in its
// own namespace and compiled for its instruction set; baseline code around
// them (the handlers, std::vector's members) runs on any CPU.
namespace scalar {
#include "int8_matmul_body.inc"
}  // namespace scalar

#ifdef JAX_SERVE_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define JAX_SERVE_BODY_AVX2 1
#include "int8_matmul_body.inc"
#undef JAX_SERVE_BODY_AVX2
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace avx512 {
#define JAX_SERVE_BODY_AVX512 1
#include "int8_matmul_body.inc"
#undef JAX_SERVE_BODY_AVX512
}  // namespace avx512
#pragma GCC pop_options
#endif

struct Kernels {
  void (*quantize_rows)(const float*, int64_t, int64_t, int64_t, bool, uint8_t*, float*);
  void (*run_tile)(const Problem&, int64_t, int64_t, bool);
  void (*wo_run_tile)(const WoProblem&, const WoPanel&, int64_t, int64_t);
};

Kernels kernels(jax_serve::Isa isa) {
#ifdef JAX_SERVE_X86
  if (isa.level == jax_serve::kAvx512)
    return {avx512::quantize_rows, avx512::run_tile, avx512::wo_run_tile};
  if (isa.level == jax_serve::kAvx2) return {avx2::quantize_rows, avx2::run_tile, avx2::wo_run_tile};
#endif
  (void)isa;
  return {scalar::quantize_rows, scalar::run_tile, scalar::wo_run_tile};
}

// w, colsum and w_scale may carry a leading stack axis ([L, ...], the layers of
// a model/stacked.py loop); ``layer`` then picks the slice to read in place, so
// the loop does not copy each layer's weights out of the stack.
ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::S32> colsum,
                          ffi::Buffer<ffi::F32> w_scale, ffi::Buffer<ffi::S32> layer_buf,
                          ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  const bool stacked = wd.size() == 4;
  const size_t o = stacked ? 1 : 0;
  if (xd.size() != 2 || wd.size() != 3 + o || wd[2 + o] != 64 ||
      colsum.dimensions().size() != 1 + o || w_scale.dimensions().size() != 1 + o)
    return ffi::Error::InvalidArgument(
        "int8_matmul_cpu: x must be [M, K], w [(L,) N/16, K/4, 64], colsum / scale [(L,) N]");
  const int64_t num = stacked ? wd[0] : 1;
  const int64_t layer = stacked ? layer_buf.typed_data()[0] : 0;
  if (layer < 0 || layer >= num ||
      (stacked && (colsum.dimensions()[0] != num || w_scale.dimensions()[0] != num)))
    return ffi::Error::InvalidArgument("int8_matmul_cpu: layer out of range of the stack");
  const int64_t m = xd[0], k = xd[1], nb = wd[o], kq = wd[1 + o];
  const int64_t n = w_scale.dimensions()[o];
  if (kq * 4 < k || kq * 4 >= k + 4 || nb * kLanes < n || nb * kLanes >= n + kLanes ||
      colsum.dimensions()[o] != nb * kLanes)
    return ffi::Error::InvalidArgument("int8_matmul_cpu: packed weight does not match x / scale");
  const int8_t* w_data = w.typed_data() + layer * nb * kq * 64;
  const int32_t* colsum_data = colsum.typed_data() + layer * nb * kLanes;
  const float* scale_data = w_scale.typed_data() + layer * n;

  const jax_serve::Isa isa = jax_serve::current_isa();
  const Kernels kern = kernels(isa);
  std::vector<uint8_t> xq(m * kq * 4);
  std::vector<float> xs(m);
  // VNNI and the portable loops take x + 128; vpmaddubsw's paths take x.
  const bool signed_x = isa.level != jax_serve::kScalar && !isa.vnni;
  kern.quantize_rows(x.typed_data(), m, k, kq, signed_x, xq.data(), xs.data());
  Problem p{xq.data(), xs.data(), w_data, colsum_data, scale_data, y->typed_data(), m, n, kq,
            nb};
  const int64_t tiles = (nb + kTileBlocks - 1) / kTileBlocks;
  jax_serve::parallel_for(pool, tiles, [&p, kern, isa, nb](int64_t t) {
    const int64_t b0 = t * kTileBlocks;
    kern.run_tile(p, b0, std::min<int64_t>(kTileBlocks, nb - b0), isa.vnni);
  });
  return ffi::Error::Success();
}

ffi::Error Int8WeightMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> w_scale,
                                ffi::Buffer<ffi::S32> layer_buf,
                                ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  const bool stacked = wd.size() == 3;  // [L, K, Np]: read layer ``layer`` in place
  const size_t o = stacked ? 1 : 0;
  if (xd.size() != 2 || wd.size() != 2 + o || w_scale.dimensions().size() != 1 + o)
    return ffi::Error::InvalidArgument(
        "int8_weight_matmul_cpu: x must be [M, K], w [(L,) K, Np], scale [(L,) N]");
  const int64_t num = stacked ? wd[0] : 1;
  const int64_t layer = stacked ? layer_buf.typed_data()[0] : 0;
  if (layer < 0 || layer >= num || (stacked && w_scale.dimensions()[0] != num))
    return ffi::Error::InvalidArgument("int8_weight_matmul_cpu: layer out of range of the stack");
  const int64_t n = w_scale.dimensions()[o], kdim = wd[o], np_ = wd[1 + o];
  if (kdim != xd[1] || np_ % kLanes != 0 || np_ < n || np_ >= n + kLanes)
    return ffi::Error::InvalidArgument("int8_weight_matmul_cpu: w does not match x / scale");
  WoProblem p{x.typed_data(), w.typed_data() + layer * kdim * np_,
              w_scale.typed_data() + layer * n, y->typed_data(), xd[0], xd[1], n, np_};
  const int64_t nb = np_ / kLanes;
  const int64_t tiles = (nb + kTileBlocks - 1) / kTileBlocks;
  const jax_serve::Isa isa = jax_serve::current_isa();
  const Kernels kern = kernels(isa);
  // A tile's columns are 64 bytes of rows Np bytes apart: with Np a multiple
  // of 2 KiB (49152 for a vocabulary-sized N) the rows map to one or two L1
  // sets and a few L2 sets, so each pass over K evicts its own lines and the
  // next pass reads them from L3 again. Then the tile's columns are first
  // copied back to back, unless one pass reads each line once (AVX-512 with
  // one row tile: all 4 blocks per pass). Measured at 32 x 576 x 49152:
  // 15 -> 8.5 ms (AVX-512), 45 -> 13 ms (AVX2); at Np = 1536 the copy only
  // costs (0.19 -> 0.21 ms), so it is skipped there.
  const bool pack = p.np % 2048 == 0 && !(isa.level == jax_serve::kAvx512 && p.m <= 6);
  jax_serve::parallel_for(pool, tiles, [&p, kern, nb, pack](int64_t t) {
    const int64_t b0 = t * kTileBlocks, blocks = std::min<int64_t>(kTileBlocks, nb - b0);
    const int8_t* src = p.w + b0 * kLanes;
    if (!pack) {
      kern.wo_run_tile(p, WoPanel{src, p.np, b0}, b0, blocks);
      return;
    }
    thread_local std::vector<int8_t> panel;
    const int64_t width = blocks * kLanes;
    panel.resize(p.k * width);
    for (int64_t kk = 0; kk < p.k; ++kk)
      std::memcpy(panel.data() + kk * width, src + kk * p.np, width);
    kern.wo_run_tile(p, WoPanel{panel.data(), width, b0}, b0, blocks);
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
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer of a stacked w
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Int8WeightMatmulCpu, Int8WeightMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer of a stacked w
                                  .Ret<ffi::Buffer<ffi::F32>>());
