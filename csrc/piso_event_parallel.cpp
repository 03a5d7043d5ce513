// The event-parallel PiSO sweep (ALGORITHM.md §2.9(b)): the GPU formulation, written once with
// device-agnostic ATen ops so that exactly this orchestration also runs (and is tested against the
// sequential sweep) on CPU. Only the O(2^(b-1) d^2) u computation is a backend kernel
// (event_u_cpu / event_u_cuda).
//
// No sequential dependency: every breakpoint event e = (r, i, k) with fp64 key sigma gets
//   dalpha_e = delta_e lin_i,   dbeta_e = delta_e ((H q_before)_i + (H q_after)_i)
// where q_before / q_after are the states with all keys > sigma / >= sigma applied (exact ties: one
// macro-event). Summed over a tie group, sum_e delta_e (u_before + u_after) = (q_a - q_b)^T H (q_a + q_b)
// = beta_after - beta_before (H symmetric), i.e. the macro-event formula of §2.7 without any
// within-group pair sum. fp64 prefix sums of dalpha, dbeta give alpha, beta after every event;
// candidates are evaluated only at the last event of each tie group (the other intervals have zero
// width), with the same place_scale steps as the sequential sweep, then argmin per row.
#include "piso_internal.h"

#include <cstdlib>
#include <limits>
#include <string>

namespace piso {
namespace detail {
namespace {

// place_scale (piso_internal.h) on tensors: returns (s, ok).
std::tuple<at::Tensor, at::Tensor> place_scale_t(const at::Tensor& alpha, const at::Tensor& beta,
                                                 const at::Tensor& upper, const at::Tensor& lower,
                                                 double eps, bool f32) {
  const auto width = upper - lower;
  auto ok = (beta > 0) & (width > 0) & (width > upper * eps);
  const auto lo_m = lower * (1.0 + kMargin);
  const auto hi_m = upper * (1.0 - kMargin);
  // beta <= 0 entries give inf/nan here; they are masked by ok.
  auto x = at::minimum(at::maximum(alpha / beta, lower + upper * eps), upper - upper * eps);
  x = at::minimum(at::maximum(x, lo_m), hi_m);
  const double inf = std::numeric_limits<double>::infinity();
  if (f32) {
    auto f = x.to(at::kFloat);
    auto fd = f.to(at::kDouble);
    auto up = at::nextafter(f, at::full_like(f, std::numeric_limits<float>::infinity()));
    auto down = at::nextafter(f, at::zeros_like(f));
    f = at::where(fd <= lo_m, up, at::where(fd >= hi_m, down, f));
    x = f.to(at::kDouble);
  } else {
    auto lo_n = at::nextafter(lo_m, at::full_like(lo_m, inf));
    auto hi_n = at::nextafter(hi_m, at::zeros_like(hi_m));
    x = at::minimum(at::maximum(x, lo_n), hi_n);
  }
  ok = ok & (x > lo_m) & (x < hi_m);
  return {x, ok};
}

}  // namespace

SweepResult sweep_event_parallel(const at::Tensor& W, const at::Tensor& lin, const at::Tensor& H,
                                 int64_t qmin, int64_t qmax, double eps, bool f32) {
  TORCH_INTERNAL_ASSERT(W.scalar_type() == at::kDouble && lin.scalar_type() == at::kDouble);
  const int64_t R = W.size(0), d = W.size(1);
  const int64_t Lmax = std::max(qmax, -qmin);
  const double inf = std::numeric_limits<double>::infinity();
  const auto dopt = W.options();

  const auto A = W.abs().contiguous();
  const auto pos = W > 0, neg = W < 0;
  // Signed breakpoint count per coordinate: sign(w) * (qmax or |qmin|), 0 for w == 0.
  const auto SL = (pos.to(at::kInt) * static_cast<int>(qmax) - neg.to(at::kInt) * static_cast<int>(-qmin))
                      .contiguous();
  const auto L = SL.abs().to(at::kDouble);

  // Keys [R, d, Lmax]: |w_i| / (k + 1/2) in fp64 (the same division the u kernels redo); absent
  // breakpoints get -inf and sort last.
  const auto k = at::arange(Lmax, dopt);
  auto keys = A.unsqueeze(-1) / (k + 0.5);
  keys = at::where(k.view({1, 1, Lmax}) < L.unsqueeze(-1), keys, -inf).reshape({R, d * Lmax});
  // Stable descending sort: equal keys keep index order (coordinate-major), like the sequential sweep.
  auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/1, /*descending=*/true);
  auto skey = std::get<0>(sorted);
  auto idx = std::get<1>(sorted);
  const int64_t T = L.sum(1).max().item<double>();
  if (T == 0) {
    return {at::ones({R}, dopt), at::zeros({R}, dopt), at::zeros({R}, dopt.dtype(at::kBool))};
  }
  skey = skey.narrow(1, 0, T);
  idx = idx.narrow(1, 0, T);
  const auto valid = skey > -inf;
  const auto coord = at::div(idx, Lmax, "floor");
  const auto level = idx - coord * Lmax;
  const auto delta = at::where(valid, W.sign().gather(1, coord), 0.0);

  const auto dalpha = delta * lin.gather(1, coord);
  at::Tensor dbeta;
  if (H.defined() && H.dim() == 2) {
#ifdef PISO_WITH_CUDA
    // PISO_CUDA_EVENT_U=counts selects the per-event count kernel also where the prefix one applies.
    const char* env = std::getenv("PISO_CUDA_EVENT_U");
    const bool counts_only = env != nullptr && std::string(env) == "counts";
    at::Tensor U;
    if (W.is_cuda() && Lmax <= 8 && d <= 65535 && !counts_only && event_u_prefix_fits(A, Lmax)) {
      U = event_u_prefix_cuda(A, SL, H, qmin, qmax);
    } else {
      const auto Hd = H.to(at::kDouble);  // the count kernels read float64 H
      U = W.is_cuda() ? event_u_cuda(A, SL, Hd, Lmax) : event_u_cpu(A, SL, Hd, Lmax);
    }
#else
    TORCH_CHECK(W.device().is_cpu(), "_piso_sweep: no event_u kernel for device ", W.device());
    auto U = event_u_cpu(A, SL, H.to(at::kDouble), Lmax);
#endif
    dbeta = delta * U.reshape({R, d * Lmax}).gather(1, idx);
  } else {
    // Diagonal: coordinate i goes from level k to k + 1 (in magnitude), beta += H_ii (2k + 1).
    auto hd = H.defined() ? H.gather(0, coord.reshape({-1})).reshape({R, T}) : at::ones({R, T}, dopt);
    dbeta = at::where(valid, hd * (2.0 * level.to(at::kDouble) + 1.0), 0.0);
  }
  const auto alpha = at::cumsum(dalpha, 1);
  const auto beta = at::cumsum(dbeta, 1);

  auto next = at::cat({skey.narrow(1, 1, T - 1), at::full({R, 1}, -inf, dopt)}, 1);
  const auto lower = at::where(next > -inf, next, 0.0);
  const auto last_of_group = valid & (next != skey);
  auto placed = place_scale_t(alpha, beta, skey, lower, eps, f32);
  auto s = std::get<0>(placed);
  auto ok = std::get<1>(placed) & last_of_group;
  auto E = at::where(ok, s * s * beta - 2.0 * s * alpha, inf);
  // argmin returns the first minimum: among equal objectives the largest scale, as sequentially.
  auto best = E.argmin(1, /*keepdim=*/true);
  auto found = ok.any(1);
  auto scale = at::where(found, s.gather(1, best).squeeze(1), 1.0);
  auto obj = at::where(found, E.gather(1, best).squeeze(1), 0.0);
  return {scale, obj, found};
}

}  // namespace detail
}  // namespace piso
