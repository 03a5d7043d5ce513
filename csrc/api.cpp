// The C++ API of torch_piso.h: thin calls through the dispatcher (same path as torch.ops.piso.*).
#include "torch_piso.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace piso {
namespace {
template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
using OptT = const std::optional<at::Tensor>&;
}  // namespace

void hessian_accumulate_(at::Tensor& H, const at::Tensor& x) {
  static auto h = op<void(const at::Tensor&, const at::Tensor&)>("piso::hessian_accumulate_");
  h.call(H, x);
}

void cross_accumulate_(at::Tensor& G, const at::Tensor& x_q, const at::Tensor& x_fp) {
  static auto h =
      op<void(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("piso::cross_accumulate_");
  h.call(G, x_q, x_fp);
}

at::Tensor optimal_scales(const at::Tensor& W, OptT H, OptT G, int64_t bits, int64_t group_size,
                          bool sequential, double eps, bool narrow_range) {
  static auto h = op<at::Tensor(const at::Tensor&, OptT, OptT, int64_t, int64_t, bool, double, bool)>(
      "piso::optimal_scales");
  return h.call(W, H, G, bits, group_size, sequential, eps, narrow_range);
}

std::tuple<at::Tensor, at::Tensor> quantize_rtn(const at::Tensor& W, const at::Tensor& scales,
                                                int64_t bits, int64_t group_size,
                                                bool narrow_range) {
  static auto h = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                        int64_t, int64_t, bool)>("piso::quantize_rtn");
  return h.call(W, scales, bits, group_size, narrow_range);
}

std::tuple<at::Tensor, at::Tensor> piso_sweep(const at::Tensor& W, const at::Tensor& lin, OptT H,
                                              int64_t qmin, int64_t qmax, double eps,
                                              const std::string& algorithm) {
  static auto h = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, OptT,
                                                        int64_t, int64_t, double, c10::string_view)>(
      "piso::_piso_sweep");
  return h.call(W, lin, H, qmin, qmax, eps, algorithm);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gptq(const at::Tensor& W, const at::Tensor& H,
                                                    int64_t bits, int64_t group_size, OptT scales,
                                                    const std::string& scales_update,
                                                    bool act_order, int64_t block_size, double damp,
                                                    bool narrow_range, OptT stats) {
  static auto h = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, int64_t, int64_t, OptT, c10::string_view, bool, int64_t,
      double, bool, OptT)>("piso::gptq");
  return h.call(W, H, bits, group_size, scales, scales_update, act_order, block_size, damp,
                narrow_range, stats);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qronos(const at::Tensor& W, const at::Tensor& H,
                                                      const at::Tensor& G, int64_t bits,
                                                      int64_t group_size, OptT scales,
                                                      const std::string& scales_update,
                                                      bool act_order, int64_t block_size,
                                                      double alpha, bool narrow_range, OptT stats) {
  static auto h = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, OptT,
      c10::string_view, bool, int64_t, double, bool, OptT)>("piso::qronos");
  return h.call(W, H, G, bits, group_size, scales, scales_update, act_order, block_size, alpha,
                narrow_range, stats);
}

at::Tensor pack(const at::Tensor& codes, int64_t bits) {
  static auto h = op<at::Tensor(const at::Tensor&, int64_t)>("piso::pack");
  return h.call(codes, bits);
}

at::Tensor unpack(const at::Tensor& packed, int64_t bits, int64_t in_features) {
  static auto h = op<at::Tensor(const at::Tensor&, int64_t, int64_t)>("piso::unpack");
  return h.call(packed, bits, in_features);
}

at::Tensor dequant_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                          int64_t bits, int64_t group_size, int64_t in_features, OptT bias) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                int64_t, int64_t, OptT)>("piso::dequant_matmul");
  return h.call(x, packed, scales, bits, group_size, in_features, bias);
}

}  // namespace piso
