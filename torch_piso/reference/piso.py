"""Float64 references for PiSO (ALGORITHM.md §2-§3) and RTN: readable, slow, for tests only.

- ``quantize_rtn``: codes = clamp(round_half_even(w / s)) in float64 (the library's rounding rule).
- ``objective``: E(s) = s² qᵀHq − 2s qᵀGw per row (H None = identity, 1-D = diagonal, G None = H).
- ``brute_force_scales``: the minimum of E over a dense scan of s ∈ (0, 4·max|w|/max|grid|] plus both
  sides of every breakpoint |w_i|/(k+½) (×(1 ± 1e-7)); an upper bound on the exact optimum over the
  open intervals between breakpoints that the exact sweep must match (ALGORITHM.md §2.10).
- ``full_objective``: the layer objective F(ŵ) = ŵᵀHŵ − 2ŵᵀGw with every group quantized.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def int_grid(bits: int, narrow_range: bool = False) -> Tuple[int, int]:
    half = 2 ** (bits - 1)
    return (-(half - 1) if narrow_range else -half), half - 1


def _expand_scales(scales: Tensor, D: int) -> Tensor:
    s = scales.to(torch.float64)
    if s.dim() == 1:
        return s[:, None].expand(-1, D)
    gs = D // s.shape[1]
    return s.repeat_interleave(gs, dim=1)


def quantize_rtn(W: Tensor, scales: Tensor, bits: int, group_size: int = -1,
                 narrow_range: bool = False) -> Tuple[Tensor, Tensor]:
    """(codes int8, W_hat in W's dtype) with the float64 division rule."""
    qmin, qmax = int_grid(bits, narrow_range)
    s = _expand_scales(scales, W.shape[1])
    q = torch.clamp(torch.round(W.to(torch.float64) / s), qmin, qmax)
    return q.to(torch.int8), (q * s).to(W.dtype)


def _quad(q: Tensor, H: Optional[Tensor]) -> Tensor:
    if H is None:
        return (q * q).sum(-1)
    H = H.to(torch.float64)
    if H.dim() == 1:
        return (q * q * H).sum(-1)
    return ((q @ H) * q).sum(-1)


def _lin(W: Tensor, H: Optional[Tensor], G: Optional[Tensor]) -> Tensor:
    """(G w) per row, G None = H; returns [..., D] float64."""
    W = W.to(torch.float64)
    M = G if G is not None else H
    if M is None:
        return W
    M = M.to(torch.float64)
    if M.dim() == 1:
        return W * M
    return W @ M.T


def objective_lin(W: Tensor, lin: Tensor, s: Tensor, H: Optional[Tensor], qmin: int,
                  qmax: int) -> Tensor:
    """E(s) = s² qᵀHq − 2s qᵀlin with q = RTN(W/s); s broadcasts over the last dim of W
    (shape [...] or [..., 1])."""
    W = W.to(torch.float64)
    s = s.to(torch.float64)
    if s.dim() == W.dim() - 1:
        s = s.unsqueeze(-1)
    q = torch.clamp(torch.round(W / s), qmin, qmax)
    s1 = s.squeeze(-1)
    return s1 * s1 * _quad(q, H) - 2 * s1 * (q * lin.to(torch.float64)).sum(-1)


def objective(W: Tensor, s: Tensor, H: Optional[Tensor] = None, G: Optional[Tensor] = None,
              bits: int = 4, narrow_range: bool = False) -> Tensor:
    """Channel-wise E per row at scales s [N]."""
    qmin, qmax = int_grid(bits, narrow_range)
    return objective_lin(W, _lin(W, H, G), s, H, qmin, qmax)


def breakpoints(w: Tensor, qmin: int, qmax: int) -> Tensor:
    """All positive breakpoints |w_i|/(k+½) of one row (float64)."""
    w = w.to(torch.float64)
    out = []
    for wi in w.tolist():
        L = qmax if wi > 0 else (-qmin if wi < 0 else 0)
        out += [abs(wi) / (k + 0.5) for k in range(L)]
    return torch.tensor(out, dtype=torch.float64)


def brute_force_lin(W: Tensor, lin: Tensor, H: Optional[Tensor], qmin: int, qmax: int,
                    n: int = 4000, float32: bool = False) -> Tuple[Tensor, Tensor]:
    """Per row (min E, argmin s) over the dense scan + both sides of every breakpoint.

    ``float32``: only float32 scales that lie strictly between breakpoints (what a float32 result
    of optimal_scales may be): the scan rounded to float32, and on each side of every breakpoint
    the nearest float32 value strictly beyond it; candidates equal to a breakpoint are dropped. An
    interval narrower than a float32 ulp then holds no candidate."""
    W = W.to(torch.float64)
    best_e, best_s = [], []
    gmax = max(-qmin, qmax)
    for r in range(W.shape[0]):
        w = W[r]
        amax = w.abs().max().item()
        if amax == 0:
            best_e.append(0.0)
            best_s.append(1.0)
            continue
        smax = 4 * amax / gmax
        # The scan is shifted off the round values i * smax / n: with tie-heavy weights those can
        # land exactly on a breakpoint, where round-half-even mixes the states of both sides -- an
        # isolated point, not an interval, which PiSO (and any scale stored with rounding error)
        # does not target.
        cand = [torch.arange(1, n + 1, dtype=torch.float64) * (smax / n) * (1 + 3.7e-10)]
        bp = breakpoints(w, qmin, qmax)
        if float32:
            b32 = bp.to(torch.float32)
            up = torch.where(b32.double() > bp, b32, torch.nextafter(b32, torch.tensor(float("inf"))))
            dn = torch.where(b32.double() < bp, b32, torch.nextafter(b32, torch.tensor(0.0)))
            s = torch.cat([cand[0].to(torch.float32), up, dn]).double()
            s = s[(s > 0) & ~torch.isin(s, bp)]
        else:
            cand += [bp * (1 + 1e-7), bp * (1 - 1e-7)]
            s = torch.cat(cand)
        e = objective_lin(w.expand(s.numel(), -1), lin[r].expand(s.numel(), -1), s, H, qmin, qmax)
        i = int(torch.argmin(e))
        best_e.append(e[i].item())
        best_s.append(s[i].item())
    return torch.tensor(best_e, dtype=torch.float64), torch.tensor(best_s, dtype=torch.float64)


def brute_force_scales(W: Tensor, H: Optional[Tensor] = None, G: Optional[Tensor] = None,
                       bits: int = 4, narrow_range: bool = False, n: int = 4000):
    """Channel-wise brute force: (min E per row, argmin s)."""
    qmin, qmax = int_grid(bits, narrow_range)
    return brute_force_lin(W, _lin(W, H, G), H, qmin, qmax, n)


def full_objective(W: Tensor, scales: Tensor, H: Tensor, G: Optional[Tensor], bits: int,
                   group_size: int, narrow_range: bool = False) -> Tensor:
    """F(ŵ) = ŵᵀHŵ − 2ŵᵀGw per row with every group quantized at its scale (H dense)."""
    _, W_hat = quantize_rtn(W.to(torch.float64), scales, bits, group_size, narrow_range)
    H = H.to(torch.float64)
    Gw = _lin(W, H, G)
    return ((W_hat @ H) * W_hat).sum(-1) - 2 * (W_hat * Gw).sum(-1)


def piso_s_step_problem(W: Tensor, W_hat: Tensor, H: Tensor, G: Optional[Tensor], k0: int,
                        gs: int) -> Tuple[Tensor, Tensor]:
    """The single-group problem PiSO_S solves for group [k0, k0+gs) (ALGORITHM.md §3.2):
    returns (H_kk, b_k) with b_k = (Gw)_k − Σ_{j∉k} H_kj ŵ_j (W_hat holds ŵ for the other groups)."""
    H = H.to(torch.float64)
    Gw = _lin(W, H, G)
    sl = slice(k0, k0 + gs)
    other = W_hat.to(torch.float64).clone()
    other[:, sl] = 0
    b = Gw[:, sl] - other @ H[:, sl]
    return H[sl, sl], b
