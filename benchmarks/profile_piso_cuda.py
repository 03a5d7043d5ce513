"""Where the time of dense PiSO on CUDA goes: torch.profiler over optimal_scales on an N x D layer
(kernels and ATen ops of the event-parallel sweep), printed as a table sorted by CUDA time.

    python benchmarks/profile_piso_cuda.py [--size 4096] [--bits 4]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import torch_piso  # noqa: F401

ap = argparse.ArgumentParser()
ap.add_argument("--size", type=int, default=4096)
ap.add_argument("--bits", type=int, default=4)
args = ap.parse_args()
g = torch.Generator().manual_seed(0)
D = args.size
W = (torch.randn(D, D, generator=g) * 0.02).cuda()
X = torch.randn(2 * D, D, generator=g).cuda()
H = (X.T @ X / X.shape[0]).contiguous()
torch.ops.piso.optimal_scales(W[:64], H, None, args.bits)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    torch.ops.piso.optimal_scales(W, H, None, args.bits)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
