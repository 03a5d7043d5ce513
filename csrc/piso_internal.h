// Pieces of the PiSO sweep shared by its implementations (csrc/piso.cpp orchestration,
// csrc/piso_event_parallel.cpp, csrc/cpu/piso_cpu.cpp, csrc/cuda/piso_cuda.cu). Internal.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace piso {
namespace detail {

// Safety margin around a breakpoint, in units of fp64 roundoff. A scale s with
//   lower * (1 + kMargin) < s < upper * (1 - kMargin)
// reproduces exactly the interval's codes when q = round(fl64(w / s)) is computed in float64
// (fl64(w/s) then lies more than an ulp away from every midpoint k + 1/2, so neither the division
// nor the round-half-even tie rule can flip a code). With the default eps = 1e-9 this never binds;
// it matters only for eps -> 0.
constexpr double kMargin = 8.0 * 0x1p-53;

// Places the scale of one interval (lower, upper) with quadratic E(s) = s^2 beta - 2 s alpha
// (ALGORITHM.md §2.4): s* = clip(alpha/beta, [lower + eps*upper, upper - eps*upper]), then moved to the
// output precision (float32 if `f32`) strictly inside the open interval (nextafter toward the interior
// if rounding landed on or outside a boundary). Returns false when the interval is not a candidate:
// beta <= 0, zero width (exact ties), width <= eps*upper, or no representable value inside.
// The event-parallel path (piso_event_parallel.cpp) applies exactly these steps with ATen ops.
inline bool place_scale(double alpha, double beta, double upper, double lower, double eps, bool f32,
                        double* s_out) {
  const double width = upper - lower;
  if (!(beta > 0.0) || !(width > 0.0) || !(width > eps * upper)) return false;
  const double lo_m = lower * (1.0 + kMargin);
  const double hi_m = upper * (1.0 - kMargin);
  double x = alpha / beta;
  x = std::min(std::max(x, lower + eps * upper), upper - eps * upper);
  x = std::min(std::max(x, lo_m), hi_m);
  if (f32) {
    float f = static_cast<float>(x);
    if (static_cast<double>(f) <= lo_m) {
      f = std::nextafter(f, INFINITY);
    } else if (static_cast<double>(f) >= hi_m) {
      f = std::nextafter(f, 0.0f);
    }
    x = static_cast<double>(f);
  } else {
    x = std::min(std::max(x, std::nextafter(lo_m, INFINITY)), std::nextafter(hi_m, 0.0));
  }
  if (!(x > lo_m && x < hi_m)) return false;
  *s_out = x;
  return true;
}

// Result of one sweep implementation before the fallbacks of sweep(): scale (float64 tensor holding
// values representable in the output dtype), objective at that scale, and whether any interval
// was a candidate (rows without one get the absmax fallback in piso.cpp).
struct SweepResult {
  at::Tensor scale, objective, found;
};

// Whether a square matrix equals its transpose exactly (CPU: read by tiles, at memory speed).
bool is_symmetric(const at::Tensor& H);
// (H + H^T) / 2, or H itself (no copy) when it is symmetric: the same values bit for bit.
at::Tensor symmetric_part(const at::Tensor& H);

// Sequential breakpoint sweep (ALGORITHM.md §2.5) on CPU.
//   W [R, d] float64 contiguous, lin [R, d] float64 contiguous,
//   H undefined (identity) | [d] float64 | [d, d] float64 symmetric contiguous.
//   u_method: 0 = cheapest, 1 = prefix_u adding H's rows one at a time, 2 = dense_u (per-event
//   updates), 3 = table_u, 4 = prefix_u adding them eight at a time; nonzero = forced.
SweepResult sweep_sequential_cpu(const at::Tensor& W, const at::Tensor& lin, const at::Tensor& H,
                                 int64_t qmin, int64_t qmax, double eps, bool f32, int u_method = 0);

// Event-parallel sweep (ALGORITHM.md §2.9(b)) written once with ATen ops; device of W. Same
// argument contract as sweep_sequential_cpu.
SweepResult sweep_event_parallel(const at::Tensor& W, const at::Tensor& lin, const at::Tensor& H,
                                 int64_t qmin, int64_t qmax, double eps, bool f32);

// The heavy part of the event-parallel sweep, one backend kernel each. For every event (r, i, k),
// i.e. coordinate i of row r crossing the breakpoint with key sigma = A[r,i] / (k + 1/2) for
// k < |SL[r,i]|, returns
//     out[r, i, k] = (H q_before)_i + (H q_after)_i
// where q_before (q_after) is the RTN state of row r with every breakpoint whose fp64 key is > sigma
// (>= sigma) applied: q_j = sign(SL[r,j]) * #{l < |SL[r,j]| : fl64(A[r,j] / (l + 1/2)) > sigma}.
// Keys are recomputed with the very same fp64 division as the sort keys, so the counts agree with
// the sort order bit for bit (exact ties included). Entries with k >= |SL[r,i]| are 0.
//   A [R, d] float64 (|w|), SL [R, d] int32 (sign(w) * number of breakpoints), H [d, d] float64.
//   Returns [R, d, Lmax] float64.
at::Tensor event_u_cpu(const at::Tensor& A, const at::Tensor& SL, const at::Tensor& H, int64_t Lmax);
#ifdef PISO_WITH_CUDA
at::Tensor event_u_cuda(const at::Tensor& A, const at::Tensor& SL, const at::Tensor& H,
                        int64_t Lmax);
// The same values by prefix sums over |w|-sorted coordinates (n d additions per row instead of
// 2^(b-1) n d exact counts), for grids up to 4 bits (max(qmax, -qmin) <= 8). H float32 or float64.
at::Tensor event_u_prefix_cuda(const at::Tensor& A, const at::Tensor& SL, const at::Tensor& H,
                               int64_t qmin, int64_t qmax);
// Whether the prefix kernel's shared memory for this grid fits the device of A (it needs the
// opt-in above 48 KB: 72 KB at Lmax = 8, more than e.g. sm_75 allows); else use event_u_cuda.
bool event_u_prefix_fits(const at::Tensor& A, int64_t Lmax);
#endif

}  // namespace detail
}  // namespace piso
