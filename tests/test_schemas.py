"""One schema per stage: the C++ operators (csrc/ops.cpp) and the Triton ones take the same
arguments in the same order, as lamb_kernels/schemas.py writes them."""
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
