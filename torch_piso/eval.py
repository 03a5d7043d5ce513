"""Perplexity over non-overlapping windows.

``ids`` (1-D) is cut into ``len(ids) // seqlen`` consecutive windows of ``seqlen`` tokens; the last
partial window is dropped (so every scored token has the same amount of context budget and the
number is comparable across models). In each window, tokens 1..seqlen-1 are predicted from their
prefix (the first token of a window has no context and is not scored): ``windows * (seqlen - 1)``
tokens in all, counted exactly. The perplexity is ``exp(sum NLL / count)``, with the NLL summed in
float64 (each window's cross-entropy is computed from float32 logits).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def nll_sum(model: nn.Module, ids: Tensor, seqlen: int = 2048, batch_size: int = 1,
            max_windows: Optional[int] = None, device: Union[str, torch.device, None] = None,
            progress: bool = True, desc: str = "perplexity"):
    """Returns ``(sum of token NLLs as a Python float (float64), number of scored tokens)``."""
    if ids.dim() != 1:
        ids = ids.reshape(-1)
    if seqlen < 2:
        raise ValueError(f"perplexity: seqlen must be >= 2, got {seqlen}")
    if batch_size < 1:
        raise ValueError(f"perplexity: batch_size must be >= 1, got {batch_size}")
    n_win = ids.numel() // seqlen
    if max_windows is not None and int(max_windows) < 1:
        raise ValueError(f"perplexity: max_windows must be >= 1 (or None for every window), got "
                         f"{max_windows}")
    if max_windows is not None:
        n_win = min(n_win, int(max_windows))
    if n_win < 1:
        raise ValueError(f"perplexity: the evaluation text has {ids.numel()} tokens, fewer than one "
                         f"window of seqlen={seqlen}; use a longer text or a smaller --seqlen")
    if device is not None:
        model.to(device)
    dev = torch.device(device) if device is not None else _model_device(model)
    windows = ids[: n_win * seqlen].to(torch.long).view(n_win, seqlen)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_win, desc=desc, unit="win", leave=False)
    try:
        for i in range(0, n_win, batch_size):
            x = windows[i:i + batch_size].to(dev)
            out = model(input_ids=x, use_cache=False)
            logits = out.logits if hasattr(out, "logits") else out[0]
            logits = logits[:, :-1, :].float()
            target = x[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                   reduction="sum")
            total += loss.double().cpu()
            count += target.numel()
            if bar is not None:
                bar.update(x.shape[0])
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return float(total), count


def perplexity(model: nn.Module, ids: Tensor, seqlen: int = 2048, batch_size: int = 1,
               max_windows: Optional[int] = None, device: Union[str, torch.device, None] = None,
               progress: bool = True) -> float:
    """exp(mean token NLL) of ``model`` on ``ids`` over non-overlapping windows (see the module doc)."""
    total, count = nll_sum(model, ids, seqlen, batch_size, max_windows, device, progress)
    return math.exp(total / count)
