// dequant_matmul on CPU: y = x @ (scale * code)^T (+ bias) without ever holding the dense weight.
//
// Two paths, both accumulating in float32 (float64 for float64 x):
// - few tokens (M <= kGemvMaxTokens, e.g. batch-1 decode): a fused GEMV. Each thread decodes one
//   output row into an L1-resident buffer of codes and takes its group-wise dot products with the
//   M token rows; y[m, n] = sum_g s[n, g] * sum_{i in g} q_i x[m, i]. Memory traffic is the packed
//   weight only (bits/32 of a float32 weight), which is what makes it faster than a dense GEMV.
// - more tokens: output rows are cut into tiles of T rows; a tile is decoded and scaled into a
//   [T, D] scratch (threads split its rows) and multiplied with one BLAS GEMM written straight into
//   y's column slice. Tiles run one after another so that BLAS keeps every core busy on each GEMM
//   (nested parallel regions would oversubscribe); the scratch (<= ~4 MB) is the only float copy of
//   the weight that ever exists.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "qlinear_common.h"

namespace piso {
namespace {

constexpr int64_t kGemvMaxTokens = 8;
constexpr int64_t kScratchElems = int64_t(1) << 20;  // float32 scratch <= 4 MB per tile

// Decodes the D signed codes of one packed row into out[0..D). Full 32-code chunks occupy exactly
// B words; with B a compile-time constant the unrolled loop turns into fixed shifts and masks.
template <int B, typename T>
void decode_row(const uint32_t* row, int64_t D, T* out) {
  constexpr uint32_t mask = (1u << B) - 1u;
  constexpr int half = 1 << (B - 1);
  int64_t i = 0;
  for (; i + 32 <= D; i += 32) {
    const uint32_t* c = row + (i >> 5) * B;
    uint64_t buf = 0;
    int nb = 0, wi = 0;
#pragma GCC unroll 32
    for (int j = 0; j < 32; ++j) {
      if (nb < B) {
        buf |= uint64_t(c[wi++]) << nb;
        nb += 32;
      }
      out[i + j] = static_cast<T>(int(buf & mask) - half);
      buf >>= B;
      nb -= B;
    }
  }
  for (; i < D; ++i) out[i] = static_cast<T>(int(extract_field(row, i, B)) - half);
}

template <typename T>
void decode_row_dispatch(int bits, const uint32_t* row, int64_t D, T* out) {
  switch (bits) {
    case 2: return decode_row<2>(row, D, out);
    case 3: return decode_row<3>(row, D, out);
    case 4: return decode_row<4>(row, D, out);
    case 5: return decode_row<5>(row, D, out);
    case 6: return decode_row<6>(row, D, out);
    case 7: return decode_row<7>(row, D, out);
    case 8: return decode_row<8>(row, D, out);
    default: TORCH_CHECK(false, "bits: expected an integer in [2, 8], got ", bits);
  }
}

// Dot product with 8 independent partial sums: the fixed summation order lets the compiler
// vectorize it without -ffast-math.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  T s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
void gemv_path(const T* x, const uint32_t* packed, const T* scales, T* y, int bits,
               const DequantMatmulDims& d) {
  at::parallel_for(0, d.N, 8, [&](int64_t n0, int64_t n1) {
    std::vector<T> q(d.D);
    for (int64_t n = n0; n < n1; ++n) {
      decode_row_dispatch(bits, packed + n * d.W, d.D, q.data());
      const T* s = scales + n * d.ng;
      for (int64_t m = 0; m < d.M; ++m) {
        const T* xm = x + m * d.D;
        T acc = 0;
        for (int64_t g = 0; g < d.ng; ++g)
          acc += s[g] * dot(q.data() + g * d.gs, xm + g * d.gs, d.gs);
        y[m * d.N + n] = acc;
      }
    }
  });
}

template <typename T>
void tiled_path(const at::Tensor& x2, const uint32_t* packed, const T* scales, const at::Tensor& y,
                int bits, const DequantMatmulDims& d) {
  int64_t T_rows = std::min<int64_t>(256, std::max<int64_t>(16, kScratchElems / d.D));
  T_rows = std::min<int64_t>(T_rows, d.N);
  auto scratch = at::empty({T_rows, d.D}, x2.options());
  T* scr = scratch.data_ptr<T>();
  for (int64_t n0 = 0; n0 < d.N; n0 += T_rows) {
    const int64_t tn = std::min(T_rows, d.N - n0);
    at::parallel_for(0, tn, 4, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = n0 + r;
        T* out = scr + r * d.D;
        decode_row_dispatch(bits, packed + n * d.W, d.D, out);
        const T* s = scales + n * d.ng;
        for (int64_t g = 0; g < d.ng; ++g) {
          const T sg = s[g];
          T* o = out + g * d.gs;
          for (int64_t k = 0; k < d.gs; ++k) o[k] *= sg;
        }
      }
    });
    // y[:, n0:n0+tn] has strides (N, 1): a valid BLAS output, so no copy is made.
    auto ys = y.narrow(1, n0, tn);
    at::mm_out(ys, x2, scratch.narrow(0, 0, tn).t());
  }
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
