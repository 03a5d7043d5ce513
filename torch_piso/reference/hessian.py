"""Float64 references of the Hessian ops and of the collector's normalized statistics
(ALGORITHM.md §1.2-1.3). Tests compare the compiled ops and HessianCollector with these."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def hessian_accumulate(H: Tensor, x: Tensor) -> Tensor:
    """What ``piso::hessian_accumulate_`` computes, out of place in float64: ``H + xᵀx`` with x [..., D]."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return H.to(torch.float64) + x2.T @ x2


def cross_accumulate(G: Tensor, x_q: Tensor, x_fp: Tensor) -> Tensor:
    """What ``piso::cross_accumulate_`` computes in float64: ``G + x_qᵀ x_fp`` (rows index x_q's features)."""
    a = x_q.reshape(-1, x_q.shape[-1]).to(torch.float64)
    b = x_fp.reshape(-1, x_fp.shape[-1]).to(torch.float64)
    return G.to(torch.float64) + a.T @ b


def normalized_statistics(xs_q: Sequence[Tensor], xs_fp: Optional[Sequence[Tensor]] = None):
    """H = X̃ᵀX̃ / T and, given the paired float inputs, G = X̃ᵀX / T with the same T (the number of
    tokens in X̃). ``xs_q[i]`` and ``xs_fp[i]`` are the inputs of batch i in the quantized and float
    models. Returns (H, G or None, T)."""
    Xq = torch.cat([x.reshape(-1, x.shape[-1]).to(torch.float64) for x in xs_q])
    T = Xq.shape[0]
    H = Xq.T @ Xq / T
    if xs_fp is None:
        return H, None, T
    Xf = torch.cat([x.reshape(-1, x.shape[-1]).to(torch.float64) for x in xs_fp])
    assert Xf.shape == Xq.shape, "paired passes must have the same tokens"
    return H, Xq.T @ Xf / T, T
