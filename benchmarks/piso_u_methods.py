"""Per-row time of the CPU sweep's ways to the u values (prefix_u adding H's rows one or eight at
a time, dense_u = per-event updates, table_u), forced through torch.ops.piso._piso_sweep, on R
random rows of a D-wide layer with a dense float32 H: the measurements behind choose_u_method and
prefix_batched in csrc/cpu/piso_cpu.cpp.

    python benchmarks/piso_u_methods.py --dims 128 256 --bits 4 6 [--threads 1] [--ways prefix prefix8]

Prints microseconds per row per thread (best of 3) for each way.
"""
import argparse
import time

import torch

import torch_piso  # noqa: F401

WAYS = ("sequential_prefix", "sequential_prefix_batched", "sequential_events", "sequential_table")
LABELS = ("prefix", "prefix8", "events", "table")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4, 6])
    ap.add_argument("--work", type=int, default=131072, help="rows x D per timing")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ways", nargs="+", choices=LABELS, default=list(LABELS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'D':>5} {'bits':>4} " + " ".join(f"{w:>9}" for w in args.ways) + "   us/row/thread")
    for D in args.dims:
        g = torch.Generator().manual_seed(0)
        R = max(8, args.work // D)
        W = torch.randn(R, D, generator=g) * 0.02
        X = torch.randn(2 * D, D, generator=g)
        H = (X.T @ X / X.shape[0]).contiguous()
        lin = W.double() @ H.double()
        for bits in args.bits:
            qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            row = []
            for way in (WAYS[LABELS.index(w)] for w in args.ways):
                torch.ops.piso._piso_sweep(W[:8], lin[:8], H, qmin, qmax, 1e-9, way)
                best = float("inf")
                for _ in range(3):
                    t = time.perf_counter()
                    torch.ops.piso._piso_sweep(W, lin, H, qmin, qmax, 1e-9, way)
                    best = min(best, time.perf_counter() - t)
                row.append(best * 1e6 / R * torch.get_num_threads())
            print(f"{D:>5} {bits:>4} " + " ".join(f"{v:>9.1f}" for v in row))


if __name__ == "__main__":
    main()
