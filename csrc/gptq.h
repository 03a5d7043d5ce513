// Internal interface between the device-agnostic GPTQ/Qronos orchestration (csrc/gptq.cpp) and the
// backend kernels of the per-block column loop (csrc/cpu/gptq_cpu.cpp, csrc/cuda/gptq_cuda.cu).
// Not part of the public C++ API.
#pragma once

#include <ATen/ATen.h>

namespace piso {
namespace detail {

// One call quantizes the columns [c0, c1) of the lazy-batch block [i1, i2) (c0 >= i1, c1 <= i2) of
// every row, in the column (processing) order of W. For each column i, independently per row r:
//   s     = scales[r, col_group[i]]                        (float64)
//   q     = clamp(nearbyint(W[r, i] / s), qmin, qmax)      (the division in float64: same rule as
//                                                           quantize_rtn, ties to even)
//   err   = (W[r, i] - s q) / U[i, i]
//   W[r, i] = s q;  W[r, j] -= err * U[i, j] for i < j < i2  (OBS update inside the block)
//   Err[r, i - i1] = err;  codes[r, i] = q;  row_loss[r] += err^2
// The caller applies the lazy update W[:, i2:] -= Err[:, :i2-i1] U[i1:i2, i2:] after the block.
// Writing s q into W[r, i] (rather than leaving W - err U_ii) keeps processed columns exactly at
// their dequantized value, which the sequential scale update (PiSO_S) reads.
struct ColumnSweepArgs {
  at::Tensor W;          // [N, D] float32/float64, contiguous (working weights, processing order)
  at::Tensor U;          // [D, D] same dtype, contiguous (upper Cholesky factor of H^-1)
  at::Tensor Err;        // [N, E] same dtype, contiguous, E >= i2 - i1
  at::Tensor codes;      // [N, D] int8, contiguous (processing order)
  at::Tensor scales;     // [N, n_groups] float64, contiguous
  at::Tensor col_group;  // [D] int64: scale column of each processed column
  at::Tensor row_loss;   // [N] float64 (accumulates sum of err^2)
  int64_t c0, c1, i1, i2;
  int64_t qmin, qmax;
  // Left-looking form (CPU kernel only; see gptq.cpp, "Two forms of the sweep"): U holds the block's
  // diagonal block V[i1:i2, i1:i2] of V = U^-1 (upper triangular, H + lambda I = V V^T; row-major
  // [i2-i1, i2-i1], indexed below by absolute column), Err holds Acc (the block's accumulated
  // corrections, [N, E]), and Res [N, D] receives each processed column's residual w0 - s q. Per
  // column i:
  //   w~ = W[r, i] + Acc[r, i - i1] / V[i, i];  q = clamp(nearbyint(w~ / s));  err = (w~ - s q) V[i, i]
  //   Res[r, i] = W[r, i] - s q;  W[r, i] = s q;  codes, row_loss as above
  //   Acc[r, j - i1] += Res[r, i] * V[i, j]  for i < j < i2
  bool left = false;
  at::Tensor Res;
};

void gptq_columns_cpu(const ColumnSweepArgs& a);
#ifdef PISO_WITH_CUDA
void gptq_columns_cuda(const ColumnSweepArgs& a);
#endif

}  // namespace detail
}  // namespace piso
