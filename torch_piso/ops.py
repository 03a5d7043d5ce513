"""Python face of the ``torch.ops.piso`` library: typed wrappers and fake (meta) kernels so every op
traces under ``torch.compile``. The kernels themselves are C++/CUDA (csrc/)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

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
    """``H += xᵀx`` for x of shape [..., D]; H is [D, D] float32/float64 (the accumulation dtype)."""
    _lib.hessian_accumulate_(H, x)


def cross_accumulate_(G: Tensor, x_q: Tensor, x_fp: Tensor) -> None:
    """``G += x_qᵀ x_fp`` (quantized-model inputs against the paired float-model inputs)."""
    _lib.cross_accumulate_(G, x_q, x_fp)


@torch.library.register_fake("piso::hessian_accumulate_")
def _(H, x):
    return None


@torch.library.register_fake("piso::cross_accumulate_")
def _(G, x_q, x_fp):
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
      and the others at their original weights). With H None or diagonal the group problems are
      exactly decoupled, so ``sequential`` is ignored there (always PiSO_I).
    - ``eps`` (relative to each interval's upper breakpoint) keeps the scale strictly inside its
      interval. Returned dtype: float64 for float64 W, else float32; the returned value in that dtype
      reproduces the interval's codes under ``quantize_rtn`` (float64 division), so the objective at
      the returned scale is the one the sweep minimized. bfloat16/float16 W are treated as their
      float32 values. All-zero rows get 1.0; rows with no admissible interval (e.g. only dead inputs)
      get the absmax scale ``max|w| / 2^(b-1)``.
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
    sequential, CUDA: event_parallel), ``sequential`` or ``event_parallel``."""
    return _lib._piso_sweep(W, lin, H, qmin, qmax, eps, algorithm)


def _check_fake_devices(**tensors):
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    first = next(iter(devs.items()))
    for n, d in devs.items():
        torch._check(d == first[1],
                     lambda: f"{first[0]} and {n} must be on the same device, got {first[1]} and {d}")


@torch.library.register_fake("piso::optimal_scales")
def _(W, H, G, bits, group_size=-1, sequential=False, eps=1e-9, narrow_range=False):
    _check_fake_devices(W=W, H=H, G=G)
    N, D = W.shape
    if group_size == -1:
        return W.new_empty((N,), dtype=_scale_dtype(W))
    return W.new_empty((N, D // group_size), dtype=_scale_dtype(W))


@torch.library.register_fake("piso::quantize_rtn")
def _(W, scales, bits, group_size=-1, narrow_range=False):
    _check_fake_devices(W=W, scales=scales)
    return W.new_empty(W.shape, dtype=torch.int8), torch.empty_like(W)


@torch.library.register_fake("piso::_piso_sweep")
def _(W, lin, H, qmin, qmax, eps=1e-9, algorithm="auto"):
    _check_fake_devices(W=W, lin=lin, H=H)
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

    ``scales_update``: none (given/absmax scales), group_absmax (IST dynamic groups), layer /
    layer_sequential (⊙*: PiSO_I / PiSO_S on H before the sweep), group / group_sequential /
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


def _ec_fake(W, bits, group_size):
    N, D = W.shape
    shape = (N,) if group_size == -1 else (N, D // group_size)
    return (W.new_empty((N, D), dtype=torch.int8), W.new_empty(shape, dtype=_scale_dtype(W)),
            torch.empty_like(W))


@torch.library.register_fake("piso::gptq")
def _(W, H, bits, group_size=-1, scales=None, scales_update="none", act_order=True, block_size=128,
      damp=0.01, narrow_range=False, stats=None):
    _check_fake_devices(W=W, H=H, scales=scales)
    return _ec_fake(W, bits, group_size)


@torch.library.register_fake("piso::qronos")
def _(W, H, G, bits, group_size=-1, scales=None, scales_update="none", act_order=True,
      block_size=128, alpha=1e-6, narrow_range=False, stats=None):
    _check_fake_devices(W=W, H=H, G=G, scales=scales)
    return _ec_fake(W, bits, group_size)
