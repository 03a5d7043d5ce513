"""Block-by-block calibration pipeline (ARCHITECTURE.md §4, ALGORITHM.md §1.2 and §4).

``quantize_model(model, calibration, config)`` quantizes every nn.Linear inside the decoder blocks
of an HF Llama / Qwen causal LM in place (nn.Linear → QuantLinear), one block at a time on
``config.device`` with activations on CPU between blocks:

1. capture the inputs of block 0 (hidden states) and the keyword arguments of every block (masks,
   position embeddings: sliding-window Qwen layers get another mask than full-attention ones) with
   pass-through recorders in place of the blocks' forwards, so no float block runs;
2. per block, per group of linears sharing an input (q,k,v → o → gate,up → down, observed with
   hooks): accumulate H = X̃ᵀX̃/T from the quantized stream (already-quantized predecessors in the
   block included) and, for the cross objective, G = X̃ᵀX/T with X from the paired float pass
   through a float copy of the block (``float_stream="block"``: applied to the quantized-stream
   block input, as in the paper; ``"model"``: a float stream propagated between blocks), then
   compute scales / run EC and swap the linears for QuantLinear at once, so the next group sees
   them;
3. propagate the quantized stream (and the float stream for ``float_stream="model"``) through the
   finished block; free its Hessians.

Decoupled "+" with PiSO scales (§4.1) runs a first full pass of RTN at PiSO scales (objective self
for GPTQ, cross for Qronos) that fixes every layer's scales; the float weights are restored after
each block of that pass, and the EC pass then runs with those scales fixed.

Report (``model.piso_report``, and ``quantize_report.json`` in ``output_dir``): per module the
layer objective of absmax RTN ("loss_before") and of the chosen result ("loss_after"), normalized
per token (H, G are /T):
  - objective "self" (GPTQ; RTN with objective="self"): Σ_rows (w−ŵ)ᵀ H (w−ŵ) = ‖X̃(w−ŵ)‖²/T;
  - objective "cross" (Qronos; RTN by default): Σ_rows wᵀH_fp w − 2 ŵᵀG w + ŵᵀHŵ = ‖Xw − X̃ŵ‖²/T,
    with H_fp = XᵀX/T collected from the same float pass.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import ops
from .config import DEFAULT_SKIP, QuantConfig, skip_pattern_matches
from .hessian import HessianCollector
from .models import DecoderParts, block_linears, find_decoder
from .nn import QuantLinear, replace_linear

__all__ = ["quantize_model", "quantize_model_with_report", "CalibrationError", "format_report"]


class CalibrationError(ValueError):
    """Bad calibration data (empty, wrong shape, token ids out of the vocabulary)."""


class _Stop(Exception):
    """Raised by hooks to end a forward early."""


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _tree_to(obj, device, memo: Optional[Dict[int, Tensor]] = None):
    """obj with every tensor moved to device; with `memo` (id → copy), a tensor met twice is
    copied once and the copies share it as the originals did."""
    if isinstance(obj, Tensor):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(_tree_to(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_tree_to(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _tree_to(v, device, memo) for k, v in obj.items()}
    return obj


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _absmax_scales(W: Tensor, bits: int, group_size: int, narrow_range: bool) -> Tensor:
    """max|w| / 2^(b-1) (narrow range: / (2^(b-1)-1)) per row or group; all-zero → 1 (float32)."""
    N, D = W.shape
    gs = D if group_size == -1 else group_size
    q = (1 << (bits - 1)) - (1 if narrow_range else 0)
    a = W.detach().to(torch.float64).abs().reshape(N, D // gs, gs).amax(2) / q
    a = torch.where(a > 0, a, torch.ones_like(a)).to(torch.float32)
    return a.reshape(N) if group_size == -1 else a


class _LayerLoss:
    """The layer objective per token of any W_hat for one W, with d = w − ŵ per row:
    self (G None) Σ dHdᵀ; cross ‖Xw − X̃ŵ‖²/T = C + 2 Σ d·v + Σ dHdᵀ, where C = Σ w(Hfp + H − G − Gᵀ)wᵀ
    = ‖(X − X̃)w‖²/T and v = w(Gᵀ − H) do not depend on ŵ: computed once per module, so each W_hat
    costs one float64 GEMM (the expanded form took two, plus one for the constant, per W_hat)."""

    def __init__(self, W: Tensor, H: Tensor, G: Optional[Tensor], Hfp: Optional[Tensor]):
        self.W = W.to(torch.float64)
        self.H = H.to(torch.float64)
        self.cross = G is not None
        if self.cross:
            G = G.to(torch.float64)
            M = Hfp.to(torch.float64) + self.H - G - G.T
            self.C = float(((self.W @ M) * self.W).sum())
            self.V = self.W @ (G.T - self.H)

    def __call__(self, What: Tensor) -> float:
        d = self.W - What.to(torch.float64)
        quad = float(((d @ self.H) * d).sum())
        if not self.cross:
            return quad
        return self.C + 2.0 * float((d * self.V).sum()) + quad


def _prepare_calibration(calibration, vocab_size: Optional[int]) -> List[Tensor]:
    if isinstance(calibration, Tensor):
        if calibration.dim() == 1:
            calibration = calibration.unsqueeze(0)
        if calibration.dim() != 2:
            raise CalibrationError(f"calibration: expected token ids [n_samples, seqlen] or a list of "
                                   f"1-D tensors, got a tensor of shape {tuple(calibration.shape)}")
        samples = list(calibration)
    elif isinstance(calibration, (list, tuple)):
        samples = list(calibration)
    else:
        raise CalibrationError(f"calibration: expected a LongTensor [n_samples, seqlen] or a list of 1-D "
                               f"LongTensors, got {type(calibration).__name__}")
    if not samples:
        raise CalibrationError("calibration: no samples (need at least 1 sequence of token ids)")
    out = []
    for i, s in enumerate(samples):
        if not isinstance(s, Tensor):
            raise CalibrationError(f"calibration[{i}]: expected a tensor of token ids, got {type(s).__name__}")
        if s.dim() == 2 and s.shape[0] == 1:
            s = s[0]
        if s.dim() != 1:
            raise CalibrationError(f"calibration[{i}]: expected a 1-D sequence of token ids, got shape "
                                   f"{tuple(s.shape)}")
        if s.numel() == 0:
            raise CalibrationError(f"calibration[{i}]: empty sequence")
        if s.dtype.is_floating_point or s.dtype.is_complex or s.dtype == torch.bool:
            raise CalibrationError(f"calibration[{i}]: expected integer token ids, got {s.dtype}")
        lo, hi = int(s.min()), int(s.max())
        if lo < 0 or (vocab_size is not None and hi >= vocab_size):
            raise CalibrationError(f"calibration[{i}]: token ids must lie in [0, {vocab_size}) (the "
                                   f"model's vocabulary), got values in [{lo}, {hi}]")
        out.append(s.to(torch.long).cpu().unsqueeze(0))
    return out


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _tqdm(iterable=None, **kw):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable if iterable is not None else nullcontext()
    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)


# ---------------------------------------------------------------------------------------------
# capture of block-0 inputs and of every block's keyword arguments
# ---------------------------------------------------------------------------------------------
_DROPPED_KWARGS = ("past_key_value", "past_key_values", "cache", "use_cache")


def _capture(model: nn.Module, parts: DecoderParts, samples: List[Tensor], progress: bool
             ) -> Tuple[List[Tensor], List[List[dict]]]:
    """Block-0 inputs (CPU) and, per sample, the keyword arguments of every block (CPU).

    Blocks need not all receive the same kwargs: HF Qwen2/Qwen3 with sliding-window layers
    (``config.layer_types`` mixing full and sliding attention) give each block the mask of its own
    attention type. So every block's ``forward`` is replaced, for the capture, by a recorder that
    keeps the kwargs of its first call and hands its input through unchanged: no float block runs
    (the point of block-by-block calibration), and the last recorder ends the forward. The kwargs
    are copied to CPU with a memo by tensor identity, so a tensor passed to many blocks (the rotary
    cos/sin, a mask shared by every layer of one type) is stored once, and blocks whose kwargs are
    the same objects share one dict (their device copies are then made once per block, not per
    kwarg set). Samples of equal length share one list: without padding the kwargs depend only on
    the length."""
    layers = parts.layers
    n = len(layers)
    inps: List[Tensor] = []
    kws: List[List[dict]] = []
    by_len: Dict[int, List[dict]] = {}
    seen: List[Optional[Tuple[tuple, dict]]] = [None] * n

    def recorder(i):
        def forward(*args, **kwargs):
            if seen[i] is None:
                if args:
                    x = args[0]
                    extra = args[1:]
                else:
                    x = kwargs.pop("hidden_states", None)
                    extra = ()
                if not isinstance(x, Tensor):
                    raise RuntimeError(f"quantize_model: decoder block {i} was not given its hidden "
                                       "states as the first argument")
                if extra:
                    raise RuntimeError("quantize_model: the decoder blocks receive extra positional "
                                       "arguments; only hidden_states + keyword arguments are supported")
                seen[i] = (x.detach().cpu() if i == 0 else None,
                           {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS})
            if i == n - 1:
                raise _Stop
            # pass-through: the next recorder only needs to be reached, its input value is unused
            return args[0] if args else kwargs["hidden_states"]

        return forward

    # an instance attribute shadows the class's forward; hooks, and attributes the model's loop
    # reads from its blocks (e.g. attention_type), stay in place. A forward already set on the
    # instance (accelerate's offload hooks wrap it so) is put back afterwards.
    own_forward = {i: b.__dict__["forward"] for i, b in enumerate(layers) if "forward" in b.__dict__}
    for i, block in enumerate(layers):
        block.forward = recorder(i)
    dev = parts.embed_tokens.weight.device
    try:
        with torch.no_grad():
            for ids in _tqdm(samples, desc="calibration: embedding", disable=not progress, leave=False):
                seen[:] = [None] * n
                try:
                    model(input_ids=ids.to(dev), use_cache=False)
                except _Stop:
                    pass
                missing = [i for i in range(n) if seen[i] is None]
                if missing:
                    raise RuntimeError(f"quantize_model: the model's forward never reached decoder "
                                       f"block(s) {missing}")
                L = ids.shape[1]
                if L not in by_len:
                    memo: Dict[int, Any] = {}
                    dicts: Dict[tuple, dict] = {}
                    per_block = []
                    for _, kw in seen:
                        key = tuple(sorted((k, id(v)) for k, v in kw.items()))
                        if key not in dicts:
                            d = _tree_to(kw, "cpu", memo)
                            d["use_cache"] = False
                            dicts[key] = d
                        per_block.append(dicts[key])
                    by_len[L] = per_block
                inps.append(seen[0][0])
                kws.append(by_len[L])
    finally:
        for i, block in enumerate(layers):
            if i in own_forward:
                block.forward = own_forward[i]
            elif "forward" in block.__dict__:
                del block.forward
    return inps, kws


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------
class _Runner:
    def __init__(self, model, parts, samples, cfg: QuantConfig, device, progress, log, spy,
                 dist=None, ckpt=None):
        self.model = model
        self.parts = parts
        self.samples = samples
        self.cfg = cfg
        self.dev = device
        self.progress = progress
        self.log = log
        self.spy = spy
        self.hdtype = getattr(torch, cfg.hessian_dtype)
        self.fixed_scales: Dict[str, Tensor] = {}
        self.scale_times: Dict[str, float] = {}
        self.rows: List[dict] = []
        # torch_piso.distributed: DistContext (data/module parallel) and BlockCheckpoint (resume)
        self.dist = dist
        self.ckpt = ckpt
        self.computed_blocks: List[str] = []
        self.resumed_blocks: List[str] = []

    def _skipped(self, qual: str) -> bool:
        return self.cfg.skips(qual)

    def _run_until(self, root: nn.Module, names: Sequence[str], x: Tensor, kw: dict):
        """Forward of `root` on x, stopped once every module in `names` has run."""
        mods = dict(root.named_modules())
        pending = set(names)
        handles = []

        def make(name):
            def hook(module, args, out):
                pending.discard(name)
                if not pending:
                    raise _Stop

            return hook

        for n in names:
            handles.append(mods[n].register_forward_hook(make(n)))
        try:
            root(x, **kw)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if pending:
            raise RuntimeError(f"quantize_model: the block's forward never ran {sorted(pending)}")

    def _collect(self, block, fp_block, names, inps, fp_inps, kws_dev, cross):
        """{name: (H, G|None, T)} and the float-pass H_fp of the group (cross only)."""
        dev = self.dev
        hc = HessianCollector(block, list(names), cross=cross, dtype=self.hdtype, device=dev)
        Hfp = {}
        handle = None
        if cross:
            first = dict(fp_block.named_modules())[names[0]]
            D = first.in_features
            Hfp["H"] = torch.zeros(D, D, dtype=self.hdtype, device=dev)
            Hfp["T"] = 0

            def fp_hook(module, args):
                x = args[0]
                ops.hessian_accumulate_(Hfp["H"], x.detach())
                Hfp["T"] += x.numel() // D

            handle = first.register_forward_pre_hook(fp_hook)
        try:
            with hc:
                for j in range(len(inps)):
                    xq = inps[j].to(dev)
                    kw = kws_dev(j)
                    if cross:
                        xf = xq if fp_inps is None else fp_inps[j].to(dev)
                        with hc.pass_("float", root=fp_block):
                            self._run_until(fp_block, names, xf, kw)
                        with hc.pass_("quant"):
                            self._run_until(block, names, xq, kw)
                    else:
                        self._run_until(block, names, xq, kw)
                if self.dist is not None:  # data parallel: sum every rank's raw statistics
                    from .distributed import reduce_statistics
                    reduce_statistics(self.dist, hc, Hfp if cross else None, names)
                res = {n: hc.pop(n) for n in names}
        finally:
            if handle is not None:
                handle.remove()
        H_fp = Hfp["H"] / Hfp["T"] if cross else None
        return res, H_fp

    def _quantize_one(self, qual, lin: nn.Linear, H, G, H_fp, mode: str, report_obj: str, block_idx):
        cfg = self.cfg
        dev = self.dev
        bits, gs, nr = cfg.bits, cfg.group_size, cfg.narrow_range
        W = lin.weight.detach().to(device=dev, dtype=torch.float32)
        Gr = G if report_obj == "cross" else None
        Hr_fp = H_fp if report_obj == "cross" else None
        abs_s = _absmax_scales(W, bits, gs, nr)
        _, What_abs = ops.quantize_rtn(W, abs_s, bits, gs, nr)
        layer_loss = _LayerLoss(W, H, Gr, Hr_fp)
        loss_before = layer_loss(What_abs)
        scale_time = ec_time = 0.0
        damping = None
        fell_back = False
        ec = cfg.error_correction
        if mode == "scales" or ec == "none":
            _sync(dev)
            t0 = time.perf_counter()
            if mode == "scales":  # decoupled first pass: RTN at PiSO scales, objective of the EC
                scales = ops.optimal_scales(W, H, G if cfg.resolved_objective == "cross" else None,
                                            bits, gs, cfg.sequential, narrow_range=nr)
            elif cfg.scales == "absmax":
                scales = abs_s
            elif cfg.scales == "data-free":
                scales = ops.optimal_scales(W, None, None, bits, gs, cfg.sequential, narrow_range=nr)
            else:
                scales = ops.optimal_scales(W, H, G if cfg.resolved_objective == "cross" else None,
                                            bits, gs, cfg.sequential, narrow_range=nr)
            _sync(dev)
            scale_time = time.perf_counter() - t0
            codes, What = ops.quantize_rtn(W, scales, bits, gs, nr)
            if mode == "scales":
                self.fixed_scales[qual] = scales.detach().cpu()
                self.scale_times[qual] = scale_time
        else:
            scales0 = None
            if cfg.scales == "piso" and cfg.effective_interleave == "decoupled":
                scales0 = self.fixed_scales[qual].to(dev)
                scale_time = self.scale_times.get(qual, 0.0)
            elif cfg.scales == "data-free" and cfg.effective_interleave == "decoupled":
                _sync(dev)
                t0 = time.perf_counter()
                scales0 = ops.optimal_scales(W, None, None, bits, gs, cfg.sequential, narrow_range=nr)
                _sync(dev)
                scale_time = time.perf_counter() - t0
            stats = torch.zeros(4, dtype=torch.float64, device=dev)
            _sync(dev)
            t0 = time.perf_counter()
            if ec == "gptq":
                codes, scales, What = ops.gptq(W, H, bits, gs, scales=scales0,
                                               scales_update=cfg.scales_update, act_order=cfg.act_order,
                                               block_size=cfg.block_size, damp=cfg.damp,
                                               narrow_range=nr, stats=stats)
            else:
                codes, scales, What = ops.qronos(W, H, G, bits, gs, scales=scales0,
                                                 scales_update=cfg.scales_update, act_order=cfg.act_order,
                                                 block_size=cfg.block_size, alpha=cfg.qronos_alpha,
                                                 narrow_range=nr, stats=stats)
            _sync(dev)
            ec_time = time.perf_counter() - t0
            st = stats.cpu().tolist()
            damping, fell_back = st[0], bool(st[2])
        loss_after = loss_before if torch.equal(What, What_abs) else layer_loss(What)
        row = {"block": block_idx, "module": qual, "shape": [int(W.shape[0]), int(W.shape[1])],
               "method": "RTN at PiSO scales (decoupled pass 1)" if mode == "scales" else cfg.label,
               "objective": report_obj, "loss_before": loss_before, "loss_after": loss_after,
               "scale_time_s": scale_time, "ec_time_s": ec_time, "damping": damping,
               "fell_back": fell_back}
        q = QuantLinear.from_linear(lin, codes.to(lin.weight.device), scales.to(lin.weight.device),
                                    bits, gs)
        return q, row

    def run_pass(self, mode: str) -> List[dict]:
        """mode "final": the recipe; "scales": decoupled pass 1 (RTN at PiSO scales, weights restored
        after each block). Returns the pass's report rows."""
        cfg, dev, parts = self.cfg, self.dev, self.parts
        layers = parts.layers
        ec = cfg.error_correction
        if mode == "scales":
            obj = cfg.resolved_objective
        else:
            obj = "cross" if ec == "qronos" else ("self" if ec == "gptq" else cfg.resolved_objective)
        cross = obj == "cross"
        model_stream = cfg.float_stream == "model" and cross
        inps, kws = _capture(self.model, parts, self.samples, self.progress)
        fp_inps = list(inps) if model_stream else None
        rows: List[dict] = []
        desc = "decoupled pass 1: RTN at PiSO scales" if mode == "scales" else f"quantizing ({cfg.label})"
        bar = _tqdm(total=len(layers), desc=desc, disable=not self.progress)
        try:
            for i, block in enumerate(layers):
                if self.dist is not None:
                    self.dist.begin_block(i, mode)
                block.to(dev)
                cache: Dict[int, dict] = {}
                memo: Dict[int, Tensor] = {}

                def kws_dev(j, i=i, cache=cache, memo=memo):
                    """Sample j's kwargs for block i, on the device (one copy per distinct tensor)."""
                    kw = kws[j][i]
                    if id(kw) not in cache:
                        cache[id(kw)] = _tree_to(kw, dev, memo)
                    return cache[id(kw)]

                with torch.no_grad():
                    groups = block_linears(block, run=lambda b: b(inps[0].to(dev), **kws_dev(0)))
                    prefix = f"{parts.layers_name}.{i}."
                    groups = [[n for n in g if not self._skipped(prefix + n)] for g in groups]
                    groups = [g for g in groups if g]
                    fp_block = copy.deepcopy(block) if (cross or model_stream) else None
                    originals: Dict[str, nn.Module] = {}
                    n_rows0 = len(rows)
                    replayed = None
                    if self.ckpt is not None and self.ckpt.has(mode, i):
                        # resume: this block finished in an earlier run; rebuild it, do not recompute
                        from .distributed import replay_block
                        replayed = replay_block(self, block, mode, i, prefix, originals)
                        rows.extend(replayed)
                        groups = []
                    for g in groups:
                        if hasattr(bar, "set_postfix_str"):
                            bar.set_postfix_str(f"block {i}: {','.join(n.rsplit('.', 1)[-1] for n in g)}")
                        res, H_fp = self._collect(block, fp_block, g, inps,
                                                  fp_inps if model_stream else None, kws_dev, cross)
                        mods = dict(block.named_modules())
                        for n in g:
                            H, G, T = res[n]
                            if self.spy is not None:
                                self.spy(prefix + n, {"H": H, "G": G, "H_fp": H_fp, "tokens": T,
                                                      "mode": mode})
                            originals[n] = mods[n]
                        if self.dist is None:
                            new = {}
                            for n in g:
                                H, G, T = res[n]
                                q, row = self._quantize_one(prefix + n, mods[n], H, G, H_fp, mode, obj, i)
                                new[n] = q
                                rows.append(row)
                        else:  # module parallel: owners quantize, codes and scales are broadcast
                            from .distributed import quantize_group_parallel
                            new, grows = quantize_group_parallel(self, mods, g, res, H_fp, mode, obj, i,
                                                                 prefix)
                            rows.extend(grows)
                        replace_linear(block, new)
                        del res, H_fp
                    tag = f"{mode}/{i}"
                    if replayed is not None:
                        self.resumed_blocks.append(tag)
                    else:
                        self.computed_blocks.append(tag)
                        if self.ckpt is not None:
                            mods = dict(block.named_modules())
                            self.ckpt.save(mode, i, {n: (mods[n].codes(), mods[n].scales)
                                                     for n in originals}, rows[n_rows0:])
                    # propagate the finished block
                    for j in range(len(inps)):
                        kw = kws_dev(j)
                        inps[j] = _first(block(inps[j].to(dev), **kw)).cpu()
                        if model_stream:
                            fp_inps[j] = _first(fp_block(fp_inps[j].to(dev), **kw)).cpu()
                    if mode == "scales":
                        replace_linear(block, originals)
                    del fp_block, originals
                block.to("cpu")
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                bar.update(1)
        finally:
            if hasattr(bar, "close"):
                bar.close()
        return rows


def _budget(model, parts, samples, cfg: QuantConfig, cross: bool) -> Tuple[int, str]:
    tokens = sum(s.numel() for s in samples)
    hidden = parts.embed_tokens.weight.shape[1]
    dtype = parts.embed_tokens.weight.dtype
    nbytes = torch.empty((), dtype=dtype).element_size()
    streams = 2 if (cfg.float_stream == "model" and cross) else 1
    act = tokens * hidden * nbytes * streams * 2  # inputs + outputs being replaced one by one
    block = parts.layers[0]
    wbytes = sum(p.numel() * p.element_size() for p in block.parameters())
    if cross:
        wbytes *= 2  # the float copy of the block
    dmax = max((m.in_features for m in block.modules() if isinstance(m, nn.Linear)), default=0)
    hb = 4 if cfg.hessian_dtype == "float32" else 8
    hess = dmax * dmax * hb * (3 if cross else 1)  # H (+ G, H_fp)
    total = act + wbytes + hess
    msg = (f"memory budget: activations {_fmt_bytes(act)} on CPU ({tokens} tokens x {hidden} hidden x "
           f"{nbytes} B x {streams} stream(s) x 2 in/out); on {cfg.device or 'device'}: one block "
           f"{_fmt_bytes(wbytes)}{' (+ float copy)' if cross else ''}, largest Hessian set "
           f"{_fmt_bytes(hess)} (D={dmax}{', H+G+H_fp' if cross else ', H'}); total ~{_fmt_bytes(total)}")
    return total, msg


def format_report(rows: List[dict]) -> str:
    """The per-module table (aligned columns)."""
    head = ["block", "module", "shape", "method", "obj", "loss before", "loss after", "scale s", "EC s",
            "damping", "fallback"]
    lines = []
    for r in rows:
        lines.append([str(r["block"]), r["module"], "x".join(map(str, r["shape"])), r["method"],
                      r["objective"], f"{r['loss_before']:.4e}", f"{r['loss_after']:.4e}",
                      f"{r['scale_time_s']:.3f}", f"{r['ec_time_s']:.3f}",
                      "-" if r["damping"] is None else f"{r['damping']:.3e}",
                      "yes" if r["fell_back"] else "no"])
    widths = [max(len(h), *(len(l[k]) for l in lines)) if lines else len(h) for k, h in enumerate(head)]
    right = {0, 5, 6, 7, 8, 9}

    def fmt(cells):
        return "  ".join(c.rjust(w) if k in right else c.ljust(w) for k, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(l) for l in lines]
    return "\n".join(out)


def _write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve_device(device, what: str = "QuantConfig.device") -> torch.device:
    """The device the pipeline runs on: None → cuda when usable, else cpu. A cuda device without
    CUDA (or without torch_piso's CUDA kernels) is a RuntimeError naming ``what`` -- the CLI calls
    this before loading a model."""
    if device is None:
        if torch.cuda.is_available() and ops.has_cuda_kernels():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise RuntimeError(f"{what}={device!r}: not a device ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{what}={device!r}: CUDA is not available")
        if not ops.has_cuda_kernels():
            raise RuntimeError(f"{what}={device!r}: torch_piso was built without CUDA "
                               "kernels; use device='cpu' or rebuild")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"{what}={device!r}: there are {torch.cuda.device_count()} CUDA "
                               "device(s)")
    elif dev.type != "cpu":
        raise RuntimeError(f"{what}={device!r}: only cpu and cuda are supported")
    return dev


def _resolve_device(cfg: QuantConfig) -> torch.device:
    return resolve_device(cfg.device)


def quantize_model_with_report(model: nn.Module, calibration, config: QuantConfig, *,
                               progress: bool = True, output_dir=None,
                               log: Optional[Callable[[str], None]] = print,
                               _spy: Optional[Callable[[str, dict], None]] = None,
                               checkpoint_dir=None, _dist=None):
    """Like :func:`quantize_model`; returns ``(model, report)``.

    checkpoint_dir: write each finished block there (atomically) and, on a rerun with the same
    model, calibration and recipe, resume after the last finished block (torch_piso.distributed).
    _dist: a torch_piso.distributed.DistContext (use quantize_model_distributed)."""
    # Called under torch.inference_mode(), every tensor made here would be an inference tensor:
    # QuantLinear buffers and block weights moved between devices that the caller could then never
    # update in place (load_state_dict, .to_()), and activations without the version counter
    # HessianCollector's input sharing relies on. No autograd is needed either way.
    with torch.inference_mode(False), torch.no_grad():
        return _quantize_model_with_report(model, calibration, config, progress=progress,
                                           output_dir=output_dir, log=log, _spy=_spy,
                                           checkpoint_dir=checkpoint_dir, _dist=_dist)


def _quantize_model_with_report(model, calibration, config, *, progress, output_dir, log, _spy,
                                checkpoint_dir, _dist):
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config: expected a QuantConfig, got {type(config).__name__}")
    cfg = config
    log = log or (lambda s: None)
    # before find_decoder: blocks without nn.Linear left would be "not a supported model"
    done = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)] \
        if isinstance(model, nn.Module) else []
    if done:
        raise ValueError(f"quantize_model: the model is already quantized ({len(done)} QuantLinear "
                         f"modules, e.g. {done[:3]}); quantize_model takes a float model -- reload "
                         "the original to quantize it with another recipe")
    parts = find_decoder(model)
    vocab = parts.embed_tokens.num_embeddings if isinstance(parts.embed_tokens, nn.Embedding) else None
    samples = _prepare_calibration(calibration, vocab)
    # every check that can fail runs before the model is touched
    quantized_names = []
    for i, block in enumerate(parts.layers):
        for n, m in block.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            qual = f"{parts.layers_name}.{i}.{n}"
            if cfg.skips(qual):
                continue
            if cfg.group_size > 0 and m.in_features % cfg.group_size != 0:
                raise ValueError(f"QuantConfig.group_size={cfg.group_size} does not divide in_features="
                                 f"{m.in_features} of module {qual!r}; choose a divisor of every "
                                 "quantized layer's in_features or skip the module")
            # found in block 1 only after block 0 was replaced, a NaN left a half-quantized model
            for pname in ("weight", "bias"):
                t = getattr(m, pname, None)
                if isinstance(t, Tensor) and t.device.type != "meta" and not torch.isfinite(t).all():
                    bad = (~torch.isfinite(t)).nonzero()[0].tolist()
                    raise ValueError(f"quantize_model: module {qual!r} has a non-finite {pname} "
                                     f"(NaN or Inf, first at index {bad}); nothing was quantized")
            quantized_names.append(qual)
    if not quantized_names:
        raise ValueError("quantize_model: no nn.Linear left to quantize (all skipped?)")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for p in cfg.skip:
        if p not in DEFAULT_SKIP and not any(skip_pattern_matches(p, n) for n in linears):
            warnings.warn(f"QuantConfig.skip: pattern {p!r} matches no nn.Linear of the model (names "
                          f"look like {linears[0]!r}); it skips nothing", stacklevel=3)
    dev = _resolve_device(cfg)
    all_samples = samples
    ckpt = None
    if checkpoint_dir is not None or _dist is not None:
        from .distributed import setup_run
        samples, ckpt = setup_run(model, all_samples, cfg, checkpoint_dir, _dist)

    params = list(model.parameters()) + list(model.buffers())
    orig_devices = {p.device for p in params}
    was_training = model.training
    torch.manual_seed(cfg.seed)
    model.eval()
    model.to("cpu")
    ec = cfg.error_correction
    final_cross = ec == "qronos" or (ec == "none" and cfg.resolved_objective == "cross")
    _, msg = _budget(model, parts, samples, cfg, final_cross or cfg.resolved_objective == "cross")
    log(f"torch_piso: {cfg.label}, W{cfg.bits}"
        f"{'' if cfg.group_size == -1 else f' G{cfg.group_size}'}, {len(quantized_names)} linears in "
        f"{len(parts.layers)} blocks, {len(samples)} calibration samples, device {dev}")
    log(msg)
    runner = _Runner(model, parts, samples, cfg, dev, progress, log, _spy, dist=_dist, ckpt=ckpt)
    t0 = time.perf_counter()
    pass1_rows: List[dict] = []
    try:
        if cfg.needs_scale_pass:
            pass1_rows = runner.run_pass("scales")
        rows = runner.run_pass("final")
    finally:
        if len(orig_devices) == 1:  # a model spread over devices (device_map) stays on CPU
            model.to(next(iter(orig_devices)))
        else:
            log(f"torch_piso: the model was on {sorted(map(str, orig_devices))}; it is left on cpu")
        model.train(was_training)
    elapsed = time.perf_counter() - t0
    totals = {"loss_before": sum(r["loss_before"] for r in rows),
              "loss_after": sum(r["loss_after"] for r in rows),
              "scale_time_s": sum(r["scale_time_s"] for r in rows),
              "ec_time_s": sum(r["ec_time_s"] for r in rows),
              "modules": len(rows), "fell_back": sum(bool(r["fell_back"]) for r in rows),
              "wall_time_s": elapsed}
    report = {"label": cfg.label, "config": cfg.to_dict(), "device": str(dev),
              "calibration": {"samples": len(all_samples), "tokens": sum(s.numel() for s in all_samples)},
              "loss_note": ("per-token layer objective: self = sum_rows (w-w_hat)^T H (w-w_hat); "
                            "cross = ||X w - X~ w_hat||^2 / T; before = absmax RTN, after = this recipe"),
              "rows": rows, "totals": totals}
    if pass1_rows:
        report["decoupled_pass1_rows"] = pass1_rows
    if _dist is not None:
        report["distributed"] = {"world_size": _dist.world_size, "backend": _dist.backend,
                                 "rank": _dist.rank, "local_samples": len(samples)}
    if ckpt is not None:
        report["checkpoint"] = {"dir": str(ckpt.dir), "computed_blocks": runner.computed_blocks,
                                "resumed_blocks": runner.resumed_blocks}
    log(format_report(rows))
    log(f"total: loss before {totals['loss_before']:.4e}, after {totals['loss_after']:.4e}; scale time "
        f"{totals['scale_time_s']:.2f} s, EC time {totals['ec_time_s']:.2f} s, wall {elapsed:.1f} s")
    if output_dir is not None:
        path = Path(output_dir) / "quantize_report.json"
        _write_json_atomic(path, report)
        log(f"report written to {path}")
    model.piso_report = report
    return model, report


def quantize_model(model: nn.Module, calibration, config: QuantConfig, *, progress: bool = True,
                   output_dir=None, log: Optional[Callable[[str], None]] = print) -> nn.Module:
    """Quantizes the decoder blocks' nn.Linear of ``model`` in place (→ QuantLinear) with the recipe
    ``config`` on ``calibration`` (LongTensor [n, seqlen] of token ids, or a list of 1-D tensors).
    Returns the model; the report (config, per-module rows, totals) is ``model.piso_report`` and,
    with ``output_dir``, ``output_dir/quantize_report.json``. ``log=None`` silences the printout."""
    model, _ = quantize_model_with_report(model, calibration, config, progress=progress,
                                          output_dir=output_dir, log=log)
    return model
