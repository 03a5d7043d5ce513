"""torch.ops.piso.gptq / qronos against the plain PyTorch references (torch_piso/reference/gptq.py),
their invariants, every scales_update mode, the damping/fallback paths, opcheck and bad inputs."""
import pytest
import torch

import torch_piso  # noqa: F401
from torch_piso.reference import gptq as R
from torch_piso.reference import piso as RP

from conftest import requires_cuda

gptq_op = torch.ops.piso.gptq
qronos_op = torch.ops.piso.qronos
GROUP_PISO = ("group", "group_sequential", "group_data_free")


def _problem(N=48, D=96, T=400, noise=0.05, seed=0, dtype=torch.float64):
    """Correlated features X (float), X~ = X + noise (quantized-model inputs), H = X~'X~, G = X~'X."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=torch.float64) / D ** 0.5
    X = torch.randn(T, D, generator=g, dtype=torch.float64) @ (torch.eye(D, dtype=torch.float64) + A)
    X = X * torch.linspace(0.3, 2.0, D, dtype=torch.float64)  # unequal diag H: act_order matters
    Xq = X + noise * torch.randn(T, D, generator=g, dtype=torch.float64)
    W = torch.randn(N, D, generator=g, dtype=torch.float64)
    return W.to(dtype), (Xq.T @ Xq).to(dtype), (Xq.T @ X).to(dtype)


def _stats():
    return torch.zeros(4, dtype=torch.float64)


def _assert_same_codes(c, rc, wh, rwh, max_frac=1e-3):
    """Identical codes except (rare) rounding ties; W_hat equal on the rows without a tie flip."""
    diff = c.to(torch.int64) != rc.to(torch.int64)
    assert diff.float().mean().item() <= max_frac
    rows = ~diff.any(1)
    assert rows.float().mean().item() >= 0.9
    torch.testing.assert_close(wh.to(torch.float64)[rows], rwh[rows], atol=1e-9, rtol=1e-9)


# ------------------------------------------------------------------------------------------------
# GPTQ vs the textbook reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scales_update", ["none", "group_absmax"])
def test_gptq_codes_match_textbook_reference(group_size, act_order, scales_update):
    W, H, _ = _problem()
    c, s, wh = gptq_op(W, H, 3, group_size, None, scales_update, act_order, 16)
    rc, rs, rwh = R.gptq(W, H, 3, group_size, None, scales_update, act_order, 16)
    _assert_same_codes(c, rc, wh, rwh)
    torch.testing.assert_close(s, rs, atol=1e-12, rtol=1e-12)
    assert c.dtype == torch.int8 and wh.dtype == W.dtype and s.dtype == torch.float64


@pytest.mark.parametrize("bits,narrow", [(2, False), (4, True), (8, False)])
def test_gptq_with_given_scales_and_grids_matches_reference(bits, narrow):
    W, H, _ = _problem(N=32, D=64)
    scales = torch.rand(32, 4, dtype=torch.float64) * 0.5 + 0.1
    c, s, wh = gptq_op(W, H, bits, 16, scales, "none", True, 128, 0.01, narrow)
    rc, rs, rwh = R.gptq(W, H, bits, 16, scales, "none", True, 128, 0.01, narrow)
    _assert_same_codes(c, rc, wh, rwh)
    assert torch.equal(s, scales)  # "none" keeps the given scales
    qmin, qmax = R.int_grid(bits, narrow)
    assert int(c.min()) >= qmin and int(c.max()) <= qmax


def test_gptq_block_size_does_not_change_the_result_beyond_rounding():
    W, H, _ = _problem()
    c1, _, w1 = gptq_op(W, H, 4, -1, None, "none", True, 1)
    c2, _, w2 = gptq_op(W, H, 4, -1, None, "none", True, 1000)
    _assert_same_codes(c1, c2, w1, w2.to(torch.float64))


def test_gptq_with_identity_H_equals_rtn_with_same_scales():
    W, _, _ = _problem()
    H = torch.eye(W.shape[1], dtype=torch.float64)
    scales = R.absmax_scales(W, 32, -4)
    c, s, wh = gptq_op(W, H, 3, 32, None, "none", True)
    rc, rwh = RP.quantize_rtn(W, scales, 3, 32)
    assert torch.equal(c, rc)
    torch.testing.assert_close(wh, rwh, atol=0, rtol=0)
    torch.testing.assert_close(s, scales)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("group_size", [-1, 16])
def test_gptq_layer_loss_below_rtn_and_stats_loss_is_the_true_loss(dtype, group_size):
    W, H, _ = _problem(dtype=dtype)
    st = _stats()
    c, s, wh = gptq_op(W, H, 3, group_size, None, "none", True, 128, 0.01, False, st)
    _, rtn = RP.quantize_rtn(W, s, 3, group_size)
    H64 = H.to(torch.float64)
    loss = R.layer_loss(W, wh, H64)
    assert loss < 0.8 * R.layer_loss(W, rtn, H64)
    assert st[2].item() == 0.0
    assert st[1].item() == pytest.approx(0.01)
    assert st[0].item() == pytest.approx(0.01 * torch.diag(H64).mean().item(), rel=1e-5)
    assert st[3].item() == pytest.approx(loss, rel=1e-3 if dtype == torch.float32 else 1e-9)


def test_gptq_float32_and_bfloat16_inputs_close_to_float64():
    W, H, _ = _problem()
    c64, _, _ = gptq_op(W, H, 4, -1)
    c32, s32, wh32 = gptq_op(W.float(), H.float(), 4, -1)
    assert s32.dtype == torch.float32 and wh32.dtype == torch.float32
    # float32 rounding may flip a near-tie code, which then diffuses along the row
    assert (c32 != c64).float().mean().item() < 0.05
    cb, sb, whb = gptq_op(W.bfloat16(), H.float(), 4, -1)
    assert whb.dtype == torch.bfloat16 and sb.dtype == torch.float32
    torch.testing.assert_close(whb, (sb[:, None] * cb.float()).bfloat16())


def test_gptq_dead_columns_are_zero_in_the_output():
    W, H, _ = _problem(N=16, D=32)
    H[5, :] = 0
    H[:, 5] = 0
    c, s, wh = gptq_op(W, H, 4, -1)
    assert torch.all(c[:, 5] == 0) and torch.all(wh[:, 5] == 0)
    rc, rs, rwh = R.gptq(W, H, 4, -1)
    _assert_same_codes(c, rc, wh, rwh)
    torch.testing.assert_close(s, R.absmax_scales(W, 32, -8)[:, 0])  # scales from the ORIGINAL W


# ------------------------------------------------------------------------------------------------
# scales_update modes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_layer_interleaved_scales_equal_optimal_scales_on_the_same_H(group_size, sequential):
    W, H, G = _problem()
    mode = "layer_sequential" if sequential else "layer"
    if sequential and group_size == -1:
        pytest.skip("PiSO_S needs groups")
    _, s, _ = gptq_op(W, H, 3, group_size, None, mode)
    ref = torch.ops.piso.optimal_scales(W, H, None, 3, group_size, sequential)
    torch.testing.assert_close(s, ref, atol=0, rtol=0)
    _, sq, _ = qronos_op(W, H, G, 3, group_size, None, mode)
    refq = torch.ops.piso.optimal_scales(W, H, G, 3, group_size, sequential)
    torch.testing.assert_close(sq, refq, atol=0, rtol=0)


def _group_scale_from_capture(mode, cap, H, G, bits, qmin, qmax, perm, gs):
    """The scale that group cap['group'] must get, from the weights captured when the sweep reached
    it: PiSO_I / data-free through the public optimal_scales op, PiSO_S through the raw sweep with
    its linear term by definition."""
    w = cap["w"]
    idx = perm[cap["position"]:cap["position"] + gs]
    if mode == "group":
        return torch.ops.piso.optimal_scales(w, H[idx][:, idx], G[idx][:, idx], bits)
    if mode == "group_data_free":
        return torch.ops.piso.optimal_scales(w, None, None, bits)
    return torch.ops.piso._piso_sweep(w, cap["lin"], H[idx][:, idx], qmin, qmax)[0]


@pytest.mark.parametrize("algo", ["gptq", "qronos"])
@pytest.mark.parametrize("mode", GROUP_PISO + ("group_absmax",))
@pytest.mark.parametrize("act_order", [False, True])
def test_group_interleaved_scales_use_the_current_weights_and_match_reference(algo, mode, act_order):
    W, H, G = _problem(N=32, D=64)
    gs = 16
    cap = []
    if algo == "gptq":
        c, s, wh = gptq_op(W, H, 3, gs, None, mode, act_order, 32)
        rc, rs, rwh = R.gptq(W, H, 3, gs, None, mode, act_order, 32, capture=cap)
        G = H
    else:
        c, s, wh = qronos_op(W, H, G, 3, gs, None, mode, act_order, 32)
        rc, rs, rwh = R.qronos(W, H, G, 3, gs, None, mode, act_order, 32, capture=cap)
    _assert_same_codes(c, rc, wh, rwh)
    torch.testing.assert_close(s, rs, atol=1e-10, rtol=1e-10)
    assert len(cap) == 64 // gs
    Hfix = H.clone()
    perm = R.column_order(torch.diag(Hfix), gs, act_order, True)
    for cp in cap:
        if mode == "group_absmax":
            want = R.absmax_scales(cp["w"], gs, -4)[:, 0]
        else:
            want = _group_scale_from_capture(mode, cp, H, G, 3, -4, 3, perm, gs)
        torch.testing.assert_close(s[:, cp["group"]], want.to(torch.float64), atol=1e-10, rtol=1e-10)
    # Later groups see error diffusion: their scale differs from the one on the original weights.
    if mode == "group_data_free":
        static = torch.ops.piso.optimal_scales(W, None, None, 3, gs)
        later = [cp["group"] for cp in cap[1:]]
        assert not torch.allclose(s[:, later], static[:, later])


def test_group_absmax_first_group_uses_untouched_weights_in_gptq():
    W, H, _ = _problem(N=32, D=64)
    cap = []
    _, s, _ = gptq_op(W, H, 3, 16, None, "group_absmax", True, 16)
    R.gptq(W, H, 3, 16, None, "group_absmax", True, 16, capture=cap)
    k0 = cap[0]["group"]
    torch.testing.assert_close(s[:, k0], R.absmax_scales(W, 16, -4)[:, k0])


@pytest.mark.parametrize("algo", ["gptq", "qronos"])
@pytest.mark.parametrize("mode", ["group", "group_sequential", "group_absmax"])
def test_group_modes_with_a_block_size_not_a_multiple_of_the_group_size(algo, mode):
    """block_size 24 or 40 with groups of 16: the lazy-batch blocks are rounded to whole groups, so
    every group's scale is computed from fully error-diffused weights; the same codes and scales as
    the reference (which applies the pending block update explicitly before every group)."""
    W, H, G = _problem(N=32, D=64)
    for bs in (24, 40):
        if algo == "gptq":
            c, s, wh = gptq_op(W, H, 3, 16, None, mode, True, bs)
            rc, rs, rwh = R.gptq(W, H, 3, 16, None, mode, True, bs)
        else:
            c, s, wh = qronos_op(W, H, G, 3, 16, None, mode, True, bs)
            rc, rs, rwh = R.qronos(W, H, G, 3, 16, None, mode, True, bs)
        _assert_same_codes(c, rc, wh, rwh)
        torch.testing.assert_close(s, rs, atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------------------------------------
# Damping, escalation and the RTN fallback
# ------------------------------------------------------------------------------------------------
def test_indefinite_H_escalates_damping_with_warning_and_no_nan(capfd):
    W, H, _ = _problem(N=16, D=64, T=64)
    m = torch.diag(H).mean()
    lam_min = torch.linalg.eigvalsh(H).min()
    H = H - (lam_min + 0.05 * m) * torch.eye(64, dtype=H.dtype)  # min eigenvalue -0.05 mean diag
    st = _stats()
    c, s, wh = gptq_op(W, H, 4, -1, None, "none", True, 128, 0.01, False, st)
    assert "used damping" in capfd.readouterr().err  # TORCH_WARN (C++ warning handler: stderr)
    assert torch.isfinite(wh).all()
    assert st[2].item() == 0.0
    assert st[1].item() == pytest.approx(0.1)  # one x10 escalation
    rc, _, rwh = R.gptq(W, H, 4, -1, None, "none", True, 128, 0.1)
    _assert_same_codes(c, rc, wh, rwh)


@pytest.mark.parametrize("algo", ["gptq", "qronos"])
def test_zero_damping_escalates_to_a_positive_damping(algo, capfd):
    """damp = 0 (GPTQ) or alpha = 0 (Qronos) on an H that is not positive definite: the first step
    of the ladder is 1e-6 x mean diag H (x10 from 0 would stay 0), so H factors after escalation
    instead of falling back to RTN."""
    W, H, G = _problem(N=16, D=64, T=64)
    m = torch.diag(H).mean()
    lam_min = torch.linalg.eigvalsh(H).min()
    H = H - (lam_min + 1e-7 * m) * torch.eye(64, dtype=H.dtype)  # min eigenvalue -1e-7 mean diag
    st = _stats()
    if algo == "gptq":
        c, s, wh = gptq_op(W, H, 4, -1, None, "none", True, 128, 0.0, False, st)
    else:
        c, s, wh = qronos_op(W, H, G, 4, -1, None, "none", True, 128, 0.0, False, st)
    assert "used damping" in capfd.readouterr().err
    assert st[2].item() == 0.0  # factored, no RTN fallback
    assert st[1].item() == pytest.approx(1e-6)  # the ladder's first step from 0
    assert torch.isfinite(wh).all()
    if algo == "gptq":
        rc, _, rwh = R.gptq(W, H, 4, -1, None, "none", True, 128, st[1].item())
        _assert_same_codes(c, rc, wh, rwh)


@pytest.mark.parametrize("algo", ["gptq", "qronos"])
@pytest.mark.parametrize("mode", ["none", "group_data_free"])
def test_never_factoring_H_falls_back_to_rtn_with_warning(algo, mode, capfd):
    W, H, G = _problem(N=16, D=32)
    H = H.clone()
    H[3, 3] = -1e9  # a huge negative eigenvalue: no damping on the ladder makes it factor
    st = _stats()
    if algo == "gptq":
        c, s, wh = gptq_op(W, H, 4, 8, None, mode, True, 128, 0.01, False, st)
    else:
        c, s, wh = qronos_op(W, H, G, 4, 8, None, mode, True, 128, 1e-6, False, st)
    assert "fell back to round-to-nearest" in capfd.readouterr().err
    assert st[2].item() == 1.0
    assert torch.isfinite(wh).all() and torch.isfinite(st).all()
    W0 = W.clone()
    rc, rwh = RP.quantize_rtn(W0, s, 4, 8)
    assert torch.equal(c, rc)
    if mode == "none":
        torch.testing.assert_close(s, R.absmax_scales(W, 8, -8))
    else:
        torch.testing.assert_close(s, torch.ops.piso.optimal_scales(W, None, None, 4, 8))


def test_group_sequential_scales_after_the_rtn_fallback_are_piso_S():
    """When H never factors, GPTQ falls back to RTN (no error diffusion) and group_sequential must
    evaluate PiSO_S's linear term by its definition (the GPTQ invariant that shortcuts it needs the
    factorization): with act_order the groups run in PiSO_S's order, so the scales are those of
    optimal_scales(sequential=True) on the same H."""
    W, H, _ = _problem(N=16, D=32)
    H = H.clone()
    H[3, 3] = -1e9
    st = _stats()
    c, s, wh = gptq_op(W, H, 4, 8, None, "group_sequential", True, 128, 0.01, False, st)
    assert st[2].item() == 1.0
    want = torch.ops.piso.optimal_scales(W, H, None, 4, 8, True)
    torch.testing.assert_close(s, want, rtol=1e-10, atol=0)
    rc, _ = RP.quantize_rtn(W, s, 4, 8)
    assert torch.equal(c, rc)


# ------------------------------------------------------------------------------------------------
# Qronos
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scales_update", ["none", "group_absmax", "layer"])
def test_qronos_codes_match_reference(group_size, act_order, scales_update):
    W, H, G = _problem()
    st = _stats()
    c, s, wh = qronos_op(W, H, G, 3, group_size, None, scales_update, act_order, 16, 1e-6, False, st)
    rc, rs, rwh = R.qronos(W, H, G, 3, group_size, None, scales_update, act_order, 16)
    _assert_same_codes(c, rc, wh, rwh)
    torch.testing.assert_close(s, rs, atol=1e-12, rtol=1e-12)
    assert st[0].item() == pytest.approx(1e-6 * R.lambda_max(H), rel=1e-9)
    assert st[3].item() == pytest.approx(R.layer_loss(W, wh, H), rel=1e-9)


def test_qronos_with_G_equal_H_equals_gptq_with_the_same_damping():
    """With G = H, Qronos' first-column correction returns w_0 and its ridge re-solve is the OBS
    update, so it is GPTQ with damping lambda: same codes and loss up to rounding."""
    W, H, _ = _problem()
    st, st2 = _stats(), _stats()
    c, _, wh = qronos_op(W, H, H, 3, -1, None, "none", True, 16, 1e-4, False, st)
    c2, _, wh2 = gptq_op(W, H, 3, -1, None, "none", True, 16, st[1].item(), False, st2)
    _assert_same_codes(c, c2, wh, wh2)
    assert st[3].item() <= st2[3].item() * (1 + 1e-9)


def test_qronos_corrects_the_input_mismatch_better_than_gptq():
    """On the cross objective |X w - X~ w_hat|^2, Qronos (which sees G) beats GPTQ on H alone."""
    W, H, G = _problem(noise=0.3)
    _, _, wq = qronos_op(W, H, G, 4, -1)
    _, _, wg = gptq_op(W, H, 4, -1)

    def cross(wh):  # |Xw|^2 dropped: E = w_hat' H w_hat - 2 w_hat' G w, (G w)_i = sum_j G_ij w_j
        return float(((wh @ H) * wh).sum() - 2 * ((W @ G.T) * wh).sum())

    assert cross(wq) < cross(wg)


# ------------------------------------------------------------------------------------------------
# opcheck, CUDA, bad inputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["none", "group", "group_sequential"])
def test_opcheck(mode):
    W, H, G = _problem(N=8, D=32, dtype=torch.float32)
    torch.library.opcheck(gptq_op, (W, H, 4, 16, None, mode, True, 16, 0.01, False, None))
    torch.library.opcheck(qronos_op, (W, H, G, 4, 16, None, mode, True, 16, 1e-6, False, None))


@requires_cuda
@pytest.mark.parametrize("mode", ["none", "layer", "group", "group_sequential", "group_absmax"])
def test_cuda_matches_cpu(mode):
    W, H, G = _problem()
    for fn, args in ((gptq_op, (W, H)), (qronos_op, (W, H, G))):
        c, s, wh = fn(*args, 3, 32, None, mode, True, 16)
        cc, sc, whc = fn(*[a.cuda() for a in args], 3, 32, None, mode, True, 16)
        _assert_same_codes(c, cc.cpu(), wh, whc.cpu().to(torch.float64), max_frac=1e-3)
        torch.testing.assert_close(s, sc.cpu(), atol=1e-9, rtol=1e-9)


@requires_cuda
def test_inputs_on_different_devices_are_rejected():
    W, H, G = _problem(N=4, D=16, T=64, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="same device"):
        gptq_op(W.cuda(), H, 4)
    with pytest.raises(RuntimeError, match="same device"):
        qronos_op(W.cuda(), H.cuda(), G, 4)


def _bad_cases():
    W, H, G = _problem(N=4, D=16, T=64, dtype=torch.float32)
    nanW = W.clone()
    nanW[0, 0] = float("nan")
    infH = H.clone()
    infH[1, 1] = float("inf")
    nanG = G.clone()
    nanG[2, 3] = float("nan")
    ok = dict(W=W, H=H, G=G, bits=4, group_size=-1, scales=None, scales_update="none",
              block_size=16, stats=None)
    cases = [
        (dict(W=W[0]), "W: expected a 2-D"),
        (dict(W=W.to(torch.int32)), "W: expected float"),
        (dict(W=W[:, :0]), "W: expected a non-empty"),
        (dict(H=H[:8, :8]), "H: expected shape"),
        (dict(H=H.half()), "H: expected float32 or float64"),
        (dict(G=G[:, :8]), "G: expected shape"),
        (dict(bits=1), "bits"),
        (dict(bits=9), "bits"),
        (dict(group_size=5), "group_size"),
        (dict(group_size=0), "group_size"),
        (dict(scales_update="groups"), "scales_update"),
        (dict(scales=torch.ones(5)), "scales: expected shape"),
        (dict(scales=torch.ones(4, 2), group_size=-1), "scales: expected shape"),
        (dict(scales=torch.ones(4, 3), group_size=8), "scales: expected shape"),
        (dict(scales=-torch.ones(4)), "strictly positive"),
        (dict(scales=torch.zeros(4)), "strictly positive"),
        (dict(W=nanW), "W: contains NaN"),
        (dict(H=infH), "H: contains NaN"),
        (dict(G=nanG), "G: contains NaN"),
        (dict(block_size=0), "block_size"),
        (dict(stats=torch.zeros(4)), "stats: expected a float64"),
        (dict(stats=torch.zeros(3, dtype=torch.float64)), "stats: expected a float64"),
        # a stats tensor on another device was silently left unwritten
        (dict(stats=torch.zeros(4, dtype=torch.float64, device="meta")), "stats"),
    ]
    return ok, cases


@pytest.mark.parametrize("algo", ["gptq", "qronos"])
def test_bad_inputs_raise_clear_errors(algo):
    ok, cases = _bad_cases()
    for change, msg in cases:
        a = dict(ok, **change)
        if algo == "gptq" and "G" in change:
            continue
        with pytest.raises(RuntimeError, match=msg):
            if algo == "gptq":
                gptq_op(a["W"], a["H"], a["bits"], a["group_size"], a["scales"], a["scales_update"],
                        True, a["block_size"], 0.01, False, a["stats"])
            else:
                qronos_op(a["W"], a["H"], a["G"], a["bits"], a["group_size"], a["scales"],
                          a["scales_update"], True, a["block_size"], 1e-6, False, a["stats"])
    W, H = ok["W"], ok["H"]
    with pytest.raises(RuntimeError, match="damp"):
        gptq_op(W, H, 4, -1, None, "none", True, 16, -1.0)
    with pytest.raises(RuntimeError, match="alpha"):
        qronos_op(W, H, ok["G"], 4, -1, None, "none", True, 16, float("nan"))


def test_gptq_and_qronos_match_reference_when_D_takes_the_blocked_triangular_inverse():
    # D > 512: U comes from the recursive 2x2-block triangular inverse (csrc/gptq.cpp)
    W, H, G = _problem(N=6, D=640, T=900, noise=0.02)
    c, s, wh = gptq_op(W, H, 4, 64, None, "none", True, 128)
    rc, rs, rwh = R.gptq(W, H, 4, 64, None, "none", True, 128)
    _assert_same_codes(c, rc, wh, rwh)
    c, s, wh = qronos_op(W, H, G, 4, -1, None, "none", True, 128)
    rc, rs, rwh = R.qronos(W, H, G, 4, -1, None, "none", True, 128)
    _assert_same_codes(c, rc, wh, rwh)


# ------------------------------------------------------------------------------------------------
# The CPU's left-looking form against the right-looking form (the GPU's), both run on CPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["gptq", "qronos"])
@pytest.mark.parametrize("mode,gs", [("none", -1), ("layer", -1), ("none", 16), ("layer", 16),
                                     ("layer_sequential", 32)])
@pytest.mark.parametrize("act_order", [False, True])
def test_left_looking_form_equals_right_looking_form(monkeypatch, op, mode, gs, act_order):
    """CPU sweeps use V (H + lambda I = V V^T) and accumulated residuals, without forming U = V^-1;
    PISO_GPTQ_FORM=right runs the U form the CUDA path uses (and every CPU mode that updates group
    scales during the sweep). Same codes, scales, loss and stats, with blocks that split groups
    (block 24 with group 16), dead columns and a block past the D = 96."""
    W, H, G = _problem(N=20, seed=3)
    H[:, 5] = 0
    H[5, :] = 0  # a dead input
    G[5, :] = 0
    for block in (24, 128):
        out = {}
        for form in ("left", "right"):
            monkeypatch.setenv("PISO_GPTQ_FORM", form)
            st = _stats()
            if op == "gptq":
                out[form] = gptq_op(W, H, 3, gs, None, mode, act_order, block, 0.01, False, st)
            else:
                out[form] = qronos_op(W, H, G, 3, gs, None, mode, act_order, block, 1e-3, False, st)
            out[form] += (st,)
        (c, s, wh, st), (rc, rs, rwh, rst) = out["left"], out["right"]
        assert torch.equal(c, rc)
        torch.testing.assert_close(s, rs, rtol=1e-12, atol=0)
        torch.testing.assert_close(wh, rwh, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(st, rst, rtol=1e-9, atol=1e-12)


def test_left_looking_form_falls_back_and_escalates_like_the_right_form(monkeypatch, capfd):
    """A Hessian that needs escalated damping, and one that never factors (RTN fallback)."""
    W, H, _ = _problem(N=12, D=40, seed=4)
    m = torch.diag(H).mean()
    H_ind = H - (torch.linalg.eigvalsh(H).min() + 0.05 * m) * torch.eye(40, dtype=torch.float64)
    H_neg = -1e8 * torch.eye(40, dtype=torch.float64)  # beyond every escalation
    for Hx, says in ((H_ind, "used damping"), (H_neg, "fell back to round-to-nearest")):
        res = {}
        for form in ("left", "right"):
            monkeypatch.setenv("PISO_GPTQ_FORM", form)
            st = _stats()
            res[form] = gptq_op(W, Hx, 4, 8, None, "layer", True, 16, 0.01, False, st) + (st,)
            assert says in capfd.readouterr().err
        assert torch.equal(res["left"][0], res["right"][0])
        torch.testing.assert_close(res["left"][3], res["right"][3], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("form", ["left", "right"])
@pytest.mark.parametrize("op", ["gptq", "qronos"])
def test_non_symmetric_H_is_used_by_its_symmetric_part(monkeypatch, form, op):
    """Only the symmetric part of H enters the objective; both CPU forms read one triangle, so a
    non-symmetric H must give the result of its symmetric part (as optimal_scales does)."""
    monkeypatch.setenv("PISO_GPTQ_FORM", form)
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(6, 16, dtype=torch.float64, generator=gen)
    X = torch.randn(40, 16, dtype=torch.float64, generator=gen)
    H = X.T @ X
    A = torch.randn(16, 16, dtype=torch.float64, generator=gen) * 3
    Hn = H + A - A.T  # symmetric part: H
    if op == "gptq":
        got, want = torch.ops.piso.gptq(W, Hn, 3), torch.ops.piso.gptq(W, H, 3)
    else:
        got, want = torch.ops.piso.qronos(W, Hn, H, 3), torch.ops.piso.qronos(W, H, H, 3)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("op", ["gptq", "qronos"])
def test_given_scales_that_underflow_or_overflow_the_working_dtype_are_rejected(op):
    W, H = torch.randn(4, 8), torch.eye(8)
    for v in (1e-50, 1e50):  # positive and finite in float64, 0 / Inf in float32
        s = torch.full((4,), v, dtype=torch.float64)
        with pytest.raises(RuntimeError, match="scales: expected values that stay positive and finite"):
            if op == "gptq":
                torch.ops.piso.gptq(W, H, 4, -1, s)
            else:
                torch.ops.piso.qronos(W, H, H, 4, -1, s)
    # The same scales are fine for float64 work.
    codes, scales, W_hat = torch.ops.piso.gptq(W.double(), H.double(), 4, -1,
                                               torch.full((4,), 1e-50, dtype=torch.float64))
    assert torch.equal(scales, torch.full((4,), 1e-50, dtype=torch.float64))


def test_gptq_rejects_dequantized_weights_that_overflow_float16():
    W = torch.tensor([[-65504.0, 40000.0]], dtype=torch.float16)
    with pytest.raises(RuntimeError, match="W_hat: scale \\* code overflows Half"):
        torch.ops.piso.gptq(W, torch.eye(2), 2, -1, None, "layer")
    codes, s, W_hat = torch.ops.piso.gptq(W.float(), torch.eye(2), 2, -1, None, "layer")
    assert torch.isfinite(W_hat).all()


@pytest.mark.parametrize("form", ["left", "right"])
@pytest.mark.parametrize("where", [(140, 10), (10, 140), (100, 70)])
def test_one_asymmetric_pair_far_from_the_diagonal_is_seen(monkeypatch, form, where):
    """The symmetry check works by tiles: one asymmetric pair in any tile makes gptq use the
    symmetric part (the CPU forms read different triangles)."""
    monkeypatch.setenv("PISO_GPTQ_FORM", form)
    gen = torch.Generator().manual_seed(1)
    D = 150
    W = torch.randn(8, D, dtype=torch.float64, generator=gen)
    X = torch.randn(400, D, dtype=torch.float64, generator=gen)
    H = X.T @ X
    H = (H + H.T) / 2
    Hn = H.clone()
    Hn[where] += 0.3 * H[where[0], where[0]]
    want = torch.ops.piso.gptq(W, (Hn + Hn.T) / 2, 3)
    for g, w in zip(torch.ops.piso.gptq(W, Hn, 3), want):
        assert torch.equal(g, w)
    for g, w in zip(torch.ops.piso.gptq(W.float(), Hn.float(), 3),
                    torch.ops.piso.gptq(W.float(), ((Hn + Hn.T) / 2).float(), 3)):
        assert torch.equal(g, w)


def _dead_feature_problem(seed=0, D=16, T=400):
    """X~ has feature 5 dead (all zero), X does not; diag H well below 1."""
    g = torch.Generator().manual_seed(seed)
    Xq = 0.3 * torch.randn(T, D, generator=g, dtype=torch.float64)
    Xq[:, 5] = 0
    X = Xq + 0.8 * torch.randn(T, D, generator=g, dtype=torch.float64)  # G far from H
    W = torch.randn(6, D, generator=g, dtype=torch.float64)
    return W, Xq.T @ Xq / T, Xq.T @ X / T, X, Xq


def test_qronos_column_order_puts_a_dead_column_last_whatever_the_scale_of_H():
    """ALGORITHM §5.2: columns by the raw diag H, so a dead column (H_ii = 0) goes last; with dead
    columns at 1 it went first when every live diagonal was below 1, and the result depended on
    the scale of H."""
    W, H, G, _, _ = _dead_feature_problem()
    assert float(H.diagonal().max()) < 1
    a = qronos_op(W, H, G, 4)
    b = qronos_op(W, 100 * H, 100 * G, 4)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.double(), y.double(), rtol=1e-9, atol=1e-9)


def test_qronos_target_keeps_the_weights_of_a_feature_dead_only_in_the_quantized_stream():
    """The target X w uses the original weights (§5.2: w = weight_orig): x_5 w_5 is part of it even
    though X~ has no feature 5, so zeroing w_5 beforehand must change the result."""
    W, H, G, X, Xq = _dead_feature_problem()
    W0 = W.clone()
    W0[:, 5] = 0
    _, _, Wh = qronos_op(W, H, G, 4, act_order=False)
    _, _, Wh0 = qronos_op(W0, H, G, 4, act_order=False)
    assert not torch.allclose(Wh, Wh0)
    loss = lambda Wh: float(((X @ W.T - Xq @ Wh.T) ** 2).sum())
    assert loss(Wh) < loss(Wh0)  # the true cross objective prefers the target with x_5 w_5


def test_qronos_ridge_pulls_a_dead_column_toward_its_original_weight_like_the_reference():
    """Step 1b's ridge term λ·w_orig (§5.2): with a large alpha, a feature dead in X~ keeps the
    shrunken original weight λw/(1+λ) (no data term), which RTN turns into nonzero codes; the op
    and the reference agree on it."""
    W, H, G, _, _ = _dead_feature_problem()
    for act_order in (False, True):
        c, s, wh = qronos_op(W, H, G, 4, -1, None, "none", act_order, 128, 1.0)
        rc, rs, rwh = R.qronos(W, H, G, 4, -1, None, "none", act_order, 128, 1.0)
        _assert_same_codes(c, rc, wh, rwh)
        assert (rc[:, 5] != 0).any()


def test_gptq_group_modes_per_channel_are_the_layer_modes():
    """Per channel a row is one group: GPTQ computes its scale before the first column, from the
    weights as they stand then -- the layer-interleaved (⊙*) result, bit for bit. (Qronos's one
    group comes after its first-column correction, ALGORITHM §4.3, so it differs.)"""
    gen = torch.Generator().manual_seed(77)
    W = torch.randn(12, 48, generator=gen)
    X = torch.randn(150, 48, generator=gen)
    H = X.T @ X
    for group, layer in (("group", "layer"), ("group_sequential", "layer_sequential")):
        for a, b in zip(gptq_op(W, H, 3, -1, None, group), gptq_op(W, H, 3, -1, None, layer)):
            assert torch.equal(a, b), (group, layer)
    # PiSO did change the scales
    assert not torch.equal(gptq_op(W, H, 3, -1, None, "layer")[1], gptq_op(W, H, 3)[1])
