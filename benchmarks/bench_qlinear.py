"""dequant_matmul vs a dense matmul (same dtype) for one square layer, on CPU or CUDA.

    python benchmarks/bench_qlinear.py [--dim 2048] [--tokens 1 512] [--bits 4 3] [--group-size 128]
    python benchmarks/bench_qlinear.py --device cuda --dtype bfloat16 --dim 4096 --tokens 1 16 512

Reports the median time of each and the ratio (quantized / dense; < 1 means the packed layer is
faster), plus the weight memory of both. Keep runs short: the numbers are for the README.

--layers L (default 1) builds L layers of that shape and each timed call runs the next one in
turn, as decoding a model does: with L = 1 both weights stay in cache between calls; with enough
layers the dense weights no longer fit (L x 16 MB at 2048 x 2048 float32) and the time includes
reading them from memory, while the packed ones (about 1/7 of that at 4 bits) may still fit.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
import time

from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
import torch_piso  # noqa: E402,F401
from torch_piso.reference.qlinear import absmax_scales, quantize_rtn_reference  # noqa: E402


def median_time(fn, min_time=0.5, max_reps=200, cuda=False):
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()  # warm-up (thread pools, first-touch of the scratch, kernel load)
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_time or len(times) < 5):
        if cuda:  # device events around the call (the work is asynchronous)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
            continue
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=128, help="-1 for per channel")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--layers", type=int, default=1, help="distinct layers cycled through, see above")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", help="activation/dense dtype: float32, bfloat16, float16")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    D = N = args.dim
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    cuda = dev.type == "cuda"
    if cuda:
        cpu = torch.cuda.get_device_name(dev)
    print(f"machine : {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"command : python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"date    : {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"layer   : {N} x {D}, group_size {args.group_size}, x {args.dtype} on {dev}, "
          f"{args.layers} distinct layer(s) cycled")
    print()
    print(f"{'bits':>4} {'tokens':>6} {'dense ms':>9} {'quant ms':>9} {'ratio':>6} "
          f"{'dense MB':>9} {'quant MB':>9}")

    torch.manual_seed(0)
    Ws = [torch.randn(N, D) / D**0.5 for _ in range(args.layers)]
    gs = args.group_size
    for bits in args.bits:
        layers = []
        for W in Ws:
            s = absmax_scales(W, bits, gs).float()
            codes = quantize_rtn_reference(W, s, bits, gs)
            layers.append((torch.ops.piso.pack(codes, bits).to(dev), s.to(dev),
                           W.to(device=dev, dtype=dt)))
        packed, s_d, W_d = layers[0]
        for M in args.tokens:
            x = torch.randn(M, D).to(device=dev, dtype=dt)
            turn = [0]

            def dense():
                W_l = layers[turn[0] % len(layers)][2]
                turn[0] += 1
                return torch.mm(x, W_l.t())

            def quant():
                p_l, s_l, _ = layers[turn[0] % len(layers)]
                turn[0] += 1
                return torch.ops.piso.dequant_matmul(x, p_l, s_l, bits, gs, D)

            t_dense = median_time(dense, cuda=cuda)
            t_q = median_time(quant, cuda=cuda)
            print(f"{bits:>4} {M:>6} {t_dense * 1e3:>9.3f} {t_q * 1e3:>9.3f} {t_q / t_dense:>6.2f} "
                  f"{W_d.numel() * W_d.element_size() / 2**20:>9.2f} "
                  f"{(packed.numel() * 4 + s_d.numel() * 4) / 2**20:>9.2f}")


if __name__ == "__main__":
    main()
