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
#include <ATen/Dispatch.h>

#include <climits>

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
          // Explicit roundings: no fused multiply-add, the same sum as the CPU twin (event_u_cpu).
          acc = __dadd_rn(acc, __dmul_rn(Hs[t], s > 0 ? cnt : -cnt));
        }
      }
    }
    if (active) out[(r * d + i) * Lmax + k] = acc;
  }
}

// ------------------------------------------------------------------------------------------------
// Prefix formulation (the CUDA twin of prefix_u in csrc/cpu/piso_cpu.cpp, whose comment derives it):
// with the row's coordinates ordered by |w| descending and K_l[x] = fl(|w_ord[x]| / (l + 1/2)),
//   out[r, i, k] = sum_l S_l(i, p_gt(l)) + S_l(i, p_ge(l)),  S_l(i, p) = sum_{x < p} sign_x H[i, ord[x]],
// p_gt(l) = #{x : K_l[x] > sigma}, p_ge with >=, sigma = K_k[pos(i)]; S_l over both signs for
// l < Lmin and over the longer grid side's sign above. Two kernels:
// - positions: one thread per (row, event level k, stream level l) merges the (decreasing) event
//   keys of level k against K_l: P[r, k, s, 2 l + {0: gt, 1: ge}], exact fp64 comparisons;
// - stream: one thread per (row, column i), 256 columns per block; the block walks x = 0..n, adding
//   H[ord[x], i] (coalesced over i; ord staged in shared memory) to acc_pos or acc_neg, and reads
//   the accumulators whenever x reaches one of the column's 2 Lmax positions per level k. For each
//   k those positions are non-decreasing in the order (gt, ge) of l = Lmax-1 down to 0 (p_ge(l) <=
//   p_gt(l - 1) since K_{l-1} > K_l), so one pointer per k suffices; the k loop is unrolled
//   (kPrefixMaxL = 8: grids up to 4 bits) so pointers and sums stay in registers.
// Work: n d additions per row (the whole of H is read once per row, float32 H as float32), against
// 2^(b-1) n d exact counts for event_u_kernel; no divisions in either kernel.
constexpr int kPrefixMaxL = 8;
constexpr int kStreamThreads = 256;
constexpr int kOrdChunk = 2048;

__global__ void prefix_positions_kernel(const double* __restrict__ Ks, int32_t* __restrict__ P,
                                        int64_t R, int64_t d, int Lmax) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= R * Lmax * Lmax) return;
  const int l = static_cast<int>(tid % Lmax);
  const int k = static_cast<int>((tid / Lmax) % Lmax);
  const int64_t r = tid / (static_cast<int64_t>(Lmax) * Lmax);
  const double* Kk = Ks + (r * Lmax + k) * d;
  const double* Kl = Ks + (r * Lmax + l) * d;
  int32_t* out = P + (r * Lmax + k) * d * (2 * Lmax) + 2 * l;
  int64_t pg = 0, pe = 0;
  for (int64_t s = 0; s < d; ++s) {
    const double sigma = Kk[s];
    if (!(sigma > 0.0)) break;  // zero weights sort last and have no events
    while (pg < d && Kl[pg] > sigma) ++pg;
    if (pe < pg) pe = pg;
    while (pe < d && Kl[pe] >= sigma) ++pe;
    out[s * 2 * Lmax] = static_cast<int32_t>(pg);
    out[s * 2 * Lmax + 1] = static_cast<int32_t>(pe);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kStreamThreads)
prefix_stream_kernel(const int32_t* __restrict__ enc, const int32_t* __restrict__ pos,
                     const int32_t* __restrict__ SL, const int32_t* __restrict__ nnz,
                     const int32_t* __restrict__ P, const scalar_t* __restrict__ H,
                     double* __restrict__ out, int64_t d, int64_t tiles, int Lmax, int Lmin,
                     int big) {
  __shared__ int32_t js[kOrdChunk];
  // This block's positions, [k][q][thread] as uint16 (d <= 65535): fires read shared memory, not
  // global memory (a dependent global load per fire stalls the whole warp; measured 7x slower).
  extern __shared__ uint16_t Ps[];  // Lmax * 2 Lmax * kStreamThreads entries (dynamic)
  const int64_t r = blockIdx.x / tiles;
  const int64_t i = (blockIdx.x % tiles) * kStreamThreads + threadIdx.x;
  const int nq = 2 * Lmax;
  int Li = 0;
  if (i < d) {
    Li = abs(SL[r * d + i]);
    const int32_t* Pi = P + (r * Lmax * d + pos[r * d + i]) * (2 * Lmax);  // + k d 2 Lmax + 2 l + b
    for (int k = 0; k < Li; ++k)
      for (int qq = 0; qq < nq; ++qq)  // q-th position of level k: l = Lmax - 1 - q / 2, b = q % 2
        Ps[(k * nq + qq) * kStreamThreads + threadIdx.x] = static_cast<uint16_t>(
            Pi[k * d * 2 * Lmax + 2 * (Lmax - 1 - qq / 2) + (qq & 1)]);
  }
  auto fetch = [&](int k, int qq) -> int {
    return qq < nq ? static_cast<int>(Ps[(k * nq + qq) * kStreamThreads + threadIdx.x]) : INT_MAX;
  };
  double U[kPrefixMaxL];
  int q[kPrefixMaxL], np[kPrefixMaxL];
  int minp = INT_MAX;
#pragma unroll
  for (int k = 0; k < kPrefixMaxL; ++k) {
    U[k] = 0.0;
    q[k] = 0;
    np[k] = k < Li ? fetch(k, 0) : INT_MAX;
    minp = min(minp, np[k]);
  }
  double accp = 0.0, accn = 0.0;
  // Reads the accumulators for every position of this column equal to x (acc = S(., x) here).
  auto fire = [&](int64_t x) {
    minp = INT_MAX;
#pragma unroll
    for (int k = 0; k < kPrefixMaxL; ++k) {
      while (np[k] == x) {
        const int l = Lmax - 1 - q[k] / 2;
        U[k] += l < Lmin ? accp - accn : (big > 0 ? accp : -accn);
        np[k] = fetch(k, ++q[k]);
      }
      minp = min(minp, np[k]);
    }
  };
  const int64_t n = nnz[r];
  const int32_t* encr = enc + r * d;
  constexpr int kU = 8;  // rows of H in flight per thread
  for (int64_t x0 = 0; x0 < n; x0 += kOrdChunk) {
    const int64_t m = min(static_cast<int64_t>(kOrdChunk), n - x0);
    __syncthreads();
    for (int64_t t = threadIdx.x; t < m; t += kStreamThreads) js[t] = encr[x0 + t];
    __syncthreads();
    if (Li == 0) continue;
    for (int64_t t = 0; t < m; t += kU) {
      int32_t e[kU];
      double h[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (t + u < m) {
          e[u] = js[t + u];
          h[u] = static_cast<double>(H[static_cast<int64_t>(e[u] >= 0 ? e[u] : ~e[u]) * d + i]);
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (t + u < m) {
          if (x0 + t + u == minp) fire(x0 + t + u);
          if (e[u] >= 0) accp += h[u]; else accn += h[u];
        }
      }
    }
  }
  if (Li > 0 && minp == n) fire(n);  // prefixes of full length
  if (i < d) {
#pragma unroll
    for (int k = 0; k < kPrefixMaxL; ++k)
      if (k < Li) out[(r * d + i) * Lmax + k] = U[k];
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

namespace piso {
namespace detail {

// Dynamic (staged positions) plus static (the ord chunk) shared memory of prefix_stream_kernel.
static size_t prefix_stream_smem(int64_t Lmax) {
  return static_cast<size_t>(Lmax * 2 * Lmax * kStreamThreads) * sizeof(uint16_t);
}

bool event_u_prefix_fits(const at::Tensor& A, int64_t Lmax) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        A.device().index()));
  return prefix_stream_smem(Lmax) + kOrdChunk * sizeof(int32_t) <= static_cast<size_t>(optin);
}

at::Tensor event_u_prefix_cuda(const at::Tensor& A, const at::Tensor& SL, const at::Tensor& H,
                               int64_t qmin, int64_t qmax) {
  TORCH_INTERNAL_ASSERT(A.is_cuda() && SL.is_cuda() && H.is_cuda());
  TORCH_INTERNAL_ASSERT(A.scalar_type() == at::kDouble && SL.scalar_type() == at::kInt);
  TORCH_INTERNAL_ASSERT(H.scalar_type() == at::kDouble || H.scalar_type() == at::kFloat);
  const int64_t Lpos = qmax, Lneg = -qmin, Lmax = std::max(Lpos, Lneg), Lmin = std::min(Lpos, Lneg);
  TORCH_INTERNAL_ASSERT(Lmax <= kPrefixMaxL);
  TORCH_INTERNAL_ASSERT(A.size(1) <= 65535);  // positions staged as uint16
  const int big = Lneg > Lpos ? -1 : 1;
  c10::cuda::CUDAGuard guard(A.device());
  const auto Ac = A.contiguous();
  const auto Sc = SL.contiguous();
  const auto Hc = H.contiguous();
  const int64_t R = Ac.size(0), d = Ac.size(1);
  auto out = at::zeros({R, d, Lmax}, Ac.options());
  if (R == 0 || d == 0) return out;
  TORCH_CHECK(d < (int64_t(1) << 30), "_piso_sweep: d too large for the CUDA prefix kernel");
  // |w| descending, ties by coordinate (stable), zeros last.
  auto sorted = at::sort(Ac, /*stable=*/true, /*dim=*/1, /*descending=*/true);
  const auto as = std::get<0>(sorted);
  const auto ord = std::get<1>(sorted);
  const auto ord32 = ord.to(at::kInt);
  const auto enc = at::where(Sc.gather(1, ord) > 0, ord32, -ord32 - 1).contiguous();  // ~j: negative
  auto pos = at::empty({R, d}, Sc.options());
  pos.scatter_(1, ord, at::arange(d, Sc.options()).expand({R, d}));
  const auto nnz = (Ac > 0).sum(1).to(at::kInt).contiguous();
  const auto half = at::arange(Lmax, Ac.options()).add_(0.5).view({1, Lmax, 1});
  const auto Ks = (as.unsqueeze(1) / half).contiguous();  // [R, Lmax, d], the sort keys' division
  // zeros: the merge stops at a key that underflowed to 0 (|w| of a few denormal ulps), leaving
  // the rest of that row's positions unwritten.
  auto P = at::zeros({R, Lmax, d, 2 * Lmax}, Sc.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  {
    const int64_t threads = R * Lmax * Lmax;
    const int bs = 128;
    prefix_positions_kernel<<<static_cast<unsigned>((threads + bs - 1) / bs), bs, 0, stream>>>(
        Ks.data_ptr<double>(), P.data_ptr<int32_t>(), R, d, static_cast<int>(Lmax));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t tiles = (d + kStreamThreads - 1) / kStreamThreads;
  TORCH_CHECK(R * tiles < (int64_t(1) << 31), "_piso_sweep: too many rows for one launch");
  const size_t smem = prefix_stream_smem(Lmax);
  AT_DISPATCH_FLOATING_TYPES(Hc.scalar_type(), "prefix_stream", [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(prefix_stream_kernel<scalar_t>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    prefix_stream_kernel<scalar_t><<<static_cast<unsigned>(R * tiles), kStreamThreads, smem, stream>>>(
        enc.data_ptr<int32_t>(), pos.data_ptr<int32_t>(), Sc.data_ptr<int32_t>(),
        nnz.data_ptr<int32_t>(), P.data_ptr<int32_t>(), Hc.data_ptr<scalar_t>(),
        out.data_ptr<double>(), d, tiles, static_cast<int>(Lmax), static_cast<int>(Lmin), big);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace detail
}  // namespace piso
