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
// Speed (dense H). The u_e cost O(d) each, 2^(b-1) d^2 additions per row with one row of H per event.
// Two ways to them, the cheaper chosen per layer (use_prefix_u):
// - prefix_u (4 Lmax^2 <= d, e.g. 4 bits from d = 256): coordinates sorted by |w|; the u value of
//   each event is a sum over levels of prefix sums of H's rows in that order, read from one pass of
//   n row additions (n d instead of 2^(b-1) n d) -- see prefix_u.
// - dense_u (wide grids on narrow layers): per-event updates, cache-blocked over the updating
//   coordinate: for each panel J of coordinates (H[J, :], ~512 KiB, stays in L2),
//     h_J = H[:, J] q_J,   u_e += h_J[i_e]  for every event e,   h_J += delta H[:, j]  for e in J,
//   walking all events in sweep order; H is read from memory once per row instead of 2^(b-1) times.
// Float32 H is kept as float32 (half the traffic) and widened exactly to fp64 in the adds; sums,
// alpha, beta are fp64. Events come from one sort of the coordinates by |w| and an Lmax-way merge of
// the per-level key lists (build_events).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

#include "piso_internal.h"

namespace piso {
namespace detail {
namespace {

// Per-thread scratch of one row.
struct Work {
  std::vector<double> key, dl, u, hblk;
  std::vector<int32_t> coord, lvl;
  std::vector<uint64_t> kb, kb2;  // build_events_radix
  std::vector<int32_t> co, co2;
  // Coordinates by |w| descending (ord, pos = inverse), their keys per level K_m[x] (keyl, n + 1
  // per level with a -inf sentinel), and prefix_u's pointers and accumulators.
  std::vector<int32_t> ord, pos, ptr;
  std::vector<double> keyl, accp, accn, U;
  struct Head {
    double key;
    int32_t coord, m, x;
  };
  std::vector<Head> heads;
  void reserve_events(size_t cap) {  // the per-event arrays both event builders fill
    if (key.size() >= cap) return;
    key.resize(cap);
    dl.resize(cap);
    u.resize(cap);
    coord.resize(cap);
    lvl.resize(cap);
  }
};

constexpr int kScanHeads = 16;

// Breakpoints of one row into wk.key / wk.coord / wk.lvl / wk.dl, sorted by fp64 key descending,
// ties by coordinate ascending. Returns their number.
// The coordinates are sorted by |w| once (n log n); level m's keys K_m[x] = fl(|w_ord[x]| / (m + 1/2))
// are then already in order (division by a constant is monotone), and the events are an Lmax-way
// merge of those lists (a binary heap of list heads): far fewer passes than sorting all n Lmax keys.
int64_t build_events(const double* w, int64_t d, int64_t qmin, int64_t qmax, Work& wk) {
  const int64_t Lpos = qmax, Lneg = -qmin, Lmax = std::max(Lpos, Lneg), Lmin = std::min(Lpos, Lneg);
  auto& ord = wk.ord;
  ord.clear();
  for (int64_t j = 0; j < d; ++j)
    if (w[j] != 0.0) ord.push_back(static_cast<int32_t>(j));
  const int64_t n = static_cast<int64_t>(ord.size());
  std::sort(ord.begin(), ord.end(), [w](int32_t x, int32_t y) {
    const double ax = std::abs(w[x]), ay = std::abs(w[y]);
    return ax > ay || (ax == ay && x < y);
  });
  wk.pos.resize(d);
  for (int64_t x = 0; x < n; ++x) wk.pos[ord[x]] = static_cast<int32_t>(x);
  const int64_t n1 = n + 1;
  wk.keyl.resize(static_cast<size_t>(Lmax * n1));
  for (int64_t m = 0; m < Lmax; ++m) {
    double* K = wk.keyl.data() + m * n1;
    const double half = static_cast<double>(m) + 0.5;
    for (int64_t x = 0; x < n; ++x) K[x] = std::abs(w[ord[x]]) / half;
    K[n] = -INFINITY;
  }
  wk.reserve_events(static_cast<size_t>(n * Lmax));
  if (n == 0) return 0;
  // Levels >= Lmin exist only for the sign with the longer grid side.
  const int big = Lneg > Lpos ? -1 : 1;
  auto has = [&](int64_t m, int64_t x) {
    return m < Lmin || (w[ord[x]] > 0 ? big > 0 : big < 0);
  };
  auto next_in = [&](int64_t m, int64_t x) {  // first x' >= x holding level m, or n
    while (x < n && !has(m, x)) ++x;
    return x;
  };
  int64_t T = 0;
  auto emit = [&](int64_t m, int64_t x) {
    const int32_t i = ord[x];
    wk.key[T] = wk.keyl[m * n1 + x];
    wk.coord[T] = i;
    wk.lvl[T] = static_cast<int32_t>(m);
    wk.dl[T] = w[i] > 0 ? 1.0 : -1.0;
    ++T;
  };
  if (Lmax <= kScanHeads) {
    // Few lists: the largest head by a branch-free scan (cheaper than a heap's unpredictable
    // branches); an exhausted list holds -inf.
    double hk[kScanHeads];
    int32_t hc[kScanHeads], hx[kScanHeads];
    int64_t total = 0;
    for (int64_t m = 0; m < Lmax; ++m) {
      const int64_t x = next_in(m, 0);
      hx[m] = static_cast<int32_t>(x);
      hk[m] = x < n ? wk.keyl[m * n1 + x] : -INFINITY;
      hc[m] = x < n ? ord[x] : INT32_MAX;
      for (int64_t y = x; y < n; ++y) total += has(m, y) ? 1 : 0;
    }
    for (int64_t e = 0; e < total; ++e) {
      int best = 0;
      for (int m = 1; m < Lmax; ++m) {
        const bool b = hk[m] > hk[best] || (hk[m] == hk[best] && hc[m] < hc[best]);
        best = b ? m : best;
      }
      emit(best, hx[best]);
      const int64_t x2 = next_in(best, hx[best] + 1);
      hx[best] = static_cast<int32_t>(x2);
      hk[best] = x2 < n ? wk.keyl[best * n1 + x2] : -INFINITY;
      hc[best] = x2 < n ? ord[x2] : INT32_MAX;
    }
    return T;
  }
  // Many lists: a binary heap of list heads; the top is the largest key, then the smallest coordinate.
  using Head = Work::Head;
  auto later = [](const Head& a, const Head& b) {
    return a.key < b.key || (a.key == b.key && a.coord > b.coord);
  };
  auto& heap = wk.heads;
  heap.clear();
  for (int64_t m = 0; m < Lmax; ++m) {
    const int64_t x = next_in(m, 0);
    if (x < n)
      heap.push_back({wk.keyl[m * n1 + x], ord[x], static_cast<int32_t>(m), static_cast<int32_t>(x)});
  }
  std::make_heap(heap.begin(), heap.end(), later);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    Head& h = heap.back();
    emit(h.m, h.x);
    const int64_t x2 = next_in(h.m, h.x + 1);
    if (x2 < n) {
      h = {wk.keyl[h.m * n1 + x2], ord[x2], h.m, static_cast<int32_t>(x2)};
      std::push_heap(heap.begin(), heap.end(), later);
    } else {
      heap.pop_back();
    }
  }
  return T;
}

// The same events as build_events (wk.key / wk.coord / wk.dl; not wk.lvl), by an LSD radix sort of
// all n Lmax keys (stable: ties keep coordinate order), without the sorted coordinate lists: faster where prefix_u (which needs
// those lists) is not used, i.e. on narrow layers and groups (measured at d = 128).
int64_t build_events_radix(const double* w, int64_t d, int64_t qmin, int64_t qmax, Work& wk) {
  const int64_t Lmax = std::max(qmax, -qmin);
  const size_t cap = static_cast<size_t>(d) * Lmax;
  wk.reserve_events(cap);
  if (wk.kb.size() < cap) {
    wk.kb.resize(cap);
    wk.kb2.resize(cap);
    wk.co.resize(cap);
    wk.co2.resize(cap);
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
      wk.co[T] = static_cast<int32_t>(i);  // levels are not needed on the paths that use this
      ++T;
    }
  }
  // LSD radix sort on the high 32 bits only (sign, exponent and 20 mantissa bits; 8-bit digits,
  // digits equal for all keys skipped), then an insertion pass that orders the rare runs of keys
  // sharing those bits by the full key. Stable throughout, so exact ties keep coordinate order.
  uint32_t hist[8][256];
  std::memset(hist, 0, sizeof hist);
  for (int64_t t = 0; t < T; ++t) {
    const uint64_t v = wk.kb[t];
    for (int b = 4; b < 8; ++b) ++hist[b][(v >> (8 * b)) & 255];
  }
  uint64_t* src = wk.kb.data();
  uint64_t* dst = wk.kb2.data();
  int32_t* csrc = wk.co.data();
  int32_t* cdst = wk.co2.data();
  for (int b = 4; b < 8 && T > 0; ++b) {
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
  for (int64_t t = 1; t < T; ++t) {
    const uint64_t v = src[t];
    if (!((src[t - 1] >> 32) == (v >> 32) && src[t - 1] > v)) continue;
    const int32_t c = csrc[t];
    int64_t j = t;
    for (; j > 0 && (src[j - 1] >> 32) == (v >> 32) && src[j - 1] > v; --j) {
      src[j] = src[j - 1];
      csrc[j] = csrc[j - 1];
    }
    src[j] = v;
    csrc[j] = c;
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

// Whether prefix_u is the cheaper way to the u values of a row: it costs n d additions plus about
// 4 n Lmax^2 pointer steps and reads, against 2^(b-1) d^2 for dense_u.
inline bool use_prefix_u(int64_t d, int64_t Lmax) { return d >= 512 && 16 * Lmax * Lmax <= d; }

// u values of every event (i, k) of one row, (H q_before)_i + (H q_after)_i (the contract of event_u
// in piso_internal.h), with n d additions instead of the sweep's 2^(b-1) n d.
//
// Order the n nonzero coordinates by |w| descending (position x = 0..n-1, a_x = |w_ord[x]|) and let
// K_m[x] = fl(a_x / (m + 1/2)): K_k[x] is the key of event (ord[x], k), and every K_m decreases in x
// (correctly rounded division is monotone). For event (i, k) at position s, sigma = K_k[s]:
//   q_before_j = sign(w_j) #{l < L_j : K_l[pos j] >  sigma},  q_after_j: the same with >=,
// and for a fixed level l the j counted form a prefix of the order, of length
//   p_gt(l, s, k) = #{x : K_l[x] > sigma}  (p_ge with >=),
// so (H q_before)_i = sum_l S_l(i, p_gt(l, s, k)) with S_l(i, p) = sum_{x < p} sign(w_ord[x]) H[i, ord[x]]
// (for l < min(qmax, -qmin) over both signs, for the extra level of the longer side over that sign).
// One pass over x keeps S(., x) for each sign as a vector (acc_pos / acc_neg += H[ord[x], :]; H is
// symmetric), and before each addition reads it for exactly the events whose prefix ends there:
// since sigma = K_k[s] decreases in s, p_gt(l, s, k) grows with s, so for every (l, k) a pointer over
// s advances while K_l[x] > K_k[s] fails. Comparisons are on the exact fp64 keys (ties included).
// Us[k][s] collects the u value of event (ord[s], k); the caller maps it back to event ids.
template <typename scalar_t>
void prefix_u(const double* w, const scalar_t* H, int64_t d, int64_t qmin, int64_t qmax, Work& wk) {
  const int64_t Lpos = qmax, Lneg = -qmin, Lmax = std::max(Lpos, Lneg), Lmin = std::min(Lpos, Lneg);
  const int big = Lneg > Lpos ? -1 : (Lpos > Lneg ? 1 : 0);  // sign with the extra levels, if any
  // ord, pos and keyl come from build_events.
  const auto& ord = wk.ord;
  const int64_t n = static_cast<int64_t>(ord.size());
  const int64_t n1 = n + 1;
  if (n == 0) return;
  wk.U.assign(static_cast<size_t>(Lmax * n), 0.0);
  wk.ptr.assign(static_cast<size_t>(2 * Lmax * Lmax), 0);
  wk.accp.assign(d, 0.0);
  wk.accn.assign(d, 0.0);
  double* accp = wk.accp.data();
  double* accn = wk.accn.data();
  const int32_t* o = ord.data();
  for (int64_t x = 0; x <= n; ++x) {
    for (int64_t l = 0; l < Lmax; ++l) {
      const double Kx = wk.keyl[l * n1 + x];
      const bool both = l < Lmin;
      for (int64_t k = 0; k < Lmax; ++k) {
        const double* sig = wk.keyl.data() + k * n1;
        double* us = wk.U.data() + k * n;
        int32_t* pp = wk.ptr.data() + 2 * (l * Lmax + k);
        int32_t pg = pp[0], pe = pp[1];
        if (pg < n && Kx > sig[pg] && pe == pg) continue;  // the common case: nothing ends here
        // Events whose ">" prefix (pg) and ">=" prefix (pe) at level l end at x. pe lags pg only
        // over exact ties (K_l[x'] == sigma), and p_ge grows with s, so one pass handles both: an
        // event strictly below K_l[x] with pe == pg ends both prefixes here (counted twice).
        auto val = [&](int32_t s_) {
          const int32_t i = o[s_];
          return both ? accp[i] - accn[i] : (big > 0 ? accp[i] : -accn[i]);
        };
        for (; pe < pg && !(Kx >= sig[pe]); ++pe) us[pe] += val(pe);
        for (; pg < n && !(Kx > sig[pg]); ++pg) {
          if (pe == pg && Kx < sig[pg]) {
            us[pg] += 2.0 * val(pg);
            ++pe;
          } else {
            us[pg] += val(pg);
          }
        }
        pp[0] = pg;
        pp[1] = pe;
      }
    }
    if (x < n) {
      const int32_t j = o[x];
      add_row(w[j] > 0 ? accp : accn, H + static_cast<int64_t>(j) * d, 1.0, d);  // H[j,:] = H[:,j]
    }
  }
}

struct Best {
  double e = INFINITY, s = 0.0;
  bool found = false;
  void offer(double alpha, double beta, double upper, double lower, double eps, bool f32) {
    // E >= -alpha^2 / beta on the whole interval: skip intervals that cannot win (with a slack far
    // above the rounding of E, so this never changes the result).
    // lb > e + slack, with lb = -alpha^2 / beta, multiplied through by beta > 0 (no division).
    if (found) {
      const double nb = alpha > 0 ? -alpha * alpha : 0.0;  // lb * beta
      if (nb > (e + 1e-12 * std::abs(e)) * beta + 1e-12 * std::abs(nb)) return;
    }
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
                     int64_t qmax, double eps, bool f32, int u_method, Work& wk, Best& best) {
  const bool prefix = u_method == 1 || (u_method == 0 && use_prefix_u(d, std::max(qmax, -qmin)));
  const int64_t T = prefix ? build_events(w, d, qmin, qmax, wk) : build_events_radix(w, d, qmin, qmax, wk);
  if (T == 0) return;
  double* u = wk.u.data();
  if (prefix) {
    // beta increment delta (u_before + u_after): per event equal to 2 delta u_before + H_ii, and over
    // a tie group it sums to the group's change of q^T H q (the macro-event rule, ALGORITHM.md §2.7);
    // candidates are only taken at the end of a tie group.
    prefix_u<scalar_t>(w, H, d, qmin, qmax, wk);
    const int64_t n = static_cast<int64_t>(wk.ord.size());
    for (int64_t t = 0; t < T; ++t) u[t] = wk.dl[t] * wk.U[wk.lvl[t] * n + wk.pos[wk.coord[t]]];
  } else {
    dense_u<scalar_t>(H, d, T, wk);
    for (int64_t t = 0; t < T; ++t) {  // u -> beta increment 2 delta u + H_ii, in place
      const int64_t i = wk.coord[t];
      u[t] = 2.0 * wk.dl[t] * u[t] + double(H[i * d + i]);
    }
  }
  select(lin, T, wk, u, eps, f32, best);
}

// Diagonal H (Hdiag == nullptr: identity): beta += H_ii ((q_i + delta)^2 - q_i^2) = H_ii (2k + 1)
// for the k-th breakpoint of coordinate i, O(1) per event.
void sweep_row_diag(const double* w, const double* lin, const double* Hdiag, int64_t d, int64_t qmin,
                    int64_t qmax, double eps, bool f32, Work& wk, std::vector<int32_t>& level,
                    Best& best) {
  const int64_t T = build_events_radix(w, d, qmin, qmax, wk);
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
                                 int64_t qmin, int64_t qmax, double eps, bool f32, int u_method) {
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
                               u_method, wk, best);
      } else if (dense) {
        sweep_row_dense<double>(Wp + r * d, Lp + r * d, H.data_ptr<double>(), d, qmin, qmax, eps,
                                f32, u_method, wk, best);
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
