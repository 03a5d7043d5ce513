"""torch_piso: exactly optimal post-training quantization scales (PiSO), GPTQ and Qronos as
PyTorch custom ops (``torch.ops.piso.*``), with a block-by-block pipeline for HF Llama/Qwen models.
"""
from __future__ import annotations

import torch  # noqa: F401  (the op library links against torch's shared libraries)

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.piso.*)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "torch_piso's compiled ops (torch_piso._C) are not built. Run "
        "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`) in the "
        f"repository root. Original error: {exc}"
    ) from exc

from . import ops  # noqa: E402,F401  (fake kernels + typed wrappers)
from .ops import (  # noqa: E402,F401
    cross_accumulate_,
    dequant_matmul,
    gptq,
    has_cuda_kernels,
    hessian_accumulate_,
    optimal_scales,
    pack,
    piso_sweep,
    quantize_rtn,
    qronos,
    unpack,
)

__version__ = "0.1.0"


def _lazy(name):
    import importlib

    return importlib.import_module(f".{name}", __name__)


def __getattr__(name):
    # Heavier modules (transformers, safetensors) load only when used.
    table = {
        "HessianCollector": "hessian",
        "Hessians": "hessian",
        "QuantConfig": "config",
        "RECIPES": "config",
        "quantize_model": "pipeline",
        "quantize_model_with_report": "pipeline",
        "CalibrationError": "pipeline",
        "QuantLinear": "nn",
        "replace_linear": "nn",
        "save_quantized": "io",
        "load_quantized": "io",
        "QuantizedCheckpointError": "io",
        "find_decoder": "models",
        "decoder_layers": "models",
        "UnsupportedModelError": "models",
        "quantize_model_distributed": "distributed",
        "init_distributed": "distributed",
        "DistributedQuantizationError": "distributed",
    }
    if name in table:
        return getattr(_lazy(table[name]), name)
    raise AttributeError(f"module 'torch_piso' has no attribute {name!r}")
