"""Saving and loading quantized models: safetensors for the tensors, one JSON manifest for the rest.

A saved directory holds
  ``model.safetensors``  every tensor of ``model.state_dict()`` (QuantLinear ``packed``/``scales``/
                         ``bias`` and all other parameters and persistent buffers); tensors that
                         share storage (tied embeddings) are stored once and listed as aliases
  ``quantized.json``     the manifest: format name and version, size and sha256 of the safetensors
                         file, name/shape/dtype of every tensor, each QuantLinear's bits, group_size,
                         in/out features and bias flag, the quantization config and the model config
                         (``config.to_dict()`` of a transformers model) so the model can be rebuilt
                         offline with ``AutoModelForCausalLM.from_config``.

Atomicity: everything is written into a sibling temporary directory (each file fsynced, then the
directory), which is renamed onto the target only when complete -- a crash mid-save leaves at most a
``.<name>.tmp-*`` directory that is never mistaken for a save. Replacing an earlier save takes two
renames (the old directory aside to ``.<name>.old-*``, the new one into place; an error in the
second puts the old one back): a crash exactly between them leaves no directory at the target, the
previous save intact under ``.<name>.old-*`` (POSIX has no atomic swap of directories). Loading
checks the manifest before touching a tensor, and nothing is ever unpickled (safetensors + json
only). Extra files (a tokenizer, a run log) can be written into the temporary directory
(``save_quantized(..., extra_files=)``) so that they appear with the save.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .nn import QuantLinear, replace_linear

FORMAT_NAME = "torch_piso.quantized"
FORMAT_VERSION = 1
MANIFEST = "quantized.json"
TENSORS_FILE = "model.safetensors"
_MODULE_KEYS = frozenset({"bits", "group_size", "in_features", "out_features", "bias"})

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}


class QuantizedCheckpointError(RuntimeError):
    """A saved quantized model is missing, incomplete, tampered with or does not fit the model."""


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_safe(obj: Any) -> Any:
    """Config dicts may hold dtypes and tuples; keep JSON-representable values, stringify the rest."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.dtype):
        return _dtype_name(obj)
    if hasattr(obj, "to_dict"):
        return _json_safe(obj.to_dict())
    return str(obj)


def _dedup_state_dict(sd: dict[str, torch.Tensor]):
    """Tensors sharing storage (tied weights) are stored once: returns (unique tensors, aliases)."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, t in sd.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               tuple(t.stride()), t.dtype) if t.numel() > 0 else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = t.detach().contiguous().cpu()
    return unique, aliases


def check_save_target(directory: Union[str, os.PathLike], what: str = "save_quantized") -> Path:
    """The rule :func:`save_quantized` follows, for callers that want to fail before hours of work
    (the CLI checks ``--out`` before loading the model): ``directory`` may be missing, empty, or a
    torch_piso save (which is replaced); anything else raises FileExistsError naming ``what``.
    Returns the path a save writes to: symbolic links resolved, so that saving through a link
    replaces the directory it points to and leaves the link in place."""
    target = Path(os.path.realpath(directory))
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{what}: {target} exists and is not a directory")
        if any(target.iterdir()) and not (target / MANIFEST).exists():
            raise FileExistsError(f"{what}: {target} exists, is not empty and is not a "
                                  f"torch_piso save; refusing to overwrite it")
    return target


def save_quantized(model: nn.Module, directory: Union[str, os.PathLike],
                   config: Optional[dict] = None,
                   extra_files: Optional[Callable[[Path], None]] = None) -> Path:
    """Writes ``model`` (with its QuantLinear modules) to ``directory`` atomically.

    ``config`` is the quantization config (any JSON-able dict, or an object with ``to_dict``); the
    model's own config is taken from ``model.config.to_dict()`` when present. An existing directory is
    replaced only if it is itself a torch_piso save (never an unrelated directory); replaced whole,
    so files added to it since are gone. A symbolic link is followed: the save replaces the
    directory it points to, the link stays. Returns the (resolved) directory written.

    ``extra_files``: called with the temporary directory before it is moved into place, to write
    more files (a tokenizer, a run log) that appear atomically with the save. They are not listed
    in the manifest and never read by :func:`load_quantized`.
    """
    from safetensors.torch import save_file

    target = check_save_target(directory)
    target.parent.mkdir(parents=True, exist_ok=True)

    quantized = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            quantized[name] = {"bits": mod.bits, "group_size": mod.group_size,
                               "in_features": mod.in_features, "out_features": mod.out_features,
                               "bias": mod.bias is not None}
    tensors, aliases = _dedup_state_dict(model.state_dict())
    model_config = attn_impl = None
    if getattr(model, "config", None) is not None and hasattr(model.config, "to_dict"):
        model_config = _json_safe(model.config.to_dict())
        attn_impl = getattr(model.config, "_attn_implementation", None)  # not in to_dict()
        attn_impl = attn_impl if isinstance(attn_impl, str) else None

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tpath = tmp / TENSORS_FILE
        save_file(tensors, str(tpath), metadata={"format": FORMAT_NAME})
        _fsync_file(tpath)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "files": {TENSORS_FILE: {"size": tpath.stat().st_size, "sha256": _sha256(tpath)}},
            "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)}
                        for k, v in tensors.items()},
            "aliases": aliases,
            "quantized_modules": quantized,
            "quantization_config": _json_safe(config) if config is not None else None,
            "model_class": type(model).__name__,
            "model_config": model_config,
            "attn_implementation": attn_impl,
            "packing": "int32 words, per-row little-endian bitstream of code + 2^(bits-1)",
        }
        if extra_files is not None:
            st = os.stat(tpath)
            extra_files(tmp)
            st2 = os.stat(tpath) if tpath.exists() else None
            if (tmp / MANIFEST).exists() or st2 is None or \
                    (st.st_ino, st.st_size, st.st_mtime_ns) != (st2.st_ino, st2.st_size, st2.st_mtime_ns):
                raise ValueError(f"save_quantized: extra_files must not write {MANIFEST} or "
                                 f"{TENSORS_FILE} (the save's own files)")
            for p in tmp.rglob("*"):
                if p.is_file() and not p.is_symlink():
                    _fsync_file(p)
        mpath = tmp / MANIFEST
        with open(mpath, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a save is an ordinary directory
        for p in (tpath, mpath):
            os.chmod(p, 0o644)
        _fsync_dir(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rmdir(old)
            os.replace(target, old)  # both renames are atomic; the window has no half directory
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)  # the second rename failed: put the previous save back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_manifest(directory: Union[str, os.PathLike], verify: bool = True) -> dict:
    """Reads and checks the manifest of a saved model (format, version, file sizes and sha256)."""
    d = Path(directory)
    mpath = d / MANIFEST
    if not d.is_dir():
        raise QuantizedCheckpointError(f"{d}: no such directory")
    if not mpath.is_file():
        raise QuantizedCheckpointError(f"{d}: missing {MANIFEST} (not a torch_piso save, or an "
                                       f"interrupted one)")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QuantizedCheckpointError(f"{mpath}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise QuantizedCheckpointError(f"{mpath}: not a {FORMAT_NAME} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise QuantizedCheckpointError(f"{mpath}: format_version {manifest.get('format_version')!r} is "
                                       f"not supported (this torch_piso reads {FORMAT_VERSION})")
    for key in ("files", "tensors", "aliases", "quantized_modules"):
        if not isinstance(manifest.get(key), dict):
            raise QuantizedCheckpointError(f"{mpath}: missing or malformed {key!r}")
    if TENSORS_FILE not in manifest["files"]:
        raise QuantizedCheckpointError(f"{mpath}: 'files' does not list {TENSORS_FILE} (its size and "
                                       f"sha256 are what make the tensors trustworthy)")
    for fname, meta in manifest["files"].items():
        if not isinstance(meta, dict):
            raise QuantizedCheckpointError(f"{mpath}: malformed 'files' entry for {fname!r}")
        if fname in ("", ".", "..") or Path(fname).name != fname or "\\" in fname:
            # a save lists only files inside its own directory; never read (hash) anything else
            raise QuantizedCheckpointError(f"{mpath}: 'files' entry {fname!r} is not a file name "
                                           f"inside the directory")
    if manifest.get("attn_implementation") is not None and \
            not isinstance(manifest["attn_implementation"], str):
        raise QuantizedCheckpointError(f"{mpath}: malformed 'attn_implementation' (expected a string)")
    for name, meta in manifest["tensors"].items():
        if not (isinstance(meta, dict) and isinstance(meta.get("shape"), list)
                and isinstance(meta.get("dtype"), str)):
            raise QuantizedCheckpointError(f"{mpath}: malformed 'tensors' entry for {name!r} "
                                           f"(needs a list 'shape' and a string 'dtype'): {meta!r}")
    if manifest.get("model_config") is not None and not isinstance(manifest["model_config"], dict):
        raise QuantizedCheckpointError(f"{mpath}: malformed 'model_config' (expected a mapping)")
    if verify:
        for fname, meta in manifest["files"].items():
            p = d / fname
            if not p.is_file():
                raise QuantizedCheckpointError(f"{d}: missing file {fname} listed in the manifest")
            size = p.stat().st_size
            if size != meta.get("size"):
                raise QuantizedCheckpointError(f"{p}: size {size} bytes does not match the manifest's "
                                               f"{meta.get('size')} (truncated or replaced file)")
            if _sha256(p) != meta.get("sha256"):
                raise QuantizedCheckpointError(f"{p}: sha256 does not match the manifest (corrupted or "
                                               f"modified file)")
    return manifest


def build_hf_model(model_config: dict, model_class: Optional[str] = None,
                   attn_implementation: Optional[str] = None) -> nn.Module:
    """Rebuilds a transformers causal LM from its ``config.to_dict()`` (no hub access), with the
    given attention implementation (None: transformers' default)."""
    import transformers

    cfg = dict(model_config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise QuantizedCheckpointError("model_config has no model_type; pass a model or a factory")
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    cls = getattr(transformers, model_class, None) if model_class else None
    if cls is not None and hasattr(cls, "_from_config"):
        return cls._from_config(config, **kw)
    return transformers.AutoModelForCausalLM.from_config(config, **kw)


def load_quantized(directory: Union[str, os.PathLike],
                   model: Union[nn.Module, Callable[..., nn.Module], None] = None,
                   device: Union[str, torch.device] = "cpu",
                   attn_implementation: Optional[str] = None) -> nn.Module:
    """Loads a :func:`save_quantized` directory.

    ``model``: an ``nn.Module`` of the original (unquantized) architecture, modified in place; or a
    factory called as ``factory(model_config_dict)`` (or with no argument if it takes none); or None
    to rebuild a transformers model from the saved model config -- returned in eval mode, like
    ``from_pretrained`` (a given model or a factory's model keeps the mode it was made in). The
    QuantLinear modules named in the manifest are swapped in, then every tensor is checked
    (present, shape, dtype) and loaded. ``attn_implementation`` ("eager", "sdpa", ...) applies to
    a rebuilt model; by default it is the one the saved model used.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    manifest = read_manifest(d, verify=True)
    if model is None:
        if not manifest.get("model_config"):
            raise QuantizedCheckpointError(f"{d}: the manifest holds no model_config; pass a model "
                                           f"or a factory to load_quantized")
        # from_config builds in training mode: dropout would make every forward differ
        model = build_hf_model(manifest["model_config"], manifest.get("model_class"),
                               attn_implementation or manifest.get("attn_implementation")).eval()
    elif not isinstance(model, nn.Module):
        takes_arg = True
        try:
            takes_arg = len(inspect.signature(model).parameters) > 0
        except (TypeError, ValueError):
            pass
        model = model(manifest.get("model_config")) if takes_arg else model()
        if not isinstance(model, nn.Module):
            raise TypeError("load_quantized: the factory did not return an nn.Module")

    # Swap in empty QuantLinear modules of the saved shapes.
    new = {}
    for name, info in manifest["quantized_modules"].items():
        if not isinstance(info, dict) or not _MODULE_KEYS <= info.keys():
            raise QuantizedCheckpointError(f"{d}: quantized module {name!r}: malformed manifest entry "
                                           f"{info!r} (needs {sorted(_MODULE_KEYS)})")
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise QuantizedCheckpointError(f"{d}: quantized module {name!r} does not exist in the "
                                           f"model") from exc
        if not isinstance(old, (nn.Linear, QuantLinear)):
            raise QuantizedCheckpointError(f"{d}: module {name!r} is a {type(old).__name__}, expected "
                                           f"nn.Linear or QuantLinear")
        if (old.in_features, old.out_features) != (info["in_features"], info["out_features"]):
            raise QuantizedCheckpointError(
                f"{d}: module {name!r} is {old.in_features}->{old.out_features} in the model but "
                f"{info['in_features']}->{info['out_features']} in the checkpoint")
        try:
            q = QuantLinear(info["in_features"], info["out_features"], info["bits"], info["group_size"],
                            bias=info["bias"], device="meta")
        except (TypeError, ValueError) as exc:  # a manifest edited by hand, not our save
            raise QuantizedCheckpointError(f"{d}: quantized module {name!r}: bad manifest entry "
                                           f"({exc})") from exc
        new[name] = q.train(old.training)
    replace_linear(model, new)

    try:
        tensors = load_file(str(d / TENSORS_FILE), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise QuantizedCheckpointError(f"{d / TENSORS_FILE}: unreadable safetensors file ({exc})") from exc
    expected = manifest["tensors"]
    for name, meta in expected.items():
        if name not in tensors:
            raise QuantizedCheckpointError(f"{d}: tensor {name!r} listed in the manifest is missing "
                                           f"from {TENSORS_FILE}")
        t = tensors[name]
        if list(t.shape) != list(meta["shape"]) or _dtype_name(t.dtype) != meta["dtype"]:
            raise QuantizedCheckpointError(
                f"{d}: tensor {name!r} is {list(t.shape)} {_dtype_name(t.dtype)} in the file but "
                f"{meta['shape']} {meta['dtype']} in the manifest")
    extra = set(tensors) - set(expected)
    if extra:
        raise QuantizedCheckpointError(f"{d}: {TENSORS_FILE} holds tensors the manifest does not "
                                       f"list: {sorted(extra)[:5]}")
    for alias, canon in manifest["aliases"].items():
        if canon not in tensors:
            raise QuantizedCheckpointError(f"{d}: alias {alias!r} points at missing tensor {canon!r}")
        tensors[alias] = tensors[canon]

    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise QuantizedCheckpointError(f"{d}: checkpoint does not fit the model: missing "
                                       f"{missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in own.items():
        if tuple(t.shape) != tuple(tensors[name].shape):
            raise QuantizedCheckpointError(f"{d}: tensor {name!r} has shape {list(tensors[name].shape)} "
                                           f"in the checkpoint but {list(t.shape)} in the model")
    # assign=True: tensors keep their saved dtype (a bf16 save loads as bf16) and the meta-device
    # QuantLinear buffers are replaced outright.
    model.load_state_dict(tensors, strict=True, assign=True)
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and not torch.isfinite(mod.scales).all():
            raise QuantizedCheckpointError(f"{d}: module {name!r} has non-finite scales")
    tie = getattr(model, "tie_weights", None)
    if callable(tie) and manifest["aliases"]:
        tie()
    return model.to(device)
