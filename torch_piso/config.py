"""QuantConfig: one quantization recipe (a row of the paper's tables) as a validated dataclass.

Vocabulary (ALGORITHM.md §4.4):

- ``scales``: ``absmax`` (max|w| / 2^(b-1), frozen), ``data-free`` (PiSO with H = I) or ``piso``
  (PiSO on the calibration Hessian).
- ``error_correction``: ``none`` (RTN), ``gptq`` or ``qronos``.
- ``interleave`` (only with error correction and scales != absmax; ignored otherwise):
  ``decoupled`` ("+": a first RTN-at-PiSO-scales pass fixes every scale, then EC runs with them),
  ``layer`` ("⊙*": PiSO once per layer on the EC algorithm's own H/G before its sweep) or
  ``group`` ("⊙†": each group's scale just before the EC sweep reaches it; needs group_size > 0).
  ``data-free`` + ``layer`` is the same computation as ``data-free`` + ``decoupled`` (H = I does not
  depend on the data, and the weights are the original ones), so it is accepted and runs as
  decoupled; the paper reports only the latter.
- ``group_variant``: ``independent`` (PiSO_I) or ``sequential`` (PiSO_S); only with group_size > 0
  and ``piso`` scales (with H = I the groups decouple exactly, so data-free ignores it).
- ``objective``: None (auto: GPTQ → "self" X̃–X̃; Qronos and standalone RTN → "cross" X–X̃),
  ``self`` or ``cross``. It selects the objective of PiSO's scales in RTN and in the decoupled
  first pass. The interleaved modes use the EC algorithm's own matrices, so there GPTQ is always
  "self" and Qronos always "cross"; asking otherwise is an error.
- ``float_stream``: where the float inputs X of the cross objective come from. ``block`` (paper /
  Brevitas, ALGORITHM §1.2): the float copy of the current block applied to the quantized-stream
  block input (X = X̃ for q/k/v). ``model``: a full float stream is propagated between blocks too
  (twice the activation memory).
- ``skip``: name globs of linears left in float. A pattern matches a module's qualified name
  (``model.layers.3.self_attn.q_proj``) whole or as a dotted suffix: ``q_proj``,
  ``self_attn.q_proj``, ``layers.0.*`` and ``*.down_proj`` all work (:meth:`QuantConfig.skips`).
  Only the nn.Linear inside the decoder blocks are ever quantized, so ``lm_head`` (and anything
  else outside the blocks) stays float whatever ``skip`` says: the default ``("lm_head",)`` only
  states that, it changes nothing. A pattern matching no nn.Linear of the model is warned about.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

__all__ = ["QuantConfig", "RECIPES", "RECIPE_ALIASES"]

SCALES = ("absmax", "data-free", "piso")
ERROR_CORRECTIONS = ("none", "gptq", "qronos")
INTERLEAVES = ("decoupled", "layer", "group")
GROUP_VARIANTS = ("independent", "sequential")
OBJECTIVES = (None, "self", "cross")
FLOAT_STREAMS = ("block", "model")
HESSIAN_DTYPES = ("float32", "float64")
#: lm_head is outside the decoder blocks, so never quantized anyway: the default states it.
DEFAULT_SKIP = ("lm_head",)


def skip_pattern_matches(pattern: str, name: str) -> bool:
    """A ``QuantConfig.skip`` pattern against a qualified module name: the whole name, or a dotted
    suffix of it (``q_proj`` matches ``model.layers.0.self_attn.q_proj``, not ``...self_attn.xq_proj``)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"QuantConfig.{name}: expected one of {list(allowed)}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class QuantConfig:
    """A weight-quantization recipe. See the module docstring for the vocabulary; build paper rows
    with :meth:`recipe` (``QuantConfig.recipe("gptq*piso", bits=3)``)."""

    bits: int = 4
    group_size: int = -1
    scales: str = "piso"
    error_correction: str = "none"
    interleave: str = "decoupled"
    group_variant: str = "independent"
    objective: Optional[str] = None
    act_order: bool = True
    damp: float = 0.01
    qronos_alpha: float = 1e-6
    block_size: int = 128
    narrow_range: bool = False
    n_samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    skip: Tuple[str, ...] = DEFAULT_SKIP  # globs, whole name or dotted suffix (see skips())
    float_stream: str = "block"
    device: Optional[str] = None
    hessian_dtype: str = "float32"

    def __post_init__(self):
        if not _is_int(self.bits) or not 2 <= self.bits <= 8:
            raise ValueError(f"QuantConfig.bits: expected an integer in [2, 8], got {self.bits!r}")
        if not _is_int(self.group_size) or not (self.group_size == -1 or self.group_size > 0):
            raise ValueError(f"QuantConfig.group_size: expected -1 (per channel) or a positive integer "
                             f"(a divisor of every quantized layer's in_features), got {self.group_size!r}")
        _choice("scales", self.scales, SCALES)
        _choice("error_correction", self.error_correction, ERROR_CORRECTIONS)
        _choice("interleave", self.interleave, INTERLEAVES)
        _choice("group_variant", self.group_variant, GROUP_VARIANTS)
        _choice("objective", self.objective, OBJECTIVES)
        _choice("float_stream", self.float_stream, FLOAT_STREAMS)
        _choice("hessian_dtype", self.hessian_dtype, HESSIAN_DTYPES)
        for name in ("act_order", "narrow_range"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuantConfig.{name}: expected true or false, got {getattr(self, name)!r}")
        for name in ("damp", "qronos_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise ValueError(f"QuantConfig.{name}: expected a finite number >= 0, got {v!r}")
            setattr(self, name, float(v))
        for name in ("block_size", "n_samples", "seqlen"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"QuantConfig.{name}: expected a positive integer, got {v!r}")
        if not _is_int(self.seed):
            raise ValueError(f"QuantConfig.seed: expected an integer, got {self.seed!r}")
        if isinstance(self.skip, str):
            self.skip = (self.skip,)
        try:
            self.skip = tuple(self.skip)
        except TypeError:
            raise ValueError(f"QuantConfig.skip: expected a list of name globs, got {self.skip!r}") from None
        if not all(isinstance(s, str) for s in self.skip):
            raise ValueError(f"QuantConfig.skip: expected a list of name globs (strings), got {self.skip!r}")
        if self.device is not None and not isinstance(self.device, str):
            self.device = str(self.device)
        if self.device is not None:
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"QuantConfig.device: not a torch device: {self.device!r}") from None
        if self.effective_interleave == "group" and self.group_size == -1:
            raise ValueError("QuantConfig.interleave: 'group' (⊙†, group-interleaved) needs group_size > 0; "
                             "per-channel scales have only 'layer' (⊙) or 'decoupled' (+)")
        if self.uses_interleaved_piso and self.objective is not None:
            own = "self" if self.error_correction == "gptq" else "cross"
            if self.objective != own:
                raise ValueError(
                    f"QuantConfig.objective: {self.objective!r} is not available with "
                    f"error_correction={self.error_correction!r} and interleave={self.interleave!r}: "
                    f"interleaved PiSO uses the EC algorithm's own matrices (objective {own!r}); use "
                    f"interleave='decoupled' or objective=None")

    # ------------------------------------------------------------------ derived
    @property
    def uses_interleaved_piso(self) -> bool:
        """PiSO runs inside the EC sweep (⊙* piso, or ⊙† piso/data-free)."""
        if self.error_correction == "none" or self.scales == "absmax":
            return False
        if self.interleave == "group":
            return True
        return self.interleave == "layer" and self.scales == "piso"

    @property
    def needs_scale_pass(self) -> bool:
        """The decoupled "+" recipe with data-dependent PiSO scales: a first RTN-at-PiSO pass."""
        return self.error_correction != "none" and self.scales == "piso" and \
            self.effective_interleave == "decoupled"

    @property
    def effective_interleave(self) -> Optional[str]:
        """None where interleaving does not apply; 'decoupled' for data-free + layer (identical)."""
        if self.error_correction == "none" or self.scales == "absmax":
            return None
        if self.scales == "data-free" and self.interleave == "layer":
            return "decoupled"
        return self.interleave

    @property
    def sequential(self) -> bool:
        return self.group_size > 0 and self.group_variant == "sequential"

    @property
    def resolved_objective(self) -> str:
        """The objective PiSO's scales minimize: 'self' (X̃–X̃) or 'cross' (X–X̃)."""
        if self.objective is not None:
            return self.objective
        return "self" if self.error_correction == "gptq" else "cross"

    @property
    def scales_update(self) -> str:
        """The ``scales_update`` argument of ops.gptq / ops.qronos for this recipe."""
        inter = self.effective_interleave
        if inter is None or inter == "decoupled":
            return "none"
        if inter == "layer":
            return "layer_sequential" if self.sequential else "layer"
        if self.scales == "data-free":
            return "group_data_free"
        return "group_sequential" if self.sequential else "group"

    @property
    def label(self) -> str:
        """The paper's name of this row, e.g. "GPTQ ⊙ PiSO", "Qronos + PiSO_S", "RTN data-free"."""
        if self.scales == "absmax":
            sc = "absmax"
        elif self.scales == "data-free":
            sc = "data-free"
        elif self.group_size > 0:
            sc = "PiSO_S" if self.group_variant == "sequential" else "PiSO_I"
        else:
            sc = "PiSO"
        ec = {"none": "RTN", "gptq": "GPTQ", "qronos": "Qronos"}[self.error_correction]
        if self.error_correction == "none" or self.scales == "absmax":
            out = f"{ec} {sc}"
        else:
            inter = self.effective_interleave
            if inter == "decoupled":
                op = "+"
            elif inter == "layer":
                op = "⊙*" if self.group_size > 0 else "⊙"
            else:
                op = "⊙†"
            out = f"{ec} {op} {sc}"
        return out

    def skips(self, name: str) -> bool:
        """Whether ``skip`` leaves the module of qualified name ``name`` in float: some pattern p
        matches ``name`` (``fnmatchcase``) or its dotted suffix (``name`` matches ``"*." + p``)."""
        return any(skip_pattern_matches(p, name) for p in self.skip)

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "QuantConfig":
        if not isinstance(d, dict):
            raise ValueError(f"QuantConfig.from_dict: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"QuantConfig: unknown key(s) {unknown}; allowed: {sorted(known)}")
        d = dict(d)
        if "skip" in d and isinstance(d["skip"], list):
            d["skip"] = tuple(d["skip"])
        return cls(**d)

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> "QuantConfig":
        """Reads a JSON (``.json``) or YAML (``.yaml``/``.yml``; anything else is tried as JSON then
        YAML) file holding one mapping; an optional ``recipe:`` key names a base recipe that the
        other keys override."""
        p = Path(path)
        text = p.read_text()
        if p.suffix.lower() in (".yaml", ".yml"):
            data = _load_yaml(text, p)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                if p.suffix.lower() == ".json":
                    raise ValueError(f"QuantConfig.from_file: {p} is not valid JSON: {exc}") from None
                data = _load_yaml(text, p)
        if not isinstance(data, dict):
            raise ValueError(f"QuantConfig.from_file: {p} must hold one mapping, got {type(data).__name__}")
        if "recipe" in data:
            data = dict(data)
            name = data.pop("recipe")
            return cls.recipe(name, **data)
        return cls.from_dict(data)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Writes JSON (or YAML for a .yaml/.yml path) atomically."""
        p = Path(path)
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=1) + "\n"
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, p)
        return p

    # ------------------------------------------------------------------ recipes
    @classmethod
    def recipe(cls, name: str, **overrides) -> "QuantConfig":
        """A paper row by name (see :data:`RECIPES`), with field overrides."""
        key = RECIPE_ALIASES.get(name, name)
        if key not in RECIPES:
            raise ValueError(f"QuantConfig.recipe: unknown recipe {name!r}; known: {list(RECIPES)}")
        d = dict(RECIPES[key])
        d.update(overrides)
        return cls.from_dict(d)


def _load_yaml(text: str, p: Path):
    try:
        import yaml
    except ImportError:  # pragma: no cover
        raise ValueError(f"QuantConfig.from_file: {p}: reading YAML needs PyYAML") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"QuantConfig.from_file: {p} is neither JSON nor valid YAML: {exc}") from None


def _recipes() -> Dict[str, Dict[str, Any]]:
    """Paper rows. '+' decoupled, '*' layer-interleaved (⊙*, plain ⊙ per channel), '†' group-
    interleaved (⊙†; the recipe sets group_size=32 unless overridden). '_s' = PiSO_S (groups)."""
    r: Dict[str, Dict[str, Any]] = {}
    for sc in ("absmax", "data-free", "piso"):
        r[f"rtn-{sc}"] = dict(scales=sc, error_correction="none")
    r["rtn-piso_s"] = dict(scales="piso", error_correction="none", group_size=32,
                           group_variant="sequential")
    for ec in ("gptq", "qronos"):
        r[f"{ec}-absmax"] = dict(scales="absmax", error_correction=ec)
        r[f"{ec}-data-free"] = dict(scales="data-free", error_correction=ec, interleave="decoupled")
        r[f"{ec}+data-free"] = dict(scales="data-free", error_correction=ec, interleave="decoupled")
        r[f"{ec}+piso"] = dict(scales="piso", error_correction=ec, interleave="decoupled")
        r[f"{ec}*piso"] = dict(scales="piso", error_correction=ec, interleave="layer")
        r[f"{ec}†piso"] = dict(scales="piso", error_correction=ec, interleave="group", group_size=32)
        r[f"{ec}†data-free"] = dict(scales="data-free", error_correction=ec, interleave="group",
                                    group_size=32)
        for v in ("+", "*", "†"):
            base = dict(r[f"{ec}{v}piso"])
            base.update(group_variant="sequential", group_size=32)
            r[f"{ec}{v}piso_s"] = base
    return r


RECIPES: Dict[str, Dict[str, Any]] = _recipes()
#: ASCII spellings: '#' or '@' for '†' ("gptq#piso" == "gptq†piso").
RECIPE_ALIASES: Dict[str, str] = {}
for _k in list(RECIPES):
    if "†" in _k:
        RECIPE_ALIASES[_k.replace("†", "#")] = _k
        RECIPE_ALIASES[_k.replace("†", "@")] = _k
