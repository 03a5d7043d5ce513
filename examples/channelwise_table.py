"""The paper's channel-wise table on any local Llama / Qwen checkpoint: 11 rows
(absmax / data-free / PiSO scales x RTN / GPTQ / Qronos, PiSO decoupled "+" or interleaved "⊙"),
perplexity on held-out text (calibration from the first half of the text, evaluation on the rest).

  python examples/channelwise_table.py --model /path/to/Qwen2.5-0.5B --text wiki.valid.txt --bits 3
  python examples/channelwise_table.py            # offline SmolLM2-135M + World English Bible

Each row quantizes a fresh copy of the float model. Add --device cuda on a GPU.
"""
import argparse
import sys

from torch_piso.cli import PAPER_CHANNELWISE, _fmt_table, run_recipes
from torch_piso.data import load_text, tokenize
from torch_piso.load import load_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: offline SmolLM2)")
    ap.add_argument("--text", default=None, help="text file (default: offline World English Bible)")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=-1, help="-1: per channel (the table's setting)")
    ap.add_argument("--rows", default=",".join(PAPER_CHANNELWISE))
    ap.add_argument("--samples", type=int, default=128, help="paper: 128 x 2048")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--eval-seqlen", type=int, default=None, help="perplexity window (default: --seqlen)")
    ap.add_argument("--eval-tokens", type=int, default=0, help="0: all of the held-out part")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    model, tok = load_model(args.model)
    ids = tokenize(tok, load_text(args.text))
    rows = run_recipes(model, tok, ids, args.rows.split(","), bits=args.bits,
                       group_size=args.group_size, samples=args.samples, seqlen=args.seqlen,
                       eval_tokens=args.eval_tokens or None, device=args.device,
                       eval_seqlen=args.eval_seqlen)
    print(_fmt_table(rows))


if __name__ == "__main__":
    sys.exit(main())
