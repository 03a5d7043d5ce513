"""Finding the parts of a decoder-only causal LM by structure (not by class-name lists).

``find_decoder(model)`` locates the decoder blocks as the largest ``nn.ModuleList`` of blocks of one
class that contain ``nn.Linear`` layers (HF Llama / Qwen2 / Qwen3 ``model.model.layers``), and around
it the token embedding, the final norm, the rotary embedding (if any) and the LM head.
``block_linears(block)`` lists a block's linears in execution order, grouped by shared input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import nn

__all__ = ["DecoderParts", "UnsupportedModelError", "find_decoder", "decoder_layers",
           "block_linears", "tiny_model"]


class UnsupportedModelError(ValueError):
    """The model does not have the structure the pipeline needs."""


@dataclass
class DecoderParts:
    base: nn.Module                    # the module owning `layers` (HF: model.model)
    layers_name: str                   # qualified name of the ModuleList (HF: "model.layers")
    layers: nn.ModuleList
    embed_tokens: nn.Module
    norm: Optional[nn.Module]
    rotary_emb: Optional[nn.Module]
    lm_head: Optional[nn.Module]


def _conv1d_types():
    try:
        from transformers.pytorch_utils import Conv1D

        return (Conv1D,)
    except Exception:  # pragma: no cover
        return ()


def _getter_or_attr(owner: nn.Module, getter: str, attr: str):
    """owner.<getter>() when HF implements it (the base class raises NotImplementedError), else
    owner.<attr>, else None."""
    get = getattr(owner, getter, None)
    if callable(get):
        try:
            found = get()
        except (NotImplementedError, AttributeError):
            found = None
        if found is not None:
            return found
    return getattr(owner, attr, None)


def find_decoder(model: nn.Module) -> DecoderParts:
    """The decoder's parts, found by structure. Raises UnsupportedModelError with the reason."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"find_decoder: expected an nn.Module, got {type(model).__name__}")
    conv = _conv1d_types()
    best, best_name, rejected = None, None, []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(b) for b in mod}
        if len(kinds) != 1:
            continue
        first = mod[0]
        if conv and any(isinstance(m, conv) for m in first.modules()):
            rejected.append(f"{name or '<root>'} ({type(first).__name__} uses GPT-2 style Conv1D, "
                            "not nn.Linear)")
            continue
        if not any(isinstance(m, nn.Linear) for m in first.modules()):
            continue
        if isinstance(first, nn.Linear):
            continue  # a list of bare linears is not a list of decoder blocks
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > sum(p.numel() for p in best.parameters()):
            best, best_name = mod, name
    if best is None:
        why = "; rejected: " + ", ".join(rejected) if rejected else ""
        raise UnsupportedModelError(
            f"find_decoder: {type(model).__name__} is not a supported decoder-only LM: no nn.ModuleList "
            f"of identical decoder blocks containing nn.Linear layers was found{why}. Supported: "
            "HF Llama / Qwen2 / Qwen3-style causal LMs (model.model.layers)")
    mods = dict(model.named_modules())
    base_name = best_name.rsplit(".", 1)[0] if "." in best_name else ""
    base = mods[base_name]
    embed = None
    for owner in (base, model):
        embed = _getter_or_attr(owner, "get_input_embeddings", "embed_tokens")
        if isinstance(embed, nn.Embedding):
            break
        embed = None
    if embed is None:
        raise UnsupportedModelError(f"find_decoder: {type(model).__name__} has decoder blocks at "
                                    f"{best_name!r} but no token embedding (nn.Embedding) was found")
    norm = getattr(base, "norm", None)
    if norm is None:
        norm = getattr(base, "final_layernorm", None) or getattr(base, "ln_f", None)
    rotary = getattr(base, "rotary_emb", None)
    lm_head = _getter_or_attr(model, "get_output_embeddings", "lm_head")
    return DecoderParts(base=base, layers_name=best_name, layers=best, embed_tokens=embed, norm=norm,
                        rotary_emb=rotary, lm_head=lm_head)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (see :func:`find_decoder`)."""
    return find_decoder(model).layers


# Known layout of Llama/Qwen blocks: groups of linears sharing one input, in execution order.
_KNOWN_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                 ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def block_linears(block: nn.Module, run: Optional[Callable[[nn.Module], object]] = None) -> List[List[str]]:
    """The block's nn.Linear names (relative to the block) in execution order, grouped by shared
    input: ``[[q, k, v], [o], [gate, up], [down]]`` for Llama/Qwen.

    ``run``: a callable ``run(block)`` doing one forward of the block (e.g. on one calibration
    sample). Given, the order and grouping are observed with hooks: consecutive calls fed the very
    same input tensor form a group (robust to any layout). Without it the known Llama/Qwen names
    are used when they are exactly the block's linears, else each linear is its own group in
    registration order."""
    linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UnsupportedModelError(f"block_linears: {type(block).__name__} has no nn.Linear")
    if run is not None:
        calls = []
        handles = []
        by_mod = {id(m): n for n, m in block.named_modules() if isinstance(m, nn.Linear)}

        def hook(mod, args):
            calls.append((by_mod[id(mod)], args[0] if args else None))

        for n, m in block.named_modules():
            if isinstance(m, nn.Linear):
                handles.append(m.register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                run(block)
        finally:
            for h in handles:
                h.remove()
        groups: List[List[str]] = []
        seen = set()
        last_x = None
        for name, x in calls:
            if name in seen:
                continue  # a module called twice: its first call fixes its position
            seen.add(name)
            if groups and x is not None and x is last_x:
                groups[-1].append(name)
            else:
                groups.append([name])
            last_x = x
        missing = [n for n in linears if n not in seen]
        if missing:  # never called in the forward: nothing to calibrate them on
            raise UnsupportedModelError(f"block_linears: the block's forward never called {missing}")
        return groups
    flat = [n for g in _KNOWN_GROUPS for n in g]
    if sorted(flat) == sorted(linears):
        return [list(g) for g in _KNOWN_GROUPS]
    return [[n] for n in linears]


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> nn.Module:
    """A tiny random HF causal LM for tests: hidden 64, 2 layers, 4 heads, 2 kv heads,
    intermediate 128, vocab 256, float32. arch in {"llama", "qwen2", "qwen3"}."""
    import transformers

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=256, max_position_embeddings=512,
                  tie_word_embeddings=False)
    if arch == "llama":
        cfg_cls, model_cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg_cls, model_cls = transformers.Qwen2Config, transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg_cls, model_cls = transformers.Qwen3Config, transformers.Qwen3ForCausalLM
        common["head_dim"] = 16
    else:
        raise ValueError(f"tiny_model: arch must be one of ['llama', 'qwen2', 'qwen3'], got {arch!r}")
    common.update(overrides)
    cfg = cfg_cls(**common)
    try:
        cfg._attn_implementation = "eager"
    except Exception:  # pragma: no cover
        pass
    torch.manual_seed(seed)
    model = model_cls(cfg).to(torch.float32).eval()
    return model
