// Internal C++ interface of the PiSO breakpoint sweep, shared by optimal_scales (csrc/piso.cpp) and
// the scale updates inside GPTQ/Qronos (csrc/gptq.cpp). Not part of the public C++ API.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace piso {
namespace detail {

// Sequential: CPU sweep, u values by whichever of prefix_u / table_u / dense_u is cheapest
// (piso_cpu.cpp);
// SequentialPrefix (prefix_u adding H's rows one at a time), SequentialPrefixBatched (eight at a
// time), SequentialEvents and SequentialTable force one of them whatever the width (tests,
// benchmarks/piso_u_methods.py).
enum class SweepAlgo {
  Auto,
  Sequential,
  EventParallel,
  SequentialPrefix,
  SequentialEvents,
  SequentialTable,
  SequentialPrefixBatched
};

// Solves R independent single-scale problems that share one H block:
//   row r:  minimize over s > 0   E_r(s) = s^2 q^T H q - 2 s q^T lin[r],   q = RTN(W[r] / s)
// on the integer grid [qmin, qmax] (ALGORITHM.md §2).
//   W   [R, d]  float32 or float64 (the values that are rounded)
//   lin [R, d]  float64 (the linear term: G w for channel-wise, b_k for PiSO_S, w for data-free)
//   H   undefined = identity, [d] = diagonal, [d, d] = dense; float32 or float64; same device as W
// Returns (scales [R] in float64 for float64 W else float32, objective [R] float64 evaluated at the
// returned scale). All-zero rows get scale 1.0 (objective 0); rows with no valid interval get the
// absmax scale max|w| / 2^(b-1) (objective evaluated there).
std::tuple<at::Tensor, at::Tensor> sweep(const at::Tensor& W, const at::Tensor& lin,
                                         const at::Tensor& H, int64_t qmin, int64_t qmax,
                                         double eps, SweepAlgo algo = SweepAlgo::Auto);

}  // namespace detail
}  // namespace piso
