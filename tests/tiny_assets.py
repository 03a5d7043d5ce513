"""A tiny random HF causal LM directory with an offline word-level tokenizer, and a tiny text, for
the CLI / data / eval tests (no network, a few seconds)."""
from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the a one two three red blue green cat dog bird fish runs sleeps eats sees big small old "
         "new and or but with from over under house tree river stone light dark day night sun moon "
         "star rain wind fire water earth sky sea king queen man woman child friend song word").split()


def tiny_text(n_words: int = 6000, seed: int = 0) -> str:
    rng = random.Random(seed)
    sents = []
    while sum(len(s.split()) for s in sents) < n_words:
        k = rng.randint(4, 12)
        sents.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
    return " ".join(sents) + "\n"


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in sorted(set(WORDS) | {w.capitalize() for w in WORDS} | {"."}):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


def make_tiny_model_dir(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    from torch_piso.models import tiny_model

    tok = tiny_tokenizer()
    assert len(tok) <= 256
    model = tiny_model(arch, seed=seed)
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    path = Path(path)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path
