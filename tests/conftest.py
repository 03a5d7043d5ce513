import pytest
import torch

import torch_piso  # noqa: F401  (registers torch.ops.piso)


def cuda_available() -> bool:
    return torch.cuda.is_available() and torch_piso.has_cuda_kernels()


requires_cuda = pytest.mark.skipif(
    not cuda_available(),
    reason="needs a CUDA GPU and a build with CUDA kernels (none on this machine)",
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
