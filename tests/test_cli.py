"""``python -m torch_piso`` end to end on a tiny random Llama saved as a HF directory with an offline
tokenizer and a tiny text (in-process through torch_piso.cli.main, plus one real subprocess)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_assets import make_tiny_model_dir, tiny_text
from torch_piso.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model_dir = make_tiny_model_dir(d / "tiny-llama")
    text = d / "text.txt"
    text.write_text(tiny_text(6000))
    return model_dir, text, d


def _quantize(assets, out, *extra):
    model_dir, text, _ = assets
    return main(["quantize", "--model", str(model_dir), "--text", str(text), "--recipe", "rtn-piso",
                 "--bits", "4", "--group-size", "32", "--samples", "4", "--seqlen", "32",
                 "--out", str(out), "--quiet", *extra])


def test_quantize_then_eval_and_reload(assets, capsys):
    from torch_piso.cli import load_quantized_with_tokenizer
    from torch_piso.nn import QuantLinear

    _, text, d = assets
    out = d / "q1"
    assert _quantize(assets, out, "--eval-tokens", "256") == 0
    run = json.loads((out / "piso_run.json").read_text())
    assert run["config"]["bits"] == 4 and run["config"]["group_size"] == 32
    assert run["config"]["n_samples"] == 4 and run["calibration_shape"] == [4, 32]
    assert run["perplexity"] > 1
    assert (out / "quantized.json").is_file() and (out / "tokenizer.json").is_file()

    # eval of the saved model, and reload gives the logits of the in-memory quantized model
    capsys.readouterr()
    assert main(["eval", "--quantized", str(out), "--text", str(text), "--seqlen", "32",
                 "--max-windows", "3", "--quiet"]) == 0
    assert "perplexity" in capsys.readouterr().out
    m1, tok = load_quantized_with_tokenizer(out)
    m2, _ = load_quantized_with_tokenizer(out)
    assert any(isinstance(m, QuantLinear) for m in m1.modules())
    x = torch.randint(3, len(tok), (2, 16))
    with torch.no_grad():
        assert torch.equal(m1(x).logits, m2(x).logits)


def test_saved_logits_match_quantized_model(assets):
    """The checkpoint reproduces the quantized model's logits exactly."""
    from torch_piso.cli import _calibration, build_config
    from torch_piso.data import load_text, tokenize
    from torch_piso.io import load_quantized, save_quantized
    from torch_piso.load import load_model
    from torch_piso.pipeline import quantize_model

    model_dir, text, d = assets
    model, tok = load_model(model_dir)
    cfg = build_config("rtn-absmax", bits=3, group_size=-1, n_samples=2, seqlen=16)
    calib, _ = _calibration(tok, tokenize(tok, load_text(text)), cfg, 0.5)
    model = quantize_model(model, calib, cfg, progress=False)
    save_quantized(model, d / "q2", cfg.to_dict())
    re = load_quantized(d / "q2")
    x = torch.randint(3, 100, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(x).logits, re(x).logits)


def test_eval_float_and_errors(assets, capsys):
    model_dir, text, d = assets
    assert main(["eval", "--model", str(model_dir), "--text", str(text), "--seqlen", "64",
                 "--max-windows", "2", "--quiet", "--json", str(d / "e.json")]) == 0
    assert json.loads((d / "e.json").read_text())["windows"] == 2
    # missing model / text / checkpoint: a clear message and exit code 2, no traceback
    capsys.readouterr()
    assert main(["eval", "--model", str(d / "nope"), "--text", str(text), "--quiet"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--text", str(d / "none.txt"), "--quiet"]) == 2
    assert "no such text file" in capsys.readouterr().err
    assert main(["eval", "--quantized", str(d / "nope"), "--text", str(text), "--quiet"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_corrupt_checkpoint_is_a_clear_error(assets, capsys):
    _, text, d = assets
    out = d / "q3"
    assert _quantize(assets, out) == 0
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["eval", "--quantized", str(out), "--text", str(text), "--seqlen", "32",
                 "--max-windows", "1", "--quiet"]) == 2
    assert "sha256" in capsys.readouterr().err


def test_config_file_and_flags(assets, tmp_path):
    from torch_piso.cli import build_config, build_parser, _config_overrides

    args = build_parser().parse_args(["quantize", "--recipe", "gptq*piso", "--bits", "2",
                                      "--no-act-order", "--ec", "qronos", "--samples", "8"])
    ov = _config_overrides(args)
    assert ov == {"bits": 2, "act_order": False, "error_correction": "qronos", "n_samples": 8}
    cfg = build_config(args.recipe, None, **ov)
    assert (cfg.bits, cfg.act_order, cfg.error_correction, cfg.n_samples) == (2, False, "qronos", 8)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(build_config("rtn-absmax", bits=5).to_dict()))
    cfg2 = build_config(None, str(p), group_size=16)
    assert cfg2.bits == 5 and cfg2.scales == "absmax" and cfg2.group_size == 16


def test_too_short_text(assets, tmp_path, capsys):
    model_dir, _, _ = assets
    t = tmp_path / "short.txt"
    t.write_text("The cat runs. " * 5)
    capsys.readouterr()
    assert main(["quantize", "--model", str(model_dir), "--text", str(t), "--recipe", "rtn-absmax",
                 "--samples", "2", "--seqlen", "64", "--quiet"]) == 2
    assert "too short" in capsys.readouterr().err
    assert main(["quantize", "--model", str(model_dir), "--text", str(t), "--recipe", "nope",
                 "--quiet"]) == 2


def test_demo_tiny(assets, tmp_path, capsys):
    model_dir, text, _ = assets
    rc = main(["demo", "--model", str(model_dir), "--text", str(text), "--recipes",
               "rtn-absmax,rtn-piso", "--bits", "4", "--samples", "4", "--seqlen", "32",
               "--eval-tokens", "256", "--eval-seqlen", "32", "--out-dir", str(tmp_path),
               "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| float |" in out and "| rtn-piso |" in out
    js = list(tmp_path.glob("demo-*.json"))
    assert len(js) == 1 and list(tmp_path.glob("demo-*.md"))
    rows = json.loads(js[0].read_text())["rows"]
    assert [r["recipe"] for r in rows] == ["float", "rtn-absmax", "rtn-piso"]
    assert all(r["perplexity"] > 1 for r in rows)


def test_module_entry_point_help():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "torch_piso", "--help"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0 and "quantize" in r.stdout and "demo" in r.stdout


@pytest.mark.parametrize("example", ["channelwise_table", "groupwise_table"])
def test_paper_table_examples_print_a_row_per_recipe(assets, capsys, example):
    import importlib.util

    model_dir, text, _ = assets
    spec = importlib.util.spec_from_file_location(example, ROOT / "examples" / f"{example}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--model", str(model_dir), "--text", str(text), "--rows", "rtn-absmax,rtn-piso",
                   "--bits", "4", "--group-size", "32", "--samples", "4", "--seqlen", "32",
                   "--eval-tokens", "256"])
    out = capsys.readouterr().out
    assert rc == 0
    table = [l for l in out.splitlines() if l.startswith("| ")]
    assert len(table) == 1 + 3  # header, float + two recipes
    ppl = {l.split("|")[1].strip(): float(l.split("|")[3]) for l in table[1:]}
    assert set(ppl) == {"float", "rtn-absmax", "rtn-piso"} and all(v > 1 for v in ppl.values())


@pytest.mark.parametrize("group_size", [-1, 16])
def test_ops_in_your_loop_example_orders_the_methods_and_reproduces_w_hat(capsys, group_size):
    """examples/ops_in_your_loop.py on its tiny random Llama: PiSO beats absmax RTN and GPTQ ⊙ PiSO
    beats GPTQ on the layer loss it prints, and the swapped-in QuantLinear reproduces W_hat."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("oiyl", ROOT / "examples" / "ops_in_your_loop.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--bits", "3", "--group-size", str(group_size)])
    out = capsys.readouterr().out
    ratio = {}
    for line in out.splitlines():
        for name in ("RTN absmax", "RTN PiSO", "GPTQ absmax", "GPTQ ⊙ PiSO"):
            if line.startswith(name + " "):
                ratio[name] = float(line.split()[-1])
    assert set(ratio) == {"RTN absmax", "RTN PiSO", "GPTQ absmax", "GPTQ ⊙ PiSO"}, out
    assert ratio["RTN absmax"] == 1.0
    assert ratio["RTN PiSO"] < 1.0 and ratio["GPTQ ⊙ PiSO"] <= ratio["GPTQ absmax"] * 1.001, out
    err = float(out.rsplit("max |diff| = ", 1)[1].split()[0])
    assert err < 1e-5, out


def test_groupwise_table_rejects_per_channel():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gw", ROOT / "examples" / "groupwise_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit):
        mod.main(["--group-size", "-1"])


# ---------------------------------------------------------------------------------------------
# refusals come before the model is loaded
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the command gets as far as loading a model."""
    import torch_piso.load

    def forbidden(*a, **k):
        raise AssertionError("the command loaded the model before refusing its arguments")

    monkeypatch.setattr(torch_piso.load, "load_model", forbidden)


def test_out_dir_that_is_not_a_save_is_refused_before_loading_the_model(assets, tmp_path, capsys,
                                                                         no_model_load):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert _quantize(assets, mine) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out: ") and "not a torch_piso save" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    assert _quantize(assets, tmp_path / "file") == 2
    assert "is not a directory" in capsys.readouterr().err


def test_missing_config_file_is_an_error_line_not_a_traceback(assets, tmp_path, capsys, no_model_load):
    model_dir, text, _ = assets
    capsys.readouterr()
    assert main(["quantize", "--model", str(model_dir), "--text", str(text),
                 "--config", str(tmp_path / "nope.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --config {tmp_path / 'nope.yaml'}: cannot read it") and \
        "Traceback" not in err
    assert main(["quantize", "--recipe", "rtn-piso", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "give --recipe or --config, not both" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["quantize", "eval", "demo"])
def test_cuda_device_without_cuda_fails_before_loading_the_model(assets, capsys, monkeypatch, cmd,
                                                                  no_model_load):
    model_dir, text, d = assets
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    capsys.readouterr()
    assert main([cmd, "--model", str(model_dir), "--text", str(text), "--device", "cuda",
                 "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: --device='cuda': CUDA is not available")


def test_cuda_device_from_the_config_file_is_checked_too(assets, tmp_path, capsys, monkeypatch,
                                                         no_model_load):
    model_dir, text, _ = assets
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "c.yaml").write_text("recipe: rtn-piso\ndevice: cuda\n")
    capsys.readouterr()
    assert main(["quantize", "--model", str(model_dir), "--text", str(text),
                 "--config", str(tmp_path / "c.yaml"), "--quiet"]) == 2
    assert "QuantConfig.device='cuda': CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("flags,match", [(["--bits", "9"], "QuantConfig.bits"),
                                         (["--recipes", "gptq†piso", "--group-size", "-1"],
                                          "needs group_size > 0"),
                                         (["--samples", "0"], "QuantConfig.n_samples")])
def test_demo_refuses_bad_recipe_overrides_before_loading_the_model(assets, capsys, no_model_load,
                                                                    flags, match):
    """The recipes are checked with the demo's --bits/--group-size/... , not only by name: a bad
    value fails at once, not after the model load and the float baseline."""
    model_dir, text, _ = assets
    capsys.readouterr()
    assert main(["demo", "--model", str(model_dir), "--text", str(text), "--quiet", *flags]) == 2
    assert match in capsys.readouterr().err


def test_quantize_eval_tokens_short_of_a_window_is_refused_before_quantizing(assets, tmp_path,
                                                                          capsys, monkeypatch):
    """--eval-tokens that cannot fill one perplexity window failed after the quantization, before
    the save: the quantized model was lost. Now refused before quantizing; a negative count (which
    sliced tokens off the end) is an argument error in every subcommand."""
    import torch_piso.pipeline

    def forbidden(*a, **k):
        raise AssertionError("quantized before refusing --eval-tokens")

    monkeypatch.setattr(torch_piso.pipeline, "quantize_model", forbidden)
    capsys.readouterr()
    assert _quantize(assets, tmp_path / "o", "--eval-tokens", "10") == 2
    assert "--eval-tokens 10: 10 held-out tokens do not fill one perplexity window of 32" in \
        capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    model_dir, text, _ = assets
    for cmd in ("quantize", "eval", "demo"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--model", str(model_dir), "--text", str(text), "--eval-tokens", "-5"])
        assert exc.value.code == 2
        assert "--eval-tokens: expected 0 or a positive integer, got -5" in capsys.readouterr().err


def test_checkpoint_dir_of_another_run_is_an_error_line_not_a_traceback(assets, tmp_path, capsys):
    """--checkpoint-dir left by a run with another recipe: `error: ...` and status 2, like every
    other bad argument, not a CheckpointMismatchError traceback."""
    ck = str(tmp_path / "ck")
    assert _quantize(assets, tmp_path / "a", "--checkpoint-dir", ck) == 0
    capsys.readouterr()
    assert _quantize(assets, tmp_path / "b", "--checkpoint-dir", ck, "--bits", "3") == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint {ck} belongs to another run" in err and "config" in err
    assert not (tmp_path / "b").exists()


def test_checkpoint_dir_inside_out_is_refused_before_loading_the_model(assets, tmp_path, capsys,
                                                                       no_model_load):
    """The save replaces --out as a whole: a checkpoint inside it would block (or be lost to) it."""
    for ck in (tmp_path / "o" / "ckpt", tmp_path / "o"):
        capsys.readouterr()
        assert _quantize(assets, tmp_path / "o", "--checkpoint-dir", str(ck)) == 2
        assert "lies inside --out" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("cmd, flags, match", [
    ("quantize", ["--calib-fraction", "1.5"], "--calib-fraction: expected a number in (0, 1)"),
    ("quantize", ["--calib-fraction", "0"], "--calib-fraction: expected a number in (0, 1)"),
    ("demo", ["--calib-fraction", "-0.1"], "--calib-fraction: expected a number in (0, 1)"),
    ("eval", ["--calib-fraction", "1"], "--calib-fraction: expected a number in [0, 1)"),
    # --damp is GPTQ's; Qronos ignored it silently
    ("quantize", ["--recipe", "qronos*piso", "--damp", "0.1"], "Qronos damps with --qronos-alpha"),
    ("quantize", ["--recipe", "gptq*piso", "--qronos-alpha", "1e-3"], "GPTQ damps with --damp"),
    ("quantize", ["--recipe", "rtn-piso", "--damp", "0.1"], "error correction is 'none'"),
])
def test_flags_the_run_would_ignore_or_misread_are_refused_before_loading_the_model(
        assets, capsys, no_model_load, cmd, flags, match):
    model_dir, text, _ = assets
    capsys.readouterr()
    assert main([cmd, "--model", str(model_dir), "--text", str(text), "--quiet", *flags]) == 2
    assert match in capsys.readouterr().err


def test_qronos_alpha_flag_reaches_the_config(assets, tmp_path):
    import json

    out = tmp_path / "q"
    assert _quantize(assets, out, "--ec", "qronos", "--interleave", "layer",
                     "--qronos-alpha", "0.001") == 0
    run = json.loads((out / "piso_run.json").read_text())
    assert run["config"]["qronos_alpha"] == 0.001 and run["config"]["error_correction"] == "qronos"


def test_quantize_writes_tokenizer_and_run_log_atomically_with_the_save(assets, tmp_path,
                                                                        monkeypatch):
    """The tokenizer and piso_run.json are written into the save's temporary directory: a failure
    while writing them leaves no output directory (before, a model without its tokenizer)."""
    import transformers

    out = tmp_path / "q"

    def fail(self, *a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", fail)
    with pytest.raises(OSError, match="simulated"):
        _quantize(assets, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert _quantize(assets, out) == 0
    names = {p.name for p in out.iterdir()}
    assert {"quantized.json", "model.safetensors", "piso_run.json", "tokenizer_config.json"} <= names


def test_bench_pipeline_repeats_alternate_and_summarize(assets, tmp_path, capsys):
    """benchmarks/bench_pipeline.py --repeats: the rows run in ABBA order, each row carries the
    seconds spent inside the ops (part of its quantize time), and the summary's medians and ratios
    are those of the rows it printed."""
    import importlib.util
    import statistics

    model_dir, text, _ = assets
    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "benchmarks" / "bench_pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out_json = tmp_path / "b.jsonl"
    rc = mod.main(["--model", str(model_dir), "--text", str(text), "--rows", "gptq-absmax,gptq*piso",
                   "--bits", "3", "--samples", "2", "--seqlen", "32", "--eval-tokens", "64",
                   "--eval-seqlen", "32", "--repeats", "2", "--out", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0
    rows = json.loads(out_json.read_text().splitlines()[-1])["rows"]
    assert [r["recipe"] for r in rows] == ["float", "gptq-absmax", "gptq*piso", "gptq*piso", "gptq-absmax"]
    for r in rows[1:]:
        assert 0 < r["scale_s"] + r["ec_s"] <= r["quantize_s"]
        assert r["scale_s"] == 0  # GPTQ: the (interleaved) scale search is inside the EC op
    # same calibration, same deterministic ops: repeats quantize identically
    assert rows[1]["layer_loss"] == rows[4]["layer_loss"] and rows[2]["layer_loss"] == rows[3]["layer_loss"]
    summary = {l.split("|")[2].strip(): l.split("|") for l in out.splitlines()
               if l.startswith("| 3 |") and l.count("|") == 8}
    q = {n: statistics.median(r["quantize_s"] for r in rows if r["recipe"] == n)
         for n in ("gptq-absmax", "gptq*piso")}
    o = {n: statistics.median(r["ec_s"] for r in rows if r["recipe"] == n) for n in q}
    assert set(summary) == set(q)
    cells = summary["gptq*piso"]
    assert float(cells[3]) == 2 and float(cells[4]) == pytest.approx(q["gptq*piso"], abs=0.051)
    assert float(cells[5]) == pytest.approx(q["gptq*piso"] / q["gptq-absmax"], abs=5e-4)
    assert float(cells[7]) == pytest.approx((q["gptq-absmax"] + o["gptq*piso"] - o["gptq-absmax"])
                                            / q["gptq-absmax"], abs=5e-4)
    assert float(summary["gptq-absmax"][5]) == 1.0
    with pytest.raises(SystemExit):
        mod.main(["--repeats", "0"])
