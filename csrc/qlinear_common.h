// Packed weight storage for QuantLinear: the layout, its argument checks, and the bit extraction
// shared by the CPU and CUDA kernels of pack / unpack / dequant_matmul.
//
// PACKING LAYOUT (format version 1; QuantLinear files depend on it -- never change it silently)
//   packed: int32 [N, W] with W = ceil(D * bits / 32) words per row (D = in_features).
//   Each row n is an independent little-endian bitstream: stream bit k is bit (k mod 32) of word
//   k / 32 (bit 0 = least significant). Code i of the row (0-based along the input dimension) is
//   stored as the unsigned offset value u = code + 2^(bits-1) in [0, 2^bits) in stream bits
//   [i*bits, i*bits + bits). Bits past D*bits in the last word are zero.
//   - bits 2, 4, 8: a word holds exactly 16, 8, 4 codes (no code crosses a word).
//   - bits 3, 5, 6, 7: dense -- a code may straddle two words; there are no wasted bits, so 3-bit
//     costs exactly 3 bits per weight, and every 32 consecutive codes fill exactly `bits` words.
//   Rows start on a word boundary, so row n's codes never share a word with row n+1.
//   int32 (not uint32) because torch and safetensors support it everywhere; only the bit pattern
//   matters and the kernels read the words as uint32.
//   All bits 2..8 are supported by the same rule (no special cases in the format).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "checks.h"

namespace piso {

inline int64_t packed_words(int64_t in_features, int64_t bits) {
  return (in_features * bits + 31) / 32;
}

// Unsigned field of code i in a row's words (the generic rule; kernels may decode 32 codes at a time
// but must agree with this). The second word is only touched when the field straddles it, so a row
// of exactly W words is never read past its end.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline uint32_t extract_field(const uint32_t* row, int64_t i, int bits) {
  const int64_t bit = i * bits;
  const int64_t w = bit >> 5;
  const int off = static_cast<int>(bit & 31);
  uint32_t v = row[w] >> off;
  if (off + bits > 32) v |= row[w + 1] << (32 - off);
  return v & ((1u << bits) - 1u);
}

// codes: int8 [N, D] within the signed grid of `bits`. Returns {N, D}.
inline std::pair<int64_t, int64_t> check_pack_args(const at::Tensor& codes, int64_t bits) {
  check_defined(codes, "codes");
  check_bits(bits);
  TORCH_CHECK(codes.scalar_type() == at::kChar, "codes: expected int8 codes, got ", codes.scalar_type());
  check_dim(codes, 2, "codes");
  TORCH_CHECK(codes.size(0) > 0 && codes.size(1) > 0,
              "codes: expected a non-empty [out_features, in_features] tensor, got shape ",
              codes.sizes());
  const auto grid = int_grid(bits, /*narrow_range=*/false);
  auto mm = at::aminmax(codes);
  const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK(lo >= grid.first && hi <= grid.second, "codes: values out of range for bits=", bits,
              ": expected every code in [", grid.first, ", ", grid.second, "], got min ", lo,
              " and max ", hi);
  return {codes.size(0), codes.size(1)};
}

inline void check_packed(const at::Tensor& packed, int64_t bits, int64_t in_features) {
  check_defined(packed, "packed");
  check_bits(bits);
  TORCH_CHECK(in_features > 0, "in_features: expected a positive integer, got ", in_features);
  TORCH_CHECK(packed.scalar_type() == at::kInt, "packed: expected int32 words, got ",
              packed.scalar_type());
  check_dim(packed, 2, "packed");
  TORCH_CHECK(packed.size(0) > 0, "packed: expected at least one row, got shape ", packed.sizes());
  const int64_t W = packed_words(in_features, bits);
  TORCH_CHECK(packed.size(1) == W, "packed: expected ", W, " int32 words per row for in_features=",
              in_features, " at bits=", bits, " (ceil(in_features*bits/32)), got shape ",
              packed.sizes());
}

struct DequantMatmulDims {
  int64_t M;   // rows of x after flattening the leading dims
  int64_t N;   // out_features
  int64_t D;   // in_features
  int64_t W;   // words per packed row
  int64_t gs;  // effective group size (D for per channel)
  int64_t ng;  // groups per row
};

// Validates every argument of dequant_matmul. `check_values`: also reject non-finite scales/bias
// (one reduction each over N or N*ng numbers). The CUDA kernel passes false because the check would
// force a device synchronization on every forward; QuantLinear validates its scales when they are
// set and loaded instead.
inline DequantMatmulDims check_dequant_matmul_args(const at::Tensor& x, const at::Tensor& packed,
                                                   const at::Tensor& scales, int64_t bits,
                                                   int64_t group_size, int64_t in_features,
                                                   const std::optional<at::Tensor>& bias,
                                                   bool check_values) {
  check_defined(x, "x");
  check_floating(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x: expected shape [..., in_features], got a 0-D tensor");
  check_packed(packed, bits, in_features);
  TORCH_CHECK(x.size(-1) == in_features, "x: last dimension ", x.size(-1),
              " does not match in_features=", in_features);
  check_same_device(x, "x", packed, "packed");
  const int64_t N = packed.size(0), D = in_features;
  const int64_t gs = check_group_size(group_size, D);
  const int64_t ng = D / gs;
  check_defined(scales, "scales");
  check_floating(scales, "scales");
  check_same_device(x, "x", scales, "scales");
  if (group_size == -1) {
    TORCH_CHECK(scales.dim() == 1 && scales.size(0) == N, "scales: expected shape [", N,
                "] (per channel, one per output row of packed), got ", scales.sizes());
  } else {
    TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == ng,
                "scales: expected shape [", N, ", ", ng, "] (in_features=", D, " / group_size=", gs,
                "), got ", scales.sizes());
  }
  if (check_values) check_finite(scales, "scales");
  if (bias.has_value() && bias->defined()) {
    const auto& b = *bias;
    check_floating(b, "bias");
    check_same_device(x, "x", b, "bias");
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N, "bias: expected shape [", N, "], got ", b.sizes());
    if (check_values) check_finite(b, "bias");
  }
  return {x.numel() / D, N, D, packed.size(1), gs, ng};
}

// Accumulation dtype: float64 for float64 x, else float32 (bf16/fp16 inputs are widened).
inline at::ScalarType accum_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Output shape [..., N] for x of shape [..., D].
inline std::vector<int64_t> dequant_matmul_out_shape(const at::Tensor& x, int64_t N) {
  auto s = x.sizes().vec();
  s.back() = N;
  return s;
}

}  // namespace piso
