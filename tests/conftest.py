"""Test setup: without a GPU the triton kernels run under the Triton interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton (and so lamb_kernels.triton) is imported; with a CUDA
device and the variable unset, the kernels are compiled and tested on CUDA tensors instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lamb_kernels import available_backends  # noqa: E402


def backend_cases():
    """(device, backend) pairs: every backend available here; CUDA cases skip without a GPU."""
    cases = [pytest.param("cpu", name, id=f"cpu-{name}") for name in available_backends("cpu")]
    if torch.cuda.is_available():
        cases += [pytest.param("cuda", name, id=f"cuda-{name}", marks=pytest.mark.gpu)
                  for name in available_backends("cuda")]
    else:
        cases += [pytest.param("cuda", name, id=f"cuda-{name}",
                               marks=[pytest.mark.gpu, pytest.mark.skip(reason="no CUDA device")])
                  for name in ("triton", "torch")]
    return cases


def pytest_generate_tests(metafunc):
    if {"device", "backend"} <= set(metafunc.fixturenames):
        metafunc.parametrize(("device", "backend"), backend_cases())
