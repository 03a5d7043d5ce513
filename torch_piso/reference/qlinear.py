"""Float64 / pure-integer references for QuantLinear's packed storage and its matmul.

The packing layout (csrc/qlinear_common.h): ``packed`` is int32 ``[N, ceil(D*bits/32)]``; each row is
an independent little-endian bitstream in which code ``i`` is stored as ``code + 2**(bits-1)`` in
stream bits ``[i*bits, (i+1)*bits)`` (stream bit k = bit k%32 of word k//32). Unused bits are zero.
"""
from __future__ import annotations

import torch
from torch import Tensor


def words_per_row(in_features: int, bits: int) -> int:
    return (in_features * bits + 31) // 32


def pack_reference(codes: Tensor, bits: int) -> Tensor:
    """Packs int8 codes [N, D] bit by bit (int64 arithmetic, deliberately naive)."""
    N, D = codes.shape
    W = words_per_row(D, bits)
    u = (codes.to(torch.int64) + (1 << (bits - 1))).cpu()
    out = torch.zeros(N, W * 32, dtype=torch.int64)  # one entry per stream bit
    for j in range(bits):
        out[:, torch.arange(D) * bits + j] = (u >> j) & 1
    weights = (torch.ones(32, dtype=torch.int64) << torch.arange(32))
    words = (out.view(N, W, 32) * weights).sum(-1)  # uint32 values in int64
    words = torch.where(words >= 2**31, words - 2**32, words)  # same bit pattern as int32
    return words.to(torch.int32)


def unpack_reference(packed: Tensor, bits: int, in_features: int) -> Tensor:
    N, W = packed.shape
    words = packed.cpu().to(torch.int64) & 0xFFFFFFFF
    stream = (words.unsqueeze(-1) >> torch.arange(32)) & 1  # [N, W, 32]
    stream = stream.reshape(N, W * 32)
    idx = torch.arange(in_features) * bits
    u = torch.zeros(N, in_features, dtype=torch.int64)
    for j in range(bits):
        u |= stream[:, idx + j] << j
    return (u - (1 << (bits - 1))).to(torch.int8)


def expand_scales(scales: Tensor, in_features: int, group_size: int) -> Tensor:
    """[N] or [N, n_groups] scales -> [N, D] (groups are contiguous along the input dimension)."""
    if group_size == -1:
        return scales.reshape(-1, 1).expand(-1, in_features)
    return scales.repeat_interleave(group_size, dim=1)


def dequantize_reference(codes: Tensor, scales: Tensor, group_size: int) -> Tensor:
    """Dense float64 weight scale * code."""
    D = codes.shape[1]
    return codes.to(torch.float64) * expand_scales(scales.to(torch.float64), D, group_size)


def dequant_matmul_reference(x: Tensor, codes: Tensor, scales: Tensor, group_size: int,
                             bias: Tensor | None = None) -> Tensor:
    """y = x @ (scale * code)^T + bias in float64 (returned in float64)."""
    W = dequantize_reference(codes, scales, group_size)
    y = x.to(torch.float64) @ W.T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y


def absmax_scales(weight: Tensor, bits: int, group_size: int = -1) -> Tensor:
    """Symmetric absmax scales max|w| / (2^(b-1) - 1) per row or group (1.0 for all-zero rows/groups,
    whose codes are 0 at any scale). float64 in, float64 out."""
    N, D = weight.shape
    w = weight.to(torch.float64)
    if group_size != -1:
        w = w.reshape(N, D // group_size, group_size)
    amax = w.abs().amax(dim=-1)
    qmax = (1 << (bits - 1)) - 1
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def quantize_rtn_reference(weight: Tensor, scales: Tensor, bits: int, group_size: int = -1) -> Tensor:
    """codes = clamp(round_half_even(w / s), -2^(b-1), 2^(b-1)-1) in float64 (the rule of
    torch.ops.piso.quantize_rtn)."""
    D = weight.shape[1]
    s = expand_scales(scales.to(torch.float64), D, group_size)
    q = torch.round(weight.to(torch.float64) / s)
    return q.clamp(-(1 << (bits - 1)), (1 << (bits - 1)) - 1).to(torch.int8)
