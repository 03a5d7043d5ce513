// pack / unpack on CPU: int8 codes [N, D] <-> the dense per-row bitstream of qlinear_common.h.
// Rows are independent streams, so both directions parallelize over rows without sharing words.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "qlinear_common.h"

namespace piso {
namespace {

at::Tensor pack_cpu(const at::Tensor& codes_in, int64_t bits) {
  const auto [N, D] = check_pack_args(codes_in, bits);
  TORCH_CHECK(codes_in.device().is_cpu(), "codes: expected a CPU tensor for the CPU kernel");
  const auto codes = codes_in.contiguous();
  const int64_t W = packed_words(D, bits);
  auto packed = at::zeros({N, W}, codes.options().dtype(at::kInt));
  const int8_t* src = codes.data_ptr<int8_t>();
  uint32_t* dst = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  const int b = static_cast<int>(bits);
  const int32_t half = 1 << (b - 1);
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n) {
      const int8_t* c = src + n * D;
      uint32_t* row = dst + n * W;
      for (int64_t i = 0; i < D; ++i) {
        const uint32_t u = static_cast<uint32_t>(int32_t(c[i]) + half);
        const int64_t bit = i * b;
        const int64_t w = bit >> 5;
        const int off = static_cast<int>(bit & 31);
        row[w] |= u << off;
        if (off + b > 32) row[w + 1] |= u >> (32 - off);  // the field straddles two words
      }
    }
  });
  return packed;
}

at::Tensor unpack_cpu(const at::Tensor& packed_in, int64_t bits, int64_t in_features) {
  check_packed(packed_in, bits, in_features);
  TORCH_CHECK(packed_in.device().is_cpu(), "packed: expected a CPU tensor for the CPU kernel");
  const auto packed = packed_in.contiguous();
  const int64_t N = packed.size(0), W = packed.size(1), D = in_features;
  auto codes = at::empty({N, D}, packed.options().dtype(at::kChar));
  const uint32_t* src = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
  int8_t* dst = codes.data_ptr<int8_t>();
  const int b = static_cast<int>(bits);
  const int32_t half = 1 << (b - 1);
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n) {
      const uint32_t* row = src + n * W;
      for (int64_t i = 0; i < D; ++i)
        dst[n * D + i] = static_cast<int8_t>(int32_t(extract_field(row, i, b)) - half);
    }
  });
  return codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(piso, CPU, m) {
  m.impl("pack", &pack_cpu);
  m.impl("unpack", &unpack_cpu);
}

}  // namespace piso
