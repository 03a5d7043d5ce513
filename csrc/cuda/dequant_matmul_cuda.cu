// dequant_matmul on CUDA: the same math and packed layout as csrc/cpu/dequant_matmul_cpu.cpp.
// - M <= kGemvMaxTokens (decode): one warp per output row; lanes stride over the input dimension,
//   decode their code, scale it and accumulate against the (at most 8) token rows; a warp shuffle
//   reduction finishes each dot product. The weight is read once, packed.
// - larger M: a classic shared-memory tiled GEMM. A 256-thread block owns a 64x64 tile of y; per
//   32-wide K step it stages x[64 x 32] and the dequantized weight tile w[64 x 32] (decoded from the
//   packed words and scaled) in shared memory, then each thread accumulates a 4x4 sub-tile. The
//   dense weight never exists beyond one 64x32 tile per block.
// Accumulation: float32 for fp16/bf16/fp32 x, float64 for float64 x (at::opmath_type). Scale and
// bias finiteness is not checked here (it would synchronize the device on every forward).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "qlinear_common.h"

namespace piso {
namespace {

constexpr int64_t kGemvMaxTokens = 8;
constexpr int kGemvWarps = 8;  // output rows per GEMV block
constexpr int kBM = 64, kBN = 64, kBK = 32, kTileThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void gemv_kernel(const scalar_t* __restrict__ x, const uint32_t* __restrict__ packed,
                            const acc_t* __restrict__ scales, const acc_t* __restrict__ bias,
                            scalar_t* __restrict__ y, int64_t M, int64_t N, int64_t D, int64_t W,
                            int64_t gs, int64_t ng, int bits) {
  const int lane = threadIdx.x & 31;
  const int64_t n = blockIdx.x * int64_t(kGemvWarps) + (threadIdx.x >> 5);
  if (n >= N) return;  // whole warp exits together (n is warp-uniform)
  const uint32_t* row = packed + n * W;
  const acc_t* s = scales + n * ng;
  const int half = 1 << (bits - 1);
  acc_t acc[kGemvMaxTokens];
#pragma unroll
  for (int m = 0; m < kGemvMaxTokens; ++m) acc[m] = acc_t(0);
  for (int64_t i = lane; i < D; i += 32) {
    const acc_t w = s[i / gs] * acc_t(int(extract_field(row, i, bits)) - half);
#pragma unroll
    for (int m = 0; m < kGemvMaxTokens; ++m)
      if (m < M) acc[m] += w * static_cast<acc_t>(x[m * D + i]);
  }
#pragma unroll
  for (int m = 0; m < kGemvMaxTokens; ++m) {
    if (m >= M) break;
    acc_t v = acc[m];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) {
      if (bias != nullptr) v += bias[n];
      y[m * N + n] = static_cast<scalar_t>(v);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTileThreads)
    tiled_kernel(const scalar_t* __restrict__ x, const uint32_t* __restrict__ packed,
                 const acc_t* __restrict__ scales, const acc_t* __restrict__ bias,
                 scalar_t* __restrict__ y, int64_t M, int64_t N, int64_t D, int64_t W, int64_t gs,
                 int64_t ng, int bits) {
  // +1 padding: the column reads below hit distinct banks.
  __shared__ acc_t xs[kBK][kBM + 1];
  __shared__ acc_t ws[kBK][kBN + 1];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t m0 = blockIdx.y * int64_t(kBM), n0 = blockIdx.x * int64_t(kBN);
  const int half = 1 << (bits - 1);
  acc_t acc[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = acc_t(0);

  for (int64_t k0 = 0; k0 < D; k0 += kBK) {
    // Consecutive threads take consecutive k: coalesced x reads, shared packed words per row.
    for (int idx = tid; idx < kBM * kBK; idx += kTileThreads) {
      const int mm = idx / kBK, kk = idx % kBK;
      const int64_t m = m0 + mm, k = k0 + kk;
      xs[kk][mm] = (m < M && k < D) ? static_cast<acc_t>(x[m * D + k]) : acc_t(0);
    }
    for (int idx = tid; idx < kBN * kBK; idx += kTileThreads) {
      const int nn = idx / kBK, kk = idx % kBK;
      const int64_t n = n0 + nn, k = k0 + kk;
      acc_t w = acc_t(0);
      if (n < N && k < D)
        w = scales[n * ng + k / gs] * acc_t(int(extract_field(packed + n * W, k, bits)) - half);
      ws[kk][nn] = w;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kBK; ++kk) {
      acc_t a[4], b[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) a[r] = xs[kk][ty + 16 * r];
#pragma unroll
      for (int c = 0; c < 4; ++c) b[c] = ws[kk][tx + 16 * c];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] += a[r] * b[c];
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t m = m0 + ty + 16 * r;
    if (m >= M) continue;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t n = n0 + tx + 16 * c;
      if (n >= N) continue;
      acc_t v = acc[r][c];
      if (bias != nullptr) v += bias[n];
      y[m * N + n] = static_cast<scalar_t>(v);
    }
  }
}

at::Tensor dequant_matmul_cuda(const at::Tensor& x, const at::Tensor& packed_in,
                               const at::Tensor& scales_in, int64_t bits, int64_t group_size,
                               int64_t in_features, const std::optional<at::Tensor>& bias) {
  const auto d = check_dequant_matmul_args(x, packed_in, scales_in, bits, group_size, in_features,
                                           bias, /*check_values=*/false);
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor for the CUDA kernel");
  c10::cuda::CUDAGuard guard(x.device());
  const auto out_shape = dequant_matmul_out_shape(x, d.N);
  auto y = at::empty(out_shape, x.options());
  if (d.M == 0) return y;
  const auto acc = accum_dtype(x);
  const auto x2 = x.reshape({d.M, d.D}).contiguous();
  const auto packed = packed_in.contiguous();
  const auto scales = scales_in.to(acc).contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const auto b = has_bias ? bias->to(acc).contiguous() : at::Tensor();
  const uint32_t* pk = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int nbits = static_cast<int>(bits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dequant_matmul_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* bp = has_bias ? b.data_ptr<acc_t>() : nullptr;
    if (d.M <= kGemvMaxTokens) {
      const int64_t blocks = (d.N + kGemvWarps - 1) / kGemvWarps;
      gemv_kernel<scalar_t, acc_t><<<blocks, kGemvWarps * 32, 0, stream>>>(
          x2.data_ptr<scalar_t>(), pk, scales.data_ptr<acc_t>(), bp, y.data_ptr<scalar_t>(), d.M,
          d.N, d.D, d.W, d.gs, d.ng, nbits);
    } else {
      // Token tiles go on grid.y, at most 65535 of them per launch: longer inputs in chunks.
      const int64_t rows_per_launch = int64_t{65535} * kBM;
      for (int64_t m0 = 0; m0 < d.M; m0 += rows_per_launch) {
        const int64_t mc = std::min(rows_per_launch, d.M - m0);
        const dim3 grid((d.N + kBN - 1) / kBN, (mc + kBM - 1) / kBM);
        tiled_kernel<scalar_t, acc_t><<<grid, kTileThreads, 0, stream>>>(
            x2.data_ptr<scalar_t>() + m0 * d.D, pk, scales.data_ptr<acc_t>(), bp,
            y.data_ptr<scalar_t>() + m0 * d.N, mc, d.N, d.D, d.W, d.gs, d.ng, nbits);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(piso, CUDA, m) { m.impl("dequant_matmul", &dequant_matmul_cuda); }

}  // namespace piso
