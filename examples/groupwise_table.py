"""The paper's group-wise table on any local Llama / Qwen checkpoint: absmax / data-free / PiSO_I /
PiSO_S scales with RTN, GPTQ and Qronos, PiSO decoupled (+), once per layer (⊙*) or per group just
before the group's first column (⊙†). Calibration from the first half of the text, perplexity on the
rest.

  python examples/groupwise_table.py --model /path/to/Llama-3.2-1B --text wiki.valid.txt --bits 3 --group-size 128
  python examples/groupwise_table.py --bits 4 --group-size 32 --samples 16 --seqlen 512 --eval-tokens 16384
"""
import argparse
import sys

from torch_piso.cli import PAPER_GROUPWISE, _fmt_table, run_recipes
from torch_piso.data import load_text, tokenize
from torch_piso.load import load_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: offline SmolLM2)")
    ap.add_argument("--text", default=None, help="text file (default: offline World English Bible)")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=32, help="must divide every in_features")
    ap.add_argument("--rows", default=",".join(PAPER_GROUPWISE))
    ap.add_argument("--samples", type=int, default=128, help="paper: 128 x 2048")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--eval-seqlen", type=int, default=None, help="perplexity window (default: --seqlen)")
    ap.add_argument("--eval-tokens", type=int, default=0, help="0: all of the held-out part")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    if args.group_size < 1:
        ap.error("--group-size must be positive for the group-wise table")
    model, tok = load_model(args.model)
    ids = tokenize(tok, load_text(args.text))
    # the recipes' own group_size (32 for the † / _s rows) is overridden by --group-size
    rows = run_recipes(model, tok, ids, args.rows.split(","), bits=args.bits,
                       group_size=args.group_size, samples=args.samples, seqlen=args.seqlen,
                       eval_tokens=args.eval_tokens or None, device=args.device,
                       eval_seqlen=args.eval_seqlen)
    print(_fmt_table(rows))


if __name__ == "__main__":
    sys.exit(main())
