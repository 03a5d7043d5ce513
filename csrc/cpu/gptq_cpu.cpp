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
      T* w = W + r * D;
      T* err_row = Err + r * E;
      int8_t* code_row = codes + r * D;
      const double* s_row = scales + r * G;
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
      row_loss[r] += loss;
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
