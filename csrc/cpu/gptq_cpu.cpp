// CPU kernel of the GPTQ/Qronos column loop inside one lazy-batch block (see csrc/gptq.h).
//
// Rows are independent given U, so they run in parallel; a row's block slice W[r, i1:i2] (at most a
// few KB) stays in L1 while its columns are processed, which is why this loop is fused per row
// instead of the textbook column-at-a-time rank-1 updates over all rows.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "gptq.h"

namespace piso {
namespace detail {
namespace {

// Columns c0..c1 of one row (the hot loop): cloned for AVX-512 / AVX2 / baseline and chosen at load
// time (the extension is built without -march). No FMA contraction (-ffp-contract=off), so every
// product and difference rounds as in the references and the CUDA kernel.
template <typename T>
__attribute__((always_inline)) inline double row_body(T* __restrict w, const T* __restrict U,
                                                      T* __restrict err_row,
                                                      int8_t* __restrict code_row,
                                                      const double* __restrict s_row,
                                                      const int64_t* __restrict col_group, int64_t D,
                                                      int64_t c0, int64_t c1, int64_t i1, int64_t i2,
                                                      double qmin, double qmax) {
  double loss = 0.0;
  for (int64_t i = c0; i < c1; ++i) {
    const double s = s_row[col_group[i]];
    const double q = std::min(qmax, std::max(qmin, std::nearbyint(static_cast<double>(w[i]) / s)));
    const T deq = static_cast<T>(s * q);
    const T err = (w[i] - deq) / U[i * D + i];
    w[i] = deq;
    code_row[i] = static_cast<int8_t>(q);
    err_row[i - i1] = err;
    loss += static_cast<double>(err) * static_cast<double>(err);
    const T* u = U + i * D;
    for (int64_t j = i + 1; j < i2; ++j) w[j] -= err * u[j];
  }
  return loss;
}

#define PISO_ROW_CLONE(T)                                                                          \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) double row_cols( \
      T* w, const T* U, T* err_row, int8_t* code_row, const double* s_row,                         \
      const int64_t* col_group, int64_t D, int64_t c0, int64_t c1, int64_t i1, int64_t i2,         \
      double qmin, double qmax) {                                                                  \
    return row_body<T>(w, U, err_row, code_row, s_row, col_group, D, c0, c1, i1, i2, qmin, qmax);  \
  }
PISO_ROW_CLONE(float)
PISO_ROW_CLONE(double)
#undef PISO_ROW_CLONE

template <typename T>
void columns_kernel(const ColumnSweepArgs& a) {
  const int64_t N = a.W.size(0), D = a.W.size(1), E = a.Err.size(1), G = a.scales.size(1);
  T* W = a.W.data_ptr<T>();
  const T* U = a.U.data_ptr<T>();
  T* Err = a.Err.data_ptr<T>();
  int8_t* codes = a.codes.data_ptr<int8_t>();
  const double* scales = a.scales.data_ptr<double>();
  const int64_t* col_group = a.col_group.data_ptr<int64_t>();
  double* row_loss = a.row_loss.data_ptr<double>();
  const double qmin = static_cast<double>(a.qmin), qmax = static_cast<double>(a.qmax);
  const int64_t c0 = a.c0, c1 = a.c1, i1 = a.i1, i2 = a.i2;
  // Grain: enough rows per task that the parallel overhead is small against (c1-c0)*(i2-i1) work.
  const int64_t work = std::max<int64_t>(1, (c1 - c0) * (i2 - c0));
  const int64_t grain = std::max<int64_t>(1, 32768 / work);
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      row_loss[r] += row_cols(W + r * D, U, Err + r * E, codes + r * D, scales + r * G, col_group,
                              D, c0, c1, i1, i2, qmin, qmax);
    }
  });
}

}  // namespace

void gptq_columns_cpu(const ColumnSweepArgs& a) {
  TORCH_CHECK(a.W.device().is_cpu(), "gptq_columns_cpu: expected CPU tensors");
  if (a.W.scalar_type() == at::kDouble) {
    columns_kernel<double>(a);
  } else {
    TORCH_CHECK(a.W.scalar_type() == at::kFloat, "gptq_columns_cpu: expected float32/float64 work");
    columns_kernel<float>(a);
  }
}

}  // namespace detail
}  // namespace piso
