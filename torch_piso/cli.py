"""``python -m torch_piso {quantize,eval,demo}``.

quantize  calibrate on the first part of a text, quantize a model with a recipe or QuantConfig flags,
          save it (``save_quantized``) with the tokenizer and a ``piso_run.json`` (config, timings,
          the pipeline's report, optional perplexity) in ``--out``
eval      perplexity of a float model (``--model``) or a saved quantized one (``--quantized``)
demo      float baseline, then several recipes, each on a fresh copy of the float model: calibration
          from the first part of the text, perplexity on the rest; a table on stdout and as
          JSON + markdown under ``outputs/``
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch

DEMO_RECIPES = ("rtn-absmax", "rtn-piso", "gptq-absmax", "gptq*piso", "qronos*piso")
RUN_JSON = "piso_run.json"
#: The paper's channel-wise rows (11): scales absmax / data-free / PiSO x RTN / GPTQ / Qronos, with
#: PiSO decoupled (+) or interleaved (⊙, once per layer on the EC algorithm's own H).
PAPER_CHANNELWISE = ("rtn-absmax", "rtn-data-free", "rtn-piso",
                     "gptq-absmax", "gptq-data-free", "gptq+piso", "gptq*piso",
                     "qronos-absmax", "qronos-data-free", "qronos+piso", "qronos*piso")
#: The paper's group-wise rows: PiSO_I / PiSO_S, decoupled (+), layer- (⊙*) and group-interleaved (⊙†).
PAPER_GROUPWISE = ("rtn-absmax", "rtn-data-free", "rtn-piso", "rtn-piso_s",
                   "gptq-absmax", "gptq-data-free", "gptq+piso", "gptq+piso_s", "gptq*piso",
                   "gptq*piso_s", "gptq†data-free", "gptq†piso", "gptq†piso_s",
                   "qronos-absmax", "qronos-data-free", "qronos+piso", "qronos+piso_s", "qronos*piso",
                   "qronos*piso_s", "qronos†data-free", "qronos†piso", "qronos†piso_s")


class CliError(Exception):
    """A bad command line found before any work: main prints ``error: <message>`` and returns 2."""


# ---------------------------------------------------------------------------------- helpers
def _check_device(device, what: str) -> None:
    """A device that cannot run (cuda without CUDA) fails here, before a model is loaded."""
    from .pipeline import resolve_device

    if device is None:
        return
    try:
        resolve_device(device, what)
    except RuntimeError as exc:
        raise CliError(str(exc)) from None


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB; ru_maxrss is KiB on Linux)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def _cuda_peak_mib(device) -> Optional[float]:
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def _reset_cuda_peak(device) -> None:
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    s = f"{platform.system()} {cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        s += f", {torch.cuda.get_device_name(0)}"
    return s


def _json_default(o):
    if isinstance(o, torch.dtype):
        return str(o).removeprefix("torch.")
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
    os.replace(tmp, path)


def _config_overrides(args) -> dict:
    """QuantConfig fields given explicitly on the command line."""
    table = {"bits": "bits", "group_size": "group_size", "scales": "scales", "ec": "error_correction",
             "interleave": "interleave", "group_variant": "group_variant", "objective": "objective",
             "act_order": "act_order", "damp": "damp", "qronos_alpha": "qronos_alpha",
             "samples": "n_samples", "seqlen": "seqlen",
             "seed": "seed", "device": "device"}
    out = {}
    for a, field in table.items():
        v = getattr(args, a, None)
        if v is not None:
            out[field] = v
    return out


def _check_ec_flags(args, cfg) -> None:
    """--damp is GPTQ's damping, --qronos-alpha Qronos's ridge: each is refused where the recipe's
    error correction would ignore it."""
    ec = cfg.error_correction
    if getattr(args, "damp", None) is not None and ec != "gptq":
        raise CliError(f"--damp sets GPTQ's damping; this recipe's error correction is {ec!r}"
                       + (" (Qronos damps with --qronos-alpha)" if ec == "qronos" else ""))
    if getattr(args, "qronos_alpha", None) is not None and ec != "qronos":
        raise CliError(f"--qronos-alpha sets Qronos's ridge; this recipe's error correction is {ec!r}"
                       + (" (GPTQ damps with --damp)" if ec == "gptq" else ""))


def build_config(recipe: Optional[str] = None, config_file: Optional[str] = None, **overrides):
    """QuantConfig from a recipe name or a config file (not both), then explicit field overrides."""
    from .config import QuantConfig

    if recipe and config_file:
        raise CliError("give --recipe or --config, not both")
    if config_file:
        try:
            cfg = QuantConfig.from_file(config_file)
        except OSError as exc:  # missing, a directory, unreadable
            raise CliError(f"--config {config_file}: cannot read it ({exc.strerror or exc})") from None
        if overrides:
            d = cfg.to_dict()
            d.update(overrides)
            cfg = QuantConfig.from_dict(d)
        return cfg
    if recipe:
        return QuantConfig.recipe(recipe, **overrides)
    return QuantConfig(**overrides)


def _check_calib_fraction(f: float, zero_ok: bool = False) -> None:
    """--calib-fraction, checked before the model is loaded."""
    if not ((zero_ok and f == 0.0) or 0.0 < f < 1.0):
        raise CliError(f"--calib-fraction: expected a number in {'[0, 1)' if zero_ok else '(0, 1)'}, "
                       f"got {f}")


def _calibration(tok, ids, cfg, calib_fraction):
    from .data import calibration_windows, split_text

    calib_ids, eval_ids = split_text(ids, calib_fraction)
    calib = calibration_windows(calib_ids, cfg.n_samples, cfg.seqlen, seed=cfg.seed,
                                bos_token_id=getattr(tok, "bos_token_id", None))
    return calib, eval_ids


def _load_text_ids(tok, text_spec, max_chars):
    from .data import load_text, tokenize

    text = load_text(text_spec)
    return tokenize(tok, text, max_chars=max_chars)


def _report_summary(model) -> Optional[object]:
    rep = getattr(model, "piso_report", None)
    if rep is None:
        return None
    if hasattr(rep, "to_dict"):
        return rep.to_dict()
    return rep


# ---------------------------------------------------------------------------------- quantize
def cmd_quantize(args) -> int:
    from .data import split_text  # noqa: F401
    from .eval import perplexity
    from .io import check_save_target, save_quantized
    from .load import load_model
    from .pipeline import quantize_model

    cfg = build_config(args.recipe, args.config, **_config_overrides(args))
    # everything that can be refused is refused before the model is loaded and quantized
    _check_device(cfg.device, "--device" if args.device else "QuantConfig.device")
    _check_calib_fraction(args.calib_fraction)
    _check_ec_flags(args, cfg)
    if not args.out and not args.eval_tokens:
        print("# note: no --out and no --eval-tokens: the quantized model is neither saved nor "
              "evaluated, only its report is printed", file=sys.stderr)
    if args.out:
        check_save_target(args.out, "--out")
        if args.checkpoint_dir:
            out, ck = Path(args.out).resolve(), Path(args.checkpoint_dir).resolve()
            if ck == out or out in ck.parents:
                # the save replaces --out as a whole: a checkpoint inside it would block the save
                # (or be deleted by it)
                raise CliError(f"--checkpoint-dir {args.checkpoint_dir} lies inside --out "
                               f"{args.out}; give it a directory outside the output")
    print(f"# config: {cfg.label if hasattr(cfg, 'label') else ''} {cfg.to_dict()}")
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    t_load = time.perf_counter() - t0
    ids = _load_text_ids(tok, args.text, args.max_chars)
    calib, eval_ids = _calibration(tok, ids, cfg, args.calib_fraction)
    if args.eval_tokens:  # found after quantizing, a bad evaluation lost the unsaved model
        eval_seqlen = args.eval_seqlen or cfg.seqlen
        n_eval = min(args.eval_tokens, eval_ids.numel())
        if eval_seqlen < 2 or n_eval < eval_seqlen:
            raise CliError(f"--eval-tokens {args.eval_tokens}: {n_eval} held-out tokens do not fill one "
                           f"perplexity window of {eval_seqlen} (--eval-seqlen, default --seqlen; at "
                           f"least 2); give more tokens or a smaller --eval-seqlen")
    print(f"# model {args.model or 'default'} loaded in {t_load:.1f} s; text: {ids.numel()} tokens, "
          f"calibration {tuple(calib.shape)} from the first {int(ids.numel() * args.calib_fraction)}")
    _reset_cuda_peak(cfg.device)
    t0 = time.perf_counter()
    # under torchrun (WORLD_SIZE > 1) or with --distributed: torch_piso.distributed, rank 0 reports
    distributed = args.distributed or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        from .distributed import finish_distributed, init_distributed, quantize_model_distributed

        ctx = init_distributed(args.backend, timeout_s=args.dist_timeout)
        model, _ = quantize_model_distributed(model, calib, cfg, checkpoint_dir=args.checkpoint_dir,
                                              timeout_s=args.dist_timeout, progress=not args.quiet)
        finish_distributed()  # all ranks together; rank 0 evaluates and saves without the group
        if ctx.rank != 0:
            return 0
    elif args.checkpoint_dir:
        from .pipeline import quantize_model_with_report

        model, _ = quantize_model_with_report(model, calib, cfg, progress=not args.quiet,
                                              checkpoint_dir=args.checkpoint_dir)
    else:
        model = quantize_model(model, calib, cfg, progress=not args.quiet)
    t_quant = time.perf_counter() - t0
    result = {"command": "quantize", "argv": sys.argv, "model": str(args.model or "default"),
              "text": str(args.text or "default"), "config": cfg.to_dict(),
              "label": getattr(cfg, "label", None), "quantize_s": t_quant,
              "peak_rss_mib": peak_rss_mib(), "peak_cuda_mib": _cuda_peak_mib(cfg.device),
              "calibration_shape": list(calib.shape), "machine": _machine(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(f"# quantized in {t_quant:.1f} s, peak RSS {result['peak_rss_mib']:.0f} MiB")
    if args.eval_tokens:
        ev = eval_ids[: args.eval_tokens]
        ppl = perplexity(model, ev, seqlen=args.eval_seqlen or cfg.seqlen, device=cfg.device,
                         progress=not args.quiet)
        result["perplexity"] = ppl
        result["eval_tokens"] = int(ev.numel())
        print(f"perplexity: {ppl:.4f}")
    result["report"] = _report_summary(model)
    if args.out:
        out = Path(args.out)
        model.to("cpu")

        def extras(tmp: Path) -> None:  # written into the save's temporary directory: atomic with it
            if tok is not None:
                tok.save_pretrained(str(tmp))
            _write_json(tmp / RUN_JSON, result)

        save_quantized(model, out, cfg.to_dict(), extra_files=extras)
        print(f"# saved to {out}")
    return 0


# ---------------------------------------------------------------------------------- eval
def load_quantized_with_tokenizer(directory, device="cpu"):
    from transformers import AutoTokenizer

    from .io import QuantizedCheckpointError, load_quantized

    d = Path(directory)
    model = load_quantized(d, None, device=device)
    model.eval()
    try:
        tok = AutoTokenizer.from_pretrained(str(d))
    except Exception as exc:
        raise QuantizedCheckpointError(f"{d}: no usable tokenizer saved beside the model ({exc})") from exc
    return model, tok


def cmd_eval(args) -> int:
    from .data import split_text
    from .eval import perplexity
    from .load import load_model

    if args.quantized and args.model:
        raise CliError("give --model or --quantized, not both")
    _check_calib_fraction(args.calib_fraction, zero_ok=True)
    t0 = time.perf_counter()
    if args.quantized:
        model, tok = load_quantized_with_tokenizer(args.quantized, device=args.device or "cpu")
        what = f"quantized {args.quantized}"
    else:
        model, tok = load_model(args.model)
        what = f"model {args.model or 'default'}"
    ids = _load_text_ids(tok, args.text, args.max_chars)
    if args.calib_fraction > 0:
        _, ids = split_text(ids, args.calib_fraction)
    if args.eval_tokens:
        ids = ids[: args.eval_tokens]
    ppl = perplexity(model, ids, seqlen=args.seqlen, batch_size=args.batch_size,
                     max_windows=args.max_windows, device=args.device, progress=not args.quiet)
    n_win = min(ids.numel() // args.seqlen, args.max_windows or 10**18)
    dt = time.perf_counter() - t0
    print(f"{what}: perplexity {ppl:.4f} over {n_win} windows x {args.seqlen} tokens ({dt:.1f} s)")
    if args.json:
        _write_json(Path(args.json), {"command": "eval", "what": what, "perplexity": ppl,
                                      "windows": n_win, "seqlen": args.seqlen, "seconds": dt,
                                      "argv": sys.argv})
    return 0


# ---------------------------------------------------------------------------------- demo
def _fmt_table(rows) -> str:
    head = "| recipe | label | perplexity | quantize s | eval s | peak RSS MiB | peak CUDA MiB |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        cuda = "" if r.get("peak_cuda_mib") is None else f"{r['peak_cuda_mib']:.0f}"
        q = "" if r.get("quantize_s") is None else f"{r['quantize_s']:.1f}"
        ppl = "error" if r.get("perplexity") is None else f"{r['perplexity']:.3f}"
        lines.append(f"| {r['recipe']} | {r.get('label') or ''} | {ppl} | {q} | {r.get('eval_s', 0):.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {cuda} |")
    return "\n".join(lines)


def run_recipes(model, tok, ids, recipes, *, bits, group_size, samples, seqlen, eval_tokens,
                calib_fraction=0.5, device=None, seed=0, progress=True, extra_overrides=None,
                include_float=True, log=print, verbose=False, eval_seqlen=None):
    """The demo's loop, shared with benchmarks/bench_pipeline.py: float baseline, then each recipe on
    a deep copy of ``model``. Returns a list of row dicts."""
    from .config import QuantConfig
    from .data import calibration_windows, split_text
    from .eval import perplexity
    from .pipeline import quantize_model

    eval_seqlen = eval_seqlen or seqlen
    calib_ids, eval_ids = split_text(ids, calib_fraction)
    eval_ids = eval_ids[:eval_tokens] if eval_tokens else eval_ids
    if eval_ids.numel() < eval_seqlen:
        raise ValueError(f"the evaluation part of the text has {eval_ids.numel()} tokens, fewer than "
                         f"one window of {eval_seqlen}; use a longer text")
    calib = calibration_windows(calib_ids, samples, seqlen, seed=seed,
                                bos_token_id=getattr(tok, "bos_token_id", None))
    n_win = eval_ids.numel() // eval_seqlen
    log(f"# calibration {samples} x {seqlen} tokens from the first {calib_ids.numel()} tokens; "
        f"perplexity on {n_win} x {eval_seqlen} of the remaining {ids.numel() - calib_ids.numel()}")
    rows = []
    if include_float:
        t0 = time.perf_counter()
        _reset_cuda_peak(device)
        ppl = perplexity(model, eval_ids, seqlen=eval_seqlen, device=device, progress=progress)
        model.to("cpu")
        rows.append({"recipe": "float", "label": "float", "bits": None, "group_size": None,
                     "perplexity": ppl, "quantize_s": None, "eval_s": time.perf_counter() - t0,
                     "peak_rss_mib": peak_rss_mib(), "peak_cuda_mib": _cuda_peak_mib(device)})
        log(f"float: perplexity {ppl:.3f}")
    for name in recipes:
        ov = dict(bits=bits, group_size=group_size, n_samples=samples, seqlen=seqlen, seed=seed)
        if device is not None:
            ov["device"] = device
        ov.update(extra_overrides or {})
        cfg = QuantConfig.recipe(name, **ov)
        qmodel = copy.deepcopy(model)
        _reset_cuda_peak(device)
        row = {"recipe": name, "label": getattr(cfg, "label", name), "bits": bits,
               "group_size": group_size, "config": cfg.to_dict()}
        try:
            t0 = time.perf_counter()
            qmodel = quantize_model(qmodel, calib, cfg, progress=progress,
                                    log=print if verbose else None)
            row["quantize_s"] = time.perf_counter() - t0
            tot = (getattr(qmodel, "piso_report", None) or {}).get("totals", {})
            row["layer_loss_absmax_rtn"] = tot.get("loss_before")
            row["layer_loss"] = tot.get("loss_after")
            # seconds inside the ops (scale search; EC, which holds interleaved PiSO) of quantize_s
            row["scale_s"] = tot.get("scale_time_s")
            row["ec_s"] = tot.get("ec_time_s")
            t0 = time.perf_counter()
            row["perplexity"] = perplexity(qmodel, eval_ids, seqlen=eval_seqlen, device=device,
                                           progress=progress)
            row["eval_s"] = time.perf_counter() - t0
        except Exception as exc:  # one failing recipe does not lose the others
            row.update(error=f"{type(exc).__name__}: {exc}", perplexity=None)
            row.setdefault("quantize_s", None)
            log(f"{name}: FAILED: {row['error']}")
        row["peak_rss_mib"] = peak_rss_mib()
        row["peak_cuda_mib"] = _cuda_peak_mib(device)
        if row.get("perplexity") is not None:
            log(f"{name} ({row['label']}): perplexity {row['perplexity']:.3f}, quantize "
                f"{row['quantize_s']:.1f} s")
        rows.append(row)
        del qmodel
        gc.collect()
    return rows


def paper_table_main(argv, *, description: str, default_rows, default_group_size: int,
                     need_groups: bool = False) -> int:
    """The command line of examples/channelwise_table.py and examples/groupwise_table.py: the
    paper's rows on a local Llama / Qwen checkpoint, printed as a perplexity table. The rows' own
    group_size (32 for the † / _s rows) is overridden by --group-size."""
    import argparse

    from .data import load_text, tokenize
    from .load import load_model

    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: offline SmolLM2)")
    ap.add_argument("--text", default=None, help="text file (default: offline World English Bible)")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=default_group_size,
                    help="-1: per channel" if not need_groups else "must divide every in_features")
    ap.add_argument("--rows", default=",".join(default_rows))
    ap.add_argument("--samples", type=int, default=128, help="paper: 128 x 2048")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--eval-seqlen", type=int, default=None, help="perplexity window (default: --seqlen)")
    ap.add_argument("--eval-tokens", type=_non_negative_int, default=0, help="0: all of the held-out part")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    if need_groups and args.group_size < 1:
        ap.error("--group-size must be positive for the group-wise table")
    model, tok = load_model(args.model)
    ids = tokenize(tok, load_text(args.text))
    rows = run_recipes(model, tok, ids, args.rows.split(","), bits=args.bits,
                       group_size=args.group_size, samples=args.samples, seqlen=args.seqlen,
                       eval_tokens=args.eval_tokens or None, device=args.device,
                       eval_seqlen=args.eval_seqlen)
    print(_fmt_table(rows))
    return 0 if all(r.get("perplexity") is not None for r in rows) else 1


def cmd_demo(args) -> int:
    from .load import load_model

    t_start = time.perf_counter()
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    _check_calib_fraction(args.calib_fraction)
    from .config import QuantConfig
    for r in recipes:  # fail fast on a typo or a bad override, before the expensive part
        QuantConfig.recipe(r, bits=args.bits, group_size=args.group_size, n_samples=args.samples,
                           seqlen=args.seqlen, seed=args.seed)
    print(f"# torch_piso demo: {args.bits}-bit, group size {args.group_size}, recipes {', '.join(recipes)}")
    print(f"# {_machine()}")
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    print(f"# model {args.model or 'default (SmolLM2-135M-Instruct Q4_1 GGUF, dequantized)'} "
          f"loaded in {time.perf_counter() - t0:.1f} s")
    ids = _load_text_ids(tok, args.text, args.max_chars)
    rows = run_recipes(model, tok, ids, recipes, bits=args.bits, group_size=args.group_size,
                       samples=args.samples, seqlen=args.seqlen, eval_tokens=args.eval_tokens,
                       calib_fraction=args.calib_fraction, device=args.device, seed=args.seed,
                       progress=not args.quiet, verbose=args.verbose, eval_seqlen=args.eval_seqlen)
    total = time.perf_counter() - t_start
    table = _fmt_table(rows)
    print()
    print(table)
    print(f"\n# total {total:.1f} s")
    stamp = datetime.datetime.now(datetime.timezone.utc)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"demo-{stamp:%Y%m%d-%H%M%S}"
    meta = {"date": stamp.isoformat(timespec="seconds"), "machine": _machine(), "argv": sys.argv,
            "model": str(args.model or "default"), "text": str(args.text or "default"),
            "bits": args.bits, "group_size": args.group_size, "samples": args.samples,
            "seqlen": args.seqlen, "eval_seqlen": args.eval_seqlen, "eval_tokens": args.eval_tokens,
            "total_s": total}
    _write_json(base.with_suffix(".json"), {**meta, "rows": rows})
    md = base.with_suffix(".md")
    tmp = md.with_suffix(".md.tmp")
    with open(tmp, "w") as f:
        f.write(f"# torch_piso demo, {meta['date']}\n\n{meta['machine']}\n\n`{' '.join(sys.argv)}`\n\n")
        f.write(table + f"\n\ntotal {total:.1f} s\n")
    os.replace(tmp, md)
    print(f"# wrote {base}.json and {base}.md")
    return 0 if all(r.get("perplexity") is not None for r in rows) else 1


# ---------------------------------------------------------------------------------- parser
def _non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {v}")
    return v


def _add_common(p, seqlen_default=None):
    p.add_argument("--model", default=None, help="HF directory, .gguf file or hub id "
                   "(default: the offline SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--text", default=None, help="text file, 'wikitext2' (needs datasets + network), "
                   "or default: the offline World English Bible")
    p.add_argument("--max-chars", type=int, default=2_000_000,
                   help="tokenize only this many leading characters of the text (default 2e6)")
    p.add_argument("--calib-fraction", type=float, default=0.5,
                   help="calibration from this leading fraction of the tokens, evaluation on the rest")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the config's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_config_flags(p):
    p.add_argument("--recipe", default=None, help="a named recipe, e.g. rtn-piso, gptq*piso, qronos*piso")
    p.add_argument("--config", default=None, help="QuantConfig JSON/YAML file")
    p.add_argument("--bits", type=int, default=None)
    p.add_argument("--group-size", type=int, default=None, help="-1 = per channel")
    p.add_argument("--scales", choices=("absmax", "data-free", "piso"), default=None)
    p.add_argument("--ec", choices=("none", "gptq", "qronos"), default=None, help="error correction")
    p.add_argument("--interleave", choices=("decoupled", "layer", "group"), default=None)
    p.add_argument("--group-variant", choices=("independent", "sequential"), default=None)
    p.add_argument("--objective", default=None)
    p.add_argument("--act-order", dest="act_order", action="store_true", default=None)
    p.add_argument("--no-act-order", dest="act_order", action="store_false")
    p.add_argument("--damp", type=float, default=None, help="GPTQ: damping, a fraction of mean diag H")
    p.add_argument("--qronos-alpha", type=float, default=None,
                   help="Qronos: ridge, a fraction of the largest eigenvalue of H")
    p.add_argument("--samples", type=int, default=None, help="calibration sequences")
    p.add_argument("--seqlen", type=int, default=None, help="calibration sequence length")
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m torch_piso", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it")
    _add_common(q)
    _add_config_flags(q)
    q.add_argument("--out", default=None, help="directory for the quantized model (+ tokenizer, "
                   f"{RUN_JSON})")
    q.add_argument("--eval-tokens", type=_non_negative_int, default=0,
                   help="also report perplexity on this many held-out tokens (0: no)")
    q.add_argument("--eval-seqlen", type=int, default=None)
    q.add_argument("--checkpoint-dir", default=None,
                   help="save each finished block there; a rerun resumes after the last one")
    q.add_argument("--distributed", action="store_true",
                   help="run on a torch.distributed group (implied under torchrun with WORLD_SIZE > 1)")
    q.add_argument("--backend", default=None, help="gloo or nccl (default: nccl with CUDA, else gloo)")
    q.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a collective may wait for a rank before the job stops")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a float or quantized model")
    _add_common(e)
    e.set_defaults(calib_fraction=0.0)  # eval scores the whole text unless told otherwise:
    # pass --calib-fraction 0.5 to score only the part `quantize` did not calibrate on
    e.add_argument("--quantized", default=None, help="a directory written by quantize --out")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--eval-tokens", type=_non_negative_int, default=0, help="only the first N tokens (0: all)")
    e.add_argument("--json", default=None, help="also write the result to this JSON file")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="float vs. several recipes on held-out text")
    _add_common(d)
    d.add_argument("--bits", type=int, default=3)
    d.add_argument("--group-size", type=int, default=-1)
    d.add_argument("--recipes", default=",".join(DEMO_RECIPES))
    # Defaults sized for a 2-core CPU (the whole demo in ~15 minutes); the paper calibrates on
    # 128 x 2048 tokens and evaluates all of WikiText-2 at 2048: raise these on a GPU.
    d.add_argument("--samples", type=int, default=8, help="calibration sequences")
    d.add_argument("--seqlen", type=int, default=256, help="calibration sequence length")
    d.add_argument("--eval-seqlen", type=int, default=512, help="perplexity window")
    d.add_argument("--eval-tokens", type=_non_negative_int, default=8192, help="held-out tokens scored")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out-dir", default="outputs")
    d.add_argument("--verbose", action="store_true", help="print the per-module table of each recipe")
    d.set_defaults(func=cmd_demo)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .data import TextLoadError
    from .distributed import CheckpointMismatchError
    from .io import QuantizedCheckpointError
    from .load import ModelLoadError

    try:
        _check_device(args.device, "--device")
        return args.func(args)
    except (CliError, ModelLoadError, TextLoadError, QuantizedCheckpointError, FileExistsError,
            CheckpointMismatchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad arguments found late (text too short, group size, recipe ...)
        if os.environ.get("PISO_TRACEBACK"):
            raise
        print(f"error: {exc} (set PISO_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 2
