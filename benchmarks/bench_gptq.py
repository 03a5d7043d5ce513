"""GPTQ speed: torch.ops.piso.gptq against the textbook PyTorch GPTQ (IST-DASLab style, lazy
blocks, float32: torch_piso.reference.gptq.gptq_speed_reference) on the same inputs, plus the
overhead of PiSO interleaving (scales_update="layer" and "group") over plain GPTQ ("none").

    python benchmarks/bench_gptq.py                     # 4096x4096 and 4096x11008, CPU (+GPU)
    python benchmarks/bench_gptq.py --sizes 2048x2048 --group-size 128

Layers are N x D (out x in). H = B Bᵀ/r + diag(d) (correlated features, well conditioned).
One timed run per entry after a small warm-up: keep it short on shared machines.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import torch_piso  # noqa: F401
from torch_piso.reference.gptq import gptq_speed_reference


def make_layer(N, D, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = 256
    B = torch.randn(D, r, generator=g) * torch.linspace(0.2, 2.0, D)[:, None]
    H = B @ B.T / r + torch.diag(0.1 + torch.rand(D, generator=g))
    W = torch.randn(N, D, generator=g) * 0.02
    return W.to(device), H.to(device)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4096x4096,4096x11008", help="NxD list, comma separated")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128, help="for the interleaving overheads")
    ap.add_argument("--devices", default="auto", help="cpu, cuda or auto (cpu + cuda if present)")
    ap.add_argument("--no-reference", action="store_true", help="skip the textbook baseline")
    ap.add_argument("--no-overhead", action="store_true", help="skip layer/group overheads")
    args = ap.parse_args()

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and torch_piso.has_cuda_kernels()
                         else [])
    if args.devices != "auto":
        devices = args.devices.split(",")
    print(f"# torch_piso GPTQ benchmark  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"load average {os.getloadavg()[0]:.1f}"
          + (f", GPU {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    print(f"# bits={args.bits}, float32, act_order, block_size=128; overheads with "
          f"group_size={args.group_size}")
    hdr = ("device", "N x D", "ours [s]", "textbook [s]", "speed-up", "same codes",
           "none g [s]", "layer/none", "group/none", "PiSO_I alone [s]")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for dev_name in devices:
        dev = torch.device(dev_name)
        for size in args.sizes.split(","):
            N, D = (int(x) for x in size.lower().split("x"))
            W, H = make_layer(N, D, dev)
            small_W, small_H = make_layer(64, 256, dev, seed=1)
            torch.ops.piso.gptq(small_W, small_H, args.bits)  # warm-up (threads, kernels)
            t_ours, (codes, _, _) = timed(lambda: torch.ops.piso.gptq(W, H, args.bits), dev)
            row = [dev_name, f"{N} x {D}", f"{t_ours:.2f}"]
            if args.no_reference:
                row += ["-", "-", "-"]
            else:
                t_ref, (rcodes, _) = timed(lambda: gptq_speed_reference(W, H, args.bits), dev)
                same = (rcodes.cpu() == codes.cpu()).float().mean().item()
                row += [f"{t_ref:.2f}", f"{t_ref / t_ours:.2f}x", f"{100 * same:.1f}%"]
            if args.no_overhead:
                row += ["-", "-", "-", "-"]
            else:
                gs = args.group_size
                t_none, _ = timed(lambda: torch.ops.piso.gptq(W, H, args.bits, gs, None, "none"), dev)
                t_layer, _ = timed(lambda: torch.ops.piso.gptq(W, H, args.bits, gs, None, "layer"), dev)
                t_group, _ = timed(lambda: torch.ops.piso.gptq(W, H, args.bits, gs, None, "group"), dev)
                # The dense PiSO_I solve the interleaved modes add (what "+" would run before GPTQ).
                t_piso, _ = timed(lambda: torch.ops.piso.optimal_scales(W, H, None, args.bits, gs), dev)
                row += [f"{t_none:.2f}", f"{t_layer / t_none:.2f}x", f"{t_group / t_none:.2f}x",
                        f"{t_piso:.2f}"]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
