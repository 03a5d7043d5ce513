// Shared argument validation and blocking constants of the Hessian ops on every backend (the tile
// GEMMs themselves run in the backend's BLAS: MKL through ATen on CPU, cuBLAS on CUDA).
//
// Contract (both backends):
//   hessian_accumulate_(H, x):      H += x^T x     x [..., D], H [D, D]
//   cross_accumulate_(G, x_q, x_fp): G += x_q^T x_fp  (rows of G index the features of x_q)
// - H/G: float32 or float64, contiguous (written in place); its dtype is the accumulation precision
//   (x is converted to it; a float64 x into a float32 H is rounded to float32 first).
// - x: float16, bfloat16, float32 or float64, any strides (a non-contiguous x is copied once into a
//   contiguous [tokens, D] buffer; the result is the same as for x.contiguous()).
// - zero tokens (an empty batch) is a no-op; NaN/Inf anywhere in x is rejected before H is touched.
// - The update added to H is exactly symmetric (diagonal tiles are symmetrized, off-diagonal tiles are
//   mirrored), so H stays symmetric bit for bit when it starts symmetric.
#pragma once

#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <climits>

namespace piso {

// Validates (H, x) for hessian_accumulate_ / (G, x_q or x_fp) for cross_accumulate_ and returns x as a
// contiguous 2-D [tokens, D] tensor. NaN/Inf are checked by the backend (each has a cheaper scan).
inline at::Tensor check_accumulate_args(const at::Tensor& H, const char* hname, const at::Tensor& x,
                                        const char* xname) {
  check_defined(H, hname);
  check_defined(x, xname);
  TORCH_CHECK(H.dim() == 2, hname, ": expected a square [D, D] matrix, got shape ", H.sizes());
  TORCH_CHECK(H.size(0) == H.size(1), hname, ": expected a square [D, D] matrix, got shape ",
              H.sizes());
  check_accumulator(H, hname);
  TORCH_CHECK(H.is_contiguous(), hname,
              ": expected a contiguous tensor (it is written in place), got strides ", H.strides());
  check_floating(x, xname);
  TORCH_CHECK(x.dim() >= 1, xname, ": expected shape [..., D], got a 0-D tensor");
  TORCH_CHECK(x.size(-1) == H.size(0), xname, ": last dimension ", x.size(-1),
              " does not match ", hname, " of shape ", H.sizes(), " (expected [..., ", H.size(0),
              "])");
  check_same_device(H, hname, x, xname);
  TORCH_CHECK(H.size(0) < INT_MAX, hname, ": D = ", H.size(0), " exceeds the BLAS index range");
  // Tokens counted explicitly: reshape({-1, 0}) is ambiguous when D = 0 (then H is [0, 0] and the
  // update a no-op).
  const int64_t tokens = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  auto x2 = x.reshape({tokens, x.size(-1)}).contiguous();
  // x may share memory with the accumulator (hessian_accumulate_(H, H)): the update must read x as
  // it was at the call, not rows of H already written, so such an x is copied first.
  if (at::get_overlap_status(H, x2) != at::MemOverlapStatus::No) x2 = x2.clone();
  return x2;
}

// Tokens processed per step: bounds the temporary holding a chunk converted to the accumulator dtype
// (kChunkElems elements, e.g. 8192 tokens at D = 2048) and keeps the GEMM depth inside int range.
constexpr int64_t kChunkElems = int64_t(1) << 24;

inline int64_t token_chunk(int64_t D) {
  return std::max<int64_t>(256, kChunkElems / std::max<int64_t>(D, 1));
}

}  // namespace piso
