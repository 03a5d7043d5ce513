"""Time torch.ops.piso.hessian_accumulate_ against the plain PyTorch accumulation H.addmm_(xᵀ, x).

Baselines: float32 x -> ``H.addmm_(x.T, x)``; bfloat16 x -> ``H.addmm_(x.T.float(), x.float())`` (what a
hook without the op would write; a bf16 addmm would round H to bf16). The op does the same math on the
block-upper triangle only (about half the flops) and converts bf16 chunks itself (CPU) or feeds them
to cuBLAS natively (CUDA). Prints machine, command, date, the best-of-N time of each (runs interleaved) and the ratio.

    python benchmarks/bench_hessian.py                      # 16384 tokens x 2048 features
    python benchmarks/bench_hessian.py --tokens 4096 --dim 1024 --repeat 3
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import torch_piso  # noqa: F401  (registers torch.ops.piso)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_pair(fa, fb, device, repeat):
    """Best-of-`repeat` seconds of fa and fb, run alternately so that load from other processes on
    a shared machine hits both alike (the minimum is the least disturbed run)."""
    fa(), fb()  # warm-up (allocator, BLAS handles, thread pools)
    _sync(device)
    ta, tb = [], []
    for _ in range(repeat):
        for fn, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
    return min(ta), min(tb)


def _machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--devices", default="auto", help="comma list of cpu,cuda (auto: cpu and cuda if present)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args(argv)

    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and torch_piso.has_cuda_kernels() else [])
    else:
        devices = args.devices.split(",")
    print(f"command : {' '.join([sys.executable] + sys.argv)}")
    print(f"date    : {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print(f"torch   : {torch.__version__}")
    print(f"shape   : x [{args.tokens}, {args.dim}] -> H [{args.dim}, {args.dim}] float32, best of {args.repeat} interleaved runs")
    header = f"{'device':<7} {'x dtype':<9} {'addmm (s)':>10} {'piso (s)':>10} {'speed-up':>9}  machine"
    print(header)
    print("-" * len(header))
    for dev in devices:
        device = torch.device(dev)
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            x = torch.randn(args.tokens, args.dim, device=device).to(dtype)
            H_ref = torch.zeros(args.dim, args.dim, device=device)
            H_op = torch.zeros_like(H_ref)
            if dtype == torch.float32:
                base = lambda: H_ref.addmm_(x.T, x)  # noqa: E731
            else:
                base = lambda: H_ref.addmm_(x.T.float(), x.float())  # noqa: E731
            op = lambda: torch.ops.piso.hessian_accumulate_(H_op, x)  # noqa: E731
            t_base, t_op = _time_pair(base, op, device, args.repeat)
            # Same number of calls on both: the two accumulators must agree (a check, not a timing).
            err = ((H_op - H_ref).abs().max() / H_ref.abs().max()).item()
            assert err < 1e-4, f"op and baseline disagree: relative error {err:.2e}"
            print(f"{dev:<7} {name:<9} {t_base:>10.4f} {t_op:>10.4f} {t_base / t_op:>8.2f}x  {_machine(device)}")


if __name__ == "__main__":
    main()
