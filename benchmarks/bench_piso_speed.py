"""Speed of dense PiSO (torch.ops.piso.optimal_scales with a dense H) against one float32 GEMM of
the same shape ([N, D] @ [D, D], N*D^2 multiply-adds).

PiSO's dense sweep does about 2^(b-1) * N * D^2 additions (one row of H per breakpoint event), so
the table also gives the achieved fraction of GEMM throughput under that count:
    fraction = (2^(b-1) N D^2 / t_piso) / (N D^2 / t_gemm) = 2^(b-1) t_gemm / t_piso.

Large layers are slow on small CPUs: `--rows-large R` times the first R and the first 2R rows of
layers with D >= 2048 and extrapolates to all N rows as t(R) + (N - R) (t(2R) - t(R)) / R, so the
per-call work that does not grow with the rows (symmetrizing H, widening it to float64) is counted
once; the output marks such rows. The GEMM is warmed up and timed alternately with PiSO (the best
of GEMM_TRIES GEMMs after each PiSO try), so both figures come from the same minutes of a machine
whose speed drifts. The CUDA path (event-parallel) is
timed when a GPU and a CUDA build exist, otherwise skipped with a message.

    python benchmarks/bench_piso_speed.py                       # 1024 and 4096, bits 2 3 4
    python benchmarks/bench_piso_speed.py --sizes 1024 --bits 4
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch

import torch_piso  # noqa: F401


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


GEMM_TRIES = 5  # GEMMs timed after each PiSO try (cheap next to PiSO)


def timeit(fn, repeats: int, sync=None) -> float:
    best = float("inf")
    for _ in range(repeats):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t)
    return best


def timeit_with_gemm(fn, gemm, repeats: int, sync=None) -> tuple[float, float]:
    """Best-of times of `fn` and of the GEMM yardstick, taken alternately (each PiSO try followed by
    GEMM_TRIES GEMMs), so that both see the same machine: on a shared VM the speed drifts over tens
    of seconds, and a GEMM timed once per layer, cold, read up to 1.7x slow and flattered PiSO."""
    for _ in range(3):  # the GEMM's first calls start the thread pool and fault in the output
        gemm()
    t_fn = t_gemm = float("inf")
    for _ in range(repeats):
        t_fn = min(t_fn, timeit(fn, 1, sync))
        t_gemm = min(t_gemm, timeit(gemm, GEMM_TRIES, sync))
    return t_fn, t_gemm


def make_layer(N: int, D: int, device: str, gen: torch.Generator):
    """Weights and a realistic H: correlated inputs X [2D, D], H = X^T X / T (float32)."""
    W = torch.randn(N, D, generator=gen) * 0.02
    mix = torch.eye(D) + 0.3 * torch.randn(D, D, generator=gen) / D ** 0.5
    X = torch.randn(2 * D, D, generator=gen) @ mix
    H = X.T @ X / X.shape[0]
    return W.to(device), H.contiguous().to(device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096], help="square layer sizes N = D")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--rows-large", type=int, default=256,
                    help="rows timed (and twice as many) for D >= 2048 on CPU, extrapolated to N")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-cuda", action="store_true")
    ap.add_argument("--devices", default="auto", help="cpu, cuda, cpu,cuda or auto (cpu + cuda if present)")
    args = ap.parse_args()

    print(f"machine : {platform.node()} | {cpu_name()} | {os.cpu_count()} logical CPUs | "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"command : {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"date    : {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}")
    if hasattr(os, "getloadavg"):  # shared machines: other jobs slow both PiSO and the GEMM
        print(f"load    : {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15-min load average)")
    print("workload: optimal_scales(W [N, D] float32, H [D, D] float32 dense, G=None, bits), per channel")
    print()

    devices = ["cpu"]
    if not args.no_cuda:
        if torch.cuda.is_available() and torch_piso.has_cuda_kernels():
            devices.append("cuda")
        else:
            print("cuda    : skipped (no CUDA GPU visible or no CUDA kernels in this build)\n")
    if args.devices != "auto":
        devices = args.devices.split(",")
    if "cuda" in devices:
        print(f"gpu     : {torch.cuda.get_device_name()}")

    hdr = (f"{'device':<6} {'N=D':>6} {'bits':>4} {'rows timed':>10} {'PiSO s':>10} {'GEMM s':>9} "
           f"{'PiSO/GEMM':>10} {'frac. of GEMM thr.':>19}")
    print(hdr)
    print("-" * len(hdr))
    gen = torch.Generator().manual_seed(0)
    for device in devices:
        sync = torch.cuda.synchronize if device == "cuda" else None
        for D in args.sizes:
            N = D
            W, H = make_layer(N, D, device, gen)
            A = torch.randn(N, D, device=device)

            def gemm(A=A, H=H):
                return torch.matmul(A, H)

            rows = N if (device == "cuda" or D < 2048) else min(N, args.rows_large)
            Wr = W[:rows].contiguous()
            reps = args.repeats if rows == N and D < 2048 else 2  # best of 2 for the row pairs
            for bits in args.bits:
                torch.ops.piso.optimal_scales(Wr[: min(rows, 4)], H, None, bits)  # warm-up
                t, t_gemm = timeit_with_gemm(
                    lambda: torch.ops.piso.optimal_scales(Wr, H, None, bits), gemm, reps, sync)
                t_full = t
                if rows < N:
                    W2 = W[: min(N, 2 * rows)].contiguous()
                    t2, t_gemm2 = timeit_with_gemm(
                        lambda: torch.ops.piso.optimal_scales(W2, H, None, bits), gemm, reps, sync)
                    t_gemm = min(t_gemm, t_gemm2)
                    per_row = max(t2 - t, 0.0) / (W2.shape[0] - rows)
                    t_full = t + (N - rows) * per_row
                ratio = t_full / t_gemm
                frac = 2 ** (bits - 1) * t_gemm / t_full
                mark = "" if rows == N else f" (extrapolated from {rows} and {2 * rows} rows)"
                print(f"{device:<6} {D:>6} {bits:>4} {rows:>10} {t_full:>10.3f} {t_gemm:>9.4f} "
                      f"{ratio:>9.1f}x {frac:>18.1%}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
