"""Text for calibration and evaluation: loading, tokenizing, a non-overlapping calibration/eval split
and random calibration windows.

Offline default text (``load_text(None)``): the World English Bible, from the Debian package
``sword-text-web`` converted to plain verse text by ``scripts/offline_assets.sh`` (``mod2imp`` +
``torch_piso/sword.py``) into ``<repo>/.data/web.txt`` (or ``$PISO_DATA_DIR/web.txt``).
``load_text("wikitext2")`` reads WikiText-2 (raw) validation through ``datasets`` (online only).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

DEFAULT_TEXT_NAME = "web.txt"
_SETUP_HINT = "run `bash scripts/setup.sh` (it installs and converts the offline text)"


class TextLoadError(RuntimeError):
    """The requested text cannot be loaded."""


def data_dir() -> Path:
    env = os.environ.get("PISO_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / ".data"


def default_text_path(must_exist: bool = True) -> Optional[Path]:
    """Path of the converted offline text; converts it now when mod2imp and the module are there."""
    p = data_dir() / DEFAULT_TEXT_NAME
    if p.is_file() and p.stat().st_size > 0:
        return p
    if shutil.which("mod2imp"):
        from .sword import MODULE, imp_to_text
        try:
            out = subprocess.run(["mod2imp", MODULE], capture_output=True, text=True, check=True).stdout
            text = imp_to_text(out.splitlines())
        except (OSError, subprocess.CalledProcessError):
            text = ""
        if len(text) > 100_000:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, p)
            return p
    if must_exist:
        raise TextLoadError(f"the offline default text ({p}) is missing; {_SETUP_HINT}")
    return None


def load_text(path: Union[str, os.PathLike, None] = None) -> str:
    """The text of ``path`` (a UTF-8 file), of WikiText-2 validation for ``"wikitext2"``, or the offline
    default for None / ``"default"``."""
    if path is None or str(path) == "default":
        return default_text_path(must_exist=True).read_text(encoding="utf-8")
    s = str(path)
    if s.lower() in ("wikitext2", "wikitext-2") and not Path(s).exists():
        try:
            import datasets
        except ImportError as exc:
            raise TextLoadError("--text wikitext2 needs the `datasets` package and network access; "
                                "pass a local text file instead (e.g. a copy of WikiText-2's "
                                "valid.txt)") from exc
        try:
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="validation")
        except Exception as exc:
            raise TextLoadError(f"could not load WikiText-2 through `datasets` (offline?): {exc}; "
                                f"pass a local text file instead") from exc
        return "".join(ds["text"])
    p = Path(s).expanduser()
    if not p.is_file():
        raise TextLoadError(f"{p}: no such text file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise TextLoadError(f"{p}: the file is empty")
    return text


def tokenize(tokenizer, text: str, max_chars: Optional[int] = None) -> Tensor:
    """Token ids of ``text`` (its first ``max_chars`` characters) as a 1-D int64 tensor, with no special
    tokens added (BOS is added per window by :func:`calibration_windows`, as the paper does)."""
    if max_chars is not None:
        text = text[:max_chars]
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long).reshape(-1)


def split_text(ids: Tensor, calib_fraction: float = 0.5, calib_tokens: Optional[int] = None
               ) -> Tuple[Tensor, Tensor]:
    """Splits a token stream into (calibration, evaluation) parts that do not overlap: calibration
    is the first ``calib_tokens`` tokens (or ``calib_fraction`` of them), evaluation the rest."""
    if ids.dim() != 1:
        raise ValueError(f"split_text: expected a 1-D token tensor, got shape {tuple(ids.shape)}")
    n = ids.numel()
    if calib_tokens is None:
        if not 0.0 < calib_fraction < 1.0:
            raise ValueError(f"calib_fraction must be in (0, 1), got {calib_fraction}")
        calib_tokens = int(n * calib_fraction)
    if not 0 < calib_tokens < n:
        raise ValueError(f"split_text: calib_tokens={calib_tokens} must be in (0, {n})")
    return ids[:calib_tokens], ids[calib_tokens:]


def calibration_windows(ids: Tensor, n_samples: int, seqlen: int, seed: int = 0,
                        bos_token_id: Optional[int] = None) -> Tensor:
    """``n_samples`` random windows of ``ids`` as a LongTensor [n_samples, seqlen].

    With ``bos_token_id``, each sequence is BOS followed by ``seqlen - 1`` text tokens. Window starts
    are drawn uniformly (with a ``torch.Generator`` seeded by ``seed``, so the result is
    deterministic); windows may overlap each other but never leave ``ids``.
    """
    if ids.dim() != 1:
        raise ValueError(f"calibration_windows: expected a 1-D token tensor, got {tuple(ids.shape)}")
    if n_samples <= 0 or seqlen <= 0:
        raise ValueError(f"calibration_windows: n_samples and seqlen must be positive, got "
                         f"{n_samples} and {seqlen}")
    body = seqlen - 1 if bos_token_id is not None else seqlen
    if body < 1 and bos_token_id is not None:
        raise ValueError("calibration_windows: seqlen must be at least 2 with a BOS token")
    n = ids.numel()
    if n < body:
        raise ValueError(f"calibration_windows: the calibration text is too short: windows of "
                         f"{seqlen} tokens need at least {body} text tokens, only {n} available "
                         f"(use a longer --text, or a smaller --seqlen)")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n - body + 1, (n_samples,), generator=g)
    offs = torch.arange(body)
    out = ids.to(torch.long)[starts[:, None] + offs[None, :]]
    if bos_token_id is not None:
        out = torch.cat([torch.full((n_samples, 1), int(bos_token_id), dtype=torch.long), out], 1)
    return out.contiguous()
