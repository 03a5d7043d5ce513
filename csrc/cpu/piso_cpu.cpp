// PiSO on CPU: the sequential breakpoint sweep (ALGORITHM.md §2.5) and the CPU version of the
// event-parallel u kernel (§2.9(b), see piso_internal.h).
//
// Sequential sweep, per row: every positive breakpoint |w_i| / (k + 1/2) (fp64 key, exact order:
// fp64 division is monotone, equal keys are exact ties) becomes an event (i, delta = sign w_i); the
// events are sorted by key descending (ties by coordinate) and applied one by one while alpha =
// q^T lin and beta = q^T H q are kept up to date:
//     alpha += delta lin_i,   beta += 2 delta h_i + H_ii,   h += delta H[:, i]      (h = H q)
// After each event the interval (next key, key) has a constant q and a convex quadratic in s, whose
// clipped minimizer is a candidate (place_scale). Tie groups need no special handling: the
// intervals between equal keys have zero width and are skipped.
//
// Dense H costs O(d) per event for the h update; that is where the time goes (about
// 2^(b-1) d^2 additions per row). Events are processed in chunks of kChunk: inside a chunk the
// needed h_i come from the chunk formula  u_c = h_start[i_c] + sum_{c' < c} delta_c' H[i_c, i_c']
// (O(kChunk^2) gathers), and h is swept once per chunk with kChunk rows of H at a time, so h is
// loaded/stored d/kChunk times less often and the adds of kChunk rows are summed in registers.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "piso_internal.h"

namespace piso {
namespace detail {
namespace {

struct Event {
  double key;
  int32_t coord;
  int32_t delta;  // +1 / -1 (integer grid: one level per breakpoint)
};

// Breakpoints of one row, sorted by fp64 key descending, ties by coordinate ascending.
void build_events(const double* w, int64_t d, int64_t qmin, int64_t qmax, std::vector<Event>& ev) {
  ev.clear();
  for (int64_t i = 0; i < d; ++i) {
    const double wi = w[i];
    if (wi == 0.0) continue;
    const int64_t L = wi > 0 ? qmax : -qmin;
    const double a = std::abs(wi);
    const int32_t delta = wi > 0 ? 1 : -1;
    for (int64_t k = 0; k < L; ++k) ev.push_back({a / (static_cast<double>(k) + 0.5), int32_t(i), delta});
  }
  std::sort(ev.begin(), ev.end(), [](const Event& x, const Event& y) {
    return x.key > y.key || (x.key == y.key && x.coord < y.coord);
  });
}

constexpr int kChunk = 8;

// h[j] += sum_c delta[c] * rows[c][j] for kChunk rows (unused slots: delta 0 on a valid row).
// The hottest loop of the library on CPU; cloned for AVX-512 / AVX2 / baseline.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void add_rows8(
    double* __restrict h, const double* __restrict r0, const double* __restrict r1,
    const double* __restrict r2, const double* __restrict r3, const double* __restrict r4,
    const double* __restrict r5, const double* __restrict r6, const double* __restrict r7,
    const double* dl, int64_t d) {
  const double d0 = dl[0], d1 = dl[1], d2 = dl[2], d3 = dl[3], d4 = dl[4], d5 = dl[5], d6 = dl[6],
               d7 = dl[7];
  for (int64_t j = 0; j < d; ++j) {
    h[j] += ((d0 * r0[j] + d1 * r1[j]) + (d2 * r2[j] + d3 * r3[j])) +
            ((d4 * r4[j] + d5 * r5[j]) + (d6 * r6[j] + d7 * r7[j]));
  }
}

struct Best {
  double e = INFINITY, s = 0.0;
  bool found = false;
  void offer(double alpha, double beta, double upper, double lower, double eps, bool f32) {
    double s_c;
    if (!place_scale(alpha, beta, upper, lower, eps, f32, &s_c)) return;
    const double e_c = s_c * s_c * beta - 2.0 * s_c * alpha;
    if (e_c < e) {  // strict: among equal objectives the largest scale (first interval) wins
      e = e_c;
      s = s_c;
      found = true;
    }
  }
};

void sweep_row_dense(const double* w, const double* lin, const double* H, int64_t d, int64_t qmin,
                     int64_t qmax, double eps, bool f32, std::vector<Event>& ev,
                     std::vector<double>& h, Best& best) {
  build_events(w, d, qmin, qmax, ev);
  const int64_t T = static_cast<int64_t>(ev.size());
  h.assign(d, 0.0);
  double alpha = 0.0, beta = 0.0;
  for (int64_t c0 = 0; c0 < T; c0 += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, T - c0);
    const double* rows[kChunk];
    double dl[kChunk];
    for (int64_t c = 0; c < n; ++c) {
      const Event& e = ev[c0 + c];
      const int64_t i = e.coord;
      const double* Hi = H + i * d;
      // u = (H q_before)_i = h_start[i] + sum over the chunk's earlier events (H symmetric).
      double u = h[i];
      for (int64_t c2 = 0; c2 < c; ++c2) u += dl[c2] * Hi[ev[c0 + c2].coord];
      alpha += e.delta * lin[i];
      beta += 2.0 * e.delta * u + Hi[i];
      rows[c] = Hi;
      dl[c] = e.delta;
      const double lower = (c0 + c + 1 < T) ? ev[c0 + c + 1].key : 0.0;
      best.offer(alpha, beta, e.key, lower, eps, f32);
    }
    for (int64_t c = n; c < kChunk; ++c) {
      rows[c] = rows[0];
      dl[c] = 0.0;
    }
    if (c0 + n < T) {  // h is not needed after the last chunk
      add_rows8(h.data(), rows[0], rows[1], rows[2], rows[3], rows[4], rows[5], rows[6], rows[7], dl,
                d);
    }
  }
}

// Diagonal H (Hdiag == nullptr: identity): beta += H_ii ((q_i + delta)^2 - q_i^2), O(1) per event.
void sweep_row_diag(const double* w, const double* lin, const double* Hdiag, int64_t d, int64_t qmin,
                    int64_t qmax, double eps, bool f32, std::vector<Event>& ev,
                    std::vector<int32_t>& q, Best& best) {
  build_events(w, d, qmin, qmax, ev);
  const int64_t T = static_cast<int64_t>(ev.size());
  q.assign(d, 0);
  double alpha = 0.0, beta = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    const Event& e = ev[t];
    const int64_t i = e.coord;
    const double hii = Hdiag ? Hdiag[i] : 1.0;
    alpha += e.delta * lin[i];
    beta += hii * static_cast<double>(2 * q[i] * e.delta + 1);
    q[i] += e.delta;
    const double lower = (t + 1 < T) ? ev[t + 1].key : 0.0;
    best.offer(alpha, beta, e.key, lower, eps, f32);
  }
}

}  // namespace

SweepResult sweep_sequential_cpu(const at::Tensor& W, const at::Tensor& lin, const at::Tensor& H,
                                 int64_t qmin, int64_t qmax, double eps, bool f32) {
  TORCH_INTERNAL_ASSERT(W.device().is_cpu() && W.scalar_type() == at::kDouble && W.is_contiguous());
  TORCH_INTERNAL_ASSERT(lin.scalar_type() == at::kDouble && lin.is_contiguous());
  const int64_t R = W.size(0), d = W.size(1);
  auto scale = at::ones({R}, W.options());
  auto obj = at::zeros({R}, W.options());
  auto found = at::zeros({R}, W.options().dtype(at::kBool));
  const double* Wp = W.data_ptr<double>();
  const double* Lp = lin.data_ptr<double>();
  double* sp = scale.data_ptr<double>();
  double* op = obj.data_ptr<double>();
  bool* fp = found.data_ptr<bool>();
  const bool dense = H.defined() && H.dim() == 2;
  const double* Hp = H.defined() ? H.data_ptr<double>() : nullptr;
  if (dense) TORCH_INTERNAL_ASSERT(H.is_contiguous() && H.scalar_type() == at::kDouble);
  // Dense rows are heavy (O(2^(b-1) d^2)): one row per task; diagonal rows are cheap.
  const int64_t grain = dense ? 1 : std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    std::vector<Event> ev;
    ev.reserve(static_cast<size_t>(d) * std::max(qmax, -qmin));
    std::vector<double> h;
    std::vector<int32_t> q;
    for (int64_t r = r0; r < r1; ++r) {
      Best best;
      if (dense) {
        sweep_row_dense(Wp + r * d, Lp + r * d, Hp, d, qmin, qmax, eps, f32, ev, h, best);
      } else {
        sweep_row_diag(Wp + r * d, Lp + r * d, Hp, d, qmin, qmax, eps, f32, ev, q, best);
      }
      if (best.found) {
        sp[r] = best.s;
        op[r] = best.e;
        fp[r] = true;
      }
    }
  });
  return {scale, obj, found};
}

at::Tensor event_u_cpu(const at::Tensor& A, const at::Tensor& SL, const at::Tensor& H, int64_t Lmax) {
  TORCH_INTERNAL_ASSERT(A.is_contiguous() && SL.is_contiguous() && H.is_contiguous());
  const int64_t R = A.size(0), d = A.size(1);
  auto out = at::zeros({R, d, Lmax}, A.options());
  const double* Ap = A.data_ptr<double>();
  const int32_t* Sp = SL.data_ptr<int32_t>();
  const double* Hp = H.data_ptr<double>();
  double* op = out.data_ptr<double>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const double* a = Ap + r * d;
      const int32_t* sl = Sp + r * d;
      for (int64_t i = 0; i < d; ++i) {
        const int32_t Li = std::abs(sl[i]);
        const double* Hi = Hp + i * d;
        for (int32_t k = 0; k < Li; ++k) {
          const double sigma = a[i] / (static_cast<double>(k) + 0.5);
          double acc = 0.0;
          for (int64_t j = 0; j < d; ++j) {
            const int32_t Lj = std::abs(sl[j]);
            if (Lj == 0) continue;
            const double aj = a[j];
            // Count of breakpoints of j with key > sigma: estimate from aj / sigma, then fix it
            // with the exact keys (the same fp64 division as the sort keys).
            const double est = std::ceil(aj / sigma - 0.5);
            int32_t c = static_cast<int32_t>(std::min<double>(std::max(est, 0.0), Lj));
            while (c > 0 && !(aj / (static_cast<double>(c - 1) + 0.5) > sigma)) --c;
            while (c < Lj && aj / (static_cast<double>(c) + 0.5) > sigma) ++c;
            const int32_t ca = c + ((c < Lj && aj / (static_cast<double>(c) + 0.5) == sigma) ? 1 : 0);
            const double cnt = static_cast<double>(c + ca);
            acc += Hi[j] * (sl[j] > 0 ? cnt : -cnt);
          }
          op[(r * d + i) * Lmax + k] = acc;
        }
      }
    }
  });
  return out;
}

}  // namespace detail
}  // namespace piso
