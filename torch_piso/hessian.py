"""HessianCollector: per-layer second-moment statistics of nn.Linear inputs, through the piso ops.

For each hooked module it accumulates (ALGORITHM.md §1.2-1.3)

    H = X̃ᵀX̃ / T      from the inputs X̃ [T, D] seen in the (partially) quantized model, and
    G = X̃ᵀX  / T      for the X–X̃ (cross) objective, X being the paired inputs of the float model,

with the SAME T (tokens of X̃) for both: PiSO's scale s* = α/β is invariant to a common rescaling of
H and G, but mixing normalizations would rescale every scale. Rows of G index the quantized-input
features (G = X̃ᵀX, not XᵀX̃).

Usage (self objective, GPTQ style)::

    with HessianCollector(block, ["*.q_proj", "*.k_proj", "*.v_proj"]) as hc:
        for x in batches:
            block(x)
    H = hc.H("self_attn.q_proj")          # normalized, float32 (or float64) [D, D]

Usage (cross objective, Qronos / RTN style): run each batch once per pass, in either order::

    with HessianCollector(block, cross=True) as hc:
        for x_fp, x_q in batches:
            with hc.pass_("float"):
                block_fp(x_fp)              # quantization disabled
            with hc.pass_("quant"):
                block(x_q)                  # quantized weights
    H, G, T = hc.pop("mlp.down_proj")

The float pass may also run through a separate float copy of the modules:
``hc.pass_("float", root=block_fp)`` hooks block_fp's modules of the same names for that pass.
The k-th input a module receives in the float pass is paired with its k-th input in the quant pass
(tokens 1:1, same count). Whichever side arrives first is held (on its device, or on
``pending_device``) until its partner arrives; then G is accumulated and the held tensor released.

Modules fed the very same input tensor object in one forward (q/k/v projections) share one
accumulator: the input is accumulated once while ``H(name)`` answers for every member. The sharing
is discovered on the first input and checked on every later one.

"The very same input" is the same tensor object *not modified in place in between*, which the
tensor's version counter tells. Under ``torch.inference_mode()`` the inputs are inference tensors,
which have no version counter, so for them nothing is assumed: an inference tensor is never
treated as an input already accumulated (each module accumulates its own; the same H, 1 to 3 times
the work of the shared case), and a cross-pass input held for its partner is held as a private copy
(a later in-place change cannot reach it). Accumulators are always created as normal tensors, so
statistics gathered under inference_mode can be read, normalized and reduced outside it.
"""
from __future__ import annotations

import fnmatch
import re
import weakref
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, Iterable, List, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["HessianCollector", "Hessians"]

Selector = Union[nn.Module, str, "re.Pattern[str]", type]


class Hessians(NamedTuple):
    """Normalized statistics of one module: H = X̃ᵀX̃/T, G = X̃ᵀX/T (None without cross), T tokens."""

    H: Tensor
    G: Optional[Tensor]
    tokens: int


@dataclass
class _Held:
    """An input waiting for its partner from the other pass."""

    kind: str
    x: Tensor
    version: Optional[int]  # None: x is a private copy (of an inference tensor), nothing can change it
    tokens: int


@dataclass
class _Current:
    """The input an accumulator took last: which members consumed it (sharing bookkeeping)."""

    ref: "weakref.ref[Tensor]"
    key: int  # id() of the tensor, its key in HessianCollector._by_input
    version: Optional[int]  # None: an inference tensor (no version counter), never shared
    pass_id: int
    consumers: set


@dataclass
class _Acc:
    D: int
    device: torch.device
    dtype: torch.dtype
    members: List[str]
    H: Optional[Tensor] = None
    G: Optional[Tensor] = None
    tokens: int = 0
    paired_tokens: int = 0
    uses: int = 0
    held: Deque[_Held] = field(default_factory=deque)
    current: Optional[_Current] = None
    finalized: bool = False  # H/G normalized in place by pop(): no more accumulation
    reduced: bool = False  # summed across ranks by all_reduce_(): no more accumulation


class HessianCollector:
    """Context manager that hooks nn.Linear modules and accumulates their input Hessians.

    Args:
        root: the module searched for targets (a decoder block, or a whole model); names are the
            qualified names relative to it (``root.named_modules()``).
        select: which modules to hook. None: every module of ``types`` under root. Otherwise one item
            or a list mixing module objects, name patterns (``fnmatch`` globs such as ``"*.q_proj"``,
            matched against the whole name; a ``"re:"`` prefix or a compiled ``re.Pattern`` is a
            regular expression, matched with ``re.search``) and classes (``isinstance``). Patterns
            pick only modules of ``types``; objects and classes must be Linear-like (``in_features``).
        types: the module classes patterns may pick (default ``(nn.Linear,)``).
        dtype: accumulator dtype, torch.float32 (default) or torch.float64.
        device: where accumulators live; None = the module's weight device (else the input's).
        cross: collect G from paired ``pass_("float")`` / ``pass_("quant")`` forwards.
        share_inputs: share one accumulator between modules fed the same input tensor (default True;
            turn off when per-module input transforms make equal inputs distinct objects).
        pending_device: where inputs waiting for their paired pass are held (None: where they are).
    """

    def __init__(self, root: nn.Module, select: Union[None, Selector, Iterable[Selector]] = None, *,
                 types=(nn.Linear,), dtype: torch.dtype = torch.float32,
                 device: Union[None, str, torch.device] = None, cross: bool = False,
                 share_inputs: bool = True, pending_device: Union[None, str, torch.device] = None):
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype: expected torch.float32 or torch.float64 accumulators, got {dtype}")
        self.root = root
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.cross = bool(cross)
        self.share_inputs = bool(share_inputs)
        self.pending_device = torch.device(pending_device) if pending_device is not None else None
        self._modules: Dict[str, nn.Module] = self._select(root, select, tuple(types))
        self._acc: Dict[str, _Acc] = {}
        self._freed: set = set()
        self._by_input: Dict[int, _Acc] = {}
        self._handles: list = []
        self._pass: Optional[str] = None
        self._pass_id = 0
        self._active = False
        self._alt_root = False

    # ------------------------------------------------------------------------------------------
    # selection
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _select(root, select, types) -> Dict[str, nn.Module]:
        named = list(root.named_modules())
        if select is None:
            chosen = {n: m for n, m in named if isinstance(m, types)}
        else:
            items = [select] if isinstance(select, (nn.Module, str, re.Pattern, type)) else list(select)
            chosen = {}
            by_id = {id(m): n for n, m in named}
            for item in items:
                if isinstance(item, nn.Module):
                    if id(item) not in by_id:
                        raise ValueError(f"select: module {type(item).__name__} is not inside root")
                    HessianCollector._check_linear(by_id[id(item)], item)
                    chosen[by_id[id(item)]] = item
                elif isinstance(item, type):
                    for n, m in named:
                        if isinstance(m, item):
                            HessianCollector._check_linear(n, m)
                            chosen[n] = m
                elif isinstance(item, (str, re.Pattern)):
                    if isinstance(item, str) and not item.startswith("re:"):
                        hit = lambda n, p=item: fnmatch.fnmatchcase(n, p)  # noqa: E731
                    else:
                        rx = item if isinstance(item, re.Pattern) else re.compile(item[3:])
                        hit = lambda n, rx=rx: rx.search(n) is not None  # noqa: E731
                    for n, m in named:
                        if hit(n) and isinstance(m, types):
                            chosen[n] = m
                else:
                    raise TypeError(f"select: expected modules, name patterns or classes, got {item!r}")
            order = {n: i for i, (n, _) in enumerate(named)}
            chosen = dict(sorted(chosen.items(), key=lambda kv: order[kv[0]]))
        if not chosen:
            raise ValueError(f"select: {select!r} matched no module of {[t.__name__ for t in types]} "
                             "under root")
        return chosen

    @staticmethod
    def _check_linear(name, m):
        if not isinstance(getattr(m, "in_features", None), int):
            raise TypeError(f"select: module {name!r} ({type(m).__name__}) is not Linear-like "
                            "(no integer in_features)")

    @property
    def names(self) -> List[str]:
        """Qualified names of the hooked modules, in model order."""
        return list(self._modules)

    def groups(self) -> List[tuple]:
        """Names that share one accumulator (same input tensor), one tuple per accumulator seen."""
        seen, out = set(), []
        for acc in self._acc.values():
            if id(acc) not in seen:
                seen.add(id(acc))
                out.append(tuple(acc.members))
        return out

    # ------------------------------------------------------------------------------------------
    # hooks and passes
    # ------------------------------------------------------------------------------------------
    def __enter__(self) -> "HessianCollector":
        if self._active:
            raise RuntimeError("HessianCollector is already active (contexts do not nest)")
        for name, m in self._modules.items():
            if name in self._freed:
                continue
            self._handles.append(m.register_forward_pre_hook(self._make_hook(name), with_kwargs=True))
        self._active = True
        self._pass_id += 1
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = False
        self._pass = None
        self._by_input.clear()

    @contextmanager
    def pass_(self, kind: str, root: Optional[nn.Module] = None):
        """Forwards inside are the "float" pass (X: quantization disabled) or the "quant" pass
        (X̃: the partially quantized model). H comes from the quant pass; G pairs the two.

        root: run this pass through another copy of the hooked modules (e.g. a float copy of the
        block): its modules with the hooked names are hooked for the duration of the pass and the
        collector's own hooks pause. Names and in_features must match."""
        if kind not in ("float", "quant"):
            raise ValueError(f"pass_: expected 'float' or 'quant', got {kind!r}")
        if not self._active:
            raise RuntimeError("pass_: enter the collector first (`with collector:`)")
        if kind == "float" and not self.cross:
            raise RuntimeError("pass_('float'): the float pass feeds G; build the collector with cross=True")
        if self._pass is not None:
            raise RuntimeError(f"pass_({kind!r}): already inside pass_({self._pass!r})")
        alt_handles = []
        if root is not None and root is not self.root:
            mods = dict(root.named_modules())
            for name, m in self._modules.items():
                if name in self._freed:
                    continue
                other = mods.get(name)
                if other is None or getattr(other, "in_features", None) != m.in_features:
                    raise ValueError(f"pass_(root=...): root has no module {name!r} with "
                                     f"in_features={m.in_features}")
                alt_handles.append(other.register_forward_pre_hook(self._make_hook(name, primary=False),
                                                                   with_kwargs=True))
        self._pass = kind
        self._alt_root = bool(alt_handles)
        self._pass_id += 1
        ok = False
        try:
            yield self
            ok = True
        finally:
            for h in alt_handles:
                h.remove()
            self._pass = None
            self._alt_root = False
            self._pass_id += 1
            self._by_input.clear()
        if ok:
            self._check_groups_complete()

    def _make_hook(self, name, primary=True):
        def hook(module, args, kwargs):
            if primary and self._alt_root:
                return None  # this pass runs through another root
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, Tensor):
                raise TypeError(f"HessianCollector: {name!r} got a non-tensor input {type(x).__name__}")
            self._observe(name, module, x)
            return None

        return hook

    def _observe(self, name: str, module: nn.Module, x: Tensor) -> None:
        if name in self._freed:
            return
        kind = self._pass
        if kind is None:
            if self.cross:
                raise RuntimeError(f"HessianCollector(cross=True): {name!r} ran outside "
                                   "collector.pass_('float') / pass_('quant')")
            kind = "quant"
        D = module.in_features
        if x.dim() == 0 or x.shape[-1] != D:
            raise ValueError(f"HessianCollector: {name!r} expects inputs [..., {D}], got {tuple(x.shape)}")
        acc = self._acc.get(name)
        # inference tensors have no version counter: an in-place change between two consumers
        # could not be seen, so such an input is never recognized as one already accumulated
        tracked = not x.is_inference()
        hit = self._by_input.get(id(x)) if tracked else None
        if hit is not None:
            cur = hit.current
            if cur is None or cur.ref() is not x or cur.version != x._version or \
                    cur.pass_id != self._pass_id:
                hit = None
        if acc is None:
            if hit is not None and self.share_inputs and hit.uses == 1 and hit.D == D and \
                    name not in hit.current.consumers:
                hit.members.append(name)  # first input of the group: join it, accumulate nothing
                hit.current.consumers.add(name)
                self._acc[name] = hit
                return
            acc = _Acc(D=D, device=self._acc_device(module, x), dtype=self.dtype, members=[name])
            self._acc[name] = acc
        elif acc.D != D:
            raise ValueError(f"HessianCollector: {name!r} has in_features={D}, its accumulator {acc.D}")
        elif hit is acc and name not in acc.current.consumers:
            acc.current.consumers.add(name)  # the shared input was already accumulated
            return
        if acc.finalized:
            raise RuntimeError(f"HessianCollector: {name!r} received data after pop(); its "
                               "statistics are final")
        if acc.reduced:
            raise RuntimeError(f"HessianCollector: {name!r} received data after all_reduce_(); its "
                               "statistics are final")
        self._check_complete(acc)
        if acc.current is not None and self._by_input.get(acc.current.key) is acc:
            del self._by_input[acc.current.key]
        acc.current = _Current(weakref.ref(x), id(x), x._version if tracked else None, self._pass_id,
                               {name})
        if tracked:
            self._by_input[id(x)] = acc
        acc.uses += 1
        self._accumulate(acc, kind, x.detach(), name)

    def _acc_device(self, module, x) -> torch.device:
        if self.device is not None:
            return self.device
        w = getattr(module, "weight", None)
        if isinstance(w, Tensor) and w.device.type != "meta":
            return w.device
        return x.device

    def _check_complete(self, acc: _Acc) -> None:
        cur = acc.current
        if cur is None:
            return
        missing = [n for n in acc.members if n not in cur.consumers]
        if missing:
            raise RuntimeError(
                f"HessianCollector: modules {acc.members} shared one input tensor on their first "
                f"forward, but {missing} did not receive the input {sorted(cur.consumers)} got. "
                "Build the collector with share_inputs=False if their inputs differ.")

    def _check_groups_complete(self) -> None:
        for acc in {id(a): a for a in self._acc.values()}.values():
            self._check_complete(acc)

    @staticmethod
    def _zeros(acc: _Acc) -> Tensor:
        # a normal tensor even inside inference_mode: pop() divides it in place, possibly outside
        with torch.inference_mode(False):
            return torch.zeros(acc.D, acc.D, dtype=acc.dtype, device=acc.device)

    def _accumulate(self, acc: _Acc, kind: str, x: Tensor, name: str) -> None:
        tokens = x.numel() // acc.D if acc.D else 0
        with torch.no_grad():
            if kind == "quant":
                if acc.H is None:
                    acc.H = self._zeros(acc)
                ops.hessian_accumulate_(acc.H, x.to(acc.device))
                acc.tokens += tokens
            if not self.cross:
                return
            other = "float" if kind == "quant" else "quant"
            if acc.held and acc.held[0].kind == other:
                held = acc.held.popleft()
                if held.tokens != tokens:
                    raise RuntimeError(
                        f"HessianCollector: {name!r} got {tokens} tokens in the {kind} pass but "
                        f"{held.tokens} in the paired {other} pass; paired passes must feed the "
                        "same batch")
                if held.version is not None and held.x._version != held.version:
                    raise RuntimeError(f"HessianCollector: the {other}-pass input held for {name!r} "
                                       "was modified in place before its pair arrived")
                x_q, x_fp = (x, held.x) if kind == "quant" else (held.x, x)
                if acc.G is None:
                    acc.G = self._zeros(acc)
                ops.cross_accumulate_(acc.G, x_q.to(acc.device), x_fp.to(acc.device))
                acc.paired_tokens += tokens
            elif x.is_inference():  # no version counter: hold a private copy instead
                dev = x.device if self.pending_device is None else self.pending_device
                acc.held.append(_Held(kind, x.to(dev, copy=True), None, tokens))
            else:
                keep = x if self.pending_device is None else x.to(self.pending_device)
                acc.held.append(_Held(kind, keep, keep._version, tokens))

    # ------------------------------------------------------------------------------------------
    # results
    # ------------------------------------------------------------------------------------------
    def _get(self, name: str) -> _Acc:
        if name in self._freed:
            raise KeyError(f"HessianCollector: {name!r} was freed")
        if name not in self._modules:
            raise KeyError(f"HessianCollector: {name!r} is not hooked; hooked: {self.names}")
        acc = self._acc.get(name)
        if acc is None or acc.tokens == 0 and acc.H is None:
            raise RuntimeError(f"HessianCollector: no quant-pass inputs collected for {name!r}")
        return acc

    def _check_ready(self, name: str, acc: _Acc) -> None:
        self._check_complete(acc)
        if acc.tokens == 0:
            raise RuntimeError(f"HessianCollector: {name!r} has seen 0 tokens; H/T is undefined")
        if self.cross:
            if acc.held:
                kinds = {h.kind for h in acc.held}
                raise RuntimeError(
                    f"HessianCollector: {name!r} has {len(acc.held)} {'/'.join(sorted(kinds))}-pass "
                    "input(s) still waiting for their paired pass")
            if acc.paired_tokens != acc.tokens:
                raise RuntimeError(f"HessianCollector: {name!r}: {acc.tokens} quant tokens but "
                                   f"{acc.paired_tokens} paired ones")

    def all_reduce_(self, group=None) -> None:
        """Data-parallel calibration: sum the raw accumulators (X̃ᵀX̃, X̃ᵀX and the token counts) of
        every hooked, not yet freed module across the ranks of a ``torch.distributed`` group, so that
        ``H``/``G``/``pop`` then normalize by the *global* T. Every rank must call it once, after its
        last forward and before reading anything, with the same modules hooked and each of them fed
        at least once (ranks may see different numbers of tokens). Summing per-rank partial sums is
        another float summation order than one process: H agrees to rounding, not bitwise."""
        import torch.distributed as dist

        accs, seen = [], set()
        for name in self.names:
            if name in self._freed:
                continue
            acc = self._get(name)
            if id(acc) in seen:
                continue
            seen.add(id(acc))
            if acc.finalized or acc.reduced:
                raise RuntimeError(f"HessianCollector.all_reduce_: {name!r} was already "
                                   f"{'popped' if acc.finalized else 'reduced'}")
            self._check_ready(name, acc)
            accs.append(acc)
        # the grouping (which modules share an input) must agree, or tensors would be mismatched
        layout = [(tuple(a.members), a.D, a.G is not None) for a in accs]
        layouts = [None] * dist.get_world_size(group)
        dist.all_gather_object(layouts, layout, group=group)
        if any(lo != layout for lo in layouts):
            raise RuntimeError(f"HessianCollector.all_reduce_: ranks hooked different accumulators: "
                               f"{layouts}")
        if not accs:
            return
        # NCCL reduces only CUDA tensors: accumulators kept on the CPU travel through the rank's GPU
        comm = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(group) == "nccl" else None

        def reduce(t):
            if comm is None or t.device == comm:
                dist.all_reduce(t, group=group)
            else:
                x = t.to(comm)
                dist.all_reduce(x, group=group)
                t.copy_(x)

        counts = torch.tensor([[a.tokens, a.paired_tokens] for a in accs], dtype=torch.int64,
                              device=accs[0].H.device)
        reduce(counts)
        for a, (t, p) in zip(accs, counts.tolist()):
            reduce(a.H)
            if a.G is not None:
                reduce(a.G)
            a.tokens, a.paired_tokens, a.reduced = int(t), int(p), True

    def tokens(self, name: str) -> int:
        """T: tokens of X̃ (quant-pass inputs) accumulated for `name`."""
        return self._get(name).tokens

    def H(self, name: str) -> Tensor:
        """X̃ᵀX̃ / T as a new [D, D] tensor of the accumulator dtype."""
        acc = self._get(name)
        self._check_ready(name, acc)
        return acc.H.clone() if acc.finalized else acc.H / acc.tokens

    def G(self, name: str) -> Tensor:
        """X̃ᵀX / T (rows: quantized-input features), same T as H(name)."""
        if not self.cross:
            raise RuntimeError("G: the collector was built without cross=True")
        acc = self._get(name)
        self._check_ready(name, acc)
        return acc.G.clone() if acc.finalized else acc.G / acc.tokens

    def pop(self, name: str) -> Hessians:
        """Normalized (H, G, T) of `name` without a copy, then free(name). The accumulator is
        normalized in place, so members of a shared group get the same tensors (do not modify
        them in place) and no further data may be added to that group."""
        acc = self._get(name)
        self._check_ready(name, acc)
        if not acc.finalized:
            acc.H.div_(acc.tokens)
            if acc.G is not None:
                acc.G.div_(acc.tokens)
            acc.finalized = True
        out = Hessians(acc.H, acc.G, acc.tokens)
        self.free(name)
        return out

    def free(self, name: str) -> None:
        """Forget `name`: its hook stops collecting and its accumulator is released once no member
        of its group remains."""
        if name not in self._modules:
            raise KeyError(f"HessianCollector: {name!r} is not hooked; hooked: {self.names}")
        self._freed.add(name)
        acc = self._acc.pop(name, None)
        if acc is not None:
            acc.members.remove(name)
            if acc.current is not None:
                acc.current.consumers.discard(name)
            if not acc.members:
                acc.H = acc.G = None
                acc.held.clear()
                self._by_input = {k: a for k, a in self._by_input.items() if a is not acc}

    def free_all(self) -> None:
        """Release every accumulator (the hooks stay until the context exits)."""
        for name in self.names:
            if name not in self._freed:
                self.free(name)

    def __repr__(self) -> str:
        return (f"HessianCollector({len(self._modules)} modules, dtype={self.dtype}, cross={self.cross}, "
                f"active={self._active})")
