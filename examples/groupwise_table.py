"""The paper's group-wise table on any local Llama / Qwen checkpoint: absmax / data-free / PiSO_I /
PiSO_S scales with RTN, GPTQ and Qronos, PiSO decoupled (+), once per layer (⊙*) or per group just
before the group's first column (⊙†). Calibration from the first half of the text, perplexity on the
rest.

  python examples/groupwise_table.py --model /path/to/Llama-3.2-1B --text wiki.valid.txt --bits 3 --group-size 128
  python examples/groupwise_table.py --bits 4 --group-size 32 --samples 16 --seqlen 512 --eval-tokens 16384
"""

import sys

from torch_piso.cli import PAPER_GROUPWISE, paper_table_main


def main(argv=None):
    return paper_table_main(argv, description=__doc__, default_rows=PAPER_GROUPWISE,
                            default_group_size=32, need_groups=True)


if __name__ == "__main__":
    sys.exit(main())
