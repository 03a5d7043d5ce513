// torch_piso C++ API: one entry point per op of the `piso` namespace. Each call goes through the
// PyTorch dispatcher, so it reaches the CPU or CUDA kernel by the tensors' device -- exactly what
// `torch.ops.piso.*` does from Python. The GoogleTest suite (tests/cpp) is written against this.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace piso {

// H += x^T x (x: [..., D]; H: [D, D] float32/float64).
void hessian_accumulate_(at::Tensor& H, const at::Tensor& x);
// G += x_q^T x_fp.
void cross_accumulate_(at::Tensor& G, const at::Tensor& x_q, const at::Tensor& x_fp);

// PiSO scales: [N] per channel or [N, D/group_size].
at::Tensor optimal_scales(const at::Tensor& W, const std::optional<at::Tensor>& H,
                          const std::optional<at::Tensor>& G, int64_t bits, int64_t group_size = -1,
                          bool sequential = false, double eps = 1e-9, bool narrow_range = false);
// (codes int8, W_hat).
std::tuple<at::Tensor, at::Tensor> quantize_rtn(const at::Tensor& W, const at::Tensor& scales,
                                                int64_t bits, int64_t group_size = -1,
                                                bool narrow_range = false);
// The raw sweep over independent problems sharing one H block: (scales, objective).
std::tuple<at::Tensor, at::Tensor> piso_sweep(const at::Tensor& W, const at::Tensor& lin,
                                              const std::optional<at::Tensor>& H, int64_t qmin,
                                              int64_t qmax, double eps = 1e-9,
                                              const std::string& algorithm = "auto");

// (codes, scales, W_hat).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gptq(
    const at::Tensor& W, const at::Tensor& H, int64_t bits, int64_t group_size = -1,
    const std::optional<at::Tensor>& scales = std::nullopt, const std::string& scales_update = "none",
    bool act_order = true, int64_t block_size = 128, double damp = 0.01, bool narrow_range = false,
    const std::optional<at::Tensor>& stats = std::nullopt);
std::tuple<at::Tensor, at::Tensor, at::Tensor> qronos(
    const at::Tensor& W, const at::Tensor& H, const at::Tensor& G, int64_t bits,
    int64_t group_size = -1, const std::optional<at::Tensor>& scales = std::nullopt,
    const std::string& scales_update = "none", bool act_order = true, int64_t block_size = 128,
    double alpha = 1e-6, bool narrow_range = false,
    const std::optional<at::Tensor>& stats = std::nullopt);

at::Tensor pack(const at::Tensor& codes, int64_t bits);
at::Tensor unpack(const at::Tensor& packed, int64_t bits, int64_t in_features);
at::Tensor dequant_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                          int64_t bits, int64_t group_size, int64_t in_features,
                          const std::optional<at::Tensor>& bias = std::nullopt);

}  // namespace piso
