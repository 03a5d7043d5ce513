// Shared argument validation and the tiled symmetric update used by the Hessian ops on every
// backend (the tile GEMMs themselves run in the backend's BLAS).
#pragma once

#include "checks.h"

namespace piso {

// Validates (H, x) for hessian_accumulate_ / (G, x_q, x_fp) for cross_accumulate_ and returns x as a
// 2-D [tokens, D] view. Non-contiguous x is accepted (copied once by reshape); H must be contiguous
// because it is written in place.
inline at::Tensor check_accumulate_args(const at::Tensor& H, const char* hname, const at::Tensor& x,
                                        const char* xname) {
  check_defined(H, hname);
  check_defined(x, xname);
  check_dim(H, 2, hname);
  TORCH_CHECK(H.size(0) == H.size(1), hname, ": expected a square [D, D] matrix, got shape ",
              H.sizes());
  check_accumulator(H, hname);
  TORCH_CHECK(H.is_contiguous(), hname, ": expected a contiguous tensor (it is written in place)");
  check_floating(x, xname);
  TORCH_CHECK(x.dim() >= 1, xname, ": expected shape [..., D], got a 0-D tensor");
  TORCH_CHECK(x.size(-1) == H.size(0), xname, ": last dimension ", x.size(-1),
              " does not match ", hname, " of shape ", H.sizes());
  check_same_device(H, hname, x, xname);
  check_finite(x, xname);
  return x.reshape({-1, x.size(-1)});
}

// Tokens converted to the accumulator dtype at a time (bounds the temporary for bf16/fp16 inputs).
constexpr int64_t kTokenChunk = 8192;

}  // namespace piso
