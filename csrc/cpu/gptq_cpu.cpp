// CPU kernel of the GPTQ/Qronos column loop inside one lazy-batch block (see csrc/gptq.h).
//
// Rows are independent given U, so they run in parallel; a few rows' block slices W[r, i1:i2] (at
// most a few KB each) stay in L1 while their columns are processed, which is why this loop is fused
// per row block instead of the textbook column-at-a-time rank-1 updates over all rows.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "gptq.h"

namespace piso {
namespace detail {
namespace {

// Columns c0..c1 of RB rows (the hot loop), w / err_row / code_row / s_row pointing at each row.
// A row's column i cannot start before column i-1's update reached w[i], a chain of about 50 cycles
// (division, rounding, division by U_ii); RB independent rows interleaved per column keep the core
// busy meanwhile, and share the loads of U's row. Cloned for AVX-512 / AVX2 / baseline and chosen at
// load time (the extension is built without -march). No FMA contraction (-ffp-contract=off), so
// every product and difference rounds as in the references and the CUDA kernel: each row's values
// are exactly those of processing it alone.
template <typename T, int RB>
__attribute__((always_inline)) inline void rows_body(T* const* w, const T* __restrict U,
                                                     T* const* err_row, int8_t* const* code_row,
                                                     const double* const* s_row,
                                                     const int64_t* __restrict col_group,
                                                     int64_t D, int64_t c0, int64_t c1, int64_t i1,
                                                     int64_t i2, double qmin, double qmax,
                                                     double* loss) {
  for (int64_t i = c0; i < c1; ++i) {
    const T* __restrict u = U + i * D;
    const T uii = u[i];
    T err[RB];
    for (int r = 0; r < RB; ++r) {
      T* __restrict wr = w[r];
      const double s = s_row[r][col_group[i]];
      const double q = std::min(qmax, std::max(qmin, std::nearbyint(static_cast<double>(wr[i]) / s)));
      const T deq = static_cast<T>(s * q);
      err[r] = (wr[i] - deq) / uii;
      wr[i] = deq;
      code_row[r][i] = static_cast<int8_t>(q);
      err_row[r][i - i1] = err[r];
      loss[r] += static_cast<double>(err[r]) * static_cast<double>(err[r]);
    }
    for (int r = 0; r < RB; ++r) {
      T* __restrict wr = w[r];
      const T e = err[r];
      for (int64_t j = i + 1; j < i2; ++j) wr[j] -= e * u[j];
    }
  }
}

// The left-looking form (ColumnSweepArgs::left): V's row i instead of U's, corrections
// accumulated in acc (the block's slice) and the quantized value read as w0 + acc / V_ii.
template <typename T, int RB>
__attribute__((always_inline)) inline void rows_body_left(
    T* const* w, const T* __restrict V, T* const* acc, T* const* res, int8_t* const* code_row,
    const double* const* s_row, const int64_t* __restrict col_group, int64_t c0, int64_t c1,
    int64_t i1, int64_t i2, double qmin, double qmax, double* loss) {
  const int64_t nb = i2 - i1;  // V is the block's diagonal block; b = column index in the block
  for (int64_t i = c0; i < c1; ++i) {
    const int64_t b = i - i1;
    const T* __restrict v = V + b * nb;  // v[b'] = V[i, i1 + b']
    const T vii = v[b];
    T rr[RB];
    for (int r = 0; r < RB; ++r) {
      T* __restrict wr = w[r];
      const T wt = wr[i] + acc[r][b] / vii;
      const double s = s_row[r][col_group[i]];
      const double q = std::min(qmax, std::max(qmin, std::nearbyint(static_cast<double>(wt) / s)));
      const T deq = static_cast<T>(s * q);
      const T err = (wt - deq) * vii;
      rr[r] = wr[i] - deq;
      res[r][i] = rr[r];
      wr[i] = deq;
      code_row[r][i] = static_cast<int8_t>(q);
      loss[r] += static_cast<double>(err) * static_cast<double>(err);
    }
    for (int r = 0; r < RB; ++r) {
      T* __restrict ar = acc[r];
      const T e = rr[r];
      for (int64_t j = b + 1; j < nb; ++j) ar[j] += e * v[j];
    }
  }
}

constexpr int kRowBlock = 4;

#define PISO_ROW_CLONE(T)                                                                          \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void rows_cols(  \
      int nr, T* const* w, const T* U, T* const* err_row, int8_t* const* code_row,                 \
      const double* const* s_row, const int64_t* col_group, int64_t D, int64_t c0, int64_t c1,     \
      int64_t i1, int64_t i2, double qmin, double qmax, double* loss) {                            \
    if (nr == kRowBlock) {                                                                         \
      rows_body<T, kRowBlock>(w, U, err_row, code_row, s_row, col_group, D, c0, c1, i1, i2, qmin,  \
                              qmax, loss);                                                         \
    } else {                                                                                       \
      for (int r = 0; r < nr; ++r)                                                                 \
        rows_body<T, 1>(w + r, U, err_row + r, code_row + r, s_row + r, col_group, D, c0, c1, i1,  \
                        i2, qmin, qmax, loss + r);                                                 \
    }                                                                                              \
  }
PISO_ROW_CLONE(float)
PISO_ROW_CLONE(double)
#undef PISO_ROW_CLONE

#define PISO_ROW_CLONE_LEFT(T)                                                                     \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void rows_left(  \
      int nr, T* const* w, const T* V, T* const* acc, T* const* res, int8_t* const* code_row,      \
      const double* const* s_row, const int64_t* col_group, int64_t c0, int64_t c1, int64_t i1,   \
      int64_t i2, double qmin, double qmax, double* loss) {                                        \
    if (nr == kRowBlock) {                                                                         \
      rows_body_left<T, kRowBlock>(w, V, acc, res, code_row, s_row, col_group, c0, c1, i1, i2,     \
                                   qmin, qmax, loss);                                              \
    } else {                                                                                       \
      for (int r = 0; r < nr; ++r)                                                                 \
        rows_body_left<T, 1>(w + r, V, acc + r, res + r, code_row + r, s_row + r, col_group, c0,   \
                             c1, i1, i2, qmin, qmax, loss + r);                                    \
    }                                                                                              \
  }
PISO_ROW_CLONE_LEFT(float)
PISO_ROW_CLONE_LEFT(double)
#undef PISO_ROW_CLONE_LEFT

template <typename T>
void columns_kernel(const ColumnSweepArgs& a) {
  const int64_t N = a.W.size(0), D = a.W.size(1), E = a.Err.size(1), G = a.scales.size(1);
  T* W = a.W.data_ptr<T>();
  const T* U = a.U.data_ptr<T>();
  T* Err = a.Err.data_ptr<T>();
  T* Res = a.left ? a.Res.data_ptr<T>() : nullptr;
  if (a.left) {
    TORCH_CHECK(a.Res.is_contiguous() && a.Res.sizes() == a.W.sizes(), "gptq: bad Res");
    TORCH_CHECK(a.U.is_contiguous() && a.U.size(0) == a.i2 - a.i1 && a.U.size(1) == a.i2 - a.i1,
                "gptq: the left-looking kernel expects the block's diagonal block of V");
  }
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
    for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
      const int nr = static_cast<int>(std::min<int64_t>(kRowBlock, r1 - rb));
      T* w[kRowBlock];
      T* err[kRowBlock];
      T* res[kRowBlock];
      int8_t* code[kRowBlock];
      const double* sr[kRowBlock];
      double loss[kRowBlock] = {};
      for (int r = 0; r < nr; ++r) {
        w[r] = W + (rb + r) * D;
        err[r] = Err + (rb + r) * E;
        if (Res) res[r] = Res + (rb + r) * D;
        code[r] = codes + (rb + r) * D;
        sr[r] = scales + (rb + r) * G;
      }
      if (Res) {
        rows_left(nr, w, U, err, res, code, sr, col_group, c0, c1, i1, i2, qmin, qmax, loss);
      } else {
        rows_cols(nr, w, U, err, code, sr, col_group, D, c0, c1, i1, i2, qmin, qmax, loss);
      }
      for (int r = 0; r < nr; ++r) row_loss[rb + r] += loss[r];
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
