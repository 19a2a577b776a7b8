"""The backend contract: one schema per stage (the C++ operators of csrc/ops.cpp and the Triton ones
take the same arguments in the same order, as lamb_kernels/schemas.py writes them), and every
backend implements the Backend protocol of lamb_kernels/contract.py."""
import pytest
import torch

import lamb_kernels
from lamb_kernels.schemas import SCHEMAS


def schema_of(name: str) -> str:
    """An operator's schema without its name: "(...) -> ..."."""
    text = str(getattr(torch.ops.lamb_kernels, name).default._schema)
    return text[text.index("("):]


@pytest.mark.parametrize("backend, prefix", [("cpp", ""), ("triton", "triton_")])
def test_every_operator_family_follows_the_stage_schemas(backend, prefix):
    if backend not in lamb_kernels.available_backends("cpu") + lamb_kernels.available_backends("cuda"):
        pytest.skip(f"{backend} unavailable here")
    for stage, schema in SCHEMAS.items():
        assert schema_of(prefix + stage) == schema, stage


def test_every_backend_implements_the_backend_protocol():
    from lamb_kernels.contract import Backend
    from lamb_kernels.ops import create_backend

    for name in lamb_kernels.available_backends("cpu"):
        backend = create_backend(name)
        assert isinstance(backend, Backend), name
        assert backend.name == name
