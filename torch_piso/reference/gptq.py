"""Textbook GPTQ and Qronos in plain PyTorch (ALGORITHM.md §5), with the PiSO interleaving modes of
§4. Readable column loops in the style of IST-DASLab ``gptq.py``; what the compiled
``torch.ops.piso.gptq`` / ``torch.ops.piso.qronos`` are tested against (run them in float64).

Deliberate differences from the compiled ops: one damping try (no escalation, raises if H does
not factor), PiSO_S's linear term evaluated by its definition (with the pending lazy-batch update
applied to the columns after the block), and ``capture`` to record what each group scale update saw.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor

GROUP_MODES = ("group_absmax", "group", "group_sequential", "group_data_free")
MODES = ("none", "layer", "layer_sequential") + GROUP_MODES


def int_grid(bits: int, narrow_range: bool = False):
    half = 2 ** (bits - 1)
    return (-(half - 1) if narrow_range else -half), half - 1


def absmax_scales(W: Tensor, group_size: int, qmin: int) -> Tensor:
    """max|w| / -qmin per row and contiguous group ([N, n_groups]); all-zero groups get 1."""
    N, D = W.shape
    a = W.abs().reshape(N, D // group_size, group_size).amax(2) / float(-qmin)
    return torch.where(a > 0, a, torch.ones_like(a))


def column_order(dH: Tensor, group_size: int, act_order: bool, group_aware: bool) -> Tensor:
    """Natural, descending diag H, or the group-aware order of ALGORITHM §3.3 (stable sorts)."""
    D = dH.numel()
    if not act_order:
        return torch.arange(D)
    if not group_aware or group_size == D:
        return torch.sort(dH, stable=True, descending=True).indices
    blocks = dH.reshape(D // group_size, group_size)
    gorder = torch.sort(blocks.sum(1), stable=True, descending=True).indices
    inner = torch.sort(blocks, dim=1, stable=True, descending=True).indices
    return (inner[gorder] + gorder[:, None] * group_size).reshape(D)


def _default_sweep(w: Tensor, lin: Tensor, H: Optional[Tensor], qmin: int, qmax: int) -> Tensor:
    return torch.ops.piso._piso_sweep(w, lin, H, qmin, qmax, 1e-9, "auto")[0]


def lambda_max(H: Tensor) -> float:
    """30 power iterations on H / max|H| from randn(seed 42, float64, CPU), Rayleigh quotient."""
    scale = H.abs().max().item()
    if scale == 0:
        return 0.0
    Hn = H / scale
    g = torch.Generator().manual_seed(42)
    v = torch.randn(H.shape[0], generator=g, dtype=torch.float64).to(H)
    v = v / v.norm()
    for _ in range(30):
        v = Hn @ v
        v = v / v.norm()
    return float(v @ (Hn @ v)) * scale


class _Sweep:
    """State shared by GPTQ and Qronos: working weights in processing order and the scale rules."""

    def __init__(self, W, H, G, bits, group_size, scales, scales_update, act_order, narrow_range,
                 sweep_fn, capture):
        assert scales_update in MODES, scales_update
        W = W.to(torch.float64)
        H = H.to(torch.float64)
        qronos = G is not None
        G = H if G is None else G.to(torch.float64)
        self.N, self.D = W.shape
        self.per_channel = group_size == -1
        self.gs = self.D if self.per_channel else group_size
        self.ng = self.D // self.gs
        self.qmin, self.qmax = int_grid(bits, narrow_range)
        self.mode = scales_update
        self.sweep_fn = sweep_fn or _default_sweep
        self.capture = capture
        dead = torch.diag(H) == 0
        s = absmax_scales(W, self.gs, self.qmin) if scales is None else \
            scales.to(torch.float64).reshape(self.N, self.ng)
        W0 = W.clone()
        W0[:, dead] = 0
        if scales_update in ("layer", "layer_sequential"):
            s = torch.ops.piso.optimal_scales(W0, H, None if G is H else G, bits, group_size,
                                              scales_update == "layer_sequential", 1e-9,
                                              narrow_range).to(torch.float64).reshape(self.N, self.ng)
        self.scales = s.clone()
        Hfix = H.clone()
        Hfix[dead, dead] = 1
        # GPTQ orders by diag H with dead columns at 1 (IST); Qronos by the raw diagonal (§5.2)
        self.perm = column_order(torch.diag(H if qronos else Hfix), self.gs, act_order,
                                 scales_update in GROUP_MODES)
        p = self.perm
        self.H = H[p][:, p]       # undamped, processing order
        self.G = G[p][:, p]
        self.Hfix = Hfix[p][:, p]
        # Qronos's target uses the original weights (§5.2: w = weight_orig); the weights being
        # quantized have dead columns zeroed
        self.Wo = (W if qronos else W0)[:, p].clone()
        self.W = W0[:, p].clone()
        self.Q = torch.zeros(self.N, self.D, dtype=torch.int64)
        self.lam = 0.0

    def group_update(self, g0: int, w_cur_full: Tensor):
        """Scale of the group at positions [g0, g0+gs) from the current weights (ALGORITHM §4.3).
        w_cur_full: all current weights (processed columns dequantized, others error-corrected)."""
        k = int(self.perm[g0]) // self.gs
        sl = slice(g0, g0 + self.gs)
        wk = w_cur_full[:, sl]
        if self.mode == "group_absmax":
            s = absmax_scales(wk, self.gs, self.qmin)[:, 0]
            lin, Hk = None, None
        else:
            Hk = self.H[sl, sl]
            if self.mode == "group_data_free":
                lin, Hk = wk, None
            elif self.mode == "group":
                lin = wk @ self.G[sl, sl].T
            else:  # PiSO_S: b_k = (G w_orig)_k - sum_{j not in k} H_kj w_cur_j
                others = w_cur_full.clone()
                others[:, sl] = 0
                lin = self.Wo @ self.G[sl, :].T - others @ self.H[sl, :].T
            s = self.sweep_fn(wk.clone(), lin.clone(), Hk, self.qmin, self.qmax).to(torch.float64)
        if self.capture is not None:
            self.capture.append(dict(group=k, position=g0, w=wk.clone(), lin=lin, scale=s.clone()))
        self.scales[:, k] = s

    def quant(self, i: int) -> Tensor:
        s = self.scales[:, int(self.perm[i]) // self.gs]
        q = torch.clamp(torch.round(self.W[:, i] / s), self.qmin, self.qmax)
        self.Q[:, i] = q.to(torch.int64)
        return s * q

    def gptq_sweep(self, U: Tensor, start: int, block_size: int):
        """Lazy-batch GPTQ on positions [start, D) (IST-style), U indexed in processing order."""
        D, gs = self.D, self.gs
        groups = self.mode in GROUP_MODES
        if groups and gs < D:
            B = gs * max(1, block_size // gs)
            bounds = [start] + list(range((start // B + 1) * B, D, B)) + [D]
        else:
            bounds = list(range(start, D, block_size)) + [D]
        for i1, i2 in zip(bounds[:-1], bounds[1:]):
            W1 = self.W[:, i1:i2].clone()
            Err1 = torch.zeros(self.N, i2 - i1, dtype=torch.float64)
            for i in range(i1, i2):
                if groups and i % gs == 0:
                    cur = self.W.clone()
                    cur[:, i1:i2] = W1
                    cur[:, i2:] -= Err1[:, :i - i1] @ U[i1:i, i2:]  # pending lazy update
                    self.group_update(i, cur)
                self.W[:, i1:i2] = W1  # quant() reads the current column
                deq = self.quant(i)
                err = (W1[:, i - i1] - deq) / U[i, i]
                W1[:, i - i1:] -= err[:, None] * U[i, i:i2][None, :]
                W1[:, i - i1] = deq
                Err1[:, i - i1] = err
            self.W[:, i1:i2] = W1
            self.W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    def result(self):
        inv = torch.argsort(self.perm)
        s = self.scales.reshape(self.N) if self.per_channel else self.scales
        return self.Q[:, inv].to(torch.int8), s, self.W[:, inv]


def layer_loss(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """sum over rows of (w - w_hat)^T H (w - w_hat) (dead columns of W ignored: H is zero there)."""
    d = (W.to(torch.float64) - W_hat.to(torch.float64))
    d[:, torch.diag(H) == 0] = 0
    return float(((d @ H.to(torch.float64)) * d).sum())


def gptq(W: Tensor, H: Tensor, bits: int, group_size: int = -1, scales: Optional[Tensor] = None,
         scales_update: str = "none", act_order: bool = True, block_size: int = 128,
         damp: float = 0.01, narrow_range: bool = False,
         sweep_fn: Optional[Callable] = None, capture: Optional[List[dict]] = None):
    """Returns (codes int8, scales float64, W_hat float64) like ``torch.ops.piso.gptq``."""
    st = _Sweep(W, H, None, bits, group_size, scales, scales_update, act_order, narrow_range,
                sweep_fn, capture)
    Hd = st.Hfix.clone()
    st.lam = damp * float(torch.diag(Hd).mean())
    Hd += st.lam * torch.eye(st.D, dtype=torch.float64)
    L = torch.linalg.cholesky(Hd)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    st.gptq_sweep(U, 0, block_size)
    return st.result()


def gptq_speed_reference(W: Tensor, H: Tensor, bits: int, block_size: int = 128,
                         damp: float = 0.01):
    """IST-DASLab-style GPTQ in the dtype of W (per channel, act_order, absmax scales): the plain
    PyTorch baseline of benchmarks/bench_gptq.py. Returns (codes, W_hat)."""
    W = W.clone()
    H = H.to(W.dtype).clone()
    N, D = W.shape
    qmin, qmax = int_grid(bits)
    s = W.abs().amax(1) / -qmin
    s[s == 0] = 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(D, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, D, block_size):
        i2 = min(i1 + block_size, D)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            q = s * torch.clamp(torch.round(w / s), qmin, qmax)
            Q1[:, i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    inv = torch.argsort(perm)
    W_hat = Q[:, inv]
    return torch.round(W_hat / s[:, None]).to(torch.int8), W_hat


def qronos(W: Tensor, H: Tensor, G: Tensor, bits: int, group_size: int = -1,
           scales: Optional[Tensor] = None, scales_update: str = "none", act_order: bool = True,
           block_size: int = 128, alpha: float = 1e-6, narrow_range: bool = False,
           sweep_fn: Optional[Callable] = None, capture: Optional[List[dict]] = None):
    """Qronos (ALGORITHM §5.2) with H = X~^T X~ and G = X~^T X. Returns (codes, scales, W_hat)."""
    st = _Sweep(W, H, G, bits, group_size, scales, scales_update, act_order, narrow_range,
                sweep_fn, capture)
    D = st.D
    st.lam = alpha * max(lambda_max(H.to(torch.float64)), 0.0)
    lam = st.lam
    # Step 1: least-squares value of column 0 given the others.
    v0 = (st.Wo @ st.G[0, :] - st.W[:, 1:] @ st.H[0, 1:]) / st.Hfix[0, 0]
    st.W[:, 0] = v0
    if scales_update in GROUP_MODES:
        st.group_update(0, st.W.clone())  # before step 1b (the Qronos timing of §4.3)
    q0 = st.quant(0)
    st.W[:, 0] = q0
    if D == 1:
        return st.result()
    # Step 1b: ridge re-solve of columns 1.. toward w, directly with the (D-1)x(D-1) system.
    A = st.Hfix[1:, 1:] + lam * torch.eye(D - 1, dtype=torch.float64)
    rhs = st.Wo @ st.G[1:, :].T + lam * st.Wo[:, 1:] - q0[:, None] * st.H[1:, 0][None, :]
    st.W[:, 1:] = torch.linalg.solve(A, rhs.T).T
    # Steps 2+: GPTQ on the remaining columns with U' = chol((H[1:,1:] + lam I)^-1, upper).
    Ufull = torch.zeros(D, D, dtype=torch.float64)
    Ufull[0, 0] = 1
    Ufull[1:, 1:] = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(A)),
                                          upper=True)
    st.gptq_sweep(Ufull, 1, block_size)
    return st.result()
