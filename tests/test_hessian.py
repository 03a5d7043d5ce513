"""Hessian ops (piso::hessian_accumulate_, piso::cross_accumulate_) and HessianCollector against float64
references (torch_piso/reference/hessian.py)."""
import re

import pytest
import torch
from torch import nn

import torch_piso
from torch_piso import HessianCollector
from torch_piso.reference import hessian as ref

from conftest import requires_cuda

# The CPU kernel's recursion stops at 512-feature diagonal blocks, the CUDA one at 1024: shapes below
# and above, and not multiples of either.
DIMS = [1, 7, 64, 513, 700, 1100]
IN_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _tol(x_dtype, acc_dtype, T):
    # Inputs are exact in the accumulator dtype (the op rounds a float64 x into a float32 H first, and
    # so does the reference); only the accumulation rounds: ~sqrt(T) eps relative.
    if acc_dtype == torch.float64:
        return 1e-12
    return 2e-6 * max(1.0, T ** 0.5)


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------------------
# hessian_accumulate_
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("x_dtype", IN_DTYPES)
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
def test_hessian_matches_float64_reference_and_is_exactly_symmetric(D, x_dtype, acc_dtype):
    x = torch.randn(3, 37, D).to(x_dtype)
    H0 = torch.randn(D, D, dtype=acc_dtype)
    H0 = H0 + H0.T
    H = H0.clone()
    torch.ops.piso.hessian_accumulate_(H, x)
    expected = ref.hessian_accumulate(H0, x.to(acc_dtype))  # the op rounds x to H's dtype first
    assert H.dtype == acc_dtype
    assert _rel_err(H, expected) < _tol(x_dtype, acc_dtype, 111)
    assert torch.equal(H, H.T)


def test_hessian_adds_exactly_xtx_to_a_non_symmetric_H():
    D = 600
    H0 = torch.randn(D, D, dtype=torch.float64)
    x = torch.randn(50, D, dtype=torch.float64)
    H = H0.clone()
    torch.ops.piso.hessian_accumulate_(H, x)
    assert _rel_err(H, ref.hessian_accumulate(H0, x)) < 1e-13


def test_hessian_accumulates_over_calls_like_one_concatenated_batch():
    D = 530
    xs = [torch.randn(n, D) for n in (64, 1, 129)]
    H = torch.zeros(D, D, dtype=torch.float64)
    for x in xs:
        torch.ops.piso.hessian_accumulate_(H, x)
    assert _rel_err(H, ref.hessian_accumulate(torch.zeros(D, D), torch.cat(xs))) < 1e-13


def test_hessian_token_chunks_give_the_same_result():
    # A bf16 x into a float32 H is converted in chunks of 2^24 / D tokens: D = 256 -> 65536 tokens,
    # so 65536 + 300 tokens take two chunks. x repeats 8 columns, so the reference is 8 x 8, tiled.
    D, T = 256, 65536 + 300
    base = torch.randn(T, 8).bfloat16()
    H = torch.zeros(D, D)
    torch.ops.piso.hessian_accumulate_(H, base.repeat(1, D // 8))
    small = base.double().T @ base.double()
    assert _rel_err(H, small.repeat(D // 8, D // 8)) < 1e-5


def test_hessian_accepts_non_contiguous_x_with_the_contiguous_result():
    D = 96
    base = torch.randn(40, 2 * D)
    views = [base[:, ::2], base[::3, :D], base.T.contiguous().T[:, :D], base.view(40, 2, D)[:, 1]]
    for x in views:
        H = torch.zeros(D, D)
        torch.ops.piso.hessian_accumulate_(H, x)
        H_c = torch.zeros(D, D)
        torch.ops.piso.hessian_accumulate_(H_c, x.contiguous())
        assert torch.equal(H, H_c)
        assert _rel_err(H, ref.hessian_accumulate(torch.zeros(D, D), x)) < 1e-5


def test_hessian_empty_batch_is_a_no_op():
    H = torch.randn(16, 16)
    H0 = H.clone()
    torch.ops.piso.hessian_accumulate_(H, torch.empty(0, 16))
    torch.ops.piso.hessian_accumulate_(H, torch.empty(3, 0, 16, dtype=torch.bfloat16))
    assert torch.equal(H, H0)
    G = torch.randn(16, 16)
    G0 = G.clone()
    torch.ops.piso.cross_accumulate_(G, torch.empty(0, 16), torch.empty(0, 16))
    assert torch.equal(G, G0)


def test_hessian_zero_features_is_a_no_op_like_its_fake_kernel():
    # D = 0: x [..., 0] could not be reshaped to [-1, 0] (a raw "cannot reshape" error) while the
    # fake kernel accepted the call.
    for x in (torch.empty(5, 0), torch.empty(2, 3, 0, dtype=torch.bfloat16), torch.empty(0)):
        H = torch.empty(0, 0)
        torch.ops.piso.hessian_accumulate_(H, x)
        torch.ops.piso.cross_accumulate_(H, x, x.double())
        torch.library.opcheck(torch.ops.piso.hessian_accumulate_.default, (H, x))
    with pytest.raises(RuntimeError, match="x_q and x_fp: expected the same number of paired tokens"):
        torch.ops.piso.cross_accumulate_(torch.empty(0, 0), torch.empty(5, 0), torch.empty(4, 0))


def test_hessian_one_dimensional_x_is_a_single_token():
    x = torch.randn(9, dtype=torch.float64)
    H = torch.zeros(9, 9, dtype=torch.float64)
    torch.ops.piso.hessian_accumulate_(H, x)
    assert torch.allclose(H, torch.outer(x, x), rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    "H, x, match",
    [
        (torch.zeros(8, 8), torch.randn(4, 9), r"x: last dimension 9 does not match H"),
        (torch.zeros(8, 8), torch.tensor(1.0), r"x: expected shape \[..., D\], got a 0-D tensor"),
        (torch.zeros(8, 9), torch.randn(4, 8), r"H: expected a square \[D, D\] matrix"),
        (torch.zeros(8), torch.randn(4, 8), r"H: expected a square \[D, D\] matrix"),
        (torch.zeros(2, 8, 8), torch.randn(4, 8), r"H: expected a square \[D, D\] matrix"),
        (torch.zeros(8, 8, dtype=torch.bfloat16), torch.randn(4, 8), r"H: expected float32 or float64"),
        (torch.zeros(8, 8, dtype=torch.int32), torch.randn(4, 8), r"H: expected float32 or float64"),
        (torch.zeros(8, 8), torch.randint(0, 5, (4, 8)), r"x: expected float16, bfloat16, float32 or float64"),
        (torch.zeros(8, 8), torch.ones(4, 8, dtype=torch.bool), r"x: expected float16, bfloat16"),
        (torch.zeros(8, 8), torch.randn(4, 8, dtype=torch.complex64), r"x: expected float16, bfloat16"),
        (torch.zeros(16, 16).t()[:8, :8], torch.randn(4, 8), r"H: expected a contiguous tensor"),
        (torch.zeros(8, 8).t(), torch.randn(4, 8), r"H: expected a contiguous tensor"),
    ],
)
def test_hessian_rejects_bad_input_naming_the_argument(H, x, match):
    if match.startswith("H: expected a contiguous") and H.is_contiguous():
        pytest.skip("view happens to be contiguous")
    with pytest.raises(RuntimeError, match=match):
        torch.ops.piso.hessian_accumulate_(H, x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("x_dtype", IN_DTYPES)
def test_hessian_rejects_non_finite_x_and_leaves_H_untouched(bad, x_dtype):
    x = torch.randn(20, 12).to(x_dtype)
    x[13, 5] = bad
    H = torch.randn(12, 12)
    H0 = H.clone()
    with pytest.raises(RuntimeError, match=r"x: contains NaN or Inf"):
        torch.ops.piso.hessian_accumulate_(H, x)
    assert torch.equal(H, H0)
    G = torch.zeros(12, 12)
    with pytest.raises(RuntimeError, match=r"x_fp: contains NaN or Inf"):
        torch.ops.piso.cross_accumulate_(G, torch.randn(20, 12), x)
    with pytest.raises(RuntimeError, match=r"x_q: contains NaN or Inf"):
        torch.ops.piso.cross_accumulate_(G, x, torch.randn(20, 12))
    assert not G.any()


def test_hessian_large_finite_values_are_not_mistaken_for_inf():
    x = torch.full((2, 3), 6.0e4, dtype=torch.float16)  # near fp16 max, finite
    H = torch.zeros(3, 3, dtype=torch.float64)
    torch.ops.piso.hessian_accumulate_(H, x)
    assert torch.equal(H, torch.full((3, 3), 2 * 6.0e4 ** 2, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to place one argument on")
def test_hessian_rejects_arguments_on_different_devices():
    with pytest.raises(RuntimeError, match=r"must be on the same device"):
        torch.ops.piso.hessian_accumulate_(torch.zeros(4, 4), torch.randn(3, 4, device="cuda"))


def test_hessian_rejects_arguments_on_different_devices_meta():
    # Without a GPU, a meta x against a CPU H exercises the same device check (dispatch lands on CPU).
    with pytest.raises(RuntimeError, match=r"H and x must be on the same device"):
        torch.ops.piso.hessian_accumulate_(torch.zeros(4, 4), torch.empty(3, 4, device="meta"))


def test_hessian_opcheck():
    for H, x in [
        (torch.zeros(33, 33), torch.randn(2, 5, 33)),
        (torch.zeros(520, 520, dtype=torch.float64), torch.randn(5, 520).bfloat16()),
        (torch.zeros(8, 8), torch.randn(0, 8)),
    ]:
        torch.library.opcheck(torch.ops.piso.hessian_accumulate_.default, (H, x))


# ---------------------------------------------------------------------------------------------
# cross_accumulate_
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [5, 513, 700])
@pytest.mark.parametrize("x_dtype", IN_DTYPES)
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
def test_cross_matches_float64_reference_rows_index_quantized_features(D, x_dtype, acc_dtype):
    x_q = torch.randn(4, 21, D).to(x_dtype)
    x_fp = (x_q.float() + 0.1 * torch.randn(4, 21, D)).to(x_dtype)
    G = torch.zeros(D, D, dtype=acc_dtype)
    torch.ops.piso.cross_accumulate_(G, x_q, x_fp)
    expected = ref.cross_accumulate(torch.zeros(D, D), x_q.to(acc_dtype), x_fp.to(acc_dtype))
    assert _rel_err(G, expected) < _tol(x_dtype, acc_dtype, 84)
    # orientation: G[i, j] = sum_t x_q[t, i] x_fp[t, j]
    i, j = 1, D - 1
    direct = (x_q.reshape(-1, D)[:, i].double() * x_fp.reshape(-1, D)[:, j].double()).sum()
    assert abs(G[i, j].item() - direct.item()) <= 1e-4 * max(1.0, abs(direct.item()))


def test_cross_accepts_mixed_input_dtypes_and_strides():
    D = 40
    x_q = torch.randn(30, 2 * D)[:, ::2]
    x_fp = torch.randn(30, D).bfloat16()
    G = torch.zeros(D, D, dtype=torch.float64)
    torch.ops.piso.cross_accumulate_(G, x_q, x_fp)
    assert _rel_err(G, ref.cross_accumulate(torch.zeros(D, D), x_q, x_fp)) < 1e-13


@pytest.mark.parametrize(
    "G, x_q, x_fp, match",
    [
        (torch.zeros(8, 8), torch.randn(4, 8), torch.randn(5, 8), r"x_q and x_fp: expected the same number of paired tokens"),
        (torch.zeros(8, 8), torch.randn(4, 8), torch.randn(4, 9), r"x_fp: last dimension 9 does not match G"),
        (torch.zeros(8, 8), torch.randn(4, 7), torch.randn(4, 8), r"x_q: last dimension 7 does not match G"),
        (torch.zeros(8, 7), torch.randn(4, 8), torch.randn(4, 8), r"G: expected a square"),
        (torch.zeros(8, 8, dtype=torch.float16), torch.randn(4, 8), torch.randn(4, 8), r"G: expected float32 or float64"),
        (torch.zeros(8, 8), torch.randint(0, 3, (4, 8)), torch.randn(4, 8), r"x_q: expected float16"),
        (torch.zeros(8, 8), torch.randn(4, 8), torch.randint(0, 3, (4, 8)), r"x_fp: expected float16"),
        (torch.zeros(8, 8).t(), torch.randn(4, 8), torch.randn(4, 8), r"G: expected a contiguous tensor"),
    ],
)
def test_cross_rejects_bad_input_naming_the_argument(G, x_q, x_fp, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.piso.cross_accumulate_(G, x_q, x_fp)


def test_cross_opcheck():
    for G, a, b in [
        (torch.zeros(33, 33), torch.randn(2, 5, 33), torch.randn(2, 5, 33)),
        (torch.zeros(20, 20, dtype=torch.float64), torch.randn(7, 20).half(), torch.randn(7, 20)),
    ]:
        torch.library.opcheck(torch.ops.piso.cross_accumulate_.default, (G, a, b))


# ---------------------------------------------------------------------------------------------
# CUDA vs CPU
# ---------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("D", [7, 1000, 1100, 2500])
@pytest.mark.parametrize("x_dtype", IN_DTYPES)
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu_and_float64_reference(D, x_dtype, acc_dtype):
    x = torch.randn(2, 300, D).to(x_dtype)
    x_fp = (x.float() + 0.1 * torch.randn_like(x.float())).to(x_dtype)
    H_cpu = torch.zeros(D, D, dtype=acc_dtype)
    torch.ops.piso.hessian_accumulate_(H_cpu, x)
    H_gpu = torch.zeros(D, D, dtype=acc_dtype, device="cuda")
    torch.ops.piso.hessian_accumulate_(H_gpu, x.cuda())
    expected = ref.hessian_accumulate(torch.zeros(D, D), x.to(acc_dtype))
    assert _rel_err(H_gpu.cpu(), expected) < _tol(x_dtype, acc_dtype, 600)
    assert _rel_err(H_gpu.cpu(), H_cpu) < 2 * _tol(x_dtype, acc_dtype, 600)
    assert torch.equal(H_gpu, H_gpu.T)
    G_gpu = torch.zeros(D, D, dtype=acc_dtype, device="cuda")
    torch.ops.piso.cross_accumulate_(G_gpu, x.cuda(), x_fp.cuda())
    G_ref = ref.cross_accumulate(torch.zeros(D, D), x.to(acc_dtype), x_fp.to(acc_dtype))
    assert _rel_err(G_gpu.cpu(), G_ref) < _tol(x_dtype, acc_dtype, 600)


@requires_cuda
def test_cuda_fp32_inputs_are_not_rounded_to_tf32():
    # 1 + 2^-20 squared differs from 1 in fp32 but not after a TF32 (10-bit mantissa) rounding.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        x = torch.full((64, 4), 1 + 2 ** -20, device="cuda")
        H = torch.zeros(4, 4, device="cuda", dtype=torch.float64)
        torch.ops.piso.hessian_accumulate_(H, x)
        assert torch.allclose(H.cpu(), torch.full((4, 4), 64 * (1 + 2 ** -20) ** 2, dtype=torch.float64), rtol=1e-12)
        H32 = torch.zeros(4, 4, device="cuda")
        torch.ops.piso.hessian_accumulate_(H32, x)
        assert (H32.cpu().double() - 64).min().item() > 64 * 2 ** -20
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@requires_cuda
def test_cuda_bad_input_and_opcheck():
    with pytest.raises(RuntimeError, match=r"must be on the same device"):
        torch.ops.piso.hessian_accumulate_(torch.zeros(4, 4, device="cuda"), torch.randn(3, 4))
    x = torch.randn(5, 4, device="cuda")
    x[1, 1] = float("nan")
    with pytest.raises(RuntimeError, match=r"x: contains NaN or Inf"):
        torch.ops.piso.hessian_accumulate_(torch.zeros(4, 4, device="cuda"), x)
    torch.library.opcheck(torch.ops.piso.hessian_accumulate_.default,
                          (torch.zeros(40, 40, device="cuda"), torch.randn(3, 40, device="cuda").bfloat16()))
    torch.library.opcheck(torch.ops.piso.cross_accumulate_.default,
                          (torch.zeros(40, 40, device="cuda"), torch.randn(3, 40, device="cuda"),
                           torch.randn(3, 40, device="cuda")))


# ---------------------------------------------------------------------------------------------
# HessianCollector
# ---------------------------------------------------------------------------------------------
class _Capture:
    """Brute force: the inputs each module received, by forward pre-hooks of its own."""

    def __init__(self, root, names):
        self.xs = {n: [] for n in names}
        mods = dict(root.named_modules())
        self.handles = [mods[n].register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args):
            self.xs[name].append(args[0].detach().clone())

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


class _SharedInput(nn.Module):
    """q/k/v style: three linears read the same tensor; o reads their sum."""

    def __init__(self, d=24, h=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(d, h)
        self.o = nn.Linear(h, d)

    def forward(self, x):
        y = self.norm(x)
        return x + self.o(torch.relu(self.q(y) + self.k(y) * self.v(y)))


def _seq():
    return nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 6))


def test_collector_H_equals_brute_force_and_counts_tokens():
    model = _seq()
    cap = _Capture(model, ["0", "2", "4"])
    batches = [torch.randn(3, 5, 12), torch.randn(7, 12), torch.randn(1, 1, 12)]
    with HessianCollector(model) as hc, torch.no_grad():
        for b in batches:
            model(b)
    cap.remove()
    assert hc.names == ["0", "2", "4"]
    for n in hc.names:
        H_ref, _, T = ref.normalized_statistics(cap.xs[n])
        assert hc.tokens(n) == T == 15 + 7 + 1
        H = hc.H(n)
        assert H.dtype == torch.float32 and H.shape == (model[int(n)].in_features,) * 2
        assert _rel_err(H, H_ref) < 1e-6
    # hooks are gone after the context: more forwards change nothing
    before = hc.H("2")
    model(torch.randn(4, 12))
    assert torch.equal(hc.H("2"), before) and hc.tokens("2") == 23


def test_collector_float64_accumulators_on_a_chosen_device():
    model = _seq().double()
    cap = _Capture(model, ["2"])
    with HessianCollector(model, "2", dtype=torch.float64, device="cpu") as hc:
        model(torch.randn(9, 12, dtype=torch.float64))
    H_ref, _, _ = ref.normalized_statistics(cap.xs["2"])
    assert hc.H("2").dtype == torch.float64
    assert _rel_err(hc.H("2"), H_ref) < 1e-13


def test_collector_selects_by_object_glob_regex_and_type():
    m = nn.ModuleDict({"attn": _SharedInput(), "mlp": _seq()})
    assert HessianCollector(m, "attn.*").names == ["attn.q", "attn.k", "attn.v", "attn.o"]
    assert HessianCollector(m, ["mlp.?", "attn.o"]).names == ["attn.o", "mlp.0", "mlp.2", "mlp.4"]
    assert HessianCollector(m, "re:(q|v)$").names == ["attn.q", "attn.v"]
    assert HessianCollector(m, re.compile(r"mlp\.[24]")).names == ["mlp.2", "mlp.4"]
    assert HessianCollector(m, [m["attn"].k, m["mlp"][0]]).names == ["attn.k", "mlp.0"]
    assert len(HessianCollector(m, nn.Linear).names) == 7
    assert len(HessianCollector(m).names) == 7
    with pytest.raises(ValueError, match="matched no module"):
        HessianCollector(m, "*.nothing")
    with pytest.raises(ValueError, match="not inside root"):
        HessianCollector(m, nn.Linear(2, 2))
    with pytest.raises(TypeError, match="not Linear-like"):
        HessianCollector(m, m["attn"].norm)
    with pytest.raises(TypeError, match="dtype"):
        HessianCollector(m, dtype=torch.float16)


def test_collector_shared_input_is_accumulated_once_and_reported_per_module():
    block = _SharedInput()
    cap = _Capture(block, ["q", "k", "v", "o"])
    calls = []
    real = torch_piso.ops.hessian_accumulate_

    def counting(H, x):
        calls.append(x.shape)
        real(H, x)

    torch_piso.ops.hessian_accumulate_ = counting
    try:
        with HessianCollector(block) as hc, torch.no_grad():
            for _ in range(3):
                block(torch.randn(2, 5, 24))
    finally:
        torch_piso.ops.hessian_accumulate_ = real
    cap.remove()
    assert len(calls) == 3 * 2  # one for q/k/v, one for o, per forward
    assert sorted(map(sorted, hc.groups())) == [["k", "q", "v"], ["o"]]
    H_q = hc.H("q")
    for n in "qkv":
        H_ref, _, T = ref.normalized_statistics(cap.xs[n])
        assert hc.tokens(n) == T == 30
        assert _rel_err(hc.H(n), H_ref) < 1e-6
        assert torch.equal(hc.H(n), H_q)
    H_ref, _, _ = ref.normalized_statistics(cap.xs["o"])
    assert _rel_err(hc.H("o"), H_ref) < 1e-6


def test_collector_share_inputs_false_keeps_separate_accumulators():
    block = _SharedInput()
    with HessianCollector(block, share_inputs=False) as hc, torch.no_grad():
        block(torch.randn(4, 24))
    assert sorted(map(tuple, hc.groups())) == [("k",), ("o",), ("q",), ("v",)]
    assert torch.equal(hc.H("q"), hc.H("k"))


def test_collector_shared_group_that_later_diverges_is_an_error():
    class Diverge(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.first = True

        def forward(self, x):
            y = x * 2
            out = self.a(y) + self.b(y if self.first else y + 1)
            self.first = False
            return out

    m = Diverge()
    with HessianCollector(m) as hc, torch.no_grad():
        m(torch.randn(3, 4))
        with pytest.raises(RuntimeError, match=r"share_inputs=False"):
            m(torch.randn(3, 4))
    del hc


def test_collector_same_module_called_twice_counts_both_inputs():
    lin = nn.Linear(6, 6)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    cap = _Capture(model, ["0"])  # "0" and "2" are the same object: the hook fires twice
    with HessianCollector(model, [lin]) as hc, torch.no_grad():
        x = torch.randn(5, 6)
        model(x)
        model(x)  # the very same input object again is a second batch, not a shared input
    cap.remove()
    H_ref, _, T = ref.normalized_statistics(cap.xs["0"])
    assert hc.tokens("0") == T == 20
    assert _rel_err(hc.H("0"), H_ref) < 1e-6


@pytest.mark.parametrize("order", ["float_first", "quant_first"])
def test_collector_cross_G_from_paired_passes_equals_brute_force(order):
    # One block object; "quantization" toggled between the passes by swapping in perturbed weights,
    # and the quant pass also gets a perturbed block input (X~ differs from X already at q/k/v).
    block = _SharedInput()
    w_fp = {n: getattr(block, n).weight.detach().clone() for n in "qkvo"}
    w_q = {n: w + 0.05 * torch.randn_like(w) for n, w in w_fp.items()}

    def set_weights(ws):
        with torch.no_grad():
            for n in "qkvo":
                getattr(block, n).weight.copy_(ws[n])

    cap = _Capture(block, ["q", "o"])
    seen = {"float": {"q": [], "o": []}, "quant": {"q": [], "o": []}}
    passes = ["float", "quant"] if order == "float_first" else ["quant", "float"]
    with HessianCollector(block, cross=True) as hc, torch.no_grad():
        for x in [torch.randn(2, 4, 24), torch.randn(5, 24)]:
            for kind in passes:
                set_weights(w_fp if kind == "float" else w_q)
                n_before = len(cap.xs["q"])
                with hc.pass_(kind):
                    block(x + 0.01 * torch.randn_like(x) if kind == "quant" else x)
                for n in ("q", "o"):
                    seen[kind][n] += cap.xs[n][n_before:]
    cap.remove()
    assert sorted(map(sorted, hc.groups())) == [["k", "q", "v"], ["o"]]
    for n, src in (("q", "q"), ("k", "q"), ("v", "q"), ("o", "o")):
        H_ref, G_ref, T = ref.normalized_statistics(seen["quant"][src], seen["float"][src])
        assert hc.tokens(n) == T == 13
        assert _rel_err(hc.H(n), H_ref) < 1e-6
        assert _rel_err(hc.G(n), G_ref) < 1e-6
        assert not torch.allclose(hc.G(n).double(), H_ref, atol=1e-4)  # the cross term is not H
    H, G, T = hc.pop("o")
    H_ref, G_ref, _ = ref.normalized_statistics(seen["quant"]["o"], seen["float"]["o"])
    assert T == 13 and _rel_err(H, H_ref) < 1e-6 and _rel_err(G, G_ref) < 1e-6


def test_collector_float_pass_through_a_separate_float_copy():
    blk_q, blk_fp = _SharedInput(), _SharedInput()
    cap_q, cap_f = _Capture(blk_q, ["q", "o"]), _Capture(blk_fp, ["q", "o"])
    with HessianCollector(blk_q, cross=True) as hc, torch.no_grad():
        for x in [torch.randn(3, 24), torch.randn(2, 2, 24)]:
            with hc.pass_("float", root=blk_fp):
                blk_fp(x)
                blk_q(x)  # the collector's own modules are paused during this pass
            with hc.pass_("quant"):
                blk_q(x + 0.1)
    cap_q.remove(), cap_f.remove()
    quant_inputs = {n: cap_q.xs[n][1::2] for n in ("q", "o")}  # [0::2] ran inside the float pass
    for n, src in (("q", "q"), ("v", "q"), ("o", "o")):
        H_ref, G_ref, T = ref.normalized_statistics(quant_inputs[src], cap_f.xs[src])
        assert hc.tokens(n) == T == 7
        assert _rel_err(hc.H(n), H_ref) < 1e-6 and _rel_err(hc.G(n), G_ref) < 1e-6
    with HessianCollector(blk_q, cross=True) as hc2:
        with pytest.raises(ValueError, match=r"root has no module 'q'"):
            with hc2.pass_("float", root=_seq()):
                pass


def test_collector_cross_pairing_errors_are_clear():
    block = _seq()
    with HessianCollector(block, cross=True) as hc, torch.no_grad():
        with pytest.raises(RuntimeError, match=r"outside collector.pass_"):
            block(torch.randn(3, 12))
        with hc.pass_("float"):
            block(torch.randn(3, 12))
        with pytest.raises(RuntimeError, match=r"no quant-pass inputs collected for '0'"):
            hc.H("0")
        with hc.pass_("float"):
            block(torch.randn(3, 12))
        with hc.pass_("quant"):
            block(torch.randn(3, 12))
        with pytest.raises(RuntimeError, match=r"'0' has 1 float-pass input\(s\) still waiting for their paired pass"):
            hc.G("0")
        with pytest.raises(RuntimeError, match=r"got 4 tokens in the quant pass but 3 in the paired float pass"):
            with hc.pass_("quant"):
                block(torch.randn(4, 12))
        with pytest.raises(ValueError, match=r"expected 'float' or 'quant'"):
            with hc.pass_("fp"):
                pass
        with pytest.raises(RuntimeError, match=r"already inside"):
            with hc.pass_("quant"), hc.pass_("float"):
                pass
    plain = HessianCollector(_seq())
    with plain:
        with pytest.raises(RuntimeError, match=r"cross=True"):
            with plain.pass_("float"):
                pass
    with pytest.raises(RuntimeError, match=r"without cross=True"):
        plain.G("0")
    with pytest.raises(RuntimeError, match=r"enter the collector first"):
        with plain.pass_("quant"):
            pass


def test_collector_held_input_modified_in_place_is_detected():
    lin = nn.Linear(5, 5)
    with HessianCollector(lin, cross=True) as hc, torch.no_grad():
        x = torch.randn(3, 5)
        with hc.pass_("float"):
            lin(x)
        x.mul_(2)
        with pytest.raises(RuntimeError, match=r"modified in place"):
            with hc.pass_("quant"):
                lin(torch.randn(3, 5))


def test_collector_pending_device_holds_float_inputs_there():
    lin = nn.Linear(5, 5)
    xs = [torch.randn(3, 5), torch.randn(3, 5)]
    with HessianCollector(lin, cross=True, pending_device="cpu") as hc, torch.no_grad():
        with hc.pass_("float"):
            lin(xs[0])
        with hc.pass_("quant"):
            lin(xs[1])
    H_ref, G_ref, _ = ref.normalized_statistics([xs[1]], [xs[0]])
    assert _rel_err(hc.G(""), G_ref) < 1e-6 and _rel_err(hc.H(""), H_ref) < 1e-6


def test_collector_free_releases_memory_and_stops_collecting():
    block = _SharedInput()
    with HessianCollector(block) as hc, torch.no_grad():
        block(torch.randn(4, 24))
        H_k = hc.H("k")
        hc.free("q")
        with pytest.raises(KeyError, match="was freed"):
            hc.H("q")
        block(torch.randn(4, 24))  # k and v keep collecting without q
        assert hc.tokens("k") == 8 and not torch.equal(hc.H("k"), H_k)
        popped = hc.pop("k")
        assert popped.tokens == 8 and torch.equal(popped.H, hc.H("v"))
        with pytest.raises(RuntimeError, match="after pop"):
            block(torch.randn(4, 24))
        hc.free_all()
        acc_refs = list(hc._acc.values())
        assert acc_refs == []
        with pytest.raises(KeyError, match="not hooked"):
            hc.H("norm")


def test_collector_hooks_are_removed_on_exit_even_after_an_error():
    model = _seq()
    n_hooks = lambda: sum(len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    with pytest.raises(ZeroDivisionError):
        with HessianCollector(model):
            assert n_hooks() == 3
            1 / 0
    assert n_hooks() == 0


def test_collector_on_tiny_llama_shares_qkv_and_matches_brute_force():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    names = [f"model.layers.{i}.{p}" for i in range(2)
             for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    cap = _Capture(model, names)
    ids = [torch.randint(0, 128, (2, 11)), torch.randint(0, 128, (1, 7))]
    with HessianCollector(model, "model.layers.*") as hc, torch.no_grad():
        for x in ids:
            model(x)
    cap.remove()
    assert hc.names == names
    groups = sorted(map(tuple, hc.groups()))
    for i in range(2):
        p = f"model.layers.{i}."
        assert tuple(p + s for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")) in groups
        assert (p + "mlp.gate_proj", p + "mlp.up_proj") in groups
    for n in names:
        H_ref, _, T = ref.normalized_statistics(cap.xs[n])
        assert hc.tokens(n) == T == 29
        assert _rel_err(hc.H(n), H_ref) < 1e-5, n
    q, k, v = (hc.H(f"model.layers.1.self_attn.{p}_proj") for p in "qkv")
    assert torch.equal(q, k) and torch.equal(q, v)


@pytest.mark.parametrize("D", [8, 600])  # 600: past the block recursion's first split
def test_accumulate_reads_an_x_that_aliases_the_accumulator_as_it_was(D):
    """hessian_accumulate_(H, H) is H + HᵀH with the H of the call, not rows already written."""
    gen = torch.Generator().manual_seed(D)
    A = torch.randn(D, D, dtype=torch.float64, generator=gen)
    H = A.clone()
    torch.ops.piso.hessian_accumulate_(H, H)
    torch.testing.assert_close(H, A + A.T @ A, rtol=1e-12, atol=1e-9)
    x = torch.randn(D, D, dtype=torch.float64, generator=gen)
    G = A.clone()
    torch.ops.piso.cross_accumulate_(G, G, x)
    torch.testing.assert_close(G, A + A.T @ x, rtol=1e-12, atol=1e-9)
    G = A.clone()
    torch.ops.piso.cross_accumulate_(G, x, G[:, :])  # a view of G as x_fp
    torch.testing.assert_close(G, A + x.T @ A, rtol=1e-12, atol=1e-9)

# ---------------------------------------------------------------------------------------------
# torch.inference_mode: inputs are inference tensors, without a version counter
# ---------------------------------------------------------------------------------------------
def test_collector_under_inference_mode_gives_the_no_grad_statistics_readable_outside():
    block = _SharedInput()
    xs = [torch.randn(2, 5, 24), torch.randn(3, 24)]
    with HessianCollector(block) as want, torch.no_grad():
        for x in xs:
            block(x)
    with HessianCollector(block) as hc:
        with torch.inference_mode():
            for x in xs:
                block(x.clone())
    for n in "qkvo":  # no sharing is assumed for inference tensors: same statistics, own accumulators
        assert hc.tokens(n) == want.tokens(n) == 13
        torch.testing.assert_close(hc.H(n), want.H(n), rtol=1e-6, atol=0)
    assert sorted(map(tuple, hc.groups())) == [("k",), ("o",), ("q",), ("v",)]
    H, _, T = hc.pop("q")  # normalized in place outside inference_mode: a normal tensor
    assert not H.is_inference() and T == 13


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_collector_input_changed_in_place_between_two_consumers_is_not_shared(mode):
    """The same tensor object, modified in place after module a consumed it: b's H sees the new
    values. Outside inference_mode the version counter shows the change; inside, nothing records
    it, so the collector never shares inputs there."""
    a, b = nn.Linear(6, 3), nn.Linear(6, 3)
    x = torch.randn(4, 6)
    with HessianCollector(nn.ModuleList([a, b])) as hc, getattr(torch, mode)():
        y = x.clone()
        a(y)
        y.mul_(3)
        b(y)
    if mode == "no_grad":
        assert sorted(hc.groups()) == [("0",), ("1",)]
    torch.testing.assert_close(hc.H("1"), 9 * hc.H("0"), rtol=1e-5, atol=0)


def test_collector_under_inference_mode_holds_a_copy_of_the_float_input_for_G():
    lin = nn.Linear(5, 5)
    x_fp, x_q = torch.randn(3, 5), torch.randn(3, 5)
    with HessianCollector(lin, cross=True) as hc, torch.inference_mode():
        x = x_fp.clone()
        with hc.pass_("float"):
            lin(x)
        x.mul_(2)  # after the float pass: must not reach the held input
        with hc.pass_("quant"):
            lin(x_q.clone())
    H_ref, G_ref, _ = ref.normalized_statistics([x_q], [x_fp])
    assert _rel_err(hc.G(""), G_ref) < 1e-6 and _rel_err(hc.H(""), H_ref) < 1e-6


def test_collector_module_first_fed_in_a_later_forward_does_not_join_an_older_accumulator():
    # b reads a's input only from the second forward on: it must not inherit a's first batch
    class Late(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 5)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.a(x) + (self.b(x) if self.calls > 1 else 0)

    m = Late()
    cap = _Capture(m, ["a", "b"])
    with HessianCollector(m) as hc, torch.no_grad():
        m(torch.randn(3, 5))
        m(torch.randn(4, 5))
    cap.remove()
    for n in "ab":
        H_ref, _, T = ref.normalized_statistics(cap.xs[n])
        assert hc.tokens(n) == T
        assert _rel_err(hc.H(n), H_ref) < 1e-6
    assert hc.tokens("a") == 7 and hc.tokens("b") == 4


def test_collector_H_and_G_return_new_tensors_even_after_a_group_member_was_popped():
    block = _SharedInput()
    x_q, x_fp = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    with HessianCollector(block, ["q", "k", "v"], cross=True) as hc, torch.no_grad():
        with hc.pass_("float"):
            block(x_fp)
        with hc.pass_("quant"):
            block(x_q)
        H, G, _ = hc.pop("q")  # normalizes the shared accumulator in place
        H0, G0 = H.clone(), G.clone()
        for n in "kv":
            h, g = hc.H(n), hc.G(n)
            assert torch.equal(h, H0) and torch.equal(g, G0)
            h.add_(1)  # the caller owns what H()/G() return
            g.add_(1)
        assert torch.equal(hc.H("v"), H0) and torch.equal(hc.G("v"), G0)
        assert torch.equal(H, H0) and torch.equal(G, G0)
