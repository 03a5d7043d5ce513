"""End to end: QuantConfig, decoder discovery and the block-by-block pipeline on tiny random
Llama / Qwen2 / Qwen3 models (hidden 64, 2 blocks; calibration 4 x 32 tokens)."""
import copy
import json

import pytest
import torch
from torch import nn

import torch_piso
from torch_piso import RECIPES, HessianCollector, QuantConfig, QuantLinear, quantize_model
from torch_piso.models import (UnsupportedModelError, block_linears, decoder_layers, find_decoder,
                               tiny_model)
from torch_piso import pipeline
from torch_piso.pipeline import CalibrationError, quantize_model_with_report

ops = torch.ops.piso

pytest.importorskip("transformers")

CAL = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
_MODELS = {}


def model(arch="llama"):
    if arch not in _MODELS:
        _MODELS[arch] = tiny_model(arch)
    return copy.deepcopy(_MODELS[arch])


def logits(m, ids=CAL):
    with torch.no_grad():
        return m(ids).logits


def zeroed(m):
    z = copy.deepcopy(m)
    for blk in decoder_layers(z):
        for mod in blk.modules():
            if isinstance(mod, nn.Linear):
                nn.init.zeros_(mod.weight)
    return z


def run(m, cfg, **kw):
    return quantize_model_with_report(m, CAL, cfg, progress=False, log=None, **kw)


def check_quantized(arch, name, **overrides):
    fp = model(arch)
    ref = logits(fp)
    zero_err = (logits(zeroed(fp)) - ref).norm()
    m, report = run(copy.deepcopy(fp), QuantConfig.recipe(name, **overrides))
    out = logits(m)
    assert torch.isfinite(out).all()
    err = (out - ref).norm()
    assert err < zero_err, (name, float(err), float(zero_err))
    lin = {n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    assert lin == {"lm_head"}
    q = [n for n, mod in m.named_modules() if isinstance(mod, QuantLinear)]
    assert len(q) == 14 and len(report["rows"]) == 14
    assert all(r["method"] == QuantConfig.recipe(name, **overrides).label for r in report["rows"])
    assert m.piso_report is report
    return m, report


# ---------------------------------------------------------------------------------------------
# every paper row
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_on_llama_is_finite_closer_than_zeroed_and_replaces_all_linears(name):
    check_quantized("llama", name, bits=3)


@pytest.mark.parametrize("arch,name", [("qwen2", "rtn-piso"), ("qwen2", "gptq*piso"),
                                       ("qwen2", "qronos+piso"), ("qwen3", "gptq†piso_s"),
                                       ("qwen3", "qronos*piso"), ("qwen3", "rtn-absmax")])
def test_recipes_on_qwen_are_finite_closer_than_zeroed_and_replace_all_linears(arch, name):
    check_quantized(arch, name)


def test_piso_rtn_reports_lower_layer_loss_than_absmax_rtn_on_every_module():
    _, report = run(model(), QuantConfig.recipe("rtn-piso", bits=3))
    for r in report["rows"]:
        assert r["objective"] == "cross"
        assert r["loss_after"] <= r["loss_before"] * (1 + 1e-6) + 1e-12, r


# ---------------------------------------------------------------------------------------------
# the statistics the pipeline uses are those of the quantized stream
# ---------------------------------------------------------------------------------------------
def _brute_force_H(m, names):
    """X̃ᵀX̃/T for `names` by hooks on the (returned, quantized) model, one sample per forward."""
    mods = dict(m.named_modules())
    acc = {n: [torch.zeros(mods[n].in_features, mods[n].in_features, dtype=torch.float64), 0]
           for n in names}
    hs = []
    for n in names:
        def hook(mod, args, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            acc[n][0] += x.T @ x
            acc[n][1] += x.shape[0]
        hs.append(mods[n].register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in CAL:
            m(ids[None])
    for h in hs:
        h.remove()
    return {n: a / t for n, (a, t) in acc.items()}


WATCH = ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
         "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def test_pipeline_H_equals_brute_force_recomputation_on_the_quantized_model():
    spy = {}
    m, _ = run(model(), QuantConfig.recipe("gptq*piso", bits=3),
               _spy=lambda n, d: spy.__setitem__(n, d["H"].double().clone()))
    brute = _brute_force_H(m, WATCH)
    for n in WATCH:
        torch.testing.assert_close(spy[n], brute[n], rtol=1e-4, atol=1e-6)


def test_recorded_H_carries_quantized_predecessors_not_the_float_model():
    fp = model()
    spy = {}
    m, _ = run(copy.deepcopy(fp), QuantConfig.recipe("rtn-absmax", bits=2),
               _spy=lambda n, d: spy.__setitem__(n, d["H"].double().clone()))
    float_H = _brute_force_H(fp, WATCH)
    quant_H = _brute_force_H(m, WATCH)
    for n in WATCH:
        torch.testing.assert_close(spy[n], quant_H[n], rtol=1e-4, atol=1e-6)
        rel = (spy[n] - float_H[n]).norm() / float_H[n].norm()
        assert rel > 1e-2, (n, float(rel))  # would be ~1e-7 if the float stream fed H


def test_cross_objective_pairs_float_block_with_quantized_input_so_G_equals_H_for_qkv():
    spy = {}
    run(model(), QuantConfig.recipe("qronos-absmax", bits=2),
        _spy=lambda n, d: spy.__setitem__(n, {k: (v.double().clone() if torch.is_tensor(v) else v)
                                              for k, v in d.items()}))
    for blk in (0, 1):  # float_stream="block": X = X̃ at the block input (ALGORITHM §1.2)
        d = spy[f"model.layers.{blk}.self_attn.q_proj"]
        torch.testing.assert_close(d["G"], d["H"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(d["H_fp"], d["H"], rtol=1e-5, atol=1e-7)
    d = spy["model.layers.0.self_attn.o_proj"]  # inside the block the float pass differs
    assert (d["G"] - d["H"]).norm() / d["H"].norm() > 1e-2


def test_float_stream_model_propagates_a_float_stream_between_blocks():
    spy = {}
    run(model(), QuantConfig.recipe("qronos-absmax", bits=2, float_stream="model"),
        _spy=lambda n, d: spy.__setitem__(n, {k: (v.double().clone() if torch.is_tensor(v) else v)
                                              for k, v in d.items()}))
    d0 = spy["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(d0["G"], d0["H"], rtol=1e-5, atol=1e-7)  # block 0: same input
    d1 = spy["model.layers.1.self_attn.q_proj"]
    assert (d1["H_fp"] - d1["H"]).norm() / d1["H"].norm() > 1e-2  # block 1: float input differs


@pytest.mark.parametrize("recipe", ["rtn-absmax", "rtn-piso", "qronos*piso", "gptq†piso"])
def test_reported_layer_losses_are_the_layer_objective_of_the_stored_weights(recipe):
    """loss_before (absmax RTN) and loss_after (the stored QuantLinear) recomputed in the expanded
    form from the statistics the module was quantized with: self Σ dHdᵀ, cross
    Σ wHfpwᵀ − 2ŵGwᵀ + ŵHŵᵀ (the report computes them another way, from d = w − ŵ)."""
    fp = model()
    Ws = {n: m.weight.detach().double().clone() for n, m in fp.named_modules()
          if isinstance(m, nn.Linear)}
    spy = {}
    cfg = QuantConfig.recipe(recipe, bits=3, **({"group_size": 16} if "†" in recipe else {}))
    q, report = run(fp, cfg, _spy=lambda n, d: spy.__setitem__(n, {
        k: (v.double().clone() if torch.is_tensor(v) else v) for k, v in d.items()}))
    mods = dict(q.named_modules())
    rows = [r for r in report["rows"] if r["module"] in spy]
    assert len(rows) == 14
    for r in rows:
        d, W = spy[r["module"]], Ws[r["module"]]
        gs = cfg.group_size
        s_abs = pipeline._absmax_scales(W.float(), 3, gs, False).double()
        What_abs = ops.quantize_rtn(W, s_abs, 3, gs)[1]
        What = mods[r["module"]].dequantize(torch.float64)

        def expanded(Wh):
            if r["objective"] == "self":
                e = W - Wh
                return float(((e @ d["H"]) * e).sum())
            return float(((W @ d["H_fp"]) * W).sum() - 2 * ((Wh @ d["G"]) * W).sum()
                         + ((Wh @ d["H"]) * Wh).sum())

        for key, Wh in (("loss_before", What_abs), ("loss_after", What)):
            want = expanded(Wh)
            assert abs(r[key] - want) <= 1e-6 * abs(want) + 1e-9, (r["module"], key, r[key], want)

def _sliding(arch):
    """layer_types ["full_attention", "sliding_attention"]: HF gives block 1 a window-4 mask."""
    m = tiny_model(arch, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert list(m.config.layer_types) == ["full_attention", "sliding_attention"]
    return m


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_sliding_window_blocks_are_calibrated_with_their_own_attention_mask(arch):
    fp = _sliding(arch)
    name = "model.layers.1.self_attn.o_proj"  # its input depends on block 1's mask (seqlen 32 > 4)
    with HessianCollector(copy.deepcopy(fp), name) as hc:
        with torch.no_grad():
            for ids in CAL:
                hc.root(ids[None])
        want = hc.H(name)
    spy = {}
    # block 0 and block 1's q,k,v stay float, so o_proj's input in the pipeline is the float one
    cfg = QuantConfig.recipe("rtn-piso", objective="self",
                             skip=("model.layers.0.*", "*.layers.1.self_attn.[qkv]_proj"))
    run(copy.deepcopy(fp), cfg, _spy=lambda n, d: spy.__setitem__(n, d["H"].clone()))
    torch.testing.assert_close(spy[name], want, rtol=1e-5, atol=1e-7)


def test_capture_runs_no_block_and_stores_each_shared_kwarg_once():
    from torch_piso.pipeline import _capture

    for m, distinct in ((model("llama"), 1), (_sliding("qwen2"), 2)):
        parts = find_decoder(m)
        ran = []
        hs = [blk.mlp.register_forward_hook(lambda *a: ran.append(1)) for blk in parts.layers]
        inps, kws = _capture(m, parts, [CAL[0][None], CAL[1][None], CAL[2][None, :20]], False)
        for h in hs:
            h.remove()
        assert ran == []  # the float blocks did not run during the capture
        assert all("forward" not in blk.__dict__ for blk in parts.layers)  # recorders removed
        wrapped = parts.layers[1].forward  # a forward set on the instance (as accelerate does) ...
        parts.layers[1].forward = wrapped
        _capture(m, parts, [CAL[0][None]], False)
        assert parts.layers[1].__dict__["forward"] is wrapped  # ... is put back
        del parts.layers[1].forward
        assert len(inps) == 3 and [len(k) for k in kws] == [2, 2, 2]
        assert kws[0] is kws[1] and kws[2] is not kws[0]  # one set per sequence length
        assert len({id(d) for d in kws[0]}) == distinct  # one dict per distinct set of kwargs
        cos0, cos1 = kws[0][0]["position_embeddings"][0], kws[0][1]["position_embeddings"][0]
        assert cos0 is cos1  # the rotary cos/sin are stored once for all blocks
        masks = [d["attention_mask"] for d in kws[0]]
        if distinct == 2:
            assert not torch.equal(masks[0], masks[1])  # full vs sliding-window mask


@pytest.mark.parametrize("ec,objective,dec_objective", [("gptq", "self", None), ("qronos", "cross", None),
                                                     ("gptq", "cross", "cross"), ("qronos", "self", "self")])
def test_decoupled_scales_equal_those_of_a_first_rtn_piso_pass(ec, objective, dec_objective):
    fp = model()
    rtn, _ = run(copy.deepcopy(fp), QuantConfig.recipe("rtn-piso", bits=3, objective=objective))
    dec, report = run(copy.deepcopy(fp), QuantConfig.recipe(f"{ec}+piso", bits=3,
                                                            objective=dec_objective))
    assert len(report["decoupled_pass1_rows"]) == 14
    rmods = dict(rtn.named_modules())
    differs = 0
    for n, mod in dec.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(mod.scales, rmods[n].scales), n
            differs += not torch.equal(mod.codes(), rmods[n].codes())
    assert differs > 0  # the EC pass changed the codes, not the scales


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def test_find_decoder_finds_parts_and_block_linears_groups_by_shared_input():
    m = model("qwen3")
    parts = find_decoder(m)
    assert parts.layers is m.model.layers and parts.layers_name == "model.layers"
    assert parts.embed_tokens is m.model.embed_tokens and parts.lm_head is m.lm_head
    assert parts.norm is m.model.norm and parts.rotary_emb is m.model.rotary_emb
    expected = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert block_linears(parts.layers[0]) == expected
    slot = {}

    def grab(mod, args, kwargs):
        slot["x"], slot["kw"] = args[0], kwargs
        raise KeyboardInterrupt

    h = parts.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        m(CAL[:1])
    h.remove()
    observed = block_linears(parts.layers[0], run=lambda b: b(slot["x"], **slot["kw"]))
    assert observed == expected


def test_unsupported_models_are_rejected_with_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="no nn.ModuleList"):
        find_decoder(nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8)))
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2,
                                                                vocab_size=64, n_positions=64))
    with pytest.raises(UnsupportedModelError, match="Conv1D"):
        quantize_model(gpt2, CAL % 64, QuantConfig(), progress=False, log=None)


# ---------------------------------------------------------------------------------------------
# errors before anything is modified
# ---------------------------------------------------------------------------------------------
def _untouched(m, fp):
    assert not any(isinstance(x, QuantLinear) for x in m.modules())
    for (n, a), (_, b) in zip(m.state_dict().items(), fp.state_dict().items()):
        assert torch.equal(a, b), n


def test_group_size_not_dividing_a_layer_is_a_clear_error_before_any_change():
    fp = model()
    m = copy.deepcopy(fp)
    with pytest.raises(ValueError, match=r"group_size=48 does not divide in_features=64 of module "
                                         r"'model.layers.0.self_attn.q_proj'"):
        run(m, QuantConfig(group_size=48))
    _untouched(m, fp)


@pytest.mark.parametrize("where,value", [("mlp.up_proj.weight", float("nan")),
                                         ("self_attn.o_proj.weight", float("-inf")),
                                         ("self_attn.k_proj.bias", float("inf"))])
def test_non_finite_weight_in_a_later_block_is_an_error_naming_it_before_any_change(where, value):
    fp = model("qwen2")  # qwen2: k_proj has a bias
    with torch.no_grad():
        fp.get_parameter(f"model.layers.1.{where}").view(-1)[7] = value
    m = copy.deepcopy(fp)
    mod, pname = where.rsplit(".", 1)
    with pytest.raises(ValueError, match=rf"module 'model.layers.1.{mod}' has a non-finite {pname}"):
        run(m, QuantConfig.recipe("gptq+piso"))
    assert not any(isinstance(x, QuantLinear) for x in m.modules())
    for (n, a), (_, b) in zip(m.state_dict().items(), fp.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=n)


def test_quantizing_an_already_quantized_model_says_so():
    m, _ = run(model(), QuantConfig(bits=4, scales="absmax"))
    with pytest.raises(ValueError, match=r"already quantized \(14 QuantLinear modules, e.g. "
                                         r"\['model.layers.0.self_attn.q_proj'"):
        run(m, QuantConfig(bits=4, scales="absmax"))
    part, _ = run(model(), QuantConfig(bits=4, scales="absmax", skip=("layers.1.*",)))
    with pytest.raises(ValueError, match=r"already quantized \(7 QuantLinear"):
        run(part, QuantConfig(bits=4, scales="absmax"))


@pytest.mark.parametrize("cal,match", [
    (torch.empty(0, 32, dtype=torch.long), "no samples"),
    ([], "no samples"),
    ([torch.empty(0, dtype=torch.long)], "empty sequence"),
    (torch.full((2, 8), 256), r"token ids must lie in \[0, 256\)"),
    (torch.full((2, 8), -1), r"token ids must lie"),
    (torch.zeros(2, 8), "integer token ids"),
])
def test_bad_calibration_is_a_clear_error_before_any_change(cal, match):
    fp = model()
    m = copy.deepcopy(fp)
    with pytest.raises(CalibrationError, match=match):
        quantize_model(m, cal, QuantConfig(), progress=False, log=None)
    _untouched(m, fp)


def test_report_json_written_atomically_with_config_rows_and_totals(tmp_path, capsys):
    m = quantize_model(model(), CAL, QuantConfig.recipe("gptq*piso"), progress=False,
                       output_dir=tmp_path / "out")
    printed = capsys.readouterr().out
    assert "memory budget" in printed and "model.layers.1.mlp.down_proj" in printed
    data = json.loads((tmp_path / "out" / "quantize_report.json").read_text())
    assert QuantConfig.from_dict(data["config"]) == QuantConfig.recipe("gptq*piso")
    assert len(data["rows"]) == 14 and data["totals"]["modules"] == 14
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["quantize_report.json"]
    assert data["label"] == "GPTQ ⊙ PiSO" == m.piso_report["label"]


def test_skip_globs_leave_modules_in_float():
    m, report = run(model(), QuantConfig(bits=4, scales="absmax", skip=("*.down_proj", "lm_head")))
    assert isinstance(m.model.layers[0].mlp.down_proj, nn.Linear)
    assert isinstance(m.model.layers[1].mlp.up_proj, QuantLinear)
    assert len(report["rows"]) == 12


def _float_linears(m):
    return sorted(n for n, x in m.named_modules() if type(x) is nn.Linear)


@pytest.mark.parametrize("skip,left", [
    (("q_proj",), ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
    (("self_attn.q_proj",), ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
    (("layers.1.mlp.*",), ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj",
                           "model.layers.1.mlp.up_proj"]),
    (("model.layers.0.self_attn.[qk]_proj",), ["model.layers.0.self_attn.k_proj",
                                               "model.layers.0.self_attn.q_proj"]),
])
def test_skip_patterns_match_the_whole_name_or_a_dotted_suffix(skip, left, recwarn):
    m, report = run(model(), QuantConfig(bits=4, scales="absmax", skip=skip))
    assert _float_linears(m) == sorted(left + ["lm_head"])
    assert len(report["rows"]) == 14 - len(left)
    assert not [w for w in recwarn if "QuantConfig.skip" in str(w.message)]


def test_skip_suffix_matching_is_by_dotted_component():
    cfg = QuantConfig(skip=("q_proj", "mlp.*"))
    assert cfg.skips("model.layers.0.self_attn.q_proj") and cfg.skips("q_proj")
    assert not cfg.skips("model.layers.0.self_attn.xq_proj")
    assert cfg.skips("model.layers.3.mlp.up_proj") and not cfg.skips("model.layers.3.xmlp.up_proj")


def test_skip_pattern_matching_no_linear_is_warned_about_by_name():
    with pytest.warns(UserWarning, match=r"QuantConfig.skip: pattern 'qproj' matches no nn.Linear"):
        m, _ = run(model(), QuantConfig(bits=4, scales="absmax", skip=("lm_head", "qproj")))
    assert _float_linears(m) == ["lm_head"]


def test_default_skip_lm_head_is_outside_the_blocks_so_never_quantized_and_not_warned(recwarn):
    for skip in (QuantConfig().skip, ()):  # the default only states what the pipeline does
        m, _ = run(model(), QuantConfig(bits=4, scales="absmax", skip=skip))
        assert _float_linears(m) == ["lm_head"]
    assert QuantConfig().skip == ("lm_head",)
    assert not [w for w in recwarn if "QuantConfig.skip" in str(w.message)]


# ---------------------------------------------------------------------------------------------
# QuantConfig
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(bits=1), r"bits: expected an integer in \[2, 8\]"),
    (dict(bits=9), r"bits"),
    (dict(bits=4.0), r"bits"),
    (dict(group_size=0), "group_size"),
    (dict(scales="mse"), r"scales: expected one of \['absmax', 'data-free', 'piso'\], got 'mse'"),
    (dict(error_correction="awq"), "error_correction: expected one of"),
    (dict(interleave="group", error_correction="gptq"), r"interleave: 'group'.*needs group_size > 0"),
    (dict(group_variant="greedy"), "group_variant"),
    (dict(objective="both"), "objective"),
    (dict(error_correction="gptq", interleave="layer", objective="cross"), "objective: 'cross'"),
    (dict(float_stream="disk"), "float_stream"),
    (dict(damp=-1.0), "damp"),
    (dict(n_samples=0), "n_samples"),
    (dict(hessian_dtype="float16"), "hessian_dtype"),
    (dict(device="tpu9"), "device"),
])
def test_quantconfig_validation_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kw)


@pytest.mark.parametrize("kw", [dict(), dict(error_correction="gptq", scales="absmax")])
def test_quantconfig_ignores_interleave_where_it_does_not_apply(kw):
    """interleave applies only with error correction and non-absmax scales (the module docs): a
    per-channel RTN or GPTQ + absmax config with interleave='group' was refused."""
    cfg = QuantConfig(interleave="group", group_size=-1, **kw)
    assert cfg.effective_interleave is None and cfg.scales_update == "none"


def test_quantconfig_from_dict_rejects_unknown_keys_and_round_trips(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bitz'\]"):
        QuantConfig.from_dict({"bitz": 3})
    cfg = QuantConfig.recipe("qronos†piso_s", bits=2, group_size=16, skip=["lm_head", "*.o_proj"])
    assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for suffix in (".json", ".yaml"):
        assert QuantConfig.from_file(cfg.save(tmp_path / f"c{suffix}")) == cfg
    (tmp_path / "r.yaml").write_text("recipe: gptq*piso\nbits: 3\n")
    assert QuantConfig.from_file(tmp_path / "r.yaml") == QuantConfig.recipe("gptq*piso", bits=3)
    with pytest.raises(ValueError, match="unknown recipe"):
        QuantConfig.recipe("gptq-magic")


def test_recipe_labels_and_op_mapping_follow_the_paper():
    cases = {
        "rtn-absmax": ("RTN absmax", "none", "cross"),
        "rtn-piso": ("RTN PiSO", "none", "cross"),
        "gptq-absmax": ("GPTQ absmax", "none", "self"),
        "gptq+piso": ("GPTQ + PiSO", "none", "self"),
        "gptq*piso": ("GPTQ ⊙ PiSO", "layer", "self"),
        "qronos+piso": ("Qronos + PiSO", "none", "cross"),
        "qronos*piso": ("Qronos ⊙ PiSO", "layer", "cross"),
        "gptq†piso": ("GPTQ ⊙† PiSO_I", "group", "self"),
        "gptq†piso_s": ("GPTQ ⊙† PiSO_S", "group_sequential", "self"),
        "qronos*piso_s": ("Qronos ⊙* PiSO_S", "layer_sequential", "cross"),
        "gptq†data-free": ("GPTQ ⊙† data-free", "group_data_free", "self"),
        "qronos+piso_s": ("Qronos + PiSO_S", "none", "cross"),
    }
    for name, (label, update, obj) in cases.items():
        cfg = QuantConfig.recipe(name)
        assert (cfg.label, cfg.scales_update, cfg.resolved_objective) == (label, update, obj), name
    assert QuantConfig.recipe("gptq+piso").needs_scale_pass
    assert not QuantConfig.recipe("gptq+data-free").needs_scale_pass
    # data-free + layer is the decoupled computation (documented)
    dl = QuantConfig(scales="data-free", error_correction="gptq", interleave="layer")
    assert dl.effective_interleave == "decoupled" and dl.scales_update == "none"
    assert QuantConfig.recipe("gptq#piso") == QuantConfig.recipe("gptq†piso")


def test_top_level_exports():
    for name in ("QuantConfig", "quantize_model", "RECIPES", "QuantLinear", "replace_linear",
                 "save_quantized", "load_quantized", "QuantizedCheckpointError"):
        assert getattr(torch_piso, name) is not None


def test_quantize_model_under_inference_mode_equals_no_grad_and_leaves_normal_tensors():
    want, _ = run(model(), QuantConfig.recipe("qronos*piso", bits=3))
    got = model()  # made outside: a deepcopy under inference_mode gives inference parameters
    with torch.inference_mode():
        got, _ = quantize_model_with_report(got, CAL.clone(), QuantConfig.recipe("qronos*piso", bits=3),
                                            progress=False, log=None)
    w = dict(want.named_modules())
    for n, mod in got.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(mod.codes(), w[n].codes()) and torch.equal(mod.scales, w[n].scales), n
    assert not any(t.is_inference() for t in got.state_dict().values())
    got.load_state_dict(want.state_dict())  # in-place copies: impossible into inference tensors


# ---------------------------------------------------------------------------------------------
# gaps found by mutation testing
# ---------------------------------------------------------------------------------------------
def test_float_stream_model_H_fp_is_the_float_models_statistic_in_every_block():
    """float_stream="model": the float pass of block i runs on the float model's block-i input, so
    H_fp = XᵀX/T of every module equals a brute-force recomputation on the float model."""
    fp = model()
    spy = {}
    run(copy.deepcopy(fp), QuantConfig.recipe("qronos-absmax", bits=2, float_stream="model"),
        _spy=lambda n, d: spy.__setitem__(n, d["H_fp"].double().clone()))
    float_H = _brute_force_H(fp, WATCH)
    for n in WATCH:
        torch.testing.assert_close(spy[n], float_H[n], rtol=1e-4, atol=1e-6)


def test_calibration_samples_of_different_lengths_use_their_own_block_kwargs():
    """Each sample's Hessian contribution is computed with the kwargs (mask, rotary cos/sin) of its
    own length: H of later blocks equals the brute-force recomputation on the quantized model."""
    cal = [CAL[0], CAL[1][:20], CAL[2][:27]]
    spy = {}
    m, _ = quantize_model_with_report(
        model(), cal, QuantConfig.recipe("rtn-absmax", bits=3), progress=False, log=None,
        _spy=lambda n, d: spy.__setitem__(n, (d["H"].double().clone(), d["tokens"])))
    mods = dict(m.named_modules())
    for n in WATCH:
        x = []
        h = mods[n].register_forward_pre_hook(
            lambda mod, args: x.append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
        with torch.no_grad():
            for ids in cal:
                m(ids[None])
        h.remove()
        X = torch.cat(x)
        H, T = spy[n]
        assert T == X.shape[0] == 32 + 20 + 27
        torch.testing.assert_close(H, X.T @ X / T, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("gs", [-1, 16])
def test_absmax_rtn_scales_are_max_abs_over_the_grid_edge(gs, narrow):
    """rtn-absmax: s = max|w| / 2^(b-1) per row or group (narrow range: / (2^(b-1) - 1)), computed
    here from the float weights, independently of the pipeline's helper."""
    fp = model()
    Ws = {n: mod.weight.detach().double().clone() for n, mod in fp.named_modules()
          if isinstance(mod, nn.Linear)}
    q, _ = run(fp, QuantConfig.recipe("rtn-absmax", bits=3, group_size=gs, narrow_range=narrow))
    den = 4 - (1 if narrow else 0)
    for n, mod in q.named_modules():
        if isinstance(mod, QuantLinear):
            W = Ws[n]
            g = W.shape[1] if gs == -1 else gs
            want = W.abs().reshape(W.shape[0], -1, g).amax(2) / den
            want = want.reshape(-1) if gs == -1 else want
            torch.testing.assert_close(mod.scales.double(), want, rtol=1e-6, atol=0)


def test_report_totals_are_the_sums_of_the_rows():
    _, report = run(model(), QuantConfig.recipe("qronos*piso", bits=3))
    rows, tot = report["rows"], report["totals"]
    for key in ("loss_before", "loss_after", "scale_time_s", "ec_time_s"):
        assert tot[key] == pytest.approx(sum(r[key] for r in rows), rel=1e-12, abs=0), key
    assert tot["modules"] == len(rows) and tot["fell_back"] == sum(r["fell_back"] for r in rows)
    assert tot["loss_after"] != tot["loss_before"]
