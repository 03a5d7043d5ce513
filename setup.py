"""Build torch_piso's compiled op library (torch_piso._C).

CUDA kernels are compiled when torch itself has CUDA *and* a CUDA toolkit (nvcc) is found -- never
by whether a GPU is visible (the build machine may have none). ``PISO_FORCE_CPU=1`` forces a CPU-only
build; ``TORCH_CUDA_ARCH_LIST`` defaults to Hopper (9.0). Build without build isolation so the
installed torch==2.11.0 is used:  pip install --no-build-isolation -e .
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("PISO_FORCE_CPU", "0") not in ("", "0"):
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None and \
        os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def sources(with_cuda: bool):
    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731
    srcs = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    srcs += sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    if with_cuda:
        srcs += sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    return [rel(s) for s in srcs]


with_cuda = want_cuda()
cxx_flags = ["-O3", "-g0", "-std=c++17", "-ffp-contract=off", "-fopenmp", "-Wall", "-Wno-unused-function"]
define_macros = [("PISO_WITH_CUDA", "1")] if with_cuda else []
ext_kwargs = dict(
    name="torch_piso._C",
    sources=sources(with_cuda),
    include_dirs=[os.path.join(ROOT, "csrc")],
    define_macros=define_macros,
    extra_link_args=["-fopenmp"],
)
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    ext = CUDAExtension(
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"],
        },
        libraries=["cublas"],
        **ext_kwargs,
    )
else:
    ext = CppExtension(extra_compile_args={"cxx": cxx_flags}, **ext_kwargs)

setup(
    name="torch_piso",
    version="0.1.0",
    description="Exactly optimal post-training quantization scales (PiSO) with GPTQ/Qronos, as PyTorch ops",
    packages=find_packages(include=["torch_piso", "torch_piso.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch==2.11.0", "transformers", "safetensors", "gguf", "numpy", "tqdm", "pyyaml"],
    entry_points={"console_scripts": ["torch-piso=torch_piso.cli:main"]},
)
