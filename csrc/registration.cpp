// All operator schemas of the `piso` namespace, in one place (the op contract of ARCHITECTURE.md §2).
// Kernels register themselves per backend beside their code (csrc/cpu/*, csrc/cuda/*), so a
// CPU-only build simply lacks the CUDA registrations. Fake (meta) kernels live in torch_piso/ops.py;
// the backend-independent Autograd registration of the non-differentiable ops is at the end.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <vector>

TORCH_LIBRARY(piso, m) {
  // H += x^T x over every leading dim of x ([..., D]); H [D,D] float32/float64 sets the precision.
  // Symmetric work (syrk-like); both triangles are written.
  m.def("hessian_accumulate_(Tensor(a!) H, Tensor x) -> ()");
  // G += x_q^T x_fp: inputs of the quantized model against the paired float inputs (X~^T X).
  m.def("cross_accumulate_(Tensor(a!) G, Tensor x_q, Tensor x_fp) -> ()");

  // PiSO: the exactly optimal scale s > 0 minimizing s^2 q^T H q - 2 s q^T G w with q = RTN(w/s).
  // H None = identity (data-free), 1-D = diagonal, 2-D = dense. G None = H. group_size -1 = per
  // channel ([N]); else [N, D/group_size] with PiSO_I, or PiSO_S when `sequential` and H is dense
  // (with H None or diagonal and no G the groups are exactly decoupled; with G, PiSO_S runs on the
  // dense diagonal matrix, since (G w)_k reads every group).
  // eps is relative to the interval's upper breakpoint. Scales float64 for float64 W, else float32,
  // strictly inside their interval so quantize_rtn (float64 division) reproduces the sweep's codes.
  m.def(
      "optimal_scales(Tensor W, Tensor? H, Tensor? G, int bits, int group_size=-1, "
      "bool sequential=False, float eps=1e-9, bool narrow_range=False) -> Tensor");
  // Round-to-nearest on a given grid: codes int8 and the dequantized weight scale * code.
  m.def(
      "quantize_rtn(Tensor W, Tensor scales, int bits, int group_size=-1, bool narrow_range=False) "
      "-> (Tensor codes, Tensor W_hat)");
  // The breakpoint sweep itself for a batch of independent problems that share one H block:
  // row r rounds W[r] and its linear term is lin[r] (E = s^2 q^T H q - 2 s q^T lin[r]).
  // Returns (scales, objective at the returned scale). `algorithm`: auto | sequential |
  // event_parallel (the GPU formulation, also runnable on CPU so that it is tested everywhere) |
  // sequential_prefix | sequential_events | sequential_table (these force the CPU sweep's way to the u values).
  m.def(
      "_piso_sweep(Tensor W, Tensor lin, Tensor? H, int qmin, int qmax, float eps=1e-9, "
      "str algorithm=\"auto\") -> (Tensor scales, Tensor objective)");

  // GPTQ on H = X~^T X~ (lazy-batch Cholesky form). scales_update: none | group_absmax | layer |
  // group | group_sequential | group_data_free. stats (optional, float64 [4], written):
  // [damping added, damping relative to mean diag H, 1 if it fell back to RTN, layer loss].
  m.def(
      "gptq(Tensor W, Tensor H, int bits, int group_size=-1, Tensor? scales=None, "
      "str scales_update=\"none\", bool act_order=True, int block_size=128, float damp=0.01, "
      "bool narrow_range=False, Tensor(b!)? stats=None) -> (Tensor codes, Tensor scales, Tensor W_hat)");
  // Qronos on H = X~^T X~ and G = X~^T X (damping alpha * lambda_max(H)); same outputs as gptq.
  m.def(
      "qronos(Tensor W, Tensor H, Tensor G, int bits, int group_size=-1, Tensor? scales=None, "
      "str scales_update=\"none\", bool act_order=True, int block_size=128, float alpha=1e-6, "
      "bool narrow_range=False, Tensor(b!)? stats=None) -> (Tensor codes, Tensor scales, Tensor W_hat)");

  // Packed storage for QuantLinear: int8 codes [N, D] <-> packed int32 words.
  m.def("pack(Tensor codes, int bits) -> Tensor");
  m.def("unpack(Tensor packed, int bits, int in_features) -> Tensor");
  // y = x @ dequant(packed, scales)^T (+ bias), without materializing the float weight.
  m.def(
      "dequant_matmul(Tensor x, Tensor packed, Tensor scales, int bits, int group_size, "
      "int in_features, Tensor? bias=None) -> Tensor");
}

namespace {

// Autograd for the ops that are not differentiable (statistics, integer codes, piecewise-constant
// scales, the GPTQ/Qronos sweeps): they run below autograd, as the generated kernels of ATen's own
// non-differentiable ops do. Without this, PyTorch's fallback for custom ops ran the kernels with
// autograd still on: the ATen calls inside them recorded graphs on inputs that require grad
// (mm_out refused them in hessian_accumulate_, cross_accumulate_ chained every batch into G's
// graph) and the outputs came back requiring grad through a node that warns and drops gradients.
// Written arguments (Tensor(a!)) get their version bumped, as any in-place op does.
void below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    const auto* alias = args[i].alias_info();
    const auto& v = (*stack)[first + i];
    if (!(alias && alias->isWrite() && v.isTensor())) continue;
    const auto& t = v.toTensor();
    // As ATen's in-place ops: refused before anything is written.
    TORCH_CHECK(!t.requires_grad(), op.schema().name(), ": ", args[i].name(),
                " requires grad, but the op writes it in place and is not differentiable; pass a "
                "tensor that does not require grad (e.g. ", args[i].name(), ".detach())");
    TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), op.schema().name(), ": ",
                args[i].name(), " is an inference tensor: writing it in place outside "
                "InferenceMode is not allowed (make a clone first)");
    written.push_back(t);
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (auto& t : written) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

// dequant_matmul is differentiable: its autograd is registered in torch_piso/ops.py.
TORCH_LIBRARY_IMPL(piso, Autograd, m) {
  for (const char* name : {"hessian_accumulate_", "cross_accumulate_", "optimal_scales",
                           "quantize_rtn", "_piso_sweep", "gptq", "qronos", "pack", "unpack"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&below_autograd>());
  }
}
