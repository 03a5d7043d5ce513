"""Python face of the ``torch.ops.piso`` library: typed wrappers and fake (meta) kernels so every op
traces under ``torch.compile``. The kernels themselves are C++/CUDA (csrc/)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference import qlinear as _ref_qlinear

_lib = torch.ops.piso


def has_cuda_kernels() -> bool:
    """True when this build registered CUDA kernels (torch with CUDA and nvcc at build time)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("piso::optimal_scales", "CUDA") or \
        torch._C._dispatch_has_kernel_for_dispatch_key("piso::hessian_accumulate_", "CUDA")


def _scale_dtype(W: Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Hessian accumulation
# ---------------------------------------------------------------------------------------------
def hessian_accumulate_(H: Tensor, x: Tensor) -> None:
    """``H += xᵀx`` for x of shape [..., D]; H is [D, D] float32/float64 (the accumulation dtype).

    x may be float16/bfloat16/float32/float64 with any strides (a non-contiguous x is copied once);
    H must be contiguous. Zero tokens is a no-op; NaN/Inf in x raise before H is touched. The update
    is computed on the block-upper triangle and mirrored, so it is exactly symmetric. CUDA: cuBLAS
    reads bf16/fp16/fp32 x natively into a float32 H (fp32 never rounded to TF32)."""
    _lib.hessian_accumulate_(H, x)


def cross_accumulate_(G: Tensor, x_q: Tensor, x_fp: Tensor) -> None:
    """``G += x_qᵀ x_fp``: quantized-model inputs against the paired float-model inputs, so rows of
    G index x_q's features (G = X̃ᵀX of ALGORITHM.md §1.2). Same argument rules as
    :func:`hessian_accumulate_`; x_q and x_fp must hold the same number of tokens."""
    _lib.cross_accumulate_(G, x_q, x_fp)


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_accumulate_fake(H, hname, x, xname):
    # The C++ kernels' shape/dtype/device checks, so that fake (meta) tensors fail like real ones.
    torch._check(H.dim() == 2 and H.shape[0] == H.shape[1],
                 lambda: f"{hname}: expected a square [D, D] matrix, got shape {tuple(H.shape)}")
    torch._check(H.dtype in (torch.float32, torch.float64),
                 lambda: f"{hname}: expected float32 or float64 (its dtype is the accumulation precision), got {H.dtype}")
    torch._check(x.dtype in _FLOATS,
                 lambda: f"{xname}: expected float16, bfloat16, float32 or float64, got {x.dtype}")
    torch._check(x.dim() >= 1, lambda: f"{xname}: expected shape [..., D], got a 0-D tensor")
    torch._check(x.shape[-1] == H.shape[0],
                 lambda: f"{xname}: last dimension {x.shape[-1]} does not match {hname} of shape {tuple(H.shape)}")
    torch._check(H.device == x.device,
                 lambda: f"{hname} and {xname} must be on the same device, got {H.device} and {x.device}")


@torch.library.register_fake("piso::hessian_accumulate_")
def _(H, x):
    _check_accumulate_fake(H, "H", x, "x")
    return None


@torch.library.register_fake("piso::cross_accumulate_")
def _(G, x_q, x_fp):
    _check_accumulate_fake(G, "G", x_q, "x_q")
    _check_accumulate_fake(G, "G", x_fp, "x_fp")
    torch._check(x_q.numel() // max(x_q.shape[-1], 1) == x_fp.numel() // max(x_fp.shape[-1], 1),
                 lambda: "x_q and x_fp: expected the same number of paired tokens")
    return None


# ---------------------------------------------------------------------------------------------
# PiSO and RTN
# ---------------------------------------------------------------------------------------------
def optimal_scales(W: Tensor, H: Optional[Tensor] = None, G: Optional[Tensor] = None, bits: int = 4,
                   group_size: int = -1, sequential: bool = False, eps: float = 1e-9,
                   narrow_range: bool = False) -> Tensor:
    """Exactly optimal PiSO scales (ALGORITHM.md §2-§3).

    Per row (or per row and group) the s > 0 minimizing ``E(s) = s² qᵀHq − 2s qᵀGw`` with
    ``q = clamp(round(w / s))`` on ``[-2^(b-1), 2^(b-1)-1]`` (``narrow_range``: ``[-(2^(b-1)-1), 2^(b-1)-1]``).

    - ``H``: None = identity (data-free), ``[D]`` = diagonal (O(1) per breakpoint), ``[D, D]`` = dense
      (O(D) per breakpoint; only its symmetric part matters). ``G``: None = H, else the cross term
      ``X̃ᵀX`` (``(Gw)_i = Σ_j G[i, j] w_j``).
    - ``group_size`` -1: returns ``[N]``; else ``[N, D / group_size]``. PiSO_I (independent groups,
      diagonal blocks H_kk, G_kk) or, with ``sequential=True`` and a dense H, PiSO_S (groups in
      descending Σ diag H order, each minimizing the full objective with processed groups quantized
      and the others at their original weights). With H None or diagonal and no G the group problems
      are exactly decoupled, so ``sequential`` changes nothing; with a cross term G they are not
      (``(Gw)_k`` reads every group), and PiSO_S runs on the dense diagonal matrix.
    - ``eps`` (relative to each interval's upper breakpoint) keeps the scale strictly inside its
      interval. Returned dtype: float64 for float64 W, else float32; the returned value in that dtype
      reproduces the interval's codes under ``quantize_rtn`` (float64 division), so the objective at
      the returned scale is the one the sweep minimized. bfloat16/float16 W are treated as their
      float32 values. A float32 result never lies on a breakpoint, so an interval narrower than a
      float32 ulp (near-tied float32 weights) is skipped and the best of the others returned.
      All-zero rows get 1.0; rows with no admissible interval (e.g. only dead inputs) get the
      absmax scale ``max|w| / 2^(b-1)``; a row for which every nonzero quantization has E > 0
      (a linear term pointing away from w) gets ``4 max|w|``, above every breakpoint: all codes 0,
      E = 0.
    - CPU uses the sequential sweep; CUDA the event-parallel formulation (same results).
    """
    return _lib.optimal_scales(W, H, G, bits, group_size, sequential, eps, narrow_range)


def quantize_rtn(W: Tensor, scales: Tensor, bits: int, group_size: int = -1,
                 narrow_range: bool = False):
    """Round-to-nearest on the signed grid; returns (codes int8, W_hat = scale * code in W's dtype).

    ``codes = clamp(round_half_even(w / s))`` with w and s widened to float64 before dividing, so a
    scale strictly inside a PiSO interval reproduces exactly that interval's codes. ``scales`` is
    ``[N]`` (group_size -1) or ``[N, D / group_size]``, finite and > 0.
    """
    return _lib.quantize_rtn(W, scales, bits, group_size, narrow_range)


def piso_sweep(W: Tensor, lin: Tensor, H: Optional[Tensor], qmin: int, qmax: int, eps: float = 1e-9,
               algorithm: str = "auto"):
    """The raw breakpoint sweep over independent rows sharing one H block:
    minimizes ``s² qᵀHq − 2s qᵀlin[r]`` with ``q = RTN(W[r] / s)`` on ``[qmin, qmax]``.
    Returns (scales, objective at the returned scale, float64). ``algorithm``: ``auto`` (CPU:
    sequential, CUDA: event_parallel), ``sequential`` or ``event_parallel``; ``sequential_prefix``
    (H's rows added one at a time), ``sequential_prefix_batched`` (eight at a time, what
    ``sequential`` uses on wide rows), ``sequential_events`` / ``sequential_table`` force one of
    the CPU sweep's ways to the u values whatever the width (tests, benchmarks)."""
    return _lib._piso_sweep(W, lin, H, qmin, qmax, eps, algorithm)


# Argument checks of the fake kernels: the same rules (and messages) as the C++ checks, so a bad call
# fails at trace time under torch.compile / FakeTensor instead of returning a shape.
def _fake_W(W, name="W"):
    torch._check(W.dim() == 2, lambda: f"{name}: expected a 2-D tensor, got shape {tuple(W.shape)}")
    torch._check(W.dtype in _FLOATS,
                 lambda: f"{name}: expected float16, bfloat16, float32 or float64, got {W.dtype}")


def _fake_bits(bits):
    torch._check(2 <= bits <= 8, lambda: f"bits: expected an integer in [2, 8], got {bits}")


def _fake_group(group_size, D):
    """Checks group_size against D (as check_group_size); returns the number of groups."""
    torch._check(group_size == -1 or group_size > 0, lambda: (
        f"group_size: expected -1 (per channel) or a positive divisor of {D}, got {group_size}"))
    if group_size == -1:
        return 1
    torch._check(D % group_size == 0,
                 lambda: f"group_size: {group_size} does not divide the {D} input features")
    return D // group_size


def _fake_square(H, D, name, diagonal_ok=False):
    if H is None:
        return
    ok = (H.dim() == 2 and H.shape[0] == D and H.shape[1] == D) or \
        (diagonal_ok and H.dim() == 1 and H.shape[0] == D)
    want = f"[{D}] (diagonal) or [{D}, {D}]" if diagonal_ok else f"[{D}, {D}]"
    torch._check(ok, lambda: f"{name}: expected shape {want}, got {tuple(H.shape)}")
    torch._check(H.dtype in (torch.float32, torch.float64), lambda: (
        f"{name}: expected float32 or float64 (its dtype is the accumulation precision), got "
        f"{H.dtype}"))


def _fake_scales(scales, N, ng, group_size):
    if scales is None:
        return
    want = (N,) if group_size == -1 else (N, ng)
    torch._check(tuple(scales.shape) == want,
                 lambda: f"scales: expected shape {list(want)}, got {list(scales.shape)}")


def _check_fake_devices(**tensors):
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    first = next(iter(devs.items()))
    for n, d in devs.items():
        torch._check(d == first[1],
                     lambda: f"{first[0]} and {n} must be on the same device, got {first[1]} and {d}")


@torch.library.register_fake("piso::optimal_scales")
def _(W, H, G, bits, group_size=-1, sequential=False, eps=1e-9, narrow_range=False):
    _check_fake_devices(W=W, H=H, G=G)
    _fake_W(W)
    N, D = W.shape
    _fake_square(H, D, "H", diagonal_ok=True)
    _fake_square(G, D, "G")
    _fake_bits(bits)
    torch._check(0 <= eps < 0.5, lambda: f"eps: expected 0 <= eps < 0.5, got {eps}")
    ng = _fake_group(group_size, D)
    if group_size == -1:
        return W.new_empty((N,), dtype=_scale_dtype(W))
    return W.new_empty((N, ng), dtype=_scale_dtype(W))


@torch.library.register_fake("piso::quantize_rtn")
def _(W, scales, bits, group_size=-1, narrow_range=False):
    _check_fake_devices(W=W, scales=scales)
    _fake_W(W)
    _fake_bits(bits)
    N, D = W.shape
    _fake_scales(scales, N, _fake_group(group_size, D), group_size)
    return W.new_empty(W.shape, dtype=torch.int8), torch.empty_like(W)


@torch.library.register_fake("piso::_piso_sweep")
def _(W, lin, H, qmin, qmax, eps=1e-9, algorithm="auto"):
    _check_fake_devices(W=W, lin=lin, H=H)
    _fake_W(W)
    torch._check(lin.shape == W.shape,
                 lambda: f"lin: expected the shape of W {list(W.shape)}, got {list(lin.shape)}")
    _fake_square(H, W.shape[1], "H", diagonal_ok=True)
    R = W.shape[0]
    return W.new_empty((R,), dtype=_scale_dtype(W)), W.new_empty((R,), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# GPTQ / Qronos
# ---------------------------------------------------------------------------------------------
SCALES_UPDATES = ("none", "group_absmax", "layer", "layer_sequential", "group", "group_sequential",
                  "group_data_free")


def gptq(W: Tensor, H: Tensor, bits: int, group_size: int = -1, scales: Optional[Tensor] = None,
         scales_update: str = "none", act_order: bool = True, block_size: int = 128,
         damp: float = 0.01, narrow_range: bool = False, stats: Optional[Tensor] = None):
    """GPTQ on H = X~ᵀX~ with optional PiSO interleaving; returns (codes int8, scales, W_hat).

    ``scales_update``: none (given/absmax scales), group_absmax (dynamic groups: each group's
    absmax scale from the current weights as the sweep reaches it), layer / layer_sequential (⊙*: PiSO_I / PiSO_S on H before the sweep), group / group_sequential /
    group_data_free (⊙†: each group's scale by PiSO_I / PiSO_S / data-free PiSO on the current,
    error-diffused weights just before its first column). ``stats`` (float64 [4], written):
    [damping added, damping / mean diag H, 1 if fell back to RTN, layer loss on the undamped H].

    ``scales`` ([N] or [N, D/group_size], > 0) are the starting scales (absmax of W when None);
    "layer*" replaces them all, group modes replace each group's when the sweep reaches it. Work
    dtype float64 for float64 W, else float32 (H is converted); codes = clamp(round_half_even(w/s))
    with the division in float64. If H + damping does not factor, the damping is escalated x10 (up
    to 6 times, TORCH_WARN); if it never factors the result is RTN with the current scales."""
    return _lib.gptq(W, H, bits, group_size, scales, scales_update, act_order, block_size, damp,
                     narrow_range, stats)


def qronos(W: Tensor, H: Tensor, G: Tensor, bits: int, group_size: int = -1,
           scales: Optional[Tensor] = None, scales_update: str = "none", act_order: bool = True,
           block_size: int = 128, alpha: float = 1e-6, narrow_range: bool = False,
           stats: Optional[Tensor] = None):
    """Qronos on H = X~ᵀX~ and G = X~ᵀX (rows of G index the quantized-model features), ridge
    alpha·λ_max(H); same modes and outputs as :func:`gptq` (stats[0] = the ridge λ)."""
    return _lib.qronos(W, H, G, bits, group_size, scales, scales_update, act_order, block_size,
                       alpha, narrow_range, stats)


def _ec_fake(W, H, G, bits, group_size, scales, scales_update, block_size):
    _fake_W(W)
    N, D = W.shape
    _fake_square(H, D, "H")
    _fake_square(G, D, "G")
    _fake_bits(bits)
    ng = _fake_group(group_size, D)
    _fake_scales(scales, N, ng, group_size)
    torch._check(scales_update in SCALES_UPDATES, lambda: (
        f"scales_update: expected one of {', '.join(SCALES_UPDATES)}, got '{scales_update}'"))
    torch._check(block_size >= 1, lambda: f"block_size: expected a positive integer, got {block_size}")
    shape = (N,) if group_size == -1 else (N, ng)
    return (W.new_empty((N, D), dtype=torch.int8), W.new_empty(shape, dtype=_scale_dtype(W)),
            torch.empty_like(W))


@torch.library.register_fake("piso::gptq")
def _(W, H, bits, group_size=-1, scales=None, scales_update="none", act_order=True, block_size=128,
      damp=0.01, narrow_range=False, stats=None):
    _check_fake_devices(W=W, H=H, scales=scales, stats=stats)
    return _ec_fake(W, H, None, bits, group_size, scales, scales_update, block_size)


@torch.library.register_fake("piso::qronos")
def _(W, H, G, bits, group_size=-1, scales=None, scales_update="none", act_order=True,
      block_size=128, alpha=1e-6, narrow_range=False, stats=None):
    _check_fake_devices(W=W, H=H, G=G, scales=scales, stats=stats)
    return _ec_fake(W, H, G, bits, group_size, scales, scales_update, block_size)


# ---------------------------------------------------------------------------------------------
# Packed storage for QuantLinear (layout: csrc/qlinear_common.h)
# ---------------------------------------------------------------------------------------------
def packed_words(in_features: int, bits: int) -> int:
    """int32 words per packed row: ceil(in_features * bits / 32)."""
    return (in_features * bits + 31) // 32


def pack(codes: Tensor, bits: int) -> Tensor:
    """int8 codes [N, D] on the signed grid of ``bits`` -> int32 [N, ceil(D*bits/32)] (dense per-row
    little-endian bitstream of ``code + 2**(bits-1)``)."""
    return _lib.pack(codes, bits)


def unpack(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """Inverse of :func:`pack`: int32 [N, W] -> int8 codes [N, in_features]."""
    return _lib.unpack(packed, bits, in_features)


def dequant_matmul(x: Tensor, packed: Tensor, scales: Tensor, bits: int, group_size: int,
                   in_features: int, bias: Optional[Tensor] = None) -> Tensor:
    """``y = x @ (scale * code)ᵀ + bias`` for x [..., in_features] -> [..., N] in x's dtype, accumulated
    in float32 (float64 for float64 x), without materializing the dense weight."""
    return _lib.dequant_matmul(x, packed, scales, bits, group_size, in_features, bias)


def _fake_packed(packed, bits, in_features):
    _fake_bits(bits)
    torch._check(in_features > 0,
                 lambda: f"in_features: expected a positive integer, got {in_features}")
    torch._check(packed.dtype == torch.int32,
                 lambda: f"packed: expected int32 words, got {packed.dtype}")
    torch._check(packed.dim() == 2,
                 lambda: f"packed: expected a 2-D tensor, got shape {tuple(packed.shape)}")
    words = packed_words(in_features, bits)
    torch._check(packed.shape[1] == words, lambda: (
        f"packed: expected {words} int32 words per row for in_features={in_features} and "
        f"bits={bits}, got {packed.shape[1]}"))


@torch.library.register_fake("piso::pack")
def _(codes, bits):
    torch._check(codes.dim() == 2,
                 lambda: f"codes: expected a 2-D tensor, got shape {tuple(codes.shape)}")
    torch._check(codes.dtype == torch.int8, lambda: f"codes: expected int8 codes, got {codes.dtype}")
    _fake_bits(bits)
    N, D = codes.shape
    return codes.new_empty((N, (D * bits + 31) // 32), dtype=torch.int32)


@torch.library.register_fake("piso::unpack")
def _(packed, bits, in_features):
    _fake_packed(packed, bits, in_features)
    return packed.new_empty((packed.shape[0], in_features), dtype=torch.int8)


@torch.library.register_fake("piso::dequant_matmul")
def _(x, packed, scales, bits, group_size, in_features, bias=None):
    # The dispatcher sends mixed meta/real inputs here: keep the kernels' device check.
    for name, t in (("packed", packed), ("scales", scales), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"x and {name} must be on the same device, got {x.device} and "
                               f"{name} on {t.device}")
    _fake_packed(packed, bits, in_features)
    torch._check(x.dim() >= 1, lambda: "x: expected shape [..., in_features], got a 0-D tensor")
    torch._check(x.shape[-1] == in_features, lambda: (
        f"x: last dimension {x.shape[-1]} does not match in_features={in_features}"))
    N = packed.shape[0]
    _fake_scales(scales, N, _fake_group(group_size, in_features), group_size)
    if bias is not None:
        torch._check(tuple(bias.shape) == (N,),
                     lambda: f"bias: expected shape [{N}], got {list(bias.shape)}")
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


# Autograd of dequant_matmul: y = x Ŵᵀ + b with Ŵ = scale * code, so
#   dL/dx = g Ŵ,   dL/dscale[n, group] = sum over the group's i of code[n, i] (gᵀx)[n, i],   dL/db = sum g
# (codes are integers: no gradient). Ŵ is materialized for the backward only (in the accumulation
# dtype: float32, float64 for float64 x); the forward stays fused.
def _dm_setup_context(ctx, inputs, output):
    x, packed, scales, bits, group_size, in_features, bias = inputs
    ctx.meta = (bits, group_size, in_features, x.dtype, scales.dtype,
                None if bias is None else bias.dtype)
    ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, packed, scales)


def _dm_backward(ctx, g):
    x, packed, scales = ctx.saved_tensors
    bits, group_size, in_features, x_dtype, s_dtype, b_dtype = ctx.meta
    acc = torch.float64 if x_dtype == torch.float64 else torch.float32
    g2 = g.reshape(-1, g.shape[-1]).to(acc)
    grad_x = grad_s = grad_b = None
    codes = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
        codes = unpack(packed, bits, in_features).to(acc)
    if ctx.needs_input_grad[0]:
        W_hat = codes * _ref_qlinear.expand_scales(scales.to(acc), in_features, group_size)
        grad_x = (g2 @ W_hat).reshape(*g.shape[:-1], in_features).to(x_dtype)
    if ctx.needs_input_grad[2]:
        P = codes * (g2.t() @ x.reshape(-1, in_features).to(acc))  # [N, D]
        if group_size == -1:
            grad_s = P.sum(1)
        else:
            grad_s = P.reshape(P.shape[0], -1, group_size).sum(2)
        grad_s = grad_s.to(s_dtype)
    # bias=None may reach the op as an omitted trailing argument: needs_input_grad then has 6 entries
    if b_dtype is not None and ctx.needs_input_grad[6]:
        grad_b = g2.sum(0).to(b_dtype)
    return grad_x, None, grad_s, None, None, None, grad_b


torch.library.register_autograd("piso::dequant_matmul", _dm_backward,
                                setup_context=_dm_setup_context)
