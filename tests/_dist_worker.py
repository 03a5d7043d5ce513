"""One rank of the distributed tests (launched by tests/test_distributed.py with RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set, as torchrun would). For each recipe: quantize a tiny random model
with quantize_model_distributed and, on rank 0, save every QuantLinear's codes and scales plus the
report to OUT/<arch>-<recipe>.safetensors / .json."""
import argparse
import json
import os
import sys
import time

import torch

torch.set_num_threads(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="llama", help="archs separated by ;")
    ap.add_argument("--recipes", default="rtn-absmax", help="per arch (;), recipes separated by ,")
    ap.add_argument("--out", required=True)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hessian-dtype", default="float32")
    ap.add_argument("--set", action="append", default=[], help="QuantConfig field=value (JSON value)")
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=16)
    ap.add_argument("--subgroup", default=None,
                    help="global ranks (comma-separated) that quantize in a subgroup; the rest wait")
    a = ap.parse_args()

    from safetensors.torch import save_file

    from torch_piso.config import QuantConfig
    from torch_piso.distributed import DistributedQuantizationError, init_distributed, \
        quantize_model_distributed
    from torch_piso.models import tiny_model
    from torch_piso.nn import QuantLinear

    ctx = init_distributed(a.backend, timeout_s=a.timeout)
    rank = ctx.rank
    ctx.close()
    group = None
    if a.subgroup is not None:
        import torch.distributed as dist

        members = [int(r) for r in a.subgroup.split(",")]
        group = dist.new_group(members)  # every rank takes part in creating it
        if rank not in members:
            from torch_piso.distributed import finish_distributed

            finish_distributed()
            return
        rank = dist.get_rank(group)  # rank 0 of the subgroup writes the results
    if a.checkpoint is not None:
        a.checkpoint = a.checkpoint.replace("{rank}", str(rank))
    dev = "cuda" if a.backend == "nccl" else "cpu"
    try:
        jobs = [(arch, r) for arch, rs in zip(a.arch.split(";"), a.recipes.split(";"))
                for r in rs.split(",")]
        for arch, recipe in jobs:
            kw = {}
            if a.hidden != 64:
                kw = dict(hidden_size=a.hidden, intermediate_size=2 * a.hidden)
            model = tiny_model(arch, seed=0, num_hidden_layers=a.layers, num_key_value_heads=a.kv_heads, **kw)
            g = torch.Generator().manual_seed(1)
            calib = torch.randint(0, model.config.vocab_size, (a.samples, a.seqlen), generator=g)
            cfg = QuantConfig.recipe(recipe, bits=3, group_size=16 if "†" in recipe or "_s" in recipe
                                     else -1, device=dev,
                                     hessian_dtype=a.hessian_dtype,
                                     **{k: json.loads(v) for k, v in (x.split("=", 1) for x in a.set)})
            t0 = time.perf_counter()
            model, report = quantize_model_distributed(model, calib, cfg, checkpoint_dir=a.checkpoint,
                                                       group=group, timeout_s=a.timeout,
                                                       progress=False, log=None)
            wall = time.perf_counter() - t0
            if rank == 0:
                t = {}
                for n, m in model.named_modules():
                    if isinstance(m, QuantLinear):
                        t[f"{n}.codes"] = m.codes().cpu().contiguous()
                        t[f"{n}.scales"] = m.scales.cpu().contiguous()
                base = os.path.join(a.out, f"{arch}-{recipe}")
                save_file(t, base + ".safetensors")
                report["wall_s"] = wall
                with open(base + ".json", "w") as f:
                    json.dump(report, f, default=str)
    except DistributedQuantizationError as exc:
        print(f"RANK{rank} DistributedQuantizationError: {exc}", file=sys.stderr, flush=True)
        os._exit(3)
    from torch_piso.distributed import finish_distributed
    finish_distributed()


if __name__ == "__main__":
    main()
