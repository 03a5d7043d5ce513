// The symmetric part of a square matrix, without a copy when it is symmetric already.
//
// Only the symmetric part of H enters q^T H q and the layer objective, but the sweeps read one
// triangle of H, or its rows as columns: a non-symmetric H is symmetrized first. A symmetric H
// (every Hessian the ops accumulate) is used as it is: (x + x) * 0.5 == x exactly, so the result is
// the same bit for bit, without the copy (0.25 s on one core at D = 4096, twice per optimal_scales
// call before).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

#include "piso_internal.h"

namespace piso {
namespace detail {
namespace {

// H == H^T for a contiguous CPU matrix, by 64 x 64 tiles (at::equal(H, H.t()) walks the transpose
// with a stride of D: 0.7 s at D = 11008; this reads H at memory speed).
template <typename T>
bool is_symmetric_cpu(const T* h, int64_t D) {
  constexpr int64_t B = 64;
  std::atomic<bool> ok{true};
  at::parallel_for(0, (D + B - 1) / B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1 && ok.load(std::memory_order_relaxed); ++bi) {
      const int64_t i0 = bi * B, i1 = std::min(D, i0 + B);
      for (int64_t j0 = 0; j0 <= i0; j0 += B) {  // the tiles on and below the diagonal
        const int64_t j1 = std::min(D, j0 + B);
        bool same = true;
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = j0; j < std::min(j1, i); ++j) same &= h[i * D + j] == h[j * D + i];
        }
        if (!same) {
          ok.store(false, std::memory_order_relaxed);
          return;
        }
      }
    }
  });
  return ok.load();
}

}  // namespace

bool is_symmetric(const at::Tensor& H) {
  TORCH_INTERNAL_ASSERT(H.dim() == 2 && H.size(0) == H.size(1));
  if (H.is_cpu() && H.is_contiguous() && H.scalar_type() == at::kFloat) {
    return is_symmetric_cpu(H.data_ptr<float>(), H.size(0));
  }
  if (H.is_cpu() && H.is_contiguous() && H.scalar_type() == at::kDouble) {
    return is_symmetric_cpu(H.data_ptr<double>(), H.size(0));
  }
  return at::equal(H, H.t());
}

at::Tensor symmetric_part(const at::Tensor& H) {
  return is_symmetric(H) ? H : (H + H.t()).mul_(0.5);
}

}  // namespace detail
}  // namespace piso
