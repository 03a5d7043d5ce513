"""Issue 5 evidence: end-to-end perplexity of the paper's channel-wise rows (11 recipes) at several
bit widths, on the offline SmolLM2-135M (or --model), with wall time and peak memory per run.

Calibration windows come from the first part of the text (--calib-fraction), perplexity from the
rest (non-overlapping windows of --seqlen, first --eval-tokens tokens). Each recipe quantizes a deep
copy of the float model. Peak RSS is the process's peak so far (ru_maxrss: monotone, so a row shows
the largest footprint of any run up to it); peak CUDA memory is reset per run.

  python benchmarks/bench_pipeline.py --text ../shared/data/wikitext-2/valid.txt --bits 2 3 4
  python benchmarks/bench_pipeline.py --rows rtn-absmax,rtn-piso --bits 3 --eval-tokens 8192
  python benchmarks/bench_pipeline.py --rows 'gptq-absmax,gptq*piso' --bits 3 --repeats 4 \
      --samples 16 --seqlen 2048 --eval-tokens 2048 --eval-seqlen 2048   # interleaving overhead, end to end

Prints a markdown table with machine, date and command, and appends one JSON line per invocation to
outputs/bench_pipeline.jsonl.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from torch_piso.cli import PAPER_CHANNELWISE, _machine, _json_default, run_recipes
from torch_piso.data import load_text, tokenize
from torch_piso.load import load_model


def _fmt(x, spec=".1f"):
    return "" if x is None else format(x, spec)


def _ops_s(r):
    """Seconds of a row's quantize time spent inside the ops (scale search + EC), or None."""
    if r.get("scale_s") is None or r.get("ec_s") is None:
        return None
    return r["scale_s"] + r["ec_s"]


def median_summary(results, recipes) -> str:
    """Per bit width and recipe: median quantize time over the repeats, its ratio to the median of
    the first recipe (the baseline), and the same for the seconds spent inside the ops."""
    lines = ["| bits | recipe | runs | median quantize s | ratio to first row | median in ops s | "
             "in-ops seconds added to the first row's quantize s |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for bits in sorted({r["bits"] for r in results if r["bits"] is not None}):
        med = {}
        for name in recipes:
            runs = [r for r in results if r["bits"] == bits and r["recipe"] == name
                    and r.get("quantize_s") is not None]
            if not runs:
                continue
            q = statistics.median(r["quantize_s"] for r in runs)
            ops_runs = [o for o in map(_ops_s, runs) if o is not None]
            o = statistics.median(ops_runs) if ops_runs else None
            med[name] = (len(runs), q, o)
        if recipes[0] not in med:
            continue
        _, q0, o0 = med[recipes[0]]
        for name, (n, q, o) in med.items():
            extra = "" if o is None or o0 is None else f"{(q0 + o - o0) / q0:.3f}"
            lines.append(f"| {bits} | {name} | {n} | {q:.1f} | {q / q0:.3f} | {_fmt(o)} | {extra} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--text", default=None, help="text file (default: the offline World English Bible)")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--group-size", type=int, default=-1)
    ap.add_argument("--rows", default=",".join(PAPER_CHANNELWISE))
    # defaults = the demo's (2-core CPU budget); the paper uses 128 x 2048 and all of WikiText-2
    ap.add_argument("--samples", type=int, default=8, help="calibration sequences")
    ap.add_argument("--seqlen", type=int, default=256, help="calibration sequence length")
    ap.add_argument("--eval-seqlen", type=int, default=512, help="perplexity window")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--calib-fraction", type=float, default=0.5)
    ap.add_argument("--max-chars", type=int, default=2_000_000)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/bench_pipeline.jsonl")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the rows this many times, in reverse order every other time (ABBA...), "
                         "and print each recipe's median quantize time and its ratio to the first row's")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    date = datetime.datetime.now(datetime.timezone.utc)
    cmd = " ".join(["python"] + sys.argv)
    print(f"# {date:%Y-%m-%d %H:%M} UTC; {_machine()}")
    print(f"# command: {cmd}")
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    ids = tokenize(tok, load_text(args.text), max_chars=args.max_chars)
    print(f"# model {args.model or 'default SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)'}, "
          f"text {args.text or 'default (World English Bible)'}: {ids.numel()} tokens "
          f"({time.perf_counter() - t0:.1f} s)")
    results = []
    order = []
    for rep in range(args.repeats):
        order += rows_wanted if rep % 2 == 0 else rows_wanted[::-1]
    for i, bits in enumerate(args.bits):
        rows = run_recipes(model, tok, ids, order, bits=bits, group_size=args.group_size,
                           samples=args.samples, seqlen=args.seqlen, eval_tokens=args.eval_tokens,
                           calib_fraction=args.calib_fraction, device=args.device, seed=args.seed,
                           progress=args.progress, include_float=(i == 0), eval_seqlen=args.eval_seqlen,
                           log=lambda s: print(s, flush=True))
        results += rows
    print()
    print("| bits | recipe | label | perplexity | quantize s | in ops s (scales + EC) | eval s | "
          "peak RSS MiB (process) | peak CUDA MiB |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ppl = "error" if r.get("perplexity") is None else f"{r['perplexity']:.3f}"
        q = _fmt(r.get("quantize_s"))
        cuda = _fmt(r.get("peak_cuda_mib"), ".0f")
        print(f"| {r['bits'] or 'float'} | {r['recipe']} | {r['label']} | {ppl} | {q} | {_fmt(_ops_s(r))} | "
              f"{r.get('eval_s') or 0:.1f} | {r['peak_rss_mib']:.0f} | {cuda} |")
    if args.repeats > 1:
        print()
        print(median_summary(results, rows_wanted))
    total = time.perf_counter() - t0
    print(f"\n# total {total:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rec = {"date": date.isoformat(timespec="seconds"), "machine": _machine(), "command": cmd,
           "args": vars(args), "total_s": total, "rows": results}
    with open(out, "a") as f:
        f.write(json.dumps(rec, default=_json_default) + "\n")
    print(f"# appended to {out}")
    return 0 if all(r.get("perplexity") is not None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
