"""Layer-objective quality of scale choices and error-correction recipes on real linears.

On the linears of the offline model (SmolLM2-135M-Instruct, Llama architecture) with Hessians from
real text, each method's layer objective  sum_rows (w - w_hat)^T H (w - w_hat)  (H = X^T X / T from
the float model's inputs of that linear) is computed and reported as a ratio to a baseline:

  --part scales : absmax, MSE grid search (100 shrink factors, weight space), data-free PiSO, PiSO;
                  per channel; ratio to absmax  (issue: exact PiSO scale search)
  --part ec     : GPTQ / Qronos x absmax / PiSO (+ decoupled, ⊙* layer-interleaved, ⊙† group-
                  interleaved PiSO_I and PiSO_S); per channel and group 32; ratio to GPTQ + absmax
                  (issue: GPTQ and Qronos with PiSO interleaved)

Layer-level evaluation uses the float inputs (X~ = X), so Qronos sees G = H here.
The weights of SmolLM2's GGUF already lie on a 4-bit asymmetric group-32 grid; symmetric per-channel
and 2/3-bit settings do not coincide with it.

  .venv/bin/python benchmarks/bench_layer_quality.py --part scales --text ../shared/data/wikitext-2/valid.txt
  .venv/bin/python benchmarks/bench_layer_quality.py --part ec --text ../shared/data/wikitext-2/valid.txt
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from collections import defaultdict

import torch

import torch_piso
from torch_piso.data import calibration_windows, load_text, tokenize
from torch_piso.load import load_model
from torch_piso.models import decoder_layers

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def collect_hessians(model, tok, text, blocks, n_samples, seqlen, seed):
    """H = X^T X / T (float64) for every linear of the chosen blocks, from one float forward."""
    ids = tokenize(tok, text, max_chars=400_000)
    calib = calibration_windows(ids, n_samples, seqlen, seed=seed, bos_token_id=tok.bos_token_id)
    layers = decoder_layers(model)
    mods = {f"{b}.{n}": layers[b].get_submodule(n) for b in blocks for n in LINEARS}
    H = {k: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for k, m in mods.items()}
    seen = {}
    handles = []
    for k, m in mods.items():
        def hook(mod, inp, k=k):
            x = inp[0].detach()
            # q/k/v (and gate/up) read one tensor: accumulate it once, share the result.
            # (`seen` keeps x alive, so its storage cannot be reused by a later input.)
            key = (x.data_ptr(), tuple(x.shape))
            if key in seen:
                H[k] = H[seen[key][0]]
            else:
                seen[key] = (k, x)
                torch.ops.piso.hessian_accumulate_(H[k], x)
        handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for i in range(0, calib.shape[0], 4):
            seen.clear()
            model(calib[i:i + 4])
    for h in handles:
        h.remove()
    T = calib.numel()
    return {k: (mods[k].weight.detach().double(), H[k] / T) for k in mods}


def layer_loss(W, W_hat, H):
    E = (W - W_hat.double())
    return float(torch.einsum("nd,de,ne->", E, H, E))


def absmax_scales(W, bits, group_size=-1):
    Wg = W if group_size == -1 else W.reshape(W.shape[0], -1, group_size)
    s = Wg.abs().amax(dim=-1) / 2 ** (bits - 1)
    return torch.where(s > 0, s, torch.ones_like(s)).float()


def mse_grid_scales(W, bits, n=100):
    """The usual heuristic: shrink factors p = 1/n .. 1 of the absmax scale, per-row weight MSE."""
    base = absmax_scales(W, bits).double()
    best_e = torch.full_like(base, math.inf)
    best_s = base.clone()
    qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    for i in range(1, n + 1):
        s = base * (i / n)
        q = torch.clamp(torch.round(W / s[:, None]), qmin, qmax)
        e = ((W - s[:, None] * q) ** 2).sum(1)
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_s = torch.where(better, s, best_s)
    return best_s.float()


def rtn_loss(W, H, scales, bits, group_size=-1):
    _, W_hat = torch_piso.quantize_rtn(W.float(), scales, bits, group_size)
    return layer_loss(W, W_hat, H)


def part_scales(layers, bits_list):
    rows = ["absmax", "MSE grid (100)", "data-free PiSO", "PiSO"]
    tot = {(r, b): 0.0 for r in rows for b in bits_list}
    per_layer_ratio = defaultdict(list)
    t_piso = 0.0
    for name, (W, H) in layers.items():
        Wf = W.float()
        Hf = H.float()
        for b in bits_list:
            t0 = time.perf_counter()
            s_piso = torch_piso.optimal_scales(Wf, Hf, None, b)
            t_piso += time.perf_counter() - t0
            losses = {
                "absmax": rtn_loss(W, H, absmax_scales(W, b), b),
                "MSE grid (100)": rtn_loss(W, H, mse_grid_scales(W, b), b),
                "data-free PiSO": rtn_loss(W, H, torch_piso.optimal_scales(Wf, None, None, b), b),
                "PiSO": rtn_loss(W, H, s_piso, b),
            }
            for r in rows:
                tot[(r, b)] += losses[r]
                per_layer_ratio[(r, b)].append(losses[r] / losses["absmax"])
    print(f"\nRTN layer objective, per channel, ratio to absmax (sum over {len(layers)} linears; "
          "geometric mean of per-layer ratios in brackets). Lower is better.")
    print(f"| scales | " + " | ".join(f"{b}-bit" for b in bits_list) + " |")
    print("|---|" + "---|" * len(bits_list))
    for r in rows:
        cells = []
        for b in bits_list:
            gm = math.exp(sum(math.log(x) for x in per_layer_ratio[(r, b)]) / len(per_layer_ratio[(r, b)]))
            cells.append(f"{tot[(r, b)] / tot[('absmax', b)]:.3f} ({gm:.3f})")
        print(f"| {r} | " + " | ".join(cells) + " |")
    print(f"(dense PiSO solve time, all layers and bit widths: {t_piso:.1f} s)")


def part_ec(layers, bits_list, group_sizes):
    def recipes(gs):
        r = [
            ("GPTQ + absmax", "gptq", None, "none"),
            ("GPTQ + PiSO", "gptq", "piso", "none"),
            ("GPTQ ⊙* PiSO", "gptq", None, "layer"),
            ("Qronos + absmax", "qronos", None, "none"),
            ("Qronos + PiSO", "qronos", "piso", "none"),
            ("Qronos ⊙* PiSO", "qronos", None, "layer"),
        ]
        if gs != -1:
            r += [
                ("GPTQ ⊙† PiSO_I", "gptq", None, "group"),
                ("GPTQ ⊙† PiSO_S", "gptq", None, "group_sequential"),
                ("GPTQ ⊙† data-free", "gptq", None, "group_data_free"),
                ("Qronos ⊙† PiSO_I", "qronos", None, "group"),
                ("Qronos ⊙† PiSO_S", "qronos", None, "group_sequential"),
            ]
        return r

    for gs in group_sizes:
        names = [r[0] for r in recipes(gs)]
        tot = {(n, b): 0.0 for n in names for b in bits_list}
        times = defaultdict(float)
        for lname, (W, H) in layers.items():
            Wf, Hf = W.float(), H.float()
            for b in bits_list:
                for name, ec, pre, upd in recipes(gs):
                    t0 = time.perf_counter()
                    scales = torch_piso.optimal_scales(Wf, Hf, None, b, gs) if pre == "piso" else None
                    if ec == "gptq":
                        _, _, W_hat = torch.ops.piso.gptq(Wf, Hf, b, gs, scales, upd)
                    else:
                        _, _, W_hat = torch.ops.piso.qronos(Wf, Hf, Hf, b, gs, scales, upd)
                    times[name] += time.perf_counter() - t0
                    tot[(name, b)] += layer_loss(W, W_hat, H)
        label = "per channel" if gs == -1 else f"group {gs}"
        print(f"\nLayer objective ({label}), ratio to GPTQ + absmax (sum over {len(layers)} linears). "
              "Lower is better.")
        print("| recipe | " + " | ".join(f"{b}-bit" for b in bits_list) + " | time (s) |")
        print("|---|" + "---|" * (len(bits_list) + 1))
        for n in names:
            cells = [f"{tot[(n, b)] / tot[('GPTQ + absmax', b)]:.3f}" for b in bits_list]
            print(f"| {n} | " + " | ".join(cells) + f" | {times[n]:.1f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["scales", "ec", "all"], default="all")
    ap.add_argument("--model", default=None, help="local HF dir, .gguf file (default: offline SmolLM2)")
    ap.add_argument("--text", default=None, help="text file (default: the offline default text)")
    ap.add_argument("--blocks", default="0,10,20,29", help="decoder blocks whose 7 linears are used")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--group-sizes", default="-1,32", help="for --part ec")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("# command: " + " ".join(["python"] + sys.argv))
    model, tok = load_model(args.model)
    text = load_text(args.text)
    blocks = [int(b) for b in args.blocks.split(",")]
    t0 = time.perf_counter()
    layers = collect_hessians(model, tok, text, blocks, args.n_samples, args.seqlen, args.seed)
    print(f"# Hessians of {len(layers)} linears from {args.n_samples} x {args.seqlen} tokens "
          f"({time.perf_counter() - t0:.1f} s)")
    bits = [int(b) for b in args.bits.split(",")]
    if args.part in ("scales", "all"):
        part_scales(layers, bits)
    if args.part in ("ec", "all"):
        part_ec(layers, bits, [int(g) for g in args.group_sizes.split(",")])


if __name__ == "__main__":
    main()
