// PiSO on CPU: the sequential breakpoint sweep (ALGORITHM.md §2.5) and the CPU version of the
// event-parallel u kernel (§2.9(b), see piso_internal.h).
//
// Sequential sweep, per row: every positive breakpoint |w_i| / (k + 1/2) (fp64 key, exact order:
// fp64 division is monotone, equal keys are exact ties) becomes an event (i, delta = sign w_i); the
// events are sorted by key descending (ties by coordinate) and applied one by one while alpha =
// q^T lin and beta = q^T H q are kept up to date:
//     alpha += delta lin_i,   beta += 2 delta u_e + H_ii,   u_e = (H q_before)_i
// After each event the interval (next key, key) has a constant q and a convex quadratic in s, whose
// clipped minimizer is a candidate (place_scale). Tie groups need no special handling: the
// intervals between equal keys have zero width and are skipped.
//
// Speed (dense H). The u_e cost O(d) each, 2^(b-1) d^2 additions per row, the time sink. The
// textbook form h += delta H[:, i] streams a whole row of H from memory per event (31 MB per row at
// d = 1024, 4 bits), so it runs at memory bandwidth. Here u is computed first, cache-blocked over
// the updating coordinate: for each panel J of coordinates (H[J, :], ~512 KiB, stays in L2),
//     h_J = H[:, J] q_J,   u_e += h_J[i_e]  for every event e,   h_J += delta H[:, j]  for e in J,
// walking all events in sweep order; H is read from memory once per row instead of 2^(b-1) times.
// Updates are applied one at a time: batching several rows per pass of h would need the pending
// rows' entries H[j_c, i] at every read, a cache miss per pending row on large layers (measured:
// 10x slower at d = 4096), while h itself stays in L1/L2 and the float->double conversion of H,
// not the h traffic, bounds the add loop.
// Float32 H is kept as float32 (half the traffic) and widened exactly to fp64 in the adds; h, u,
// alpha, beta are fp64. Events are sorted with an LSD radix sort on the fp64 key bits (stable, so
// ties keep coordinate order), several times faster than a comparison sort at these sizes.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "piso_internal.h"

namespace piso {
namespace detail {
namespace {

// Per-thread scratch of one row.
struct Work {
  std::vector<uint64_t> kb, kb2;
  std::vector<int32_t> co, co2;
  std::vector<double> key, dl, u, hblk;
  std::vector<int32_t> coord, bstart, blist;
};

// Breakpoints of one row into wk.key / wk.coord / wk.dl, sorted by fp64 key descending, ties by
// coordinate ascending. Returns their number.
int64_t build_events(const double* w, int64_t d, int64_t qmin, int64_t qmax, Work& wk) {
  const size_t cap = static_cast<size_t>(d) * std::max(qmax, -qmin);
  if (wk.kb.size() < cap) {
    wk.kb.resize(cap);
    wk.kb2.resize(cap);
    wk.co.resize(cap);
    wk.co2.resize(cap);
    wk.key.resize(cap);
    wk.dl.resize(cap);
    wk.u.resize(cap);
    wk.coord.resize(cap);
    wk.blist.resize(cap);
  }
  int64_t T = 0;
  for (int64_t i = 0; i < d; ++i) {
    const double wi = w[i];
    if (wi == 0.0) continue;
    const int64_t L = wi > 0 ? qmax : -qmin;
    const double a = std::abs(wi);
    for (int64_t k = 0; k < L; ++k) {
      const double key = a / (static_cast<double>(k) + 0.5);
      uint64_t bits;
      std::memcpy(&bits, &key, sizeof bits);
      wk.kb[T] = ~bits;  // positive doubles order like their bit patterns; ~ makes it descending
      wk.co[T] = static_cast<int32_t>(i);
      ++T;
    }
  }
  // LSD radix sort, 8-bit digits; digits equal for all keys (exponent bytes) are skipped.
  uint32_t hist[8][256];
  std::memset(hist, 0, sizeof hist);
  for (int64_t t = 0; t < T; ++t) {
    const uint64_t v = wk.kb[t];
    for (int b = 0; b < 8; ++b) ++hist[b][(v >> (8 * b)) & 255];
  }
  uint64_t* src = wk.kb.data();
  uint64_t* dst = wk.kb2.data();
  int32_t* csrc = wk.co.data();
  int32_t* cdst = wk.co2.data();
  for (int b = 0; b < 8 && T > 0; ++b) {
    if (hist[b][(src[0] >> (8 * b)) & 255] == static_cast<uint32_t>(T)) continue;
    uint32_t off[256];
    uint32_t acc = 0;
    for (int v = 0; v < 256; ++v) {
      off[v] = acc;
      acc += hist[b][v];
    }
    for (int64_t t = 0; t < T; ++t) {
      const uint32_t p = off[(src[t] >> (8 * b)) & 255]++;
      dst[p] = src[t];
      cdst[p] = csrc[t];
    }
    std::swap(src, dst);
    std::swap(csrc, cdst);
  }
  for (int64_t t = 0; t < T; ++t) {
    const uint64_t bits = ~src[t];
    std::memcpy(&wk.key[t], &bits, sizeof bits);
    wk.coord[t] = csrc[t];
    wk.dl[t] = w[csrc[t]] > 0 ? 1.0 : -1.0;
  }
  return T;
}

template <typename scalar_t>
__attribute__((always_inline)) inline void add_row_body(double* __restrict h,
                                                        const scalar_t* __restrict row, double dl,
                                                        int64_t n) {
  for (int64_t j = 0; j < n; ++j) h[j] += dl * double(row[j]);
}

// h[j] += dl * row[j]: the hottest loop of the library on CPU; cloned for AVX-512 / AVX2 / baseline.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void add_row(
    double* h, const float* row, double dl, int64_t n) {
  add_row_body<float>(h, row, dl, n);
}
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void add_row(
    double* h, const double* row, double dl, int64_t n) {
  add_row_body<double>(h, row, dl, n);
}

#ifndef PISO_PANEL_BYTES
#define PISO_PANEL_BYTES (512 * 1024)
#endif
constexpr int64_t kPanelBytes = PISO_PANEL_BYTES;

// u[t] = (H q_before(t))_{coord[t]} for all T sorted events, cache-blocked (see the file comment).
template <typename scalar_t>
void dense_u(const scalar_t* H, int64_t d, int64_t T, Work& wk) {
  // Panel H[J, :] of about 512 KiB: stays in L2 while all events walk past it.
  const int64_t B = std::min<int64_t>(
      d, std::max<int64_t>(8, kPanelBytes / (d * static_cast<int64_t>(sizeof(scalar_t)))));
  const int32_t* coord = wk.coord.data();
  const double* dl = wk.dl.data();
  double* u = wk.u.data();
  std::fill(u, u + T, 0.0);
  wk.hblk.resize(d);
  double* h = wk.hblk.data();
  for (int64_t J0 = 0; J0 < d; J0 += B) {
    const uint32_t nJ = static_cast<uint32_t>(std::min(B, d - J0));
    int64_t t0 = 0;  // before the first event of J, h_J = 0: nothing to read
    while (t0 < T && static_cast<uint32_t>(coord[t0] - J0) >= nJ) ++t0;
    if (t0 == T) continue;
    std::fill(h, h + d, 0.0);
    for (int64_t t = t0; t < T; ++t) {
      const int32_t i = coord[t];
      u[t] += h[i];  // (H_{:,J} q_J)_i, state strictly before event t
      if (static_cast<uint32_t>(i - J0) < nJ) {
        add_row(h, H + static_cast<int64_t>(i) * d, dl[t], d);  // H[i, :] = H[:, i] (symmetric)
      }
    }
  }
}

struct Best {
  double e = INFINITY, s = 0.0;
  bool found = false;
  void offer(double alpha, double beta, double upper, double lower, double eps, bool f32) {
    // E >= -alpha^2 / beta on the whole interval: skip intervals that cannot win (with a slack far
    // above the rounding of E, so this never changes the result).
    const double lb = alpha > 0 ? -alpha * (alpha / beta) : 0.0;
    if (found && lb > e + 1e-12 * (std::abs(lb) + std::abs(e))) return;
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

// Candidate pass over the sorted events, given du[t] = (beta increment of event t).
void select(const double* lin, int64_t T, const Work& wk, const double* dbeta, double eps, bool f32,
            Best& best) {
  double alpha = 0.0, beta = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    alpha += wk.dl[t] * lin[wk.coord[t]];
    beta += dbeta[t];
    const double upper = wk.key[t];
    const double lower = (t + 1 < T) ? wk.key[t + 1] : 0.0;
    if (lower == upper || !(beta > 0.0)) continue;  // zero-width (tie) or no curvature
    best.offer(alpha, beta, upper, lower, eps, f32);
  }
}

template <typename scalar_t>
void sweep_row_dense(const double* w, const double* lin, const scalar_t* H, int64_t d, int64_t qmin,
                     int64_t qmax, double eps, bool f32, Work& wk, Best& best) {
  const int64_t T = build_events(w, d, qmin, qmax, wk);
  if (T == 0) return;
  dense_u<scalar_t>(H, d, T, wk);
  double* u = wk.u.data();
  for (int64_t t = 0; t < T; ++t) {  // u -> beta increment 2 delta u + H_ii, in place
    const int64_t i = wk.coord[t];
    u[t] = 2.0 * wk.dl[t] * u[t] + double(H[i * d + i]);
  }
  select(lin, T, wk, u, eps, f32, best);
}

// Diagonal H (Hdiag == nullptr: identity): beta += H_ii ((q_i + delta)^2 - q_i^2) = H_ii (2k + 1)
// for the k-th breakpoint of coordinate i, O(1) per event.
void sweep_row_diag(const double* w, const double* lin, const double* Hdiag, int64_t d, int64_t qmin,
                    int64_t qmax, double eps, bool f32, Work& wk, std::vector<int32_t>& level,
                    Best& best) {
  const int64_t T = build_events(w, d, qmin, qmax, wk);
  if (T == 0) return;
  level.assign(d, 0);
  double* db = wk.u.data();
  for (int64_t t = 0; t < T; ++t) {
    const int32_t i = wk.coord[t];
    const double hii = Hdiag ? Hdiag[i] : 1.0;
    db[t] = hii * static_cast<double>(2 * level[i] + 1);
    ++level[i];
  }
  select(lin, T, wk, db, eps, f32, best);
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
  if (dense) TORCH_INTERNAL_ASSERT(H.is_contiguous());
  const bool h32 = dense && H.scalar_type() == at::kFloat;
  TORCH_INTERNAL_ASSERT(!H.defined() || h32 || H.scalar_type() == at::kDouble);
  // Dense rows are heavy (O(2^(b-1) d^2)): one row per task; diagonal rows are cheap.
  const int64_t grain = dense ? 1 : std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    Work wk;
    std::vector<int32_t> level;
    for (int64_t r = r0; r < r1; ++r) {
      Best best;
      if (h32) {
        sweep_row_dense<float>(Wp + r * d, Lp + r * d, H.data_ptr<float>(), d, qmin, qmax, eps, f32,
                               wk, best);
      } else if (dense) {
        sweep_row_dense<double>(Wp + r * d, Lp + r * d, H.data_ptr<double>(), d, qmin, qmax, eps,
                                f32, wk, best);
      } else {
        sweep_row_diag(Wp + r * d, Lp + r * d, H.defined() ? H.data_ptr<double>() : nullptr, d, qmin,
                       qmax, eps, f32, wk, level, best);
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
