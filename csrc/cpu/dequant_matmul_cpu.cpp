// dequant_matmul on CPU: y = x @ (scale * code)^T (+ bias) without ever holding the dense weight.
//
// Two paths, both accumulating in float32 (float64 for float64 x):
// - few tokens (M <= kGemvMaxTokens, e.g. batch-1 decode): a fused GEMV. Each thread decodes one
//   output row into an L1-resident buffer of codes and takes its group-wise dot products with the
//   M token rows; y[m, n] = sum_g s[n, g] * sum_{i in g} q_i x[m, i]. Memory traffic is the packed
//   weight only (bits/32 of a float32 weight), which is what makes it faster than a dense GEMV.
// - more tokens: output rows are cut into tiles of T rows (T <= 256, scratch <= 4 MB); each thread
//   takes whole tiles, decodes and scales a tile into its own [T, D] scratch and multiplies it with
//   one BLAS GEMM written straight into y's column slice. The per-thread scratch is the only float
//   copy of (part of) the weight that ever exists.
// The inner loops (dequant_kernels.inc) are compiled three times, generic, AVX2+FMA and AVX-512,
// and the best the CPU has is picked at run time: the vector copies decode 8 or 16 codes per byte
// shuffle + per-lane shift, and their dot products use vector accumulators of their width.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "qlinear_common.h"

namespace piso {
namespace {

constexpr int64_t kGemvMaxTokens = 8;
constexpr int64_t kScratchElems = int64_t(1) << 20;  // per-thread float32 scratch <= 4 MB

namespace generic {
#include "dequant_kernels.inc"
}  // namespace generic

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PISO_HAVE_SIMD_CLONES 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("fp-contract=fast")  // a * b + c as one FMA in the dot products
#define PISO_DQ_AVX2 1
namespace avx2 {
#include "dequant_kernels.inc"
}  // namespace avx2
#undef PISO_DQ_AVX2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#pragma GCC optimize("fp-contract=fast")
#pragma GCC diagnostic push
// GCC 12's AVX-512 headers start some intrinsics from _mm512_undefined_*(), which it then reports.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define PISO_DQ_AVX512 1
namespace avx512 {
#include "dequant_kernels.inc"
}  // namespace avx512
#undef PISO_DQ_AVX512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

// 2 = AVX-512 (F, BW, VL, DQ), 1 = AVX2 + FMA, 0 = generic. PISO_DEQUANT_ISA=generic|avx2|avx512
// caps it (tests run every copy on one machine); any other value is an error, not ignored.
int simd_level() {
#ifdef PISO_HAVE_SIMD_CLONES
  static const int level = [] {
    int l = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) l = 1;
    if (l == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      l = 2;
    if (const char* cap = std::getenv("PISO_DEQUANT_ISA")) {
      const std::string c(cap);
      TORCH_CHECK(c == "generic" || c == "avx2" || c == "avx512",
                  "PISO_DEQUANT_ISA: expected 'generic', 'avx2' or 'avx512', got '", c, "'");
      if (c == "generic") l = 0;
      else if (c == "avx2") l = std::min(l, 1);
    }
    return l;
  }();
  return level;
#else
  return 0;
#endif
}

template <typename T>
void gemv_rows(const T* x, const uint32_t* packed, const T* scales, T* y, int bits,
               const DequantMatmulDims& d, int64_t n0, int64_t n1, T* q) {
#ifdef PISO_HAVE_SIMD_CLONES
  switch (simd_level()) {
    case 2: return avx512::gemv_rows(x, packed, scales, y, bits, d, n0, n1, q);
    case 1: return avx2::gemv_rows(x, packed, scales, y, bits, d, n0, n1, q);
    default: break;
  }
#endif
  generic::gemv_rows(x, packed, scales, y, bits, d, n0, n1, q);
}

template <typename T>
void dequant_rows(const uint32_t* packed, const T* scales, int bits, const DequantMatmulDims& d,
                  int64_t n0, int64_t n1, T* out) {
#ifdef PISO_HAVE_SIMD_CLONES
  switch (simd_level()) {
    case 2: return avx512::dequant_rows(packed, scales, bits, d, n0, n1, out);
    case 1: return avx2::dequant_rows(packed, scales, bits, d, n0, n1, out);
    default: break;
  }
#endif
  generic::dequant_rows(packed, scales, bits, d, n0, n1, out);
}

template <typename T>
void gemv_path(const T* x, const uint32_t* packed, const T* scales, T* y, int bits,
               const DequantMatmulDims& d) {
  at::parallel_for(0, d.N, 8, [&](int64_t n0, int64_t n1) {
    std::vector<T> q(d.D);
    gemv_rows(x, packed, scales, y, bits, d, n0, n1, q.data());
  });
}

// Threads take whole tiles: each decodes its tile into its own scratch and runs a single-threaded
// GEMM on it (BLAS called inside a parallel region stays on its thread), which measured faster here
// than one multi-threaded GEMM per narrow tile.
template <typename T>
void tiled_path(const at::Tensor& x2, const uint32_t* packed, const T* scales, const at::Tensor& y,
                int bits, const DequantMatmulDims& d) {
  const int64_t T_rows =
      std::min<int64_t>(d.N, std::min<int64_t>(256, std::max<int64_t>(16, kScratchElems / d.D)));
  const int64_t ntiles = (d.N + T_rows - 1) / T_rows;
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    auto scratch = at::empty({T_rows, d.D}, x2.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * T_rows, tn = std::min(T_rows, d.N - n0);
      dequant_rows(packed, scales, bits, d, n0, n0 + tn, scratch.data_ptr<T>());
      // y[:, n0:n0+tn] has strides (N, 1): a valid BLAS output, written without a copy.
      auto ys = y.narrow(1, n0, tn);
      at::mm_out(ys, x2, scratch.narrow(0, 0, tn).t());
    }
  });
}

at::Tensor dequant_matmul_cpu(const at::Tensor& x, const at::Tensor& packed_in,
                              const at::Tensor& scales_in, int64_t bits, int64_t group_size,
                              int64_t in_features, const std::optional<at::Tensor>& bias) {
  const auto d = check_dequant_matmul_args(x, packed_in, scales_in, bits, group_size, in_features,
                                           bias, /*check_values=*/true);
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor for the CPU kernel");
  const auto acc = accum_dtype(x);
  const auto out_shape = dequant_matmul_out_shape(x, d.N);
  if (d.M == 0) return at::empty(out_shape, x.options());
  const auto x2 = x.reshape({d.M, d.D}).to(acc).contiguous();
  const auto packed = packed_in.contiguous();
  const auto scales = scales_in.to(acc).contiguous();
  auto y = at::empty({d.M, d.N}, x2.options());
  const uint32_t* pk = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
  const int b = static_cast<int>(bits);
  AT_DISPATCH_FLOATING_TYPES(acc, "dequant_matmul_cpu", [&] {
    if (d.M <= kGemvMaxTokens)
      gemv_path<scalar_t>(x2.data_ptr<scalar_t>(), pk, scales.data_ptr<scalar_t>(),
                          y.data_ptr<scalar_t>(), b, d);
    else
      tiled_path<scalar_t>(x2, pk, scales.data_ptr<scalar_t>(), y, b, d);
  });
  if (bias.has_value() && bias->defined()) y.add_(bias->to(acc));
  return y.to(x.scalar_type()).reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(piso, CPU, m) { m.impl("dequant_matmul", &dequant_matmul_cpu); }

}  // namespace piso
