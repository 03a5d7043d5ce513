"""pack / unpack / dequant_matmul ops, QuantLinear, and save/load of quantized models."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import torch_piso
from torch_piso.io import (MANIFEST, TENSORS_FILE, QuantizedCheckpointError, load_quantized,
                           save_quantized)
from torch_piso.nn import QuantLinear, replace_linear
from torch_piso.reference import qlinear as ref

from conftest import requires_cuda

ops = torch.ops.piso
ALL_BITS = list(range(2, 9))


def grid(bits):
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def random_codes(N, D, bits, extremes=True):
    lo, hi = grid(bits)
    c = torch.randint(lo, hi + 1, (N, D), dtype=torch.int8)
    if extremes:  # both ends of the grid in every row, at positions that straddle words for odd bits
        c[:, 0] = lo
        c[:, -1] = hi
        c[:, D // 2] = lo
    return c


def random_scales(N, D, group_size, dtype=torch.float32):
    shape = (N,) if group_size == -1 else (N, D // group_size)
    return (torch.rand(shape, dtype=torch.float64) * 0.1 + 0.01).to(dtype)


# ----------------------------------------------------------------------------------- pack / unpack
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("D", [1, 7, 32, 33, 95, 100, 256])
def test_pack_unpack_round_trip_and_layout_match_bitwise_reference(bits, D):
    codes = random_codes(5, D, bits)
    packed = ops.pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, (D * bits + 31) // 32)
    assert torch.equal(packed, ref.pack_reference(codes, bits))
    assert torch.equal(ops.unpack(packed, bits, D), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_pack_stores_every_grid_value_and_leaves_padding_bits_zero(bits):
    lo, hi = grid(bits)
    codes = torch.arange(lo, hi + 1, dtype=torch.int8).repeat(3, 1)  # D = 2^bits
    codes = torch.cat([codes, codes[:, :3]], dim=1)  # a partial last word
    D = codes.shape[1]
    packed = ops.pack(codes, bits)
    assert torch.equal(ops.unpack(packed, bits, D), codes)
    used = D * bits - 32 * (packed.shape[1] - 1)  # bits used in the last word
    if used < 32:
        last = packed[:, -1].to(torch.int64) & 0xFFFFFFFF
        assert torch.all(last >> used == 0)


def test_three_bit_packing_is_dense():
    codes = random_codes(4, 320, 3)
    assert ops.pack(codes, 3).shape == (4, 30)  # 320 * 3 / 32 words: no padding per word


# ----------------------------------------------------------------------------------- dequant_matmul
def _check_against_reference(x, codes, scales, bits, group_size, bias, atol, rtol):
    D = codes.shape[1]
    packed = ops.pack(codes, bits)
    y = ops.dequant_matmul(x, packed, scales, bits, group_size, D, bias)
    expect = ref.dequant_matmul_reference(x, codes, scales, group_size, bias)
    assert y.dtype == x.dtype
    assert y.shape == (*x.shape[:-1], codes.shape[0])
    torch.testing.assert_close(y.to(torch.float64), expect, atol=atol, rtol=rtol)


TOL = {torch.float32: (2e-5, 1e-4), torch.float64: (1e-12, 1e-12), torch.bfloat16: (2e-2, 2e-2),
       torch.float16: (2e-3, 2e-3)}


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("x_shape", [(96,), (3, 96), (2, 7, 96), (40, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dequant_matmul_matches_float64_dense_reference(bits, group_size, x_shape, dtype, with_bias):
    N, D = 37, 96
    codes = random_codes(N, D, bits)
    scales = random_scales(N, D, group_size)
    x = torch.randn(x_shape, dtype=torch.float64).to(dtype)
    bias = torch.randn(N).to(dtype) if with_bias else None
    # bf16 output rounding is the dominant error; the reference sees the same bf16 inputs.
    atol, rtol = TOL[dtype]
    _check_against_reference(x, codes, scales, bits, group_size, bias, atol, rtol)


@pytest.mark.parametrize("M", [1, 8, 9, 300])  # both sides of the GEMV/tiled switch, several tiles
def test_dequant_matmul_gemv_and_tiled_paths_agree_with_reference(M):
    N, D, bits = 600, 1100, 3  # D not a multiple of 32: a ragged tail in every row
    codes = random_codes(N, D, bits)
    scales = random_scales(N, D, 100)
    x = torch.randn(M, D)
    _check_against_reference(x, codes, scales, bits, 100, torch.randn(N), 1e-4, 1e-4)


_ISA_CHECK = """
import torch, torch_piso
from torch_piso.reference import qlinear as ref
torch.manual_seed(0)
worst = 0.0
for bits in range(2, 9):
    for D, gs in ((96, 32), (1100, 100), (256, -1), (40, 8)):
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        codes = torch.randint(lo, hi + 1, (21, D), dtype=torch.int8)
        codes[:, 0], codes[:, -1] = lo, hi
        ng = 1 if gs == -1 else D // gs
        scales = torch.rand(21, ng, dtype=torch.float64).add(0.01).float().squeeze(1)
        packed = torch.ops.piso.pack(codes, bits)
        for M in (1, 3, 12):
            for dt in (torch.float32, torch.float64):
                x = torch.randn(M, D, dtype=dt)
                y = torch.ops.piso.dequant_matmul(x, packed, scales, bits, gs, D)
                e = ref.dequant_matmul_reference(x, codes, scales, gs, None)
                err = ((y.double() - e).abs() / (1 + e.abs())).max().item()
                worst = max(worst, err if dt == torch.float32 else err * 1e7)
print(worst)
"""


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_dequant_matmul_every_cpu_copy_matches_reference(isa):
    """The CPU kernels exist as generic, AVX2 and AVX-512 copies picked at run time; the best one
    the machine has runs everywhere else, so the other two are run here in subprocesses capped by
    PISO_DEQUANT_ISA (every bit width, ragged rows, odd group sizes, the GEMV and tiled paths)."""
    env = dict(os.environ, PISO_DEQUANT_ISA=isa)
    r = subprocess.run([sys.executable, "-c", _ISA_CHECK], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.strip()) < 1e-4, r.stdout


def test_dequant_matmul_rejects_an_unknown_isa_cap():
    env = dict(os.environ, PISO_DEQUANT_ISA="sse9")
    code = ("import torch, torch_piso\n"
            "p = torch.ops.piso.pack(torch.zeros(4, 32, dtype=torch.int8), 4)\n"
            "torch.ops.piso.dequant_matmul(torch.ones(1, 32), p, torch.ones(4), 4, -1, 32)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode != 0 and "PISO_DEQUANT_ISA: expected 'generic', 'avx2' or 'avx512'" in r.stderr


def test_dequant_matmul_float16_and_float64_scales():
    codes = random_codes(16, 64, 4)
    x = torch.randn(5, 64).half()
    _check_against_reference(x, codes, random_scales(16, 64, 16, torch.float64), 4, 16, None,
                             *TOL[torch.float16])


def test_dequant_matmul_non_contiguous_x():
    codes = random_codes(10, 64, 4)
    x = torch.randn(64, 12).t()  # [12, 64], not contiguous
    _check_against_reference(x, codes, random_scales(10, 64, -1), 4, -1, None, *TOL[torch.float32])


def test_dequant_matmul_empty_batch_returns_empty_output_like_linear():
    codes = random_codes(10, 64, 4)
    y = ops.dequant_matmul(torch.randn(0, 64), ops.pack(codes, 4), random_scales(10, 64, -1), 4, -1, 64)
    assert y.shape == (0, 10)


# ----------------------------------------------------------------------------------- opcheck
def test_opcheck_pack_unpack_dequant_matmul():
    codes = random_codes(12, 70, 3)
    packed = ops.pack(codes, 3)
    torch.library.opcheck(ops.pack.default, (codes, 3))
    torch.library.opcheck(ops.unpack.default, (packed, 3, 70))
    for x, gs, bias in [(torch.randn(70), -1, None), (torch.randn(2, 3, 70), 10, torch.randn(12)),
                        (torch.randn(20, 70, dtype=torch.float64), 35, None)]:
        torch.library.opcheck(ops.dequant_matmul.default,
                              (x, packed, random_scales(12, 70, gs), 3, gs, 70, bias))


def test_dequant_matmul_traces_under_torch_compile_with_fake_shapes():
    q = QuantLinear.from_float(nn.Linear(64, 24), 4, 16)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        y = ops.dequant_matmul(torch.empty(3, 5, 64), q.packed, q.scales, 4, 16, 64, q.bias)
        p = ops.pack(torch.empty(24, 64, dtype=torch.int8), 3)
    assert y.shape == (3, 5, 24) and p.shape == (24, 6)


# ----------------------------------------------------------------------------------- bad inputs
def test_pack_rejects_codes_out_of_range_for_bits():
    codes = torch.zeros(3, 8, dtype=torch.int8)
    codes[1, 2] = 4
    with pytest.raises(RuntimeError, match=r"codes: values out of range for bits=3.*\[-4, 3\]"):
        ops.pack(codes, 3)
    codes[1, 2] = -5
    with pytest.raises(RuntimeError, match="out of range"):
        ops.pack(codes, 3)


def test_pack_rejects_bad_dtype_shape_bits_and_empty():
    with pytest.raises(RuntimeError, match="codes: expected int8"):
        ops.pack(torch.zeros(3, 8, dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match="codes: expected a 2-D"):
        ops.pack(torch.zeros(8, dtype=torch.int8), 4)
    with pytest.raises(RuntimeError, match=r"bits: expected an integer in \[2, 8\]"):
        ops.pack(torch.zeros(3, 8, dtype=torch.int8), 9)
    with pytest.raises(RuntimeError, match=r"bits: expected an integer in \[2, 8\]"):
        ops.pack(torch.zeros(3, 8, dtype=torch.int8), 1)
    with pytest.raises(RuntimeError, match="non-empty"):
        ops.pack(torch.zeros(0, 8, dtype=torch.int8), 4)


def test_unpack_rejects_wrong_word_count_dtype_and_in_features():
    packed = ops.pack(random_codes(3, 40, 3), 3)  # 4 words
    with pytest.raises(RuntimeError, match=r"packed: expected 5 int32 words per row"):
        ops.unpack(packed, 4, 40)
    with pytest.raises(RuntimeError, match="packed: expected int32"):
        ops.unpack(packed.to(torch.int64), 3, 40)
    with pytest.raises(RuntimeError, match="in_features: expected a positive"):
        ops.unpack(packed, 3, 0)


def _good_args():
    codes = random_codes(6, 32, 4)
    return dict(x=torch.randn(2, 32), packed=ops.pack(codes, 4), scales=random_scales(6, 32, 8),
                bits=4, group_size=8, in_features=32, bias=torch.randn(6))


def _call(**over):
    a = _good_args()
    a.update(over)
    return ops.dequant_matmul(a["x"], a["packed"], a["scales"], a["bits"], a["group_size"],
                              a["in_features"], a["bias"])


@pytest.mark.parametrize("over, pattern", [
    (dict(x=torch.randn(2, 31)), r"x: last dimension 31 does not match in_features=32"),
    (dict(x=torch.randint(0, 3, (2, 32))), "x: expected float16, bfloat16, float32 or float64"),
    (dict(x=torch.tensor(1.0)), "x: expected shape"),
    (dict(scales=torch.rand(6, 3)), r"scales: expected shape \[6, 4\]"),
    (dict(scales=torch.rand(6)), r"scales: expected shape \[6, 4\]"),
    (dict(group_size=-1), r"scales: expected shape \[6\]"),
    (dict(group_size=5), "group_size: 5 does not divide the 32"),
    (dict(group_size=0), "group_size: expected -1"),
    (dict(bits=9), r"bits: expected an integer in \[2, 8\]"),
    (dict(bits=3), "packed: expected 3 int32 words"),
    (dict(in_features=33), "packed: expected"),
    (dict(packed=torch.zeros(6, 4, dtype=torch.int64)), "packed: expected int32"),
    (dict(bias=torch.randn(5)), r"bias: expected shape \[6\]"),
    (dict(bias=torch.zeros(6, dtype=torch.int32)), "bias: expected float16"),
    (dict(scales=torch.full((6, 4), float("nan"))), "scales: contains NaN or Inf"),
    (dict(bias=torch.full((6,), float("inf"))), "bias: contains NaN or Inf"),
    (dict(x=torch.randn(2, 32, device="meta")), "must be on the same device"),
])
def test_dequant_matmul_rejects_bad_input_with_a_clear_message(over, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        _call(**over)


# ----------------------------------------------------------------------------------- QuantLinear
@pytest.mark.parametrize("bits, group_size", [(4, -1), (3, 16), (8, 32), (2, -1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantlinear_matches_dense_linear_with_dequantized_weight(bits, group_size, dtype):
    lin = nn.Linear(64, 48, bias=True).to(dtype)
    q = QuantLinear.from_float(lin, bits, group_size)
    dense = nn.Linear(64, 48, bias=True).to(dtype)
    with torch.no_grad():
        dense.weight.copy_(q.dequantize(torch.float32))
        dense.bias.copy_(lin.bias)
    x = torch.randn(3, 5, 64).to(dtype)
    y = q(x)
    expect = x.double() @ q.dequantize(torch.float64).T + lin.bias.double()
    torch.testing.assert_close(y.double(), expect, **dict(zip(("atol", "rtol"), TOL[dtype])))
    if dtype == torch.float32:
        torch.testing.assert_close(y, dense(x), atol=1e-5, rtol=1e-5)
    assert q.bias.dtype == dtype and y.dtype == dtype


def test_from_float_codes_are_rtn_at_absmax_scales():
    lin = nn.Linear(40, 9, bias=False)
    q = QuantLinear.from_float(lin, 4, 8)
    s = ref.absmax_scales(lin.weight.detach(), 4, 8).float()
    assert torch.equal(q.scales, s)
    assert torch.equal(q.codes(), ref.quantize_rtn_reference(lin.weight.detach(), s, 4, 8))
    assert q.codes().abs().max() == 7  # absmax maps each group's largest weight to +-qmax
    assert "bits=4" in repr(q) and "group_size=8" in repr(q)


def test_from_linear_keeps_given_codes_and_scales_and_rejects_bad_ones():
    lin = nn.Linear(32, 6)
    codes = random_codes(6, 32, 3)
    scales = random_scales(6, 32, -1)
    q = QuantLinear.from_linear(lin, codes, scales, 3, -1)
    assert torch.equal(q.codes(), codes) and torch.equal(q.scales, scales)
    with pytest.raises(RuntimeError, match="out of range for bits=2"):
        QuantLinear.from_linear(lin, codes, scales, 2, -1)
    with pytest.raises(ValueError, match="scales: expected shape"):
        QuantLinear.from_linear(lin, codes, random_scales(6, 32, 8), 3, -1)
    with pytest.raises(ValueError, match="codes: expected shape"):
        QuantLinear.from_linear(lin, codes[:, :16], scales, 3, -1)
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear.from_linear(lin, codes, scales, 3, 5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        QuantLinear.from_linear(lin, codes, torch.full((6,), float("nan")), 3, -1)


def test_replace_linear_by_mapping_and_by_callable():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)))
    names = replace_linear(model, {"2.0": QuantLinear.from_float(model[2][0], 4)})
    assert names == ["2.0"] and isinstance(model[2][0], QuantLinear)
    names = replace_linear(model, lambda n, m: QuantLinear.from_float(m, 8))
    assert names == ["0"] and isinstance(model[0], QuantLinear)
    with pytest.raises(KeyError, match="no submodule"):
        replace_linear(model, {"5.x": nn.Identity()})


# ----------------------------------------------------------------------------------- save / load
def tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def quantize_some(model):
    recipe = {"model.layers.0.self_attn.q_proj": (4, -1), "model.layers.0.mlp.down_proj": (3, 32),
              "model.layers.1.self_attn.o_proj": (2, 16), "model.layers.1.mlp.up_proj": (8, -1)}
    replace_linear(model, {n: QuantLinear.from_float(model.get_submodule(n), b, g)
                           for n, (b, g) in recipe.items()})
    return recipe


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    model = tiny_llama()
    quantize_some(model)
    d = tmp_path_factory.mktemp("ckpt") / "llama-q"
    save_quantized(model, d, config={"bits": 4, "method": "rtn"})
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        logits = model(ids).logits
    return model, d, ids, logits


def test_save_load_round_trip_gives_identical_codes_and_logits(saved_llama):
    model, d, ids, logits = saved_llama
    loaded = load_quantized(d)  # rebuilt offline from the manifest's model config
    assert type(loaded).__name__ == "LlamaForCausalLM"
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            other = loaded.get_submodule(name)
            assert isinstance(other, QuantLinear)
            assert (other.bits, other.group_size) == (mod.bits, mod.group_size)
            assert torch.equal(other.codes(), mod.codes())
            assert torch.equal(other.scales, mod.scales)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)  # loaded in eval mode
    manifest = json.loads((d / MANIFEST).read_text())
    assert manifest["quantization_config"] == {"bits": 4, "method": "rtn"}
    assert manifest["quantized_modules"]["model.layers.0.mlp.down_proj"]["bits"] == 3


def test_model_rebuilt_from_config_loads_in_eval_mode_so_dropout_is_off(tmp_path):
    from torch_piso.models import tiny_model

    model = tiny_model("qwen2", attention_dropout=0.5)
    quantize_some(model)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert not loaded.training and not any(m.training for m in loaded.modules())
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, want = loaded(ids).logits, loaded(ids).logits, model.eval()(ids).logits
    assert torch.equal(a, b)  # no dropout: the same logits on every call
    # to rounding only: tiny_model uses eager attention, the rebuilt model the default (sdpa);
    # with dropout 0.5 left on, the logits differ by O(1)
    torch.testing.assert_close(a, want, rtol=0, atol=1e-5)


def test_load_into_given_model_or_factory(saved_llama):
    _, d, ids, logits = saved_llama
    for target in (tiny_llama(seed=1), lambda: tiny_llama(seed=2)):
        loaded = load_quantized(d, target)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, logits)


def test_save_load_tied_embeddings_are_stored_once_and_restored(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    replace_linear(model, {"model.layers.0.self_attn.k_proj":  # Qwen2 k_proj has a bias
                           QuantLinear.from_float(model.model.layers[0].self_attn.k_proj, 4, 16)})
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def _copy_save(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_load_rejects_truncated_tensor_file(saved_llama, tmp_path):
    d = _copy_save(saved_llama[1], tmp_path / "c")
    f = d / TENSORS_FILE
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(QuantizedCheckpointError, match="truncated"):
        load_quantized(d)


def test_load_rejects_missing_tensor_file_and_missing_manifest(saved_llama, tmp_path):
    d = _copy_save(saved_llama[1], tmp_path / "c")
    (d / TENSORS_FILE).unlink()
    with pytest.raises(QuantizedCheckpointError, match="missing file model.safetensors"):
        load_quantized(d)
    (d / MANIFEST).unlink()
    with pytest.raises(QuantizedCheckpointError, match="missing quantized.json"):
        load_quantized(d)


def test_load_rejects_corrupted_bytes_of_the_same_size(saved_llama, tmp_path):
    d = _copy_save(saved_llama[1], tmp_path / "c")
    f = d / TENSORS_FILE
    b = bytearray(f.read_bytes())
    b[-5] ^= 0xFF
    f.write_bytes(bytes(b))
    with pytest.raises(QuantizedCheckpointError, match="sha256"):
        load_quantized(d)


@pytest.mark.parametrize("tamper, pattern", [
    (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
    (lambda m: m.update(format="something"), "not a torch_piso.quantized manifest"),
    (lambda m: m["tensors"]["model.layers.0.self_attn.q_proj.packed"].update(shape=[64, 9]),
     "in the file but"),
    (lambda m: m["tensors"].update({"ghost": {"shape": [1], "dtype": "float32"}}), "'ghost'.*missing"),
    (lambda m: m["tensors"]["model.norm.weight"].update(dtype="float16"),
     r"'model.norm.weight' is \[64\] float32 in the file but \[64\] float16 in the manifest"),
    (lambda m: m["tensors"].pop("model.norm.weight"), r"holds tensors the manifest does not list"),
    (lambda m: m["quantized_modules"]["model.layers.0.self_attn.q_proj"].update(bits=3),
     "packed.*has shape"),
    (lambda m: m["quantized_modules"].update({"model.nothere": m["quantized_modules"][
        "model.layers.0.self_attn.q_proj"]}), "does not exist in the model"),
    (lambda m: m.update(files={}), "'files' does not list model.safetensors"),
    (lambda m: m["files"].update({"model.safetensors": 7}), "malformed 'files' entry"),
    (lambda m: m["tensors"].update({"model.norm.weight": 5}), "malformed 'tensors' entry for 'model.norm"),
    (lambda m: m["tensors"]["model.norm.weight"].pop("dtype"), "malformed 'tensors' entry"),
    (lambda m: m.update(model_config=[1, 2]), "malformed 'model_config'"),
    # the manifest lists only files inside the save; nothing else is ever read (hashed)
    (lambda m: m["files"].update({"../outside": {"size": 1, "sha256": "0"}}),
     "'../outside' is not a file name inside the directory"),
    (lambda m: m["files"].update({"/etc/hostname": {"size": 1, "sha256": "0"}}),
     "is not a file name inside the directory"),
    (lambda m: m.update(attn_implementation=3), "malformed 'attn_implementation'"),
    (lambda m: m["quantized_modules"]["model.layers.0.self_attn.q_proj"].update(bits=9),
     r"q_proj': bad manifest entry \(bits: expected an integer in \[2, 8\], got 9\)"),
    (lambda m: m["quantized_modules"]["model.layers.0.self_attn.q_proj"].update(bits="4"), "bits"),
    (lambda m: m["quantized_modules"]["model.layers.0.mlp.down_proj"].update(group_size=5),
     r"down_proj': bad manifest entry \(group_size"),
    (lambda m: m["quantized_modules"]["model.layers.0.mlp.down_proj"].pop("group_size"),
     r"down_proj': malformed manifest entry"),
])
def test_load_rejects_tampered_manifest(saved_llama, tmp_path, tamper, pattern):
    d = _copy_save(saved_llama[1], tmp_path / "c")
    m = json.loads((d / MANIFEST).read_text())
    tamper(m)
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(QuantizedCheckpointError, match=pattern):
        load_quantized(d)


def test_load_rejects_a_model_of_another_shape(saved_llama):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    with pytest.raises(QuantizedCheckpointError, match="down_proj.*is 96->64 in the model"):
        load_quantized(saved_llama[1], transformers.LlamaForCausalLM(cfg))


def test_failed_save_leaves_no_directory_that_loads(tmp_path, monkeypatch):
    import safetensors.torch as st

    model = tiny_llama()
    quantize_some(model)
    real = st.save_file

    def half_write_then_fail(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(1000)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(st, "save_file", half_write_then_fail)
    with pytest.raises(OSError, match="simulated"):
        save_quantized(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is cleaned up too
    with pytest.raises(QuantizedCheckpointError, match="no such directory"):
        load_quantized(tmp_path / "q")


def test_failed_overwrite_keeps_the_previous_save_intact(saved_llama, tmp_path, monkeypatch):
    import torch_piso.io as tio

    d = _copy_save(saved_llama[1], tmp_path / "c")
    model = tiny_llama(seed=3)
    monkeypatch.setattr(tio, "_sha256", lambda p: (_ for _ in ()).throw(OSError("crash (simulated)")))
    with pytest.raises(OSError, match="simulated"):
        save_quantized(model, d)
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(load_quantized(d)(saved_llama[2]).logits, saved_llama[3])


def test_save_refuses_to_overwrite_an_unrelated_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a torch_piso save"):
        save_quantized(nn.Sequential(nn.Linear(4, 4)), tmp_path / "mine")


def test_save_through_a_symlink_replaces_its_target_and_keeps_the_link(saved_llama, tmp_path):
    model, d, ids, logits = saved_llama
    real = _copy_save(d, tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert save_quantized(model, link) == real.resolve()
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no leftovers
    with torch.no_grad():
        assert torch.equal(load_quantized(link)(ids).logits, logits)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (tmp_path / "to_mine").symlink_to(mine)
    with pytest.raises(FileExistsError, match="not a torch_piso save"):  # the target's rule applies
        save_quantized(model, tmp_path / "to_mine")


def test_load_never_unpickles(saved_llama, monkeypatch):
    import pickle

    def forbidden(*a, **k):
        raise AssertionError("load_quantized must not unpickle")

    for mod, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(mod, attr, forbidden)
    _, d, ids, logits = saved_llama
    with torch.no_grad():
        assert torch.equal(load_quantized(d)(ids).logits, logits)


# ----------------------------------------------------------------------------------- CUDA
@requires_cuda
@pytest.mark.parametrize("bits", ALL_BITS)
def test_cuda_pack_unpack_match_cpu(bits):
    codes = random_codes(33, 301, bits)
    p = ops.pack(codes, bits)
    assert torch.equal(ops.pack(codes.cuda(), bits).cpu(), p)
    assert torch.equal(ops.unpack(p.cuda(), bits, 301).cpu(), codes)


@requires_cuda
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("M", [1, 5, 8, 9, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cuda_dequant_matmul_matches_cpu(bits, M, dtype):
    N, D, gs = 130, 320, 64
    codes = random_codes(N, D, bits)
    packed, scales, bias = ops.pack(codes, bits), random_scales(N, D, gs), torch.randn(N)
    x = torch.randn(M, D).to(dtype)
    y_cpu = ops.dequant_matmul(x, packed, scales, bits, gs, D, bias)
    y_gpu = ops.dequant_matmul(x.cuda(), packed.cuda(), scales.cuda(), bits, gs, D, bias.cuda())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y_gpu.cpu().double(), y_cpu.double(), atol=atol * 5, rtol=rtol * 5)
    torch.library.opcheck(ops.dequant_matmul.default,
                          (x.cuda(), packed.cuda(), scales.cuda(), bits, gs, D, bias.cuda()))


@requires_cuda
def test_cuda_quantlinear_save_load_round_trip(tmp_path):
    lin = nn.Linear(96, 40).cuda()
    q = QuantLinear.from_float(lin, 4, 32)
    model = nn.Sequential(q)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q", nn.Sequential(nn.Linear(96, 40)), device="cuda")
    x = torch.randn(3, 96, device="cuda")
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("group_size", [-1, 4])
def test_dequant_matmul_backward_passes_gradcheck(group_size):
    """Gradients w.r.t. x, scales and bias of y = x (scale * code)ᵀ + b, checked numerically in
    float64 (codes are integers and get none)."""
    gen = torch.Generator().manual_seed(3)
    N, D, bits = 5, 12, 3
    codes = torch.randint(-4, 4, (N, D), generator=gen, dtype=torch.int8)
    packed = torch.ops.piso.pack(codes, bits)
    sshape = (N,) if group_size == -1 else (N, D // group_size)
    scales = (torch.rand(sshape, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(N, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, D, generator=gen, dtype=torch.float64, requires_grad=True)
    f = lambda x, s, b: torch.ops.piso.dequant_matmul(x, packed, s, bits, group_size, D, b)
    assert torch.autograd.gradcheck(f, (x, scales, bias))


@pytest.mark.parametrize("group_size", [-1, 4])
def test_dequant_matmul_backward_without_bias(group_size):
    """bias None (omitted or passed): the Llama/Qwen linears have none, so a backward through a
    bias-free QuantLinear must work and give the gradients w.r.t. x and scales."""
    gen = torch.Generator().manual_seed(4)
    N, D, bits = 5, 12, 3
    packed = torch.ops.piso.pack(torch.randint(-4, 4, (N, D), generator=gen, dtype=torch.int8), bits)
    sshape = (N,) if group_size == -1 else (N, D // group_size)
    scales = (torch.rand(sshape, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    x = torch.randn(2, 3, D, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, s: torch.ops.piso.dequant_matmul(x, packed, s, bits, group_size, D), (x, scales))
    assert torch.autograd.gradcheck(
        lambda x, s: torch.ops.piso.dequant_matmul(x, packed, s, bits, group_size, D, None), (x, scales))
    q = QuantLinear.from_float(nn.Linear(D, N, bias=False), bits, group_size)
    xq = torch.randn(3, D, requires_grad=True)
    q(xq).square().sum().backward()
    W_hat = q.dequantize()
    torch.testing.assert_close(xq.grad, 2 * (xq.detach() @ W_hat.T) @ W_hat, rtol=1e-4, atol=1e-5)


def test_gradients_flow_through_quant_linear_as_through_its_dense_weight():
    """A trainable module before a QuantLinear (e.g. LoRA, input attribution) gets the gradient the
    dense dequantized weight gives."""
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(64, 48), 4, group_size=16)
    a = nn.Linear(64, 64)
    x = torch.randn(3, 64)
    q(a(x)).square().sum().backward()
    got = a.weight.grad.clone()
    a.weight.grad = None
    W_hat = q.dequantize()
    (torch.nn.functional.linear(a(x), W_hat, q.bias)).square().sum().backward()
    torch.testing.assert_close(got, a.weight.grad, rtol=1e-4, atol=1e-4)


def test_top_level_wrappers_reach_the_packing_ops():
    """README: typed wrappers as torch_piso.<op> for every op."""
    codes = torch.randint(-4, 4, (3, 10), dtype=torch.int8)
    packed = torch_piso.pack(codes, 3)
    assert torch.equal(torch_piso.unpack(packed, 3, 10), codes)
    x = torch.randn(2, 10, dtype=torch.float64)
    s = torch.rand(3, dtype=torch.float64) + 0.5
    torch.testing.assert_close(torch_piso.dequant_matmul(x, packed, s, 3, -1, 10),
                               x @ (codes.double() * s[:, None]).T)
    W = torch.randn(2, 8, dtype=torch.float64)
    sc, obj = torch_piso.piso_sweep(W, W, None, -4, 3)
    assert torch.equal(sc, torch_piso.optimal_scales(W, None, None, 3))


def test_replace_linear_replaces_a_shared_linear_at_every_name():
    lin = nn.Linear(8, 4)
    s = nn.Sequential(lin, nn.ReLU(), lin)
    names = replace_linear(s, lambda n, l: QuantLinear.from_float(l, 4))
    assert names == ["0", "2"] and isinstance(s[0], QuantLinear) and isinstance(s[2], QuantLinear)


def test_attention_implementation_is_kept_by_a_reload(tmp_path):
    """A model built with eager attention came back as sdpa: the manifest did not record it."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    quantize_some(model)
    save_quantized(model, tmp_path / "q")
    assert load_quantized(tmp_path / "q").config._attn_implementation == "eager"
    again = load_quantized(tmp_path / "q", attn_implementation="sdpa")
    assert again.config._attn_implementation == "sdpa"


def test_extra_files_land_with_the_save_and_may_not_replace_its_own(tmp_path):
    model = tiny_llama()
    quantize_some(model)
    save_quantized(model, tmp_path / "q", extra_files=lambda d: (d / "notes.txt").write_text("hi"))
    assert (tmp_path / "q" / "notes.txt").read_text() == "hi"
    load_quantized(tmp_path / "q")
    with pytest.raises(ValueError, match="must not write"):
        save_quantized(model, tmp_path / "r",
                       extra_files=lambda d: (d / TENSORS_FILE).write_bytes(b"x"))
    with pytest.raises(ValueError, match="must not write"):
        save_quantized(model, tmp_path / "r", extra_files=lambda d: (d / MANIFEST).write_text("{}"))
    assert not (tmp_path / "r").exists()


def test_buffers_viewing_one_storage_at_different_offsets_are_saved_separately(tmp_path):
    # same storage, shape, stride and dtype, different storage_offset: two tensors, not an alias
    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            base = torch.arange(8, dtype=torch.float32).reshape(2, 4)
            self.register_buffer("a", base[0])
            self.register_buffer("b", base[1])
            self.lin = QuantLinear.from_float(nn.Linear(4, 3), 4)

    m = Views()
    save_quantized(m, tmp_path / "v")
    assert json.loads((tmp_path / "v" / MANIFEST).read_text())["aliases"] == {}
    fresh = Views()
    fresh.a.zero_()  # one storage: zeroes both views
    loaded = load_quantized(tmp_path / "v", fresh)
    assert torch.equal(loaded.a, m.a) and torch.equal(loaded.b, m.b)


def test_overwrite_whose_final_rename_fails_keeps_the_previous_save(saved_llama, tmp_path, monkeypatch):
    import torch_piso.io as tio

    d = _copy_save(saved_llama[1], tmp_path / "c")
    real = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".c.tmp-") and Path(dst) == d:
            raise OSError("rename failed (simulated)")
        real(src, dst)

    monkeypatch.setattr(tio.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        save_quantized(tiny_llama(seed=3), d)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporaries left
    with torch.no_grad():
        assert torch.equal(load_quantized(d)(saved_llama[2]).logits, saved_llama[3])
