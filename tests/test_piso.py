"""PiSO ops (optimal_scales, quantize_rtn, _piso_sweep) against the float64 reference
torch_piso/reference/piso.py (brute force over s, objectives, RTN)."""
import itertools
import zlib

import pytest
import torch

import torch_piso  # noqa: F401
from torch_piso.reference import piso as ref
from conftest import requires_cuda

ops = torch.ops.piso
f64 = torch.float64


def spd(D, gen, dead=()):
    A = torch.randn(D, D + 3, dtype=f64, generator=gen)
    H = A @ A.T / D + 0.05 * torch.eye(D, dtype=f64)
    for i in dead:
        H[i, :] = 0
        H[:, i] = 0
    return H


def make_W(kind, N, D, gen, dtype=f64):
    if kind == "gauss":
        W = torch.randn(N, D, dtype=f64, generator=gen)
    elif kind == "ties":  # few distinct magnitudes: exact ties, also across levels (0.25*3 == 0.75)
        vals = torch.tensor([-0.75, -0.5, -0.25, 0.25, 0.5, 0.75, 1.5, 0.0], dtype=f64)
        W = vals[torch.randint(0, len(vals), (N, D), generator=gen)]
    elif kind == "bf16":  # bf16-valued weights (8-bit mantissa): frequent coincidences
        W = (torch.randn(N, D, dtype=f64, generator=gen) * 0.05).to(torch.bfloat16).to(f64)
    else:
        raise ValueError(kind)
    return W.to(dtype)


def H_variant(kind, D, gen):
    if kind == "identity":
        return None
    if kind == "diag":
        return torch.rand(D, dtype=f64, generator=gen) + 0.1
    return spd(D, gen)


def three_sweeps(W, lin, H, qmin, qmax):
    """The CPU sweep's three ways to the u values (prefix sums, per-event updates, tables; the
    prefix way also with its row additions batched, as on wide rows) on the same problem: their
    objectives agree, and each is the reference objective at its own returned scales. Returns the
    prefix sweep's (scales, objective)."""
    out = [ops._piso_sweep(W, lin, H, qmin, qmax, 1e-9, a)
           for a in ("sequential_prefix", "sequential_events", "sequential_table",
                     "sequential_prefix_batched")]
    for s, o in out:
        torch.testing.assert_close(o, out[1][1], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ref.objective_lin(W, lin, s, H, qmin, qmax), o, rtol=1e-9,
                                   atol=1e-9)
    return out[0]


def tol(e_ref):
    return 1e-5 + 1e-6 * e_ref.abs()


# ------------------------------------------------------------------------------------------------
# Exactness against brute force
# ------------------------------------------------------------------------------------------------
CASES = list(itertools.product([2, 3, 4, 8], ["identity", "diag", "dense"], ["gauss", "ties", "bf16"]))


@pytest.mark.parametrize("bits,hkind,wkind", CASES)
def test_optimal_scales_no_worse_than_brute_force(bits, hkind, wkind):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{bits}{hkind}{wkind}".encode()))
    for trial in range(3):
        D = [1, 5, 17, 64][(trial + bits) % 4] if bits < 8 else [1, 6, 24][trial]
        narrow = trial == 1
        W = make_W(wkind, 3, D, gen, dtype=f64 if trial != 2 else torch.float32)
        H = H_variant(hkind, D, gen)
        G = torch.randn(D, D, dtype=f64, generator=gen) if (trial == 0 and hkind == "dense") else None
        s = ops.optimal_scales(W, H, G, bits, narrow_range=narrow)
        assert s.dtype == (f64 if W.dtype == f64 else torch.float32)
        assert (s > 0).all()
        e = ref.objective(W, s, H, G, bits, narrow)
        e_b, _ = ref.brute_force_scales(W, H, G, bits, narrow, n=1500)
        assert (e <= e_b + tol(e_b)).all(), (e, e_b)


@pytest.mark.parametrize("algorithm", ["sequential", "event_parallel", "sequential_prefix",
                                       "sequential_events", "sequential_table",
                                       "sequential_prefix_batched"])
@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_sweep_objective_is_the_objective_at_the_returned_scale(algorithm, dtype):
    """The scale, in its returned dtype, reproduces the interval whose objective the sweep found
    (RTN codes at that scale, recomputed by the reference, give the same E)."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(12):
        bits = [2, 3, 4, 8][trial % 4]
        qmin, qmax = ref.int_grid(bits, trial % 3 == 0)
        D = [3, 16, 40][trial % 3]
        W = make_W(["gauss", "ties", "bf16"][trial % 3], 5, D, gen, dtype)
        H = H_variant(["dense", "diag", "identity"][trial % 3], D, gen)
        lin = torch.randn(5, D, dtype=f64, generator=gen) if trial % 2 else ref._lin(W, H, None)
        s, obj = ops._piso_sweep(W, lin, H, qmin, qmax, 1e-9, algorithm)
        assert s.dtype == (f64 if dtype == f64 else torch.float32) and obj.dtype == f64
        e = ref.objective_lin(W, lin, s, H, qmin, qmax)
        torch.testing.assert_close(obj, e, rtol=1e-9, atol=1e-9)
        e_b, _ = ref.brute_force_lin(W, lin, H, qmin, qmax, n=1000)
        assert (obj <= e_b + tol(e_b)).all()


def test_float32_scale_reproduces_interval_codes_with_tiny_eps():
    """eps = 0: the float32 scale must still sit strictly inside its interval (nextafter nudge), so
    quantize_rtn at the returned scale gives the objective the sweep reports."""
    gen = torch.Generator().manual_seed(2)
    for bits in (2, 4):
        qmin, qmax = ref.int_grid(bits)
        W = make_W("bf16", 16, 12, gen, torch.float32)
        H = spd(12, gen)
        lin = ref._lin(W, H, None)
        for eps in (0.0, 1e-12):
            s, obj = ops._piso_sweep(W, lin, H, qmin, qmax, eps, "sequential")
            codes, _ = ops.quantize_rtn(W, s, bits)
            q = codes.to(f64)
            s64 = s.to(f64)
            e = s64 ** 2 * ((q @ H) * q).sum(1) - 2 * s64 * (q * lin).sum(1)
            torch.testing.assert_close(obj, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["sequential", "event_parallel"])
def test_float64_scale_reproduces_interval_codes_with_eps_zero(algorithm):
    """eps = 0 with float64 W: a scale clipped to its interval's lower breakpoint must still keep
    the safety margin of a few fp64 ulps (piso_internal.h, kMargin), so that RTN at the returned
    scale -- fl64(w / s), round half to even -- reproduces the interval's codes and the objective
    the sweep reports."""
    gen = torch.Generator().manual_seed(43)
    for trial in range(8):
        bits = [2, 3, 4, 8][trial % 4]
        qmin, qmax = ref.int_grid(bits)
        D = [12, 40][trial % 2]
        W = make_W(["bf16", "gauss"][trial % 2], 64, D, gen)
        H = spd(D, gen)
        lin = torch.randn(64, D, dtype=f64, generator=gen) if trial % 3 else ref._lin(W, H, None)
        s, obj = ops._piso_sweep(W, lin, H, qmin, qmax, 0.0, algorithm)
        torch.testing.assert_close(ref.objective_lin(W, lin, s, H, qmin, qmax), obj, rtol=1e-9,
                                   atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Algorithms agree
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hkind", ["identity", "diag", "dense"])
def test_event_parallel_equals_sequential(hkind):
    gen = torch.Generator().manual_seed(3)
    for trial in range(10):
        bits = [2, 3, 4, 8][trial % 4]
        qmin, qmax = ref.int_grid(bits, trial % 5 == 0)
        D = [1, 7, 33, 64][trial % 4]
        dtype = f64 if trial % 2 else torch.float32
        W = make_W(["gauss", "ties", "bf16"][trial % 3], 6, D, gen, dtype)
        W[0] = 0  # all-zero row
        H = H_variant(hkind, D, gen)
        lin = torch.randn(6, D, dtype=f64, generator=gen)
        s1, o1 = ops._piso_sweep(W, lin, H, qmin, qmax, 1e-9, "sequential")
        s2, o2 = ops._piso_sweep(W, lin, H, qmin, qmax, 1e-9, "event_parallel")
        torch.testing.assert_close(o2, o1, rtol=1e-9, atol=1e-12)
        # equal scales, or a different scale with the same objective (a tie)
        same = (s1 == s2) | torch.isclose(ref.objective_lin(W, lin, s2, H, qmin, qmax), o1,
                                          rtol=1e-9, atol=1e-12)
        assert same.all()


@pytest.mark.parametrize("hkind", ["identity", "diag", "dense"])
def test_exact_objective_ties_between_intervals_go_to_the_largest_scale(hkind):
    """Rows whose nonzero weights share one magnitude c = 105/128 (c/q exact for q = 1..8) and
    H = I (as identity, diagonal or dense), lin = w: every interval q = 1..min(qmax, -qmin) reaches
    E = -|w|^2 exactly, the global minimum. ALGORITHM.md §2.4 accepts a candidate only if E < best
    so far (strict), in sweep order of descending s, so the first interval, s = c, must win in every
    sweep implementation (and the event-parallel argmin takes the first minimum likewise)."""
    gen = torch.Generator().manual_seed(31)
    c = 105 / 128
    for bits, narrow in [(2, False), (3, False), (3, True), (4, False), (4, True)]:
        qmin, qmax = ref.int_grid(bits, narrow)
        D = 24
        W = c * torch.randint(-1, 2, (6, D), generator=gen).to(f64)
        W[:, 0] = c
        W[1] = 0
        W[1, 3] = -c  # a single nonzero weight
        W[2] = -c
        H = {"identity": None, "diag": torch.ones(D, dtype=f64),
             "dense": torch.eye(D, dtype=f64)}[hkind]
        lin = W.clone()
        algos = ["sequential", "event_parallel"]
        if hkind == "dense":
            algos += ["sequential_prefix", "sequential_events", "sequential_table",
                      "sequential_prefix_batched"]
        for dtype in (f64, torch.float32):
            for algo in algos:
                s, obj = ops._piso_sweep(W.to(dtype), lin, H, qmin, qmax, 1e-9, algo)
                torch.testing.assert_close(obj, -(W * W).sum(1), rtol=0, atol=0)
                assert (s.to(f64) == c).all(), (bits, narrow, dtype, algo, s)


@pytest.mark.parametrize("wkind", ["gauss", "ties", "bf16"])
def test_prefix_u_equals_per_event_updates_and_brute_force(wkind):
    """The three ways to the u values of the CPU sweep (prefix sums over coordinates sorted by |w|,
    read as they pass -- rows added one or eight at a time -- or stored as tables, and one row of H
    per breakpoint event) give the same
    objective, with exact ties, both grid kinds, dead coordinates and zero weights; and they reach
    the brute-force optimum."""
    gen = torch.Generator().manual_seed(zlib.crc32(wkind.encode()))
    for trial in range(12):
        bits = [2, 3, 4, 5, 6, 8][trial % 6]  # 8 bits: 128 level lists
        qmin, qmax = ref.int_grid(bits, trial % 3 == 1)
        D = [9, 40, 130, 300][trial % 4]
        W = make_W(wkind, 7, D, gen, f64 if trial % 2 else torch.float32)
        W[0] = 0
        W[1, : D // 2] = 0
        H = spd(D, gen, dead=(0, D - 1)).to(torch.float32 if trial % 3 == 0 else f64)
        lin = torch.randn(7, D, dtype=f64, generator=gen) if trial % 2 else ref._lin(W, H, None)
        lin[:, [0, D - 1]] = 0  # as (G w)_i for a dead input i, where X~ (hence G's row i) is zero
        s1, o1 = three_sweeps(W, lin, H, qmin, qmax)
        torch.testing.assert_close(ref.objective_lin(W, lin, s1, H, qmin, qmax), o1, rtol=1e-9,
                                   atol=1e-9)
        if D <= 40:
            e_b, _ = ref.brute_force_lin(W, lin, H, qmin, qmax, n=1000)
            assert (o1 <= e_b + tol(e_b)).all()


@pytest.mark.parametrize("hkind", ["identity", "diag", "dense"])
def test_keys_equal_in_their_high_bits_are_ordered_exactly(hkind):
    """Weights 2^-24 (or a few ulps) apart give keys that agree in their top 32 bits and differ
    below (the CPU event sort orders those by the full key in a second pass), mixed with exact
    ties: the sweep
    must agree with the event-parallel one (an independent ATen sort) and reach brute force."""
    gen = torch.Generator().manual_seed(21)
    base = torch.tensor([0.3, 0.7, 1.1], dtype=f64)
    for trial in range(6):
        D = [12, 40][trial % 2]
        mags = base[torch.randint(0, 3, (5, D), generator=gen)]
        steps = torch.randint(0, 4, (5, D), generator=gen).to(f64)
        # 2^-24 apart: candidate intervals (wider than eps) between keys with the same top 32 bits;
        # 2^-50: a few ulps apart (intervals too narrow to be candidates)
        W = mags * (1 + steps * 2.0 ** (-24 if trial % 3 else -50))
        W = W * torch.where(torch.rand(5, D, generator=gen) < 0.5, -1.0, 1.0).to(f64)
        H = H_variant(hkind, D, gen)
        lin = ref._lin(W, H, None)
        for bits in (2, 4):
            qmin, qmax = ref.int_grid(bits)
            s1, o1 = ops._piso_sweep(W, lin, H, qmin, qmax, 1e-9, "sequential")
            s2, o2 = ops._piso_sweep(W, lin, H, qmin, qmax, 1e-9, "event_parallel")
            torch.testing.assert_close(o1, o2, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(ref.objective_lin(W, lin, s1, H, qmin, qmax), o1,
                                       rtol=1e-9, atol=1e-12)
            e_b, _ = ref.brute_force_lin(W, lin, H, qmin, qmax, n=800)
            assert (o1 <= e_b + tol(e_b)).all()


def test_dense_equals_diagonal_when_H_is_diagonal():
    gen = torch.Generator().manual_seed(4)
    for bits in (2, 3, 4):
        W = make_W("gauss", 8, 20, gen)
        h = torch.rand(20, dtype=f64, generator=gen) + 0.1
        s_diag = ops.optimal_scales(W, h, None, bits)
        s_dense = ops.optimal_scales(W, torch.diag(h), None, bits)
        torch.testing.assert_close(ref.objective(W, s_dense, h, None, bits),
                                   ref.objective(W, s_diag, h, None, bits), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dense", [False, True])
def test_known_scale_recovery(dense):
    """w = s_opt * Q with Q on the grid and H = G = I: the optimum is s_opt (E = -|w|^2)."""
    gen = torch.Generator().manual_seed(5)
    for s_opt in (0.3, 1.5, 0.05):
        Q = torch.randint(-8, 8, (4, 16), generator=gen).to(f64)
        # -8 and an odd 7 make s_opt the only zero-error scale (-8 alone does not: with every
        # code even, 2 s_opt is exact too, and ties go to the larger scale)
        Q[:, 0] = -8
        Q[:, 1] = 7
        W = s_opt * Q
        H = torch.eye(16, dtype=f64) if dense else torch.ones(16, dtype=f64)
        s = ops.optimal_scales(W, H, None, 4)
        torch.testing.assert_close(s, torch.full_like(s, s_opt), rtol=1e-6, atol=0)
        s_free = ops.optimal_scales(W, None, None, 4)
        torch.testing.assert_close(s_free, torch.full_like(s, s_opt), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# Degenerate rows
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["sequential", "event_parallel"])
def test_all_zero_row_gets_scale_one_and_dead_row_gets_absmax(algorithm):
    gen = torch.Generator().manual_seed(6)
    D = 10
    H = spd(D, gen, dead=(2, 5))
    W = torch.randn(3, D, dtype=f64, generator=gen)
    W[0] = 0
    W[1] = 0
    W[1, 2], W[1, 5] = 0.7, -0.3  # only dead inputs: beta == 0 on every interval
    s, obj = ops._piso_sweep(W, W @ H, H, -8, 7, 1e-9, algorithm)
    assert s[0] == 1.0 and obj[0] == 0.0
    assert s[1] == 0.7 / 8 and obj[1] == 0.0
    assert s[2] > 0
    # narrow grid: the absmax of gptq and the pipeline, max|w| / (2^(b-1) - 1)
    s, obj = ops._piso_sweep(W, W @ H, H, -7, 7, 1e-9, algorithm)
    assert s[1] == 0.7 / 7 and obj[1] == 0.0


def test_scales_are_always_positive_even_when_negative_scale_would_fit():
    gen = torch.Generator().manual_seed(7)
    W = torch.tensor([[0.8, -0.7], [1.0, -1.0], [-3.0, 0.01]], dtype=f64)  # = -0.1 * [-8, 7] etc.
    for H in (None, torch.ones(2, dtype=f64), torch.eye(2, dtype=f64), spd(2, gen)):
        s = ops.optimal_scales(W, H, None, 4)
        assert (s > 0).all()


def test_dead_input_of_diagonal_H_never_breaks_the_row():
    W = torch.tensor([[0.5, -0.2, 0.9]], dtype=f64)
    h = torch.tensor([0.0, 1.0, 0.0], dtype=f64)
    s = ops.optimal_scales(W, h, None, 3)
    e_b, _ = ref.brute_force_scales(W, h, None, 3)
    assert ref.objective(W, s, h, None, 3) <= e_b + tol(e_b)


@pytest.mark.parametrize("algorithm", ["sequential", "event_parallel"])
@pytest.mark.parametrize("h_kind", ["diagonal", "dense"])
def test_absmax_fallback_reports_the_objective_at_its_scale(algorithm, h_kind):
    """A row whose weights sit only on dead inputs (beta = 0 on every interval: no candidate) gets
    the absmax fallback scale, and the objective returned with it is E at that scale -- with a
    nonzero linear term it is -2 s q^T lin, not 0."""
    gen = torch.Generator().manual_seed(53)
    D = 10
    dead = (2, 5)
    H = spd(D, gen, dead=dead) if h_kind == "dense" else torch.rand(D, dtype=f64, generator=gen) + 0.1
    if h_kind == "diagonal":
        H[list(dead)] = 0
    W = torch.randn(4, D, dtype=f64, generator=gen)
    W[0] = 0
    W[0, 2], W[0, 5] = 0.7, -0.3
    W[1] = 0
    W[1, 5] = 1.3
    lin = torch.randn(4, D, dtype=f64, generator=gen)
    for qmin, qmax in [(-8, 7), (-7, 7), (-2, 1)]:
        s, obj = ops._piso_sweep(W, lin, H, qmin, qmax, 1e-9, algorithm)
        assert s[0] == 0.7 / -qmin and s[1] == 1.3 / -qmin
        e = ref.objective_lin(W, lin, s, H, qmin, qmax)
        assert (e[:2] != 0).all()
        torch.testing.assert_close(obj, e, rtol=1e-12, atol=0)


SWEEPS = ["sequential", "event_parallel", "sequential_prefix", "sequential_events",
          "sequential_table", "sequential_prefix_batched"]


@pytest.mark.parametrize("algorithm", SWEEPS)
@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_row_better_left_at_zero_gets_a_scale_above_every_breakpoint(algorithm, dtype):
    """A linear term pointing away from w (a cross term G, or PiSO_S's residual b_k, can) makes
    every nonzero quantization worse than q = 0: the optimum over s > 0 is then any scale above the
    largest breakpoint 2 max|w| (E = 0), which the sweep's own intervals (beta = 0 there) do not
    include. The op returns 4 max|w| with objective 0, as the brute force (which tries just above
    every breakpoint) finds; the other rows keep their negative optimum."""
    gen = torch.Generator().manual_seed(71)
    D = 24
    H = spd(D, gen)
    W = torch.randn(6, D, dtype=f64, generator=gen).to(dtype)
    lin = W.to(f64) @ H
    lin[:3] = -lin[:3]  # alpha = -q^T H w < 0 on every interval of rows 0-2
    for qmin, qmax in [(-8, 7), (-2, 1), (-7, 7)]:
        s, obj = ops._piso_sweep(W, lin, H, qmin, qmax, 1e-9, algorithm)
        amax = W.to(f64).abs().amax(1)
        assert torch.equal(s[:3].to(f64), 4 * amax[:3]) and (obj[:3] == 0).all()
        assert (obj[3:] < 0).all() and (s[3:].to(f64) < 2 * amax[3:]).all()
        e = ref.objective_lin(W, lin, s, H, qmin, qmax)
        torch.testing.assert_close(obj, e, rtol=1e-9, atol=1e-12)
        e_b, _ = ref.brute_force_lin(W, lin, H, qmin, qmax, n=500)
        assert (e <= e_b + tol(e_b)).all(), (e, e_b)


@pytest.mark.parametrize("algorithm", SWEEPS)
def test_float32_result_skips_an_interval_narrower_than_a_float32_ulp(algorithm):
    """Float32 weights a and b just below 3a (2a and 3a in one binade) give keys b / 1.5 < 2a less
    than one float32 ulp apart: the interval between them (codes (1, 1)) holds no float32 value, so
    a float32 result cannot be in it (a float32 scale on a breakpoint mixes both sides' codes). With
    H = I and lin = (2a, 2a) that interval is the row's optimum (E = -8 a^2, which the float64 op
    finds); the float32 op must return the best of the other intervals (about -7.56 a^2, codes
    (2, 3) at s just below 2a / 3): as good as the best float32 scale strictly between breakpoints,
    and strictly inside its interval (the objective at the returned scale is the one reported)."""
    gen = torch.Generator().manual_seed(72)
    a = (1 + torch.rand(16, generator=gen) / 3).float()  # [1, 4/3): 2a and 3a both in [2, 4)
    b = torch.nextafter((3 * a.double()).float(), torch.zeros(()))
    b = torch.where(b.double() < 3 * a.double(), b, torch.nextafter(b, torch.zeros(())))
    W = torch.stack([a, b], 1)
    lin = 2 * a.double()[:, None].expand(-1, 2).contiguous()
    qmin, qmax = ref.int_grid(3)
    s64, e64 = ops._piso_sweep(W.double(), lin, None, qmin, qmax, 1e-9, algorithm)
    torch.testing.assert_close(e64, -8 * a.double() ** 2, rtol=1e-6, atol=0)
    s32, e32 = ops._piso_sweep(W, lin, None, qmin, qmax, 1e-9, algorithm)
    assert s32.dtype == torch.float32
    torch.testing.assert_close(ref.objective_lin(W, lin, s32, None, qmin, qmax), e32, rtol=1e-12,
                               atol=0)
    e_b32, _ = ref.brute_force_lin(W, lin, None, qmin, qmax, n=2000, float32=True)
    assert (e32 <= e_b32 + 1e-12 * e_b32.abs()).all(), (e32, e_b32)
    torch.testing.assert_close(e32, e_b32, rtol=1e-6, atol=0)
    assert (e32 > -7.6 * a.double() ** 2).all()  # not the float64 optimum -8 a^2


# ------------------------------------------------------------------------------------------------
# Group-wise PiSO_I / PiSO_S
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hkind", ["identity", "diag", "dense"])
def test_piso_I_equals_channel_wise_on_each_group_slice(hkind):
    gen = torch.Generator().manual_seed(8)
    N, D, gs = 5, 24, 8
    W = make_W("gauss", N, D, gen)
    H = H_variant(hkind, D, gen)
    G = torch.randn(D, D, dtype=f64, generator=gen) if hkind == "dense" else None
    s = ops.optimal_scales(W, H, G, 3, group_size=gs)
    assert s.shape == (N, D // gs)
    for k in range(D // gs):
        sl = slice(k * gs, (k + 1) * gs)
        Hk = None if H is None else (H[sl] if H.dim() == 1 else H[sl, sl])
        Gk = None if G is None else G[sl, sl]
        s_k = ops.optimal_scales(W[:, sl].contiguous(), Hk, Gk, 3)
        torch.testing.assert_close(s[:, k], s_k, rtol=0, atol=0)


@pytest.mark.parametrize("h_dtype", [f64, torch.float32])
@pytest.mark.parametrize("group_size,sequential", [(-1, False), (8, False), (8, True)])
def test_non_symmetric_H_is_used_by_its_symmetric_part(group_size, sequential, h_dtype):
    """Only H's symmetric part enters q^T H q (and, with G = None, the linear term q^T H w): a
    non-symmetric H, also inside the diagonal blocks PiSO_I reads, gives the scales of (H + H^T)/2."""
    gen = torch.Generator().manual_seed(21)
    N, D = 6, 24
    W = make_W("gauss", N, D, gen)
    A = torch.randn(D, D, dtype=f64, generator=gen)
    Hn = (spd(D, gen) + 0.5 * (A - A.T)).to(h_dtype)
    Hsym = (Hn + Hn.T) * 0.5
    s_n = ops.optimal_scales(W, Hn, None, 3, group_size, sequential)
    s_sym = ops.optimal_scales(W, Hsym, None, 3, group_size, sequential)
    torch.testing.assert_close(s_n, s_sym, rtol=0, atol=0)
    # And the result is PiSO's for H's symmetric part: no worse than brute force on each problem
    # (group-wise: PiSO_I's single-group problems; PiSO_S is checked step by step elsewhere).
    if not sequential:
        gs = D if group_size == -1 else group_size
        qmin, qmax = ref.int_grid(3)
        for k in range(D // gs):
            sl = slice(k * gs, (k + 1) * gs)
            Hk = Hsym[sl, sl].to(f64)
            e = ref.objective_lin(W[:, sl], W[:, sl] @ Hk, s_n.reshape(N, -1)[:, k], Hk, qmin, qmax)
            e_b, _ = ref.brute_force_lin(W[:, sl], W[:, sl] @ Hk, Hk, qmin, qmax, n=1500)
            assert (e <= e_b + tol(e_b)).all(), (k, e, e_b)
    # The raw sweep symmetrizes H the same way.
    lin = W @ Hsym.to(f64)
    sw_n = ops._piso_sweep(W, lin, Hn, -4, 3, 1e-9, "auto")
    sw_sym = ops._piso_sweep(W, lin, Hsym, -4, 3, 1e-9, "auto")
    torch.testing.assert_close(sw_n[0], sw_sym[0], rtol=0, atol=0)
    torch.testing.assert_close(sw_n[1], sw_sym[1], rtol=0, atol=0)


@pytest.mark.parametrize("hkind", ["identity", "diag"])
def test_sequential_flag_is_ignored_for_identity_and_diagonal_H(hkind):
    gen = torch.Generator().manual_seed(9)
    W = make_W("gauss", 4, 16, gen)
    H = H_variant(hkind, 16, gen)
    torch.testing.assert_close(ops.optimal_scales(W, H, None, 4, 4, True),
                               ops.optimal_scales(W, H, None, 4, 4, False), rtol=0, atol=0)


@pytest.mark.parametrize("cross", [False, True])
def test_piso_S_each_step_is_exact_for_its_single_group_problem(cross):
    """Replays the PiSO_S schedule (groups by descending sum diag H; processed groups at s q,
    unprocessed at w) and checks every step against brute force on its single-group objective."""
    gen = torch.Generator().manual_seed(10 + cross)
    N, D, gs, bits = 4, 24, 6, 3
    qmin, qmax = ref.int_grid(bits)
    W = make_W("gauss", N, D, gen)
    H = spd(D, gen)
    H += torch.diag(torch.rand(D, dtype=f64, generator=gen) * 3)  # distinct group importances
    G = H + 0.3 * torch.randn(D, D, dtype=f64, generator=gen) if cross else None
    s = ops.optimal_scales(W, H, G, bits, gs, True)
    order = torch.argsort(H.diagonal().reshape(-1, gs).sum(1), descending=True, stable=True)
    W_hat = W.clone()
    for k in order.tolist():
        sl = slice(k * gs, (k + 1) * gs)
        Hkk, b = ref.piso_s_step_problem(W, W_hat, H, G, k * gs, gs)
        e = ref.objective_lin(W[:, sl], b, s[:, k], Hkk, qmin, qmax)
        e_b, _ = ref.brute_force_lin(W[:, sl], b, Hkk, qmin, qmax, n=1500)
        assert (e <= e_b + tol(e_b)).all(), (k, e, e_b)
        _, W_hat[:, sl] = ref.quantize_rtn(W[:, sl], s[:, k], bits)


def test_piso_S_full_objective_no_worse_than_piso_I_on_average():
    gen = torch.Generator().manual_seed(11)
    diffs = []
    for trial in range(6):
        N, D, gs, bits = 16, 32, 8, [2, 3, 4][trial % 3]
        W = make_W("gauss", N, D, gen)
        X = torch.randn(64, D, dtype=f64, generator=gen) @ (torch.eye(D, dtype=f64) + 0.5 * torch.randn(D, D, dtype=f64, generator=gen))
        H = X.T @ X / 64
        sI = ops.optimal_scales(W, H, None, bits, gs, False)
        sS = ops.optimal_scales(W, H, None, bits, gs, True)
        FI = ref.full_objective(W, sI, H, None, bits, gs)
        FS = ref.full_objective(W, sS, H, None, bits, gs)
        diffs.append((FS - FI).mean().item())
    assert sum(diffs) / len(diffs) < 0


# ------------------------------------------------------------------------------------------------
# Dtypes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_W_equals_its_float32_values(dtype):
    gen = torch.Generator().manual_seed(12)
    W = torch.randn(6, 16, generator=gen).to(dtype)
    H = spd(16, gen).float()
    s = ops.optimal_scales(W, H, None, 4)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, ops.optimal_scales(W.float(), H, None, 4), rtol=0, atol=0)
    codes, W_hat = ops.quantize_rtn(W, s, 4)
    assert W_hat.dtype == dtype and codes.dtype == torch.int8


def test_float32_H_and_G_match_float64_reference():
    gen = torch.Generator().manual_seed(13)
    W = torch.randn(6, 20, generator=gen)
    H = spd(20, gen).float()
    G = torch.randn(20, 20, generator=gen)
    s = ops.optimal_scales(W, H, G, 3)
    e = ref.objective(W, s, H, G, 3)
    e_b, _ = ref.brute_force_scales(W, H, G, 3)
    assert (e <= e_b + tol(e_b)).all()


# ------------------------------------------------------------------------------------------------
# quantize_rtn
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [-1, 4])
@pytest.mark.parametrize("narrow", [False, True])
def test_quantize_rtn_matches_reference(group_size, narrow):
    gen = torch.Generator().manual_seed(14)
    W = torch.randn(5, 12, generator=gen)
    shape = (5,) if group_size == -1 else (5, 3)
    s = torch.rand(shape, generator=gen) * 0.3 + 0.05
    for bits in (2, 4, 8):
        codes, W_hat = ops.quantize_rtn(W, s, bits, group_size, narrow)
        rc, rW = ref.quantize_rtn(W, s, bits, group_size, narrow)
        assert torch.equal(codes, rc) and torch.equal(W_hat, rW)
        qmin, qmax = ref.int_grid(bits, narrow)
        assert codes.min() >= qmin and codes.max() <= qmax


def test_quantize_rtn_rejects_nonpositive_or_nonfinite_scales():
    W = torch.randn(3, 4)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        s = torch.ones(3)
        s[1] = bad
        with pytest.raises(RuntimeError, match="scales"):
            ops.quantize_rtn(W, s, 4)
    with pytest.raises(RuntimeError, match="scales"):
        ops.quantize_rtn(W, torch.ones(3, 2), 4, 4)  # wrong group count
    with pytest.raises(RuntimeError, match="scales"):
        ops.quantize_rtn(W, torch.ones(4), 4)


# ------------------------------------------------------------------------------------------------
# opcheck and bad input
# ------------------------------------------------------------------------------------------------
def test_opcheck_optimal_scales_quantize_rtn_and_sweep():
    gen = torch.Generator().manual_seed(15)
    W = torch.randn(4, 8, generator=gen)
    H = spd(8, gen).float()
    for args in [(W, H, None, 4), (W, None, None, 3, 4), (W, H, H.T.contiguous(), 2, 4, True),
                 (W.double(), H.diagonal().double(), None, 4)]:
        torch.library.opcheck(ops.optimal_scales.default, args)
    s = ops.optimal_scales(W, H, None, 4)
    torch.library.opcheck(ops.quantize_rtn.default, (W, s, 4))
    torch.library.opcheck(ops.quantize_rtn.default, (W, torch.rand(4, 2) + 0.1, 4, 4, True))
    lin = W.double() @ H.double()
    torch.library.opcheck(ops._piso_sweep.default, (W, lin, H, -8, 7, 1e-9, "sequential"))
    torch.library.opcheck(ops._piso_sweep.default, (W, lin, H, -8, 7, 1e-9, "event_parallel"))


def _bad_optimal_scales_cases():
    W = torch.randn(4, 8)
    H = torch.eye(8)
    nanW = W.clone()
    nanW[0, 0] = float("nan")
    infH = H.clone()
    infH[1, 1] = float("inf")
    nanG = H.clone()
    nanG[0, 3] = float("nan")
    return [
        ("W", (torch.randn(8), H, None, 4)),
        ("W", (torch.randn(2, 4, 8), None, None, 4)),
        ("W", (torch.randint(0, 3, (4, 8)), None, None, 4)),
        ("W", (torch.empty(0, 8), None, None, 4)),
        ("W", (nanW, None, None, 4)),
        ("H", (W, torch.eye(7), None, 4)),
        ("H", (W, torch.ones(8, 8, 8), None, 4)),
        ("H", (W, torch.ones(8, dtype=torch.bfloat16), None, 4)),
        ("H", (W, infH, None, 4)),
        ("G", (W, H, torch.ones(8), 4)),
        ("G", (W, H, torch.ones(8, 7), 4)),
        ("G", (W, H, nanG, 4)),
        ("G", (W, H, torch.ones(8, 8, dtype=torch.int32), 4)),
        ("bits", (W, H, None, 1)),
        ("bits", (W, H, None, 9)),
        ("group_size", (W, H, None, 4, 3)),
        ("group_size", (W, H, None, 4, 0)),
        ("group_size", (W, H, None, 4, -2)),
        ("eps", (W, H, None, 4, -1, False, -1.0)),
    ]


@pytest.mark.parametrize("name,args", _bad_optimal_scales_cases())
def test_optimal_scales_rejects_bad_input_naming_the_argument(name, args):
    with pytest.raises(RuntimeError, match=name):
        ops.optimal_scales(*args)


def test_piso_sweep_and_quantize_rtn_reject_bad_input():
    W = torch.randn(4, 8)
    lin = torch.randn(4, 8, dtype=f64)
    with pytest.raises(RuntimeError, match="lin"):
        ops._piso_sweep(W, lin[:, :7], None, -8, 7)
    with pytest.raises(RuntimeError, match="algorithm"):
        ops._piso_sweep(W, lin, None, -8, 7, 1e-9, "fast")
    with pytest.raises(RuntimeError, match="qmin"):
        ops._piso_sweep(W, lin, None, 0, 7)
    with pytest.raises(RuntimeError, match="H"):
        ops._piso_sweep(W, lin, torch.eye(5), -8, 7)
    with pytest.raises(RuntimeError, match="W"):
        ops.quantize_rtn(torch.randn(8), torch.ones(8), 4)
    with pytest.raises(RuntimeError, match="bits"):
        ops.quantize_rtn(W, torch.ones(4), 10)
    with pytest.raises(RuntimeError, match="group_size"):
        ops.quantize_rtn(W, torch.ones(4, 3), 4, 3)


def test_devices_must_match():
    """Mixed devices are rejected (here CPU with meta, which reaches the fake kernel; the CUDA kernel
    check is covered by test_cuda_optimal_scales_and_quantize_rtn_equal_cpu)."""
    W = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="device"):
        ops.optimal_scales(W, torch.eye(8, device="meta"), None, 4)
    with pytest.raises(RuntimeError, match="device"):
        ops.quantize_rtn(W, torch.ones(4, device="meta"), 4)


# ------------------------------------------------------------------------------------------------
# CUDA == CPU
# ------------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("hkind", ["identity", "diag", "dense"])
def test_cuda_event_parallel_equals_cpu_sequential(hkind):
    gen = torch.Generator().manual_seed(16)
    for trial in range(8):
        bits = [2, 3, 4, 8][trial % 4]
        qmin, qmax = ref.int_grid(bits)
        D = [5, 33, 64, 130][trial % 4]
        dtype = f64 if trial % 2 else torch.float32
        W = make_W(["gauss", "ties", "bf16"][trial % 3], 9, D, gen, dtype)
        W[0] = 0
        H = H_variant(hkind, D, gen)
        lin = torch.randn(9, D, dtype=f64, generator=gen)
        s1, o1 = ops._piso_sweep(W, lin, H, qmin, qmax, 1e-9, "sequential")
        s2, o2 = ops._piso_sweep(W.cuda(), lin.cuda(), None if H is None else H.cuda(), qmin, qmax)
        torch.testing.assert_close(o2.cpu(), o1, rtol=1e-9, atol=1e-12)
        e2 = ref.objective_lin(W, lin, s2.cpu(), H, qmin, qmax)
        torch.testing.assert_close(e2, o1, rtol=1e-9, atol=1e-12)


@requires_cuda
def test_cuda_optimal_scales_and_quantize_rtn_equal_cpu():
    gen = torch.Generator().manual_seed(17)
    W = torch.randn(16, 64, generator=gen)
    H = spd(64, gen).float()
    for gs, seq in [(-1, False), (16, False), (16, True)]:
        s_cpu = ops.optimal_scales(W, H, None, 3, gs, seq)
        s_gpu = ops.optimal_scales(W.cuda(), H.cuda(), None, 3, gs, seq)
        if gs == -1:
            torch.testing.assert_close(ref.objective(W, s_gpu.cpu(), H, None, 3),
                                       ref.objective(W, s_cpu, H, None, 3), rtol=1e-6, atol=1e-8)
        else:
            torch.testing.assert_close(ref.full_objective(W, s_gpu.cpu(), H, None, 3, gs),
                                       ref.full_objective(W, s_cpu, H, None, 3, gs), rtol=1e-6, atol=1e-8)
        codes_c, what_c = ops.quantize_rtn(W, s_cpu, 3, gs)
        codes_g, what_g = ops.quantize_rtn(W.cuda(), s_cpu.cuda(), 3, gs)
        assert torch.equal(codes_c, codes_g.cpu()) and torch.equal(what_c, what_g.cpu())
    with pytest.raises(RuntimeError, match="device"):
        ops.optimal_scales(W.cuda(), H, None, 3)


@pytest.mark.parametrize("seed", range(4))
def test_prefix_table_and_per_event_sweeps_agree_on_random_rows(seed):
    """Random widths 1..200, every bit width 2..8, both grid kinds, and four kinds of weights
    (Gaussian, a coarse grid with many exact ties, bfloat16 values, ratios of small integers whose
    keys tie across levels), float32-valued or float64 H, lin = H w or unrelated: the prefix-sum,
    table and per-event sweeps reach the same objective."""
    gen = torch.Generator().manual_seed(100 + seed)
    for trial in range(40):
        bits = 2 + trial % 7
        qmin, qmax = ref.int_grid(bits, trial % 3 == 1)
        D = int(torch.randint(1, 200, (1,), generator=gen))
        kind = trial % 4
        if kind == 0:
            W = torch.randn(5, D, generator=gen, dtype=f64)
        elif kind == 1:
            W = torch.randint(-3, 4, (5, D), generator=gen).to(f64) * 0.25
        elif kind == 2:
            W = torch.randn(5, D, generator=gen).to(torch.bfloat16).to(f64)
        else:
            W = torch.randint(-40, 41, (5, D), generator=gen).to(f64) / 7
        X = torch.randn(D + 3, D, generator=gen, dtype=f64)
        H = X.T @ X
        if trial % 5 == 0:
            H = H.float().to(f64)
        lin = torch.randn(5, D, dtype=f64, generator=gen) if trial % 2 else W @ H
        s1, o1 = three_sweeps(W, lin, H, qmin, qmax)


@pytest.mark.parametrize("h_dtype", [f64, torch.float32])
def test_per_event_sweep_with_a_row_whose_first_H_panels_hold_no_event(h_dtype):
    """The per-event (dense_u) sweep walks H in panels of about 512 KiB of rows (218 rows of a
    float64 H at D = 300, 327 of a float32 H at D = 400); a row whose weights are zero over a whole
    leading panel has no event there, and its later panels must still be applied: the same
    objective as the prefix-sum and table sweeps, and no worse than brute force."""
    gen = torch.Generator().manual_seed(41)
    D = 300 if h_dtype == f64 else 400
    H = spd(D, gen).to(h_dtype)
    for bits in (2, 4):
        qmin, qmax = ref.int_grid(bits)
        W = make_W("gauss", 4, D, gen)
        W[0, : D - 40] = 0  # every panel but the last empty
        W[1, : D // 2 + 100] = 0  # the first panel empty
        W[2, 50:] = 0  # only the first panel holds events
        lin = ref._lin(W, H, None)
        s1, o1 = three_sweeps(W, lin, H, qmin, qmax)
        torch.testing.assert_close(ref.objective_lin(W, lin, s1, H, qmin, qmax), o1, rtol=1e-9,
                                   atol=1e-9)
        e_b, _ = ref.brute_force_lin(W, lin, H, qmin, qmax, n=600)
        assert (o1 <= e_b + tol(e_b)).all()


@pytest.mark.parametrize("h_kind", ["diagonal", "identity"])
def test_piso_s_with_cross_term_runs_sequentially_for_diagonal_and_identity_H(h_kind):
    """With G given, a diagonal (or identity) H no longer decouples the groups ((G w)_k reads every
    group), so sequential=True must be PiSO_S on the full objective: the same scales as the dense
    diagonal matrix, and (on these cases) not the PiSO_I ones."""
    gen = torch.Generator().manual_seed(7)
    N, D, gs, bits = 6, 16, 4, 3
    W = torch.randn(N, D, dtype=f64, generator=gen)
    X = torch.randn(60, D, dtype=f64, generator=gen)
    G = X.T @ (X @ (torch.eye(D, dtype=f64) + 0.5 * torch.randn(D, D, dtype=f64, generator=gen)))
    Hd = (X * X).sum(0) if h_kind == "diagonal" else None
    H_dense = torch.diag(Hd) if h_kind == "diagonal" else torch.eye(D, dtype=f64)
    s_seq = ops.optimal_scales(W, Hd, G, bits, gs, True)
    assert torch.equal(s_seq, ops.optimal_scales(W, H_dense, G, bits, gs, True))
    s_ind = ops.optimal_scales(W, Hd, G, bits, gs, False)
    assert not torch.equal(s_seq, s_ind)
    assert ref.full_objective(W, s_seq, H_dense, G, bits, gs).sum() < \
        ref.full_objective(W, s_ind, H_dense, G, bits, gs).sum()


@pytest.mark.parametrize("k", [-1000, -700, -530, 0, 530, 700, 1000])
@pytest.mark.parametrize("h_kind", ["identity", "diagonal", "dense"])
def test_float64_rows_far_from_one_give_the_scaled_scales(k, h_kind):
    """Scaling a float64 row by 2^k scales its optimal scale by exactly 2^k and keeps its codes, also
    where s^2 q^T H q leaves the float64 range (|w| ~ 1e-300 or 1e300); likewise H by 2^k."""
    gen = torch.Generator().manual_seed(11)
    W = make_W("gauss", 5, 12, gen)
    H = {"identity": None, "diagonal": torch.rand(12, dtype=f64, generator=gen) + 0.1,
         "dense": spd(12, gen)}[h_kind]
    c = 2.0 ** k
    s = ops.optimal_scales(W, H, None, 3)
    Ws = W * (2.0 ** (k // 2)) * (2.0 ** (k - k // 2))  # two steps: 2^k itself may overflow
    assert (Ws != 0).all() and torch.isfinite(Ws).all()
    s_scaled = ops.optimal_scales(Ws, H, None, 3)
    assert torch.equal(ops.quantize_rtn(Ws, s_scaled, 3)[0], ops.quantize_rtn(W, s, 3)[0])
    torch.testing.assert_close(s_scaled / (2.0 ** (k // 2)) / (2.0 ** (k - k // 2)), s,
                               rtol=0, atol=0)
    if H is not None:
        s_h = ops.optimal_scales(W, H * c, None, 3)
        assert torch.equal(s_h, s)


@pytest.mark.parametrize("h_kind", ["identity", "diagonal", "dense"])
@pytest.mark.parametrize("algorithm", ["sequential", "event_parallel"])
def test_sweep_objective_of_float64_rows_far_from_one_is_in_the_callers_units(h_kind, algorithm):
    """_piso_sweep scales float64 rows (and H with lin) far from 1 by powers of two internally; the
    objective it returns must be scaled back: a row scaled by 2^a with H scaled by 2^h (lin by
    2^(a+h)) has E scaled by exactly 2^(2a+h), and it is the objective at the returned scale."""
    gen = torch.Generator().manual_seed(47)
    D = 12
    W = make_W("gauss", 4, D, gen)
    H = {"identity": None, "diagonal": torch.rand(D, dtype=f64, generator=gen) + 0.1,
         "dense": spd(D, gen)}[h_kind]
    lin = ref._lin(W, H, None)
    qmin, qmax = ref.int_grid(3)
    s, obj = ops._piso_sweep(W, lin, H, qmin, qmax, 1e-9, algorithm)
    a = torch.tensor([0, 300, -300, 350], dtype=f64)  # per-row exponents, also mixed in one call
    for h in ([0] if H is None else [0, 270, -290]):
        ra = (2.0 ** a).unsqueeze(1)
        Ws, lins = W * ra, lin * ra * 2.0 ** h
        Hs = None if H is None else H * 2.0 ** h
        s2, obj2 = ops._piso_sweep(Ws, lins, Hs, qmin, qmax, 1e-9, algorithm)
        assert torch.equal(s2, s * 2.0 ** a)
        assert torch.equal(obj2, obj * 2.0 ** (2 * a + h))
        torch.testing.assert_close(ref.objective_lin(Ws, lins, s2, Hs, qmin, qmax), obj2,
                                   rtol=1e-9, atol=0)


def test_quantize_rtn_rejects_a_dequantized_value_that_overflows_float16():
    W = torch.tensor([[-65504.0, 40000.0]], dtype=torch.float16)
    s = ops.optimal_scales(W, None, None, 2)
    assert s.item() * 2 > 65504  # the exact optimum puts -2 s past float16's largest value
    with pytest.raises(RuntimeError, match="W_hat: scale \\* code overflows Half"):
        ops.quantize_rtn(W, s, 2)
    codes, W_hat = ops.quantize_rtn(W.float(), s, 2)  # the advised float32 copy works
    assert torch.isfinite(W_hat).all()


@pytest.mark.parametrize("call, match", [
    (lambda W: ops.optimal_scales(W, None, None, 4, 3), "group_size: 3 does not divide"),
    (lambda W: ops.optimal_scales(W, None, None, 4, 0), "group_size: expected -1"),
    (lambda W: ops.optimal_scales(W, None, None, 1), "bits: expected an integer in \\[2, 8\\]"),
    (lambda W: ops.optimal_scales(W, torch.ones(7, device="meta"), None, 4), "H: expected shape"),
    (lambda W: ops.optimal_scales(W, None, torch.ones(8, 7, device="meta"), 4), "G: expected shape"),
    (lambda W: ops.quantize_rtn(W, torch.ones(3, device="meta"), 4), "scales: expected shape"),
    (lambda W: ops.quantize_rtn(W, torch.ones(4, 2, device="meta"), 4, 2),
     "scales: expected shape \\[4, 4\\]"),
    (lambda W: ops.gptq(W, torch.ones(8, 8, device="meta"), 4, 3), "group_size: 3 does not divide"),
    (lambda W: ops.gptq(W, torch.ones(8, 8, device="meta"), 4, -1, None, "bogus"), "scales_update"),
    (lambda W: ops.gptq(W, torch.ones(8, device="meta"), 4), "H: expected shape \\[8, 8\\]"),
    (lambda W: ops.qronos(W, torch.ones(8, 8, device="meta"), torch.ones(8, 8, device="meta"), 4,
                          -1, None, "none", True, 0), "block_size"),
])
def test_fake_kernels_check_arguments_like_the_kernels(call, match):
    """On meta tensors (the fake kernels, as under torch.compile) a bad call raises the kernels'
    message instead of returning a shape."""
    with pytest.raises(RuntimeError, match=match):
        call(torch.empty(4, 8, device="meta"))


# ------------------------------------------------------------------------------------------------
# Inputs that require grad: the ops are not differentiable (statistics, integer codes, piecewise
# constant scales), so they run below autograd -- no error, no graph, same values.
# ------------------------------------------------------------------------------------------------
def test_inputs_that_require_grad_give_the_same_values_and_no_graph():
    gen = torch.Generator().manual_seed(21)
    D = 16
    x = torch.randn(3, 5, D, generator=gen)
    xg = x.clone().requires_grad_()
    H0, G0 = torch.zeros(D, D), torch.zeros(D, D)
    ops.hessian_accumulate_(H0, x)
    ops.cross_accumulate_(G0, x, 2 * x)
    H1, G1 = torch.zeros(D, D), torch.zeros(D, D)
    v = H1._version
    ops.hessian_accumulate_(H1, xg)  # was: mm(): functions with out=... arguments don't support ...
    ops.cross_accumulate_(G1, xg, 2 * xg)  # was: G silently joined xg's graph (and kept it alive)
    assert H1._version > v
    assert torch.equal(H1, H0) and torch.equal(G1, G0)
    assert not H1.requires_grad and not G1.requires_grad and G1.grad_fn is None

    W = torch.randn(4, D, generator=gen)
    H = (H0 / 15 + 0.1 * torch.eye(D)).contiguous()
    calls = [
        lambda W, H: (ops.optimal_scales(W, H, None, 4),),
        lambda W, H: (ops.optimal_scales(W, H, H, 3, 4, True),),
        lambda W, H: ops.quantize_rtn(W, W.detach().abs().amax(1) / 7, 4),
        lambda W, H: ops.quantize_rtn(W.detach(), (W.abs().amax(1) / 7), 4),
        lambda W, H: ops._piso_sweep(W, W @ H, H, -8, 7),
        lambda W, H: ops.gptq(W, H, 4, 4, None, "group"),
        lambda W, H: ops.qronos(W, H, H, 4, -1, W.detach().abs().amax(1) / 8 + 0.01, "layer"),
    ]
    for call in calls:
        want = call(W, H)
        got = call(W.clone().requires_grad_(), H.clone().requires_grad_())
        for a, b in zip(got, want):
            assert not a.requires_grad and a.grad_fn is None
            assert torch.equal(a, b)
    # A written argument that requires grad, or an inference tensor outside InferenceMode, is
    # refused before anything is written, as ATen's in-place ops do.
    Hg = torch.zeros(D, D, requires_grad=True)
    with pytest.raises(RuntimeError, match="H requires grad, but the op writes it in place"):
        ops.hessian_accumulate_(Hg, x)
    with pytest.raises(RuntimeError, match="G requires grad"):
        ops.cross_accumulate_(torch.zeros(D, D, requires_grad=True), x, x)
    with pytest.raises(RuntimeError, match="stats requires grad"):
        ops.gptq(W, H, 4, -1, None, "none", True, 16, 0.01, False,
                 torch.zeros(4, dtype=torch.float64, requires_grad=True))
    assert torch.equal(Hg.detach(), torch.zeros(D, D))
    with torch.inference_mode():
        Hi = torch.zeros(D, D)
        ops.hessian_accumulate_(Hi, x)  # inside InferenceMode: fine
    Hi_before = Hi.clone()
    with pytest.raises(RuntimeError, match="inference tensor"):
        ops.hessian_accumulate_(Hi, x)
    assert torch.equal(Hi, Hi_before)
    # opcheck's autograd-registration test runs on inputs that require grad.
    torch.library.opcheck(ops.gptq.default, (W.clone().requires_grad_(), H, 4))
    torch.library.opcheck(ops.hessian_accumulate_.default, (torch.zeros(D, D), xg))


def test_brute_force_breakpoints_are_every_rounding_boundary_of_each_weight():
    """The reference brute force's candidates: |w_i|/(k+½) for k = 0 .. L-1, L = qmax for w_i > 0,
    -qmin for w_i < 0, none for 0 -- the scales at which some code of the row changes under RTN."""
    for bits, narrow in ((3, False), (4, True), (2, False)):
        qmin, qmax = ref.int_grid(bits, narrow)
        w = torch.tensor([0.7, -1.3, 0.0, 2.0], dtype=f64)
        bp = ref.breakpoints(w, qmin, qmax)
        want = [abs(x) / (k + 0.5) for x, L in ((0.7, qmax), (-1.3, -qmin), (2.0, qmax))
                for k in range(L)]
        torch.testing.assert_close(bp.sort().values, torch.tensor(sorted(want), dtype=f64))
        # at each breakpoint, codes change: just above and just below give different RTN codes
        for b in bp.tolist():
            lo = torch.clamp(torch.round(w / (b * (1 - 1e-9))), qmin, qmax)
            hi = torch.clamp(torch.round(w / (b * (1 + 1e-9))), qmin, qmax)
            assert not torch.equal(lo, hi), b
