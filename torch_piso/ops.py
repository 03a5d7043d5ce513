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
    """Exactly optimal PiSO scales. See ``torch.ops.piso.optimal_scales``."""
    return _lib.optimal_scales(W, H, G, bits, group_size, sequential, eps, narrow_range)


def quantize_rtn(W: Tensor, scales: Tensor, bits: int, group_size: int = -1,
                 narrow_range: bool = False):
    """Round-to-nearest on the signed grid; returns (codes int8, W_hat = scale * code)."""
    return _lib.quantize_rtn(W, scales, bits, group_size, narrow_range)


@torch.library.register_fake("piso::optimal_scales")
def _(W, H, G, bits, group_size=-1, sequential=False, eps=1e-9, narrow_range=False):
    N, D = W.shape
    if group_size == -1:
        return W.new_empty((N,), dtype=_scale_dtype(W))
    return W.new_empty((N, D // group_size), dtype=_scale_dtype(W))


@torch.library.register_fake("piso::quantize_rtn")
def _(W, scales, bits, group_size=-1, narrow_range=False):
    return W.new_empty(W.shape, dtype=torch.int8), torch.empty_like(W)


@torch.library.register_fake("piso::_piso_sweep")
def _(W, lin, H, qmin, qmax, eps=1e-9, algorithm="auto"):
    R = W.shape[0]
    return W.new_empty((R,), dtype=_scale_dtype(W)), W.new_empty((R,), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# GPTQ / Qronos
# ---------------------------------------------------------------------------------------------
def _ec_fake(W, bits, group_size):
    N, D = W.shape
    shape = (N,) if group_size == -1 else (N, D // group_size)
    return (W.new_empty((N, D), dtype=torch.int8), W.new_empty(shape, dtype=_scale_dtype(W)),
            torch.empty_like(W))


@torch.library.register_fake("piso::gptq")
def _(W, H, bits, group_size=-1, scales=None, scales_update="none", act_order=True, block_size=128,
      damp=0.01, narrow_range=False, stats=None):
    return _ec_fake(W, bits, group_size)


@torch.library.register_fake("piso::qronos")
def _(W, H, G, bits, group_size=-1, scales=None, scales_update="none", act_order=True,
      block_size=128, alpha=1e-6, narrow_range=False, stats=None):
    return _ec_fake(W, bits, group_size)
