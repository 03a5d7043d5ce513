"""Qronos's ridge on the offline model: qronos-absmax at 3 bits per channel with the default
alpha = 1e-6 (x lambda_max(H)) and a stronger 1e-2, calibration 8 x 256 tokens (the demo's) from
the first half of the default text, perplexity on 8192 tokens (windows of 512) of the second half.

    .venv/bin/python benchmarks/bench_qronos_alpha.py
"""
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: F401
from torch_piso.load import load_model
from torch_piso.data import load_text, tokenize, calibration_windows
from torch_piso.eval import perplexity
from torch_piso import QuantConfig, quantize_model
model, tok = load_model(None)
ids = tokenize(tok, load_text(None), max_chars=2_000_000)
half = ids.numel() // 2
cal = calibration_windows(ids[:half], 8, 256, seed=0, bos_token_id=tok.bos_token_id)
ev = ids[half:half + 8192]
for a in (1e-6, 1e-2):
    m = copy.deepcopy(model)
    quantize_model(m, cal, QuantConfig.recipe("qronos-absmax", bits=3, qronos_alpha=a), progress=False, log=lambda *x, **k: None)
    print("alpha", a, "ppl", perplexity(m, ev, seqlen=512, progress=False), flush=True)
