// CUDA kernel of the event-parallel PiSO sweep: the u values of every breakpoint event
// (contract in piso_internal.h, orchestration in piso_event_parallel.cpp; the CPU twin is
// event_u_cpu in csrc/cpu/piso_cpu.cpp, which is what the test suite checks on machines without GPU).
//
//   out[r, i, k] = sum_j H[i, j] * sign(w_rj) * (c_before(r, j; sigma) + c_after(r, j; sigma)),
//   sigma = fl64(|w_ri| / (k + 1/2)),  c_before = #{l < L_rj : fl64(|w_rj| / (l + 1/2)) > sigma},
//   c_after = c_before + [the next key of j equals sigma].
//
// Work layout: one thread block per (coordinate i, tile of RT rows); each thread owns one event
// (row r of the tile, level k) and loops over j. Why this shape:
// - H[i, :] is the only operand that is large (d^2 in total) and it is the same for every row and
//   every level of coordinate i, so it is staged through shared memory once per block and read as a
//   broadcast by all RT * Lmax events of the block (RT = 256 / Lmax rows: 2 rows at 8 bits, 32 at
//   4 bits, 128 at 2 bits), i.e. H traffic is divided by 256 compared with a per-event dot product.
// - Each thread owns a whole dot product, so no cross-thread reduction and no atomics (results are
//   deterministic); the per-element cost is the exact count (one fp64 division for the estimate plus
//   one or two for the exact key check), which is why the rows' |w| and counts are read from
//   global memory (L1/L2 resident; lanes of a warp share r when Lmax >= 32, so loads broadcast).
// - fp64 throughout: keys must be recomputed bit-identically to the sort keys (IEEE division is
//   correctly rounded on the GPU as on the CPU), and the sums feed fp64 prefix sums.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "piso_internal.h"

namespace piso {
namespace detail {
namespace {

constexpr int kThreads = 256;
constexpr int kHTile = 2048;  // doubles of H[i, :] staged per pass (16 KiB of shared memory)

__device__ __forceinline__ int count_above(double aj, int Lj, double sigma, int* after) {
  // Estimate #{l : aj / (l + 1/2) > sigma} ~ ceil(aj / sigma - 1/2), then correct it with the exact
  // fp64 keys (the estimate is off by at most one step near a breakpoint).
  double est = ceil(aj / sigma - 0.5);
  est = fmin(fmax(est, 0.0), static_cast<double>(Lj));
  int c = static_cast<int>(est);
  while (c > 0 && !(aj / (static_cast<double>(c - 1) + 0.5) > sigma)) --c;
  while (c < Lj && aj / (static_cast<double>(c) + 0.5) > sigma) ++c;
  *after = c + ((c < Lj && aj / (static_cast<double>(c) + 0.5) == sigma) ? 1 : 0);
  return c;
}

__global__ void event_u_kernel(const double* __restrict__ A, const int* __restrict__ SL,
                               const double* __restrict__ H, double* __restrict__ out, int64_t R,
                               int64_t d, int Lmax, int RT) {
  __shared__ double Hs[kHTile];
  const int64_t i = blockIdx.x % d;
  const int64_t r0 = (blockIdx.x / d) * RT;
  const int64_t n_ev = static_cast<int64_t>(RT) * Lmax;
  // Passes only when Lmax > kThreads (grids wider than 8 bits, allowed by detail::sweep).
  for (int64_t e0 = 0; e0 < n_ev; e0 += blockDim.x) {
    const int64_t e = e0 + threadIdx.x;
    const int64_t r = r0 + e / Lmax;
    const int k = static_cast<int>(e % Lmax);
    bool active = e < n_ev && r < R;
    double sigma = 0.0;
    const double* a = nullptr;
    const int* sl = nullptr;
    if (active) {
      a = A + r * d;
      sl = SL + r * d;
      const int Li = abs(sl[i]);
      active = k < Li;
      sigma = a[i] / (static_cast<double>(k) + 0.5);
    }
    double acc = 0.0;
    for (int64_t j0 = 0; j0 < d; j0 += kHTile) {
      const int64_t n = min(static_cast<int64_t>(kHTile), d - j0);
      __syncthreads();
      for (int64_t t = threadIdx.x; t < n; t += blockDim.x) Hs[t] = H[i * d + j0 + t];
      __syncthreads();
      if (active) {
        for (int64_t t = 0; t < n; ++t) {
          const int s = sl[j0 + t];
          if (s == 0) continue;
          int after;
          const int before = count_above(a[j0 + t], abs(s), sigma, &after);
          const double cnt = static_cast<double>(before + after);
          acc += Hs[t] * (s > 0 ? cnt : -cnt);
        }
      }
    }
    if (active) out[(r * d + i) * Lmax + k] = acc;
  }
}

}  // namespace

at::Tensor event_u_cuda(const at::Tensor& A, const at::Tensor& SL, const at::Tensor& H,
                        int64_t Lmax) {
  TORCH_INTERNAL_ASSERT(A.is_cuda() && SL.is_cuda() && H.is_cuda());
  TORCH_INTERNAL_ASSERT(A.scalar_type() == at::kDouble && SL.scalar_type() == at::kInt &&
                        H.scalar_type() == at::kDouble);
  c10::cuda::CUDAGuard guard(A.device());
  auto Ac = A.contiguous();
  auto Sc = SL.contiguous();
  auto Hc = H.contiguous();
  const int64_t R = Ac.size(0), d = Ac.size(1);
  auto out = at::zeros({R, d, Lmax}, Ac.options());
  if (R == 0 || d == 0) return out;
  const int RT = static_cast<int>(std::max<int64_t>(1, kThreads / Lmax));
  const int64_t tiles = (R + RT - 1) / RT;
  const int64_t blocks = tiles * d;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "_piso_sweep: too many events for one launch (", blocks,
              " blocks)");
  auto stream = at::cuda::getCurrentCUDAStream();
  event_u_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      Ac.data_ptr<double>(), Sc.data_ptr<int>(), Hc.data_ptr<double>(), out.data_ptr<double>(), R, d,
      static_cast<int>(Lmax), RT);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace detail
}  // namespace piso
