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
// Three ways to them, the cheapest chosen per layer (choose_u_method):
// - prefix_u: the u value of each event is a sum over levels of prefix sums of H's rows, taken over
//   the coordinates sorted by |w|; one pass of n row additions (n d instead of 2^(b-1) n d) serves
//   every event from contiguous ranges of the event order -- see prefix_u. On wide rows the row
//   additions go eight at a time (prefix_batched).
// - dense_u (wide grids on narrow layers): per-event updates, cache-blocked over the updating
//   coordinate: for each panel J of coordinates (H[J, :], ~512 KiB, stays in L2),
//     h_J = H[:, J] q_J,   u_e += h_J[i_e]  for every event e,   h_J += delta H[:, j]  for e in J,
//   walking all events in sweep order; H is read from memory once per row instead of 2^(b-1) times.
// - table_u (4- to 6-bit grids on rows of a few hundred, e.g. group-size rows): prefix_u's sums
//   stored as whole tables (in L2 at that width) and read per event, no range bookkeeping.
// Float32 H is kept as float32 (half the traffic) and widened exactly to fp64 in the adds; sums,
// alpha, beta are fp64. Events come from one radix sort of their fp64 keys (build_events).
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
  std::vector<double> key, dl, u, hblk, al, be;
  std::vector<int32_t> coord, lvl;
  std::vector<uint64_t> kb, kb2;  // build_events' radix sort
  std::vector<int32_t> co, co2;
  // prefix_u: coordinates by |w| descending (ord, pos = inverse), the per-level lists (A, B, X,
  // Lmax * d each, see prefix_u), the open tie group (mem) and the accumulators.
  std::vector<int32_t> ord, pos, A, B, X, mem;
  std::vector<double> accp, accn;
  std::vector<double> tab;  // table_u's prefix tables
  void reserve_events(size_t cap) {  // the per-event arrays build_events fills
    if (key.size() >= cap) return;
    key.resize(cap);
    dl.resize(cap);
    u.resize(cap);
    coord.resize(cap);
    lvl.resize(cap);
  }
};

// Breakpoints of one row into wk.key / wk.coord / wk.dl (and wk.lvl if `levels`), sorted by fp64
// key descending, ties by coordinate ascending. Returns their number T. An LSD radix sort of all
// n Lmax keys (stable: ties keep coordinate order) on the keys' high 32 bits, then an exact
// insertion pass. With `levels` the level rides in the payload's low 7 bits (Lmax <= 128, d < 2^25).
int64_t build_events(const double* w, int64_t d, int64_t qmin, int64_t qmax, bool levels, Work& wk) {
  const int64_t Lmax = std::max(qmax, -qmin);
  const int shift = levels ? 7 : 0;
  TORCH_INTERNAL_ASSERT(!levels || (Lmax <= 128 && d < (int64_t{1} << 24)));
  const size_t cap = static_cast<size_t>(d) * Lmax + Lmax;  // + Lmax: the last coordinate's spill
  wk.reserve_events(cap);
  if (wk.kb.size() < cap) {
    wk.kb.resize(cap);
    wk.kb2.resize(cap);
    wk.co.resize(cap);
    wk.co2.resize(cap);
  }
  // Keys coordinate by coordinate (so that the stable sort keeps exact ties in coordinate order),
  // branch-free: every coordinate writes Lmax keys and keeps its first L (0 for w = 0, else qmax or
  // -qmin by sign); the next coordinate overwrites the rest.
  const int64_t Lpos = qmax, Lneg = -qmin;
  uint64_t* kb = wk.kb.data();
  int32_t* co = wk.co.data();
  int64_t T = 0;
  for (int64_t i = 0; i < d; ++i) {
    const double wi = w[i];
    const double a = std::abs(wi);
    const int64_t L = a == 0.0 ? 0 : (wi > 0.0 ? Lpos : Lneg);
    for (int64_t k = 0; k < Lmax; ++k) {
      const double key = a / (static_cast<double>(k) + 0.5);
      uint64_t bits;
      std::memcpy(&bits, &key, sizeof bits);
      kb[T + k] = ~bits;  // positive doubles order like their bit patterns; ~ makes it descending
      co[T + k] = static_cast<int32_t>((i << shift) | (levels ? k : 0));
    }
    T += L;
  }
  if (T == 0) return 0;
  // LSD radix sort (stable, 8-bit digits) on the 24 bits from the highest bit in which any two keys
  // differ, then an insertion pass that orders the rare runs of keys agreeing in those bits by the
  // full key, and exact ties by coordinate (the payload orders like the coordinate).
  uint64_t diff = 0;
  for (int64_t t = 0; t < T; ++t) diff |= kb[t] ^ kb[0];
  const int hb = diff ? 63 - __builtin_clzll(diff) : -1;
  const int lo = std::max(0, hb + 1 - 24);
  const int nd = hb < 0 ? 0 : (hb - lo) / 8 + 1;
  uint32_t hist[3][256];
  std::memset(hist, 0, sizeof hist);
  for (int64_t t = 0; t < T; ++t) {
    const uint64_t v = kb[t] >> lo;
    for (int b = 0; b < nd; ++b) ++hist[b][(v >> (8 * b)) & 255];
  }
  uint64_t* src = kb;
  uint64_t* dst = wk.kb2.data();
  int32_t* csrc = co;
  int32_t* cdst = wk.co2.data();
  for (int b = 0; b < nd; ++b) {
    const int sh = lo + 8 * b;
    if (hist[b][(src[0] >> sh) & 255] == static_cast<uint32_t>(T)) continue;
    uint32_t off[256];
    uint32_t acc = 0;
    for (int v = 0; v < 256; ++v) {
      off[v] = acc;
      acc += hist[b][v];
    }
    for (int64_t t = 0; t < T; ++t) {
      const uint32_t p = off[(src[t] >> sh) & 255]++;
      dst[p] = src[t];
      cdst[p] = csrc[t];
    }
    std::swap(src, dst);
    std::swap(csrc, cdst);
  }
  auto before = [&](int64_t j, uint64_t v, int32_t c) {  // element j belongs after (v, c)
    return (src[j] >> lo) == (v >> lo) && (src[j] > v || (src[j] == v && csrc[j] > c));
  };
  for (int64_t t = 1; t < T; ++t) {
    const uint64_t v = src[t];
    const int32_t c = csrc[t];
    if (!before(t - 1, v, c)) continue;
    int64_t j = t;
    for (; j > 0 && before(j - 1, v, c); --j) {
      src[j] = src[j - 1];
      csrc[j] = csrc[j - 1];
    }
    src[j] = v;
    csrc[j] = c;
  }
  for (int64_t t = 0; t < T; ++t) {
    const uint64_t bits = ~src[t];
    std::memcpy(&wk.key[t], &bits, sizeof bits);
    const int32_t c = csrc[t] >> shift;
    wk.coord[t] = c;
    if (levels) wk.lvl[t] = csrc[t] & 127;
    wk.dl[t] = std::copysign(1.0, w[c]);
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

template <typename scalar_t>
__attribute__((always_inline)) inline void next_row_body(double* __restrict dst,
                                                         const double* __restrict src,
                                                         const scalar_t* __restrict row, double dl,
                                                         int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = src[j] + dl * double(row[j]);
}

// dst[j] = src[j] + dl * row[j]: the next row of table_u's prefix tables.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void next_row(
    double* dst, const double* src, const float* row, double dl, int64_t n) {
  next_row_body<float>(dst, src, row, dl, n);
}
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void next_row(
    double* dst, const double* src, const double* row, double dl, int64_t n) {
  next_row_body<double>(dst, src, row, dl, n);
}

// h[j] += rows[0][j] + ... + rows[count - 1][j] (count <= kPrefixBatch): prefix_u's pass, one
// load and store of h per batch of rows.
constexpr int kPrefixBatch = 8;

template <int K, typename scalar_t>
__attribute__((always_inline)) inline void add_rows_body(double* __restrict h,
                                                         const scalar_t* const* rows, int64_t n) {
  const scalar_t* __restrict r[K];
  for (int k = 0; k < K; ++k) r[k] = rows[k];
  for (int64_t j = 0; j < n; ++j) {
    double v = double(r[0][j]);
    for (int k = 1; k < K; ++k) v += double(r[k][j]);
    h[j] += v;
  }
}

template <typename scalar_t>
__attribute__((always_inline)) inline void add_rows_any(double* h, const scalar_t* const* rows,
                                                        int count, int64_t n) {
  static_assert(kPrefixBatch == 8, "add_rows_any handles up to 8 rows");
  switch (count) {
    case 0: return;
    case 1: return add_rows_body<1>(h, rows, n);
    case 2: return add_rows_body<2>(h, rows, n);
    case 3: return add_rows_body<3>(h, rows, n);
    case 4: return add_rows_body<4>(h, rows, n);
    case 5: return add_rows_body<5>(h, rows, n);
    case 6: return add_rows_body<6>(h, rows, n);
    case 7: return add_rows_body<7>(h, rows, n);
    default: return add_rows_body<8>(h, rows, n);
  }
}
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void add_rows(
    double* h, const float* const* rows, int count, int64_t n) {
  add_rows_any<float>(h, rows, count, n);
}
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void add_rows(
    double* h, const double* const* rows, int count, int64_t n) {
  add_rows_any<double>(h, rows, count, n);
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
// n Lmax^2 scalar reads, against Lmax n d (vectorized) additions for dense_u. The crossover below
// is measured (benchmarks/piso_rows_timing.py-style timings of both, 2026-11-30, 2-core Xeon):
// 2-bit grids from d = 512, 3 to 6 bits from d = 256, wider grids from d of about 7 Lmax.
inline bool use_prefix_u(int64_t d, int64_t Lmax) {
  return d >= std::max<int64_t>(Lmax <= 2 ? 512 : 256, 7 * Lmax);
}

// Whether prefix_u batches its row additions: they get cheaper with K = kPrefixBatch rows per
// pass over the sums, but every read served inside a batch pays (K - 1) / 2 corrections on
// average, about Lmax^2 reads per coordinate against d additions. Measured
// (benchmarks/piso_rows_timing.py under K = 1, 2, 4, 8, alternated, 2026-12-01, 2 threads): K = 8
// is 1.13x / 1.3x / 1.5x faster at d = 4096 for 4 / 3 / 2 bits and about 1.2x at d = 2048 (3 and
// 4 bits) and for 2-bit grids from d = 1024; at d = 1024 with 3 or 4 bits it is slower (K = 1
// best). Again on a Zen 4 VM (benchmarks/piso_u_methods.py --ways prefix prefix8, 2026-12-02):
// 1.1-1.8x faster at d = 4096, 1.0-1.6x at 2048, 1.1x at 1024 for 2 bits; slower at d <= 1024 for
// 3 and 4 bits and at d = 512 for 2 bits (1.05-1.2x).
inline bool prefix_batched(int64_t d, int64_t Lmax) {
  return d >= 2048 || (Lmax <= 2 && d >= 1024);
}

// u_method for auto: 1 = prefix_u one row at a time, 4 = prefix_u adding kPrefixBatch rows at a
// time, 2 = dense_u, 3 = table_u. table_u measured fastest (benchmarks/piso_u_methods.py,
// 2026-12-01, one and two threads) for 4- to 6-bit grids on rows of 128 to 320 (6-bit from 160):
// group-size rows. A forced u_method (the sequential_* algorithms) is taken as given.
inline int choose_u_method(int64_t d, int64_t Lmax) {
  if (Lmax >= 8 && Lmax <= 32 && d >= 128 && d <= 320 && (Lmax <= 16 || d >= 160)) return 3;
  if (!use_prefix_u(d, Lmax)) return 2;
  return prefix_batched(d, Lmax) ? 4 : 1;
}

// u values of every event of one row, (H q_before)_i + (H q_after)_i (the contract of event_u in
// piso_internal.h), into wk.u[t] for the events t of build_events(levels = true), with n d additions
// instead of the sweep's 2^(b-1) n d. Derivation and tie rules: docs/PREFIX_SWEEP.md.
//
// Level l's events, in sweep order, visit the nonzero coordinates holding level l in order of |w|
// descending (K_l = |w| / (l + 1/2) is monotone in |w|); the j-th is event G_l[j]. For an event t
// with key sigma, let p_l = #{level-l keys > sigma} (q_before) and p'_l = #{>= sigma} (q_after).
// Then (H q_before)_i = sum_l S_l(i, p_l), S_l(i, p) = the sum of sign(w_c) H[i, c] over the first p
// coordinates c of level l's list (H symmetric: a prefix sum of H's rows). Every p_l (p'_l) is
// nondecreasing in t, so the events reading S_l(., j) form one contiguous range of t:
//   p_l = j  for t in [A_l[j-1], A_l[j]),   A_l[j] = 1 + last index of G_l[j]'s tie group,
//   p'_l = j for t in [B_l[j-1], B_l[j]),   B_l[j] = first index of G_l[j]'s tie group,
// (A_l[-1] = B_l[-1] = 0, A_l[n_l] = B_l[n_l] = T). One pass over the coordinates by |w| keeps S as
// two accumulators (accp / accn: rows of positive / negative weights added; levels held by both
// signs read accp - accn, the extra levels of the longer grid side only one of them) and, before
// adding coordinate x, serves those ranges for every level whose list reaches x. Every event is
// served once per level and side (about 2^(b-1) reads per event); exact ties need no special case.
template <bool batched, typename scalar_t>
void prefix_u(const double* w, const scalar_t* H, int64_t d, int64_t qmin, int64_t qmax, int64_t T,
              Work& wk) {
  const int64_t K = batched ? kPrefixBatch : 1;
  const int64_t Lpos = qmax, Lneg = -qmin, Lmax = std::max(Lpos, Lneg), Lmin = std::min(Lpos, Lneg);
  const bool big_pos = Lpos > Lneg;  // which sign holds the extra levels, if any
  TORCH_INTERNAL_ASSERT(Lmax <= 128 && Lmax * d < INT32_MAX);
  const double* key = wk.key.data();
  const int32_t* co = wk.coord.data();
  const int32_t* lv = wk.lvl.data();
  const size_t LD = static_cast<size_t>(Lmax * d);
  if (wk.A.size() < LD) {
    wk.A.resize(LD);
    wk.B.resize(LD);
    wk.X.resize(LD);
  }
  wk.ord.resize(d);
  wk.pos.resize(d);
  if (wk.mem.size() < static_cast<size_t>(T)) wk.mem.resize(T);
  int32_t *A = wk.A.data(), *B = wk.B.data(), *X = wk.X.data();
  int32_t *ord = wk.ord.data(), *pos = wk.pos.data(), *mem = wk.mem.data();
  int32_t cnt[128] = {0};
  // Level lists, B (tie-group starts) and A (tie-group ends, set when the group closes).
  int32_t gs = 0;
  int64_t nm = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (t > 0 && key[t] != key[t - 1]) {
      for (int64_t m = 0; m < nm; ++m) A[mem[m]] = static_cast<int32_t>(t);
      nm = 0;
      gs = static_cast<int32_t>(t);
    }
    const int32_t l = lv[t], c = co[t];
    const int32_t j = cnt[l]++;
    const int32_t idx = l * static_cast<int32_t>(d) + j;
    B[idx] = gs;
    mem[nm++] = idx;
    if (l == 0) {  // level 0 comes first for every coordinate (|w| / 0.5 > |w| / 1.5)
      ord[j] = c;
      pos[c] = j;
    } else if (l >= Lmin) {
      X[idx] = pos[c];  // where the extra level's j-th coordinate sits in the pass
    }
  }
  for (int64_t m = 0; m < nm; ++m) A[mem[m]] = static_cast<int32_t>(T);
  const int64_t n = cnt[0];
  double* U = wk.u.data();
  std::fill(U, U + T, 0.0);
  wk.accp.assign(d, 0.0);
  wk.accn.assign(d, 0.0);
  const double* accp = wk.accp.data();
  const double* accn = wk.accn.data();
  auto serve = [&](int64_t l, int64_t j, auto val) {
    const int64_t base = l * d, nl = cnt[l];
    const int64_t Ap = j > 0 ? A[base + j - 1] : 0, Bp = j > 0 ? B[base + j - 1] : 0;
    const int64_t Ac = j < nl ? A[base + j] : T, Bc = j < nl ? B[base + j] : T;
    if (Ap > Bc) return;  // K_l[j-1] == K_l[j]: no event has a count of exactly j
    for (int64_t t = Bp; t < Ap; ++t) U[t] += val(co[t]);        // after only
    for (int64_t t = Ap; t < Bc; ++t) U[t] += 2.0 * val(co[t]);  // before and after
    for (int64_t t = Bc; t < Ac; ++t) U[t] += val(co[t]);        // before only
  };
  // The pass adds H's rows K at a time (add_rows: one load and store of the sums per batch instead
  // of per row; see prefix_batched). A batch [x0, x0 + nb) serves position x0 before its rows are
  // added, then the others after: the reads at x0 + m are the sums after the batch less its rows
  // m..nb-1, component i (rows[k][i], in cache just after the add) -- for `both` every row with its
  // sign, for `one` only the longer side's rows. K = 1 is the plain pass (no corrections).
  const scalar_t* rows[kPrefixBatch];
  double sg[kPrefixBatch];
  bool big[kPrefixBatch];
  const scalar_t* plus[kPrefixBatch];
  const scalar_t* minus[kPrefixBatch];
  int64_t m = 0, nb = 0;  // position within the batch of the reads being served, batch size
  auto both = [&](int32_t i) {
    double v = accp[i] - accn[i];
    if constexpr (batched) {
      for (int64_t k = m; k < nb; ++k) v -= sg[k] * double(rows[k][i]);
    }
    return v;
  };
  auto one = [&](int32_t i) {
    double v = big_pos ? accp[i] : -accn[i];
    if constexpr (batched) {
      for (int64_t k = m; k < nb; ++k) {
        if (big[k]) v -= sg[k] * double(rows[k][i]);
      }
    }
    return v;
  };
  int32_t jx[128] = {0};
  auto serve_at = [&](int64_t x) {
    for (int64_t l = 0; l < Lmin; ++l) serve(l, x, both);
    for (int64_t l = Lmin; l < Lmax; ++l) {
      if (x == n) {
        serve(l, cnt[l], one);
      } else if (jx[l] < cnt[l] && X[l * d + jx[l]] == x) {
        serve(l, jx[l], one);
        ++jx[l];
      }
    }
  };
  for (int64_t x0 = 0;;) {
    nb = std::min<int64_t>(K, n - x0);
    m = nb;  // position x0 before the batch's rows are added: no correction
    serve_at(x0);
    if (nb == 0) break;
    if constexpr (!batched) {
      const int32_t c = ord[x0];
      add_row(w[c] > 0 ? wk.accp.data() : wk.accn.data(), H + static_cast<int64_t>(c) * d, 1.0, d);
      x0 += 1;
      continue;
    }
    int np = 0, nn = 0;
    for (int64_t k = 0; k < nb; ++k) {
      const int32_t c = ord[x0 + k];
      rows[k] = H + static_cast<int64_t>(c) * d;
      sg[k] = w[c] > 0 ? 1.0 : -1.0;
      big[k] = (w[c] > 0) == big_pos;
      if (w[c] > 0) plus[np++] = rows[k];
      else minus[nn++] = rows[k];
    }
    add_rows(wk.accp.data(), plus, np, d);
    add_rows(wk.accn.data(), minus, nn, d);
    for (m = 1; m < nb; ++m) serve_at(x0 + m);
    x0 += nb;
  }
}

// The same u values as prefix_u (u_before + u_after of every event, into wk.u), for narrow rows
// whose prefix sums fit in L2 as whole tables (group-size rows: d of a few hundred). Where prefix_u
// keeps one running sum and serves every level's reads as it passes, this stores every prefix:
//   Sa[x] = sum of sign(w_c) H[c, :] over the first x coordinates c of the |w| order (n + 1 rows),
//   Sb[j] = the same over the first j coordinates of the longer grid side (the extra levels'
//           coordinates, in the same order; only when the grid is asymmetric),
// and reads (H q_before)_i = sum_l T_l[p_l][i] for each event, with p_l = level l's events before
// the event's tie group (T_l = Sa for levels both signs hold, Sb for the extra ones). The first p_l
// events of level l are the coordinates with |w| / (l + 1/2) > sigma, which is a prefix of the
// |w| order (of the longer side's order for an extra level): the rows of the tables. An event alone
// in its tie group has u_after = u_before + delta H_ii; in a tie group both are read, the second
// with the counts after the group (the macro-event rule, as prefix_u).
// Cost: n d (+ n_big d) additions and stores, then Lmax reads per event from the tables.
template <typename scalar_t>
void table_u(const double* w, const scalar_t* H, int64_t d, int64_t qmin, int64_t qmax, int64_t T,
             Work& wk) {
  const int64_t Lpos = qmax, Lneg = -qmin, Lmax = std::max(Lpos, Lneg), Lmin = std::min(Lpos, Lneg);
  const bool big_pos = Lpos > Lneg;
  TORCH_INTERNAL_ASSERT(Lmax <= 128);
  const double* key = wk.key.data();
  const double* dl = wk.dl.data();
  const int32_t* co = wk.coord.data();
  const int32_t* lv = wk.lvl.data();
  // The |w| order: level 0 comes first for every nonzero coordinate, in that order.
  wk.ord.resize(d);
  int32_t* ord = wk.ord.data();
  int64_t n = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (lv[t] == 0) ord[n++] = co[t];
  }
  int64_t nb = 0;
  if (Lmax > Lmin) {
    for (int64_t x = 0; x < n; ++x) nb += (w[ord[x]] > 0) == big_pos;
  }
  const size_t rows = static_cast<size_t>(n + 1 + (Lmax > Lmin ? nb + 1 : 0));
  if (wk.tab.size() < rows * d) wk.tab.resize(rows * d);
  double* Sa = wk.tab.data();
  double* Sb = Sa + (n + 1) * d;
  std::fill(Sa, Sa + d, 0.0);
  if (Lmax > Lmin) std::fill(Sb, Sb + d, 0.0);
  for (int64_t x = 0, j = 0; x < n; ++x) {
    const int32_t c = ord[x];
    const scalar_t* Hc = H + static_cast<int64_t>(c) * d;
    const double sg = w[c] > 0 ? 1.0 : -1.0;
    next_row(Sa + (x + 1) * d, Sa + x * d, Hc, sg, d);
    if (Lmax > Lmin && (w[c] > 0) == big_pos) {
      next_row(Sb + (j + 1) * d, Sb + j * d, Hc, sg, d);
      ++j;
    }
  }
  // ptr[l] = T_l[p_l]: the row for level l's count so far.
  const double* ptr[128];
  for (int64_t l = 0; l < Lmax; ++l) ptr[l] = l < Lmin ? Sa : Sb;
  // Four partial sums: the reads of one event are independent, a single chain would serialize them.
  auto read = [&](int32_t i) {
    double v0 = 0.0, v1 = 0.0, v2 = 0.0, v3 = 0.0;
    int64_t l = 0;
    for (; l + 4 <= Lmax; l += 4) {
      v0 += ptr[l][i];
      v1 += ptr[l + 1][i];
      v2 += ptr[l + 2][i];
      v3 += ptr[l + 3][i];
    }
    for (; l < Lmax; ++l) v0 += ptr[l][i];
    return (v0 + v1) + (v2 + v3);
  };
  double* U = wk.u.data();
  for (int64_t g0 = 0, g1; g0 < T; g0 = g1) {
    g1 = g0 + 1;
    while (g1 < T && key[g1] == key[g0]) ++g1;
    if (g1 == g0 + 1) {
      const int32_t i = co[g0];
      U[g0] = 2.0 * read(i) + dl[g0] * double(H[static_cast<int64_t>(i) * d + i]);
      ptr[lv[g0]] += d;
      continue;
    }
    for (int64_t t = g0; t < g1; ++t) U[t] = read(co[t]);
    for (int64_t t = g0; t < g1; ++t) ptr[lv[t]] += d;
    for (int64_t t = g0; t < g1; ++t) U[t] += read(co[t]);
  }
}

struct Best {
  double e = INFINITY, s = 0.0;
  bool found = false;
  // lb > bound + slack, with lb = -alpha^2 / beta, multiplied through by beta > 0 (no division).
  static bool cannot_win(double alpha, double beta, double bound) {
    const double nb = alpha > 0 ? -alpha * alpha : 0.0;  // lb * beta
    return nb > (bound + 1e-12 * std::abs(bound)) * beta + 1e-12 * std::abs(nb);
  }
  void offer(double alpha, double beta, double upper, double lower, double eps, bool f32) {
    // E >= -alpha^2 / beta on the whole interval: skip intervals that cannot win (with a slack far
    // above the rounding of E, so this never changes the result).
    if (found && cannot_win(alpha, beta, e)) return;
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

// Candidate pass over the sorted events, given dbeta[t] (the beta increment of event t).
// Every interval's E is at least lb = -alpha^2 / beta (E's minimum over all s > 0). A first pass
// keeps the running alpha and beta and finds the valid interval with the least lb; its candidate's
// objective U0 bounds the row's optimum from above, so an interval with lb > U0 can neither win nor
// tie. The candidate pass then visits, in sweep order, only the intervals that bound lets through
// (with Best::offer's slack), which leaves the result exactly that of visiting them all.
void select(const double* lin, int64_t T, Work& wk, const double* dbeta, double eps, bool f32,
            Best& best) {
  if (wk.al.size() < static_cast<size_t>(T)) {
    wk.al.resize(T);
    wk.be.resize(T);
  }
  double* al = wk.al.data();
  double* be = wk.be.data();
  const double* key = wk.key.data();
  const double* dl = wk.dl.data();
  const int32_t* coord = wk.coord.data();
  auto valid = [&](int64_t t) {  // positive width (not inside a tie group) and curvature
    const double lower = t + 1 < T ? key[t + 1] : 0.0;
    return lower != key[t] && be[t] > 0.0;
  };
  double alpha = 0.0, beta = 0.0, lb_min = INFINITY;
  int64_t t0 = -1;
  for (int64_t t = 0; t < T; ++t) {
    alpha += dl[t] * lin[coord[t]];
    beta += dbeta[t];
    al[t] = alpha;
    be[t] = beta;
    const double lb = (alpha > 0.0 ? -alpha * alpha : 0.0) / beta;
    if (valid(t) && lb < lb_min) {
      lb_min = lb;
      t0 = t;
    }
  }
  if (t0 < 0) return;
  Best probe;
  probe.offer(al[t0], be[t0], key[t0], t0 + 1 < T ? key[t0 + 1] : 0.0, eps, f32);
  const double U0 = probe.found ? probe.e : INFINITY;
  for (int64_t t = 0; t < T; ++t) {
    if (!valid(t) || Best::cannot_win(al[t], be[t], U0)) continue;
    best.offer(al[t], be[t], key[t], t + 1 < T ? key[t + 1] : 0.0, eps, f32);
  }
}

template <typename scalar_t>
void sweep_row_dense(const double* w, const double* lin, const scalar_t* H, int64_t d, int64_t qmin,
                     int64_t qmax, double eps, bool f32, int u_method, Work& wk, Best& best) {
  const int m = u_method != 0 ? u_method : choose_u_method(d, std::max(qmax, -qmin));
  const int64_t T = build_events(w, d, qmin, qmax, m != 2, wk);
  if (T == 0) return;
  double* u = wk.u.data();
  if (m != 2) {
    // beta increment delta (u_before + u_after): per event equal to 2 delta u_before + H_ii, and over
    // a tie group it sums to the group's change of q^T H q (the macro-event rule, ALGORITHM.md §2.7);
    // candidates are only taken at the end of a tie group.
    if (m == 4) {
      prefix_u<true, scalar_t>(w, H, d, qmin, qmax, T, wk);
    } else if (m == 1) {
      prefix_u<false, scalar_t>(w, H, d, qmin, qmax, T, wk);
    } else {
      table_u<scalar_t>(w, H, d, qmin, qmax, T, wk);
    }
    for (int64_t t = 0; t < T; ++t) u[t] *= wk.dl[t];
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
  const int64_t T = build_events(w, d, qmin, qmax, false, wk);
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
