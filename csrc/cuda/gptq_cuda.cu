// CUDA kernel of the GPTQ/Qronos column loop inside one lazy-batch block (see csrc/gptq.h); a
// line-by-line mirror of csrc/cpu/gptq_cpu.cpp, which is the tested logic.
//
// Layout: one warp per row (8 rows per CUDA block). For column i every lane computes the same
// q / err from W[r, i] (a broadcast load); the lanes then update the row's remaining block columns
// j in (i, i2) with consecutive j per lane (coalesced). U[i, i+1:i2) is staged in shared memory once
// per CUDA block and shared by its 8 rows. Products are rounded explicitly (no FMA contraction) so
// every operation rounds as on the CPU.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "gptq.h"

namespace piso {
namespace detail {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kChunk = 1024;  // U elements staged in shared memory at a time

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

template <typename T>
__global__ void columns_kernel(T* __restrict__ W, const T* __restrict__ U, T* __restrict__ Err,
                               int8_t* __restrict__ codes, const double* __restrict__ scales,
                               const int64_t* __restrict__ col_group, double* __restrict__ row_loss,
                               int64_t N, int64_t D, int64_t E, int64_t G, int64_t c0, int64_t c1,
                               int64_t i1, int64_t i2, double qmin, double qmax) {
  __shared__ T Us[kChunk];
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const bool active = r < N;  // inactive warps still take part in every __syncthreads
  T* w = W + (active ? r : 0) * D;
  double loss = 0.0;
  for (int64_t i = c0; i < c1; ++i) {
    T err = T(0);
    if (active) {
      const double s = scales[r * G + col_group[i]];
      const T wi = w[i];
      const double q = fmin(qmax, fmax(qmin, rint(static_cast<double>(wi) / s)));
      const T deq = static_cast<T>(s * q);
      err = sub_rn(wi, deq) / U[i * D + i];
      __syncwarp();  // every lane has read w[i] before lane 0 overwrites it
      if (lane == 0) {
        w[i] = deq;
        codes[r * D + i] = static_cast<int8_t>(q);
        Err[r * E + (i - i1)] = err;
        loss += static_cast<double>(err) * static_cast<double>(err);
      }
    }
    for (int64_t j0 = i + 1; j0 < i2; j0 += kChunk) {
      const int64_t n = (i2 - j0) < kChunk ? (i2 - j0) : kChunk;
      __syncthreads();
      for (int64_t t = threadIdx.x; t < n; t += blockDim.x) Us[t] = U[i * D + j0 + t];
      __syncthreads();
      if (active) {
        for (int64_t t = lane; t < n; t += 32) w[j0 + t] = sub_rn(w[j0 + t], mul_rn(err, Us[t]));
      }
    }
    __syncwarp();  // the next column's value, written by some lane, is visible to all lanes
  }
  if (active && lane == 0) row_loss[r] += loss;
}

}  // namespace

void gptq_columns_cuda(const ColumnSweepArgs& a) {
  TORCH_CHECK(a.W.is_cuda(), "gptq_columns_cuda: expected CUDA tensors");
  TORCH_INTERNAL_ASSERT(!a.left, "gptq_columns_cuda: the left-looking form is CPU-only");
  c10::cuda::CUDAGuard guard(a.W.device());
  const int64_t N = a.W.size(0), D = a.W.size(1), E = a.Err.size(1), G = a.scales.size(1);
  if (N == 0 || a.c1 <= a.c0) return;
  const dim3 block(32 * kWarpsPerBlock);
  const dim3 grid(static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock));
  auto stream = at::cuda::getCurrentCUDAStream();
  const double qmin = static_cast<double>(a.qmin), qmax = static_cast<double>(a.qmax);
  if (a.W.scalar_type() == at::kDouble) {
    columns_kernel<double><<<grid, block, 0, stream>>>(
        a.W.data_ptr<double>(), a.U.data_ptr<double>(), a.Err.data_ptr<double>(),
        a.codes.data_ptr<int8_t>(), a.scales.data_ptr<double>(), a.col_group.data_ptr<int64_t>(),
        a.row_loss.data_ptr<double>(), N, D, E, G, a.c0, a.c1, a.i1, a.i2, qmin, qmax);
  } else {
    TORCH_CHECK(a.W.scalar_type() == at::kFloat, "gptq_columns_cuda: expected float32/float64 work");
    columns_kernel<float><<<grid, block, 0, stream>>>(
        a.W.data_ptr<float>(), a.U.data_ptr<float>(), a.Err.data_ptr<float>(),
        a.codes.data_ptr<int8_t>(), a.scales.data_ptr<double>(), a.col_group.data_ptr<int64_t>(),
        a.row_loss.data_ptr<double>(), N, D, E, G, a.c0, a.c1, a.i1, a.i2, qmin, qmax);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace detail
}  // namespace piso
