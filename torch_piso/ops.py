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


@torch.library.register_fake("piso::pack")
def _(codes, bits):
    N, D = codes.shape
    return codes.new_empty((N, (D * bits + 31) // 32), dtype=torch.int32)


@torch.library.register_fake("piso::unpack")
def _(packed, bits, in_features):
    return packed.new_empty((packed.shape[0], in_features), dtype=torch.int8)


@torch.library.register_fake("piso::dequant_matmul")
def _(x, packed, scales, bits, group_size, in_features, bias=None):
    # The dispatcher sends mixed meta/real inputs here: keep the kernels' device check.
    for name, t in (("packed", packed), ("scales", scales), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"x and {name} must be on the same device, got {x.device} and "
                               f"{name} on {t.device}")
    return x.new_empty((*x.shape[:-1], packed.shape[0]))
