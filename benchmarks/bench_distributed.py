"""Distributed quantization: wall time with 1 and 2 torchrun processes (gloo, CPU) on a small random
Llama, the per-rank memory and time model, and the model checked against the two runs.

    PYTHONPATH=. python benchmarks/bench_distributed.py            # launches torchrun 1 and 2 ranks
    PYTHONPATH=. python benchmarks/bench_distributed.py --recipe qronos*piso --layers 4 --hidden 256

Per-rank model (docs/DISTRIBUTED.md has the derivation and the 8B / 70B figures), with R ranks,
T calibration tokens, h hidden, i intermediate, P_b parameters of one block, b bits, B bytes per
activation element, s streams (2 for float_stream="model", else 1):

  memory per rank = one block's weights (P_b·B, twice with a float copy for the cross objective)
                  + the largest group's Hessians (fp32 D² each: H, plus G and the float-pass XᵀX for
                    the cross objective; D = i for down_proj)
                  + the activation shard (T/R)·h·B·s·2 (inputs and outputs of the block)
  time            = forwards ~ 2·T·P_b·(2·(1 + cross) + 1)/R  (data parallel; plus Hessian accumulation
                    ~ 2·T·D² per distinct input, also /R)
                  + Σ over groups of the slowest rank's modules (module parallel, LPT on
                    PiSO ~ N·D²·2^(b−1), GPTQ ~ D³ + N·D², Qronos ~ 2D³ + N·D²)
                  + communication: the all-reduce of each group's Hessians and the broadcast of codes
                    and scales (2·(R−1)/R · bytes / bandwidth; loopback here, NVLink / IB there).

The check: the 1-process run gives the forward part (wall − Σ module quantization times) and each
module's quantization time; the model predicts the 2-process wall from them (forward part / 2 +
per-group LPT makespan of the measured module times) and the script prints predicted vs measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# the analytic model (pure)
# ------------------------------------------------------------------------------------------------
LLAMA = {
    "Llama-3.1-8B": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128),
    "Llama-3.1-70B": dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, head_dim=128),
}


def block_shapes(hidden, intermediate, heads, kv_heads, head_dim):
    """[(name, N, D)] of one Llama block's linears and the groups sharing an input."""
    q, kv = heads * head_dim, kv_heads * head_dim
    mods = [("q_proj", q, hidden), ("k_proj", kv, hidden), ("v_proj", kv, hidden),
            ("o_proj", hidden, q), ("gate_proj", intermediate, hidden), ("up_proj", intermediate, hidden),
            ("down_proj", hidden, intermediate)]
    groups = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    return mods, groups


def memory_model(arch: dict, tokens: int, ranks: int, weight_bytes=2, act_bytes=2, cross=True,
                 streams=1) -> dict:
    mods, groups = block_shapes(arch["hidden"], arch["intermediate"], arch["heads"], arch["kv_heads"],
                                arch["head_dim"])
    params = sum(n * d for _, n, d in mods)
    weights = params * weight_bytes * (2 if cross else 1)
    dmax = max(d for _, _, d in mods)
    hess = dmax * dmax * 4 * (3 if cross else 1)
    act = -(-tokens // ranks) * arch["hidden"] * act_bytes * streams * 2
    return {"block_params": params, "weights": weights, "hessians": hess, "activations": act,
            "total": weights + hess + act}


def flop_model(arch: dict, tokens: int, ranks: int, bits: int, ec: str = "gptq", cross=False) -> dict:
    """Flops per block per rank: data-parallel forwards + Hessians, module-parallel quantization."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_d", ROOT / "torch_piso" / "distributed.py")
    assign = None
    try:
        d = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(d)
        assign = d.assign_modules
    except Exception:  # pragma: no cover - keep the model importable without torch
        pass
    mods, groups = block_shapes(arch["hidden"], arch["intermediate"], arch["heads"], arch["kv_heads"],
                                arch["head_dim"])
    params = sum(n * d for _, n, d in mods)
    t = tokens / ranks
    # collection: partial forwards up to each group (~2 block forwards per token; the float pass of
    # the cross objective repeats them) + 1 propagation forward
    fwd = 2 * t * params * (2 * (2 if cross else 1) + 1)
    ins = {}
    for g in groups:
        ins[g[0]] = dict((m, d) for m, _, d in mods)[g[0]]
    hess = sum(2 * t * d * d * (2 if cross else 1) for d in ins.values())
    q = 2 ** (bits - 1)

    def cost(n, d):
        c = n * d * d * q  # PiSO
        if ec == "gptq":
            c += d ** 3 + n * d * d
        elif ec == "qronos":
            c += 2 * d ** 3 + n * d * d
        return c

    shape = {m: (n, d) for m, n, d in mods}
    quant_total = sum(cost(n, d) for _, n, d in mods)
    makespan = 0.0
    for g in groups:
        costs = {m: cost(*shape[m]) for m in g}
        if assign is None or ranks == 1:
            makespan += sum(costs.values())
        else:
            a = assign(costs, ranks)
            makespan += max(sum(c for m, c in costs.items() if a[m] == r) for r in range(ranks))
    return {"forward": fwd, "hessian": hess, "quant_total": quant_total, "quant_makespan": makespan}


def fmt_bytes(n):
    for u in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or u == "TiB":
            return f"{n:.1f} {u}"
        n /= 1024


# ------------------------------------------------------------------------------------------------
# worker (one torchrun rank)
# ------------------------------------------------------------------------------------------------
def worker(a):
    import torch

    torch.set_num_threads(1)
    from torch_piso.config import QuantConfig
    from torch_piso.distributed import (finish_distributed, init_distributed,
                                        quantize_model_distributed)
    from torch_piso.models import tiny_model

    ctx = init_distributed("gloo", timeout_s=300)
    rank, world = ctx.rank, ctx.world_size
    ctx.close()
    model = tiny_model("llama", seed=0, num_hidden_layers=a.layers, hidden_size=a.hidden,
                       intermediate_size=a.intermediate, num_attention_heads=a.heads,
                       num_key_value_heads=a.heads, vocab_size=512)
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 512, (a.samples, a.seqlen), generator=g)
    cfg = QuantConfig.recipe(a.recipe, bits=a.bits, device="cpu")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    model, report = quantize_model_distributed(model, calib, cfg, progress=False, log=None)
    wall = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss = [None] * world
    dist.all_gather_object(rss, (rss0, rss1))
    coll = [None] * world
    dist.all_gather_object(coll, report["distributed"]["collective_s"])
    if rank == 0:
        out = {"world": world, "wall_s": wall, "rss": rss, "collective_s": coll,
               "modules": [{k: r[k] for k in ("block", "module", "shape", "scale_time_s", "ec_time_s")}
                           | {"rank": r.get("rank", 0)} for r in report["rows"]],
               "result_sha256": report["distributed"]["result_sha256"]}
        Path(a.out).write_text(json.dumps(out))
        from safetensors.torch import save_file

        from torch_piso.nn import QuantLinear

        save_file({n: m.codes().contiguous() for n, m in model.named_modules()
                   if isinstance(m, QuantLinear)}, a.out + ".safetensors")
    finish_distributed()


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(nproc, a, out):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, "--worker",
           "--out", out] + [f"--{k}={v}" for k, v in
                            dict(recipe=a.recipe, bits=a.bits, layers=a.layers, hidden=a.hidden,
                                 intermediate=a.intermediate, heads=a.heads, samples=a.samples,
                                 seqlen=a.seqlen).items()]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    total = time.perf_counter() - t0
    res = json.loads(Path(out).read_text())
    from safetensors.torch import load_file

    res["codes"] = load_file(out + ".safetensors")
    res["torchrun_total_s"] = total
    return res


def predict_from_one(one: dict, ranks: int, cost_cfg) -> dict:
    """2-process wall predicted from the 1-process run (see the module docstring)."""
    from torch_piso.distributed import assign_modules, module_cost

    mods = one["modules"]
    qtime = {(m["block"], m["module"]): m["scale_time_s"] + m["ec_time_s"] for m in mods}
    quant1 = sum(qtime.values())
    other1 = one["wall_s"] - quant1
    # groups: modules of a block sharing an input, as the pipeline forms them (by suffix)
    groups = {}
    for m in mods:
        suffix = m["module"].rsplit(".", 1)[-1]
        key = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}.get(
            suffix, suffix)
        groups.setdefault((m["block"], key), []).append(m)
    makespan = 0.0
    for g in groups.values():
        costs = {x["module"]: module_cost(x["shape"][0], x["shape"][1], cost_cfg) for x in g}
        owner = assign_modules(costs, ranks)
        makespan += max(sum(qtime[(x["block"], x["module"])] for x in g if owner[x["module"]] == r)
                        for r in range(ranks))
    return {"forward_etc_1": other1, "quant_1": quant1, "quant_makespan": makespan,
            "predicted_wall": other1 / ranks + makespan}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--recipe", default="gptq*piso")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    a = ap.parse_args()
    if a.worker:
        return worker(a)

    import torch

    from torch_piso.config import QuantConfig

    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = None
    print(f"bench_distributed: {time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.node()}, "
          f"{os.cpu_count()} CPUs, load average {load}, torch {torch.__version__}, gloo on loopback")
    print(f"model: random Llama, {a.layers} layers, hidden {a.hidden}, intermediate {a.intermediate}, "
          f"{a.heads} heads; calibration {a.samples} x {a.seqlen} tokens; recipe {a.recipe}, W{a.bits}")
    res = {}
    with tempfile.TemporaryDirectory() as td:
        for n in (1, 2):
            res[n] = run_torchrun(n, a, os.path.join(td, f"r{n}.json"))
    diff = sum(int((res[1]["codes"][k] != res[2]["codes"][k]).sum()) for k in res[1]["codes"])
    total = sum(v.numel() for v in res[1]["codes"].values())
    cfg = QuantConfig.recipe(a.recipe, bits=a.bits)
    pred = predict_from_one(res[1], 2, cfg)
    print()
    print("| processes | quantize wall (s) | in collectives per rank (s) | torchrun total (s) | "
          "per-rank peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for n in (1, 2):
        r = res[n]
        rss = ", ".join(f"{x[1] / 2**20:.0f}" for x in r["rss"])
        coll = ", ".join(f"{c:.2f}" for c in r["collective_s"])
        print(f"| {n} | {r['wall_s']:.2f} | {coll} | {r['torchrun_total_s']:.1f} | {rss} |")
    print(f"\ncodes differing between the 1- and 2-process results: {diff} / {total} = {diff / total:.2e} "
          "(float32 H summed in another order)")
    print(f"\n1-process split: forwards/Hessians/other {pred['forward_etc_1']:.2f} s + module "
          f"quantization {pred['quant_1']:.2f} s")
    print(f"model for 2 processes: {pred['forward_etc_1']:.2f}/2 + LPT makespan {pred['quant_makespan']:.2f}"
          f" = {pred['predicted_wall']:.2f} s predicted; measured {res[2]['wall_s']:.2f} s "
          f"(ratio measured/predicted {res[2]['wall_s'] / pred['predicted_wall']:.2f}; the machine has "
          f"{os.cpu_count()} cores shared with other jobs)")
    arch = dict(hidden=a.hidden, intermediate=a.intermediate, heads=a.heads, kv_heads=a.heads,
                head_dim=a.hidden // a.heads)
    cross = cfg.error_correction == "qronos" or cfg.resolved_objective == "cross" and \
        cfg.error_correction == "none"
    print("\nper-rank working set (model) for this run:")
    for n in (1, 2):
        m = memory_model(arch, a.samples * a.seqlen, n, weight_bytes=4, act_bytes=4, cross=True)
        grow = max(x[1] - x[0] for x in res[n]["rss"])
        print(f"  {n} rank(s): block {fmt_bytes(m['weights'])} + Hessians {fmt_bytes(m['hessians'])} + "
              f"activations {fmt_bytes(m['activations'])} = {fmt_bytes(m['total'])}; measured RSS growth "
              f"during quantization (max over ranks) {fmt_bytes(grow)}")
    print("\nLarge models: bf16 weights and activations, fp32 Hessians, 128 x 2048 = 262144 calibration "
          "tokens, W4; forward TFLOP per rank for the whole model, quantization TFLOP per block as the "
          "slowest rank's share (LPT). Times assume a sustained 300 TFLOP/s bf16 forward and 30 TFLOP/s "
          "fp32 quantization kernels per GPU (assumptions, not measurements).")
    for ec, cross, label in (("gptq", False, "GPTQ ⊙ PiSO (self objective: H only)"),
                             ("qronos", True, "Qronos ⊙ PiSO (cross: float block copy, H, G, XᵀX)")):
        print(f"\n{label}")
        print("| model | ranks | block weights | Hessians | activation shard | total per rank | "
              "forward TFLOP | quant TFLOP/block | est. time |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, arch in LLAMA.items():
            for r in (1, 2, 8):
                m = memory_model(arch, 128 * 2048, r, cross=cross)
                f = flop_model(arch, 128 * 2048, r, bits=4, ec=ec, cross=cross)
                fw = (f["forward"] + f["hessian"]) * arch["layers"]
                qt = f["quant_makespan"] * arch["layers"]
                est = fw / 300e12 + qt / 30e12
                print(f"| {name} | {r} | {fmt_bytes(m['weights'])} | {fmt_bytes(m['hessians'])} | "
                      f"{fmt_bytes(m['activations'])} | {fmt_bytes(m['total'])} | {fw / 1e12:.0f} | "
                      f"{f['quant_makespan'] / 1e12:.1f} | {est / 60:.1f} min |")

if __name__ == "__main__":
    main()
