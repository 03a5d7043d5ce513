"""Best-of-3 time of dense optimal_scales on R rows of a D-wide layer (float32 W and H): a small
probe for comparing two builds side by side, e.g. the current one and an older commit built in a
worktree (run this file with PYTHONPATH pointing at each checkout in turn). With GROUP_SIZE, the
group-wise PiSO_I of the layer (every row cut into D / GROUP_SIZE independent problems).

    python benchmarks/piso_rows_timing.py D R BITS [GROUP_SIZE]
"""
import torch, time, sys, torch_piso
g=torch.Generator().manual_seed(0)
D=int(sys.argv[1]); R=int(sys.argv[2]); bits=int(sys.argv[3])
gs=int(sys.argv[4]) if len(sys.argv) > 4 else -1
W=torch.randn(R,D,generator=g)*0.02
X=torch.randn(2*D,D,generator=g); H=(X.T@X/X.shape[0]).contiguous()
torch.ops.piso.optimal_scales(W[:8], H, None, bits, gs)
best=1e9
for _ in range(3):
    t=time.perf_counter(); torch.ops.piso.optimal_scales(W, H, None, bits, gs); best=min(best,time.perf_counter()-t)
tag = f" group_size={gs}" if gs != -1 else ""
print(f"{torch_piso.__file__.split('/')[2]} D={D} R={R} bits={bits}{tag}: {best:.3f} s")
