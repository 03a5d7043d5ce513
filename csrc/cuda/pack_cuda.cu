// pack / unpack on CUDA, the same per-row bitstream as csrc/cpu/pack_cpu.cpp (qlinear_common.h).
// pack: one thread per output word gathers the (at most ceil(32/bits)+1) codes that touch it, so no
// two threads write one word and no atomics are needed. unpack: one thread per code.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "qlinear_common.h"

namespace piso {
namespace {

constexpr int kThreads = 256;

__global__ void pack_kernel(const int8_t* __restrict__ codes, uint32_t* __restrict__ packed,
                            int64_t N, int64_t D, int64_t W, int bits) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= N * W) return;
  const int64_t n = t / W, w = t % W;
  const int32_t half = 1 << (bits - 1);
  const int64_t lo_bit = w * 32, hi_bit = lo_bit + 32;  // this word's stream bits [lo, hi)
  int64_t i = lo_bit / bits;                           // first code that may touch the word
  uint32_t word = 0;
  for (; i < D && i * bits < hi_bit; ++i) {
    const uint64_t u = static_cast<uint32_t>(int32_t(codes[n * D + i]) + half);
    const int64_t shift = i * bits - lo_bit;  // negative: the code started in the previous word
    word |= shift >= 0 ? static_cast<uint32_t>(u << shift) : static_cast<uint32_t>(u >> (-shift));
  }
  packed[t] = word;
}

__global__ void unpack_kernel(const uint32_t* __restrict__ packed, int8_t* __restrict__ codes,
                              int64_t N, int64_t D, int64_t W, int bits) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= N * D) return;
  const int64_t n = t / D, i = t % D;
  codes[t] = static_cast<int8_t>(int32_t(extract_field(packed + n * W, i, bits)) - (1 << (bits - 1)));
}

at::Tensor pack_cuda(const at::Tensor& codes_in, int64_t bits) {
  const auto [N, D] = check_pack_args(codes_in, bits);
  TORCH_CHECK(codes_in.is_cuda(), "codes: expected a CUDA tensor for the CUDA kernel");
  c10::cuda::CUDAGuard guard(codes_in.device());
  const auto codes = codes_in.contiguous();
  const int64_t W = packed_words(D, bits);
  auto packed = at::empty({N, W}, codes.options().dtype(at::kInt));
  const int64_t total = N * W;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  pack_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      codes.data_ptr<int8_t>(), reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>()), N, D, W,
      static_cast<int>(bits));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return packed;
}

at::Tensor unpack_cuda(const at::Tensor& packed_in, int64_t bits, int64_t in_features) {
  check_packed(packed_in, bits, in_features);
  TORCH_CHECK(packed_in.is_cuda(), "packed: expected a CUDA tensor for the CUDA kernel");
  c10::cuda::CUDAGuard guard(packed_in.device());
  const auto packed = packed_in.contiguous();
  const int64_t N = packed.size(0), W = packed.size(1), D = in_features;
  auto codes = at::empty({N, D}, packed.options().dtype(at::kChar));
  const int64_t total = N * D;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  unpack_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>()), codes.data_ptr<int8_t>(), N, D,
      W, static_cast<int>(bits));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(piso, CUDA, m) {
  m.impl("pack", &pack_cuda);
  m.impl("unpack", &unpack_cuda);
}

}  // namespace piso
