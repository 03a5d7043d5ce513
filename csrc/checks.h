// Shared argument checks. Every message names the argument and what was expected.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <string>

namespace piso {

inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-D tensor, got shape ", t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name,
              ": expected float16, bfloat16, float32 or float64, got ", st);
}

inline void check_accumulator(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, name,
              ": expected float32 or float64 (its dtype is the accumulation precision), got ", st);
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b,
                              const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " and ", bn, " must be on the same device, got ",
              a.device(), " and ", bn, " on ", b.device());
}

inline void check_nonempty(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() > 0, name, ": expected a non-empty tensor, got shape ", t.sizes());
}

namespace detail {
// Whether every element of a contiguous CPU float tensor is finite, without a temporary (the bool
// tensor of at::isfinite costs a fresh allocation, i.e. page faults, as large as the input).
template <typename T>
bool all_finite_cpu(const T* p, int64_t n) {
  return at::parallel_reduce(
      0, n, 1 << 16, true,
      [&](int64_t b, int64_t e, bool ok) {
        // x - x is 0 for finite x and NaN for NaN/Inf: one running sum tests a whole range.
        T acc = 0;
        for (int64_t i = b; i < e; ++i) acc += p[i] - p[i];
        return ok && acc == T(0);
      },
      [](bool a, bool b) { return a && b; });
}
}  // namespace detail

// Whether every element is finite: one pass, and on CPU (contiguous float/double) no temporary.
inline bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (t.device().is_cpu() && t.is_contiguous()) {
    if (t.scalar_type() == at::kFloat) return detail::all_finite_cpu(t.data_ptr<float>(), t.numel());
    if (t.scalar_type() == at::kDouble) return detail::all_finite_cpu(t.data_ptr<double>(), t.numel());
  }
  return at::isfinite(t).all().item<bool>();
}

// NaN/Inf are rejected (never a silent wrong answer).
inline void check_finite(const at::Tensor& t, const char* name) {
  TORCH_CHECK(all_finite(t), name, ": contains NaN or Inf; remove non-finite values before calling");
}

// The dequantized weights scale * code, cast to W's dtype, from finite inputs: Inf here means the
// product does not fit that dtype (float16 tops out at 65504), never a silent Inf in the result.
inline void check_representable(const at::Tensor& W_hat, at::ScalarType dtype) {
  TORCH_CHECK(all_finite(W_hat), "W_hat: scale * code overflows ", dtype,
              " (the dtype of W) for some weights; quantize a float32 copy of W instead");
}

inline void check_bits(int64_t bits) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits: expected an integer in [2, 8], got ", bits);
}

// Integer grid [qmin, qmax] for `bits` (signed; narrow_range drops -2^(b-1)).
inline std::pair<int64_t, int64_t> int_grid(int64_t bits, bool narrow_range) {
  check_bits(bits);
  const int64_t half = int64_t(1) << (bits - 1);
  return {narrow_range ? -(half - 1) : -half, half - 1};
}

// group_size -1 = per channel; else must divide D. Returns the effective group size.
inline int64_t check_group_size(int64_t group_size, int64_t D) {
  if (group_size == -1) return D;
  TORCH_CHECK(group_size > 0, "group_size: expected -1 (per channel) or a positive divisor of ", D,
              ", got ", group_size);
  TORCH_CHECK(D % group_size == 0, "group_size: ", group_size, " does not divide the ", D,
              " input features");
  return group_size;
}

}  // namespace piso
