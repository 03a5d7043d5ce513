"""The paper's channel-wise table on any local Llama / Qwen checkpoint: 11 rows
(absmax / data-free / PiSO scales x RTN / GPTQ / Qronos, PiSO decoupled "+" or interleaved "⊙"),
perplexity on held-out text (calibration from the first half of the text, evaluation on the rest).

  python examples/channelwise_table.py --model /path/to/Qwen2.5-0.5B --text wiki.valid.txt --bits 3
  python examples/channelwise_table.py            # offline SmolLM2-135M + World English Bible

Each row quantizes a fresh copy of the float model. Add --device cuda on a GPU.
"""

import sys

from torch_piso.cli import PAPER_CHANNELWISE, paper_table_main


def main(argv=None):
    return paper_table_main(argv, description=__doc__, default_rows=PAPER_CHANNELWISE,
                            default_group_size=-1)


if __name__ == "__main__":
    sys.exit(main())
