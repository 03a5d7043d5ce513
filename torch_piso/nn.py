"""QuantLinear: a drop-in ``nn.Linear`` replacement holding packed integer codes and scales.

Storage (all buffers, so they follow ``.to()`` and live in ``state_dict``):
  ``packed``  int32 [out_features, ceil(in_features * bits / 32)]  (layout: csrc/qlinear_common.h)
  ``scales``  float32 [out_features] (per channel, group_size -1) or [out_features, in_features/group_size]
  ``bias``    [out_features] in the original linear's dtype, or None
``scales`` and ``bias`` are floating buffers, so ``.to(dtype)`` / ``.half()`` cast them like any
module's (bf16 scales round the dequantized weight to bf16 precision; keep a model's QuantLinear
scales float32 by casting before quantizing, or not at all); ``packed`` stays int32.
The dequantized weight is ``scale * code``; forward is ``torch.ops.piso.dequant_matmul`` and never
builds it.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .reference import qlinear as _ref


def _check_bits_group(bits: int, group_size: int, in_features: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits: expected an integer in [2, 8], got {bits!r}")
    if group_size != -1 and (group_size <= 0 or in_features % group_size != 0):
        raise ValueError(f"group_size: expected -1 (per channel) or a positive divisor of "
                         f"in_features={in_features}, got {group_size}")


def _has_kernel(op: str, device: torch.device) -> bool:
    key = "CUDA" if device.type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"piso::{op}", key)


class QuantLinear(nn.Module):
    """Linear layer with ``bits``-bit signed codes on the grid [-2^(b-1), 2^(b-1)-1] and float scales.

    Build one with :meth:`from_linear` (codes and scales from a quantizer) or :meth:`from_float`
    (round-to-nearest at absmax or given scales); the plain constructor makes zero-filled storage of
    the right shapes for :func:`torch_piso.io.load_quantized` to fill.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = -1,
                 bias: bool = False, device=None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got "
                             f"{in_features} and {out_features}")
        _check_bits_group(bits, group_size, in_features)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bits = int(bits)
        self.group_size = int(group_size)
        words = _ref.words_per_row(in_features, bits)
        sshape = (out_features,) if group_size == -1 else (out_features, in_features // group_size)
        self.register_buffer("packed", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(sshape, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, codes: Tensor, scales: Tensor, bits: int,
                    group_size: int = -1) -> "QuantLinear":
        """Wraps already computed int8 ``codes`` [out, in] and ``scales`` ([out] or [out, in/group_size])
        for ``linear`` (whose bias, if any, is copied). Codes out of range for ``bits`` are rejected."""
        N, D = linear.out_features, linear.in_features
        if tuple(codes.shape) != (N, D):
            raise ValueError(f"codes: expected shape [{N}, {D}] (the linear's weight), got {tuple(codes.shape)}")
        if codes.dtype != torch.int8:
            raise ValueError(f"codes: expected int8, got {codes.dtype}")
        dev = linear.weight.device
        has_bias = linear.bias is not None
        q = cls(D, N, bits, group_size, bias=has_bias, device=dev,
                bias_dtype=linear.bias.dtype if has_bias else torch.float32)
        q.set_quantized(codes.to(dev), scales.to(dev))
        if has_bias:
            q.bias.copy_(linear.bias.detach())
        return q

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, group_size: int = -1,
                   scales: Optional[Tensor] = None) -> "QuantLinear":
        """Round-to-nearest quantization of ``linear.weight`` at ``scales`` (default: symmetric absmax,
        max|w| / (2^(b-1)-1) per row or group) through ``torch.ops.piso.quantize_rtn``."""
        W = linear.weight.detach()
        _check_bits_group(bits, group_size, W.shape[1])
        if scales is None:
            scales = _ref.absmax_scales(W, bits, group_size).to(torch.float32)
        scales = scales.to(W.device)
        if _has_kernel("quantize_rtn", W.device):
            codes, _ = torch.ops.piso.quantize_rtn(W, scales, bits, group_size)
        else:  # a build without the PiSO ops: the same float64 rule in plain PyTorch
            codes = _ref.quantize_rtn_reference(W, scales, bits, group_size)
        return cls.from_linear(linear, codes, scales, bits, group_size)

    @torch.no_grad()
    def set_quantized(self, codes: Tensor, scales: Tensor) -> None:
        """Replaces the stored codes and scales (validated: range, shapes, finite scales)."""
        sshape = tuple(self.scales.shape)
        if tuple(scales.shape) != sshape:
            raise ValueError(f"scales: expected shape {list(sshape)} for out_features={self.out_features}, "
                             f"in_features={self.in_features}, group_size={self.group_size}, got "
                             f"{list(scales.shape)}")
        if not torch.isfinite(scales).all():
            raise ValueError("scales: contains NaN or Inf")
        packed = torch.ops.piso.pack(codes.to(self.packed.device), self.bits)
        self.packed.copy_(packed)
        self.scales.copy_(scales.to(torch.float32))

    # ------------------------------------------------------------------ use
    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.piso.dequant_matmul(x, self.packed, self.scales, self.bits, self.group_size,
                                             self.in_features, self.bias)

    def codes(self) -> Tensor:
        """int8 codes [out_features, in_features]."""
        return torch.ops.piso.unpack(self.packed, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense weight scale * code [out_features, in_features] (for tests and evaluation)."""
        q = self.codes().to(torch.float64)
        s = _ref.expand_scales(self.scales.to(torch.float64), self.in_features, self.group_size)
        return (q * s).to(dtype)

    def extra_repr(self) -> str:
        g = "per_channel" if self.group_size == -1 else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"{g}, bias={self.bias is not None}")


def _get_parent(model: nn.Module, name: str):
    parts = name.split(".")
    parent = model
    for p in parts[:-1]:
        if not hasattr(parent, p):
            raise KeyError(f"replace_linear: no submodule {name!r} in the model (missing {p!r})")
        parent = getattr(parent, p)
    if not isinstance(getattr(parent, parts[-1], None), nn.Module):
        raise KeyError(f"replace_linear: no submodule {name!r} in the model")
    return parent, parts[-1]


def replace_linear(model: nn.Module,
                   replacement: Union[Mapping[str, nn.Module],
                                      Callable[[str, nn.Linear], Optional[nn.Module]]]) -> list[str]:
    """Swaps modules in place by dotted name and returns the replaced names.

    ``replacement`` is either a mapping ``name -> new module`` (every name must exist) or a callable
    ``fn(name, linear) -> module or None`` called for every ``nn.Linear`` of the model (None keeps it),
    at every name it is reachable by (one Linear used at two places is replaced at both).
    """
    if callable(replacement) and not isinstance(replacement, Mapping):
        todo = {}
        for name, mod in model.named_modules(remove_duplicate=False):
            if isinstance(mod, nn.Linear):
                new = replacement(name, mod)
                if new is not None:
                    todo[name] = new
    else:
        todo = dict(replacement)
    for name, new in todo.items():
        if not isinstance(new, nn.Module):
            raise TypeError(f"replace_linear: the replacement for {name!r} is not an nn.Module")
        parent, leaf = _get_parent(model, name)
        setattr(parent, leaf, new)
    return list(todo)
