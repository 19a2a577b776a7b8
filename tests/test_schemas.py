"""The backend contract: one schema per stage (the C++ operators of csrc/ops.cpp and the Triton ones
take the same arguments in the same order, as lamb_kernels/schemas.py writes them), and every
backend implements the Backend protocol of lamb_kernels/backend_api.py."""
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
    from lamb_kernels.backend_api import Backend
    from lamb_kernels.backends import create_backend

    for name in lamb_kernels.available_backends("cpu"):
        backend = create_backend(name)
        assert isinstance(backend, Backend), name
        assert backend.name == name


@pytest.mark.parametrize("optimizer", ["FusedLAMB", "FusedLARS"])
def test_every_backend_fills_the_one_plan_type(optimizer):
    """Each backend's prepare_* returns backend_api.Plan with the bucket's tensors in order: the
    parameters as the optimizer steps them, their grads and states."""
    from lamb_kernels.backend_api import Plan

    for name in lamb_kernels.available_backends("cpu"):
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((3, 4), (5,), (2, 2, 2))]
        for p in params:
            p.grad = torch.randn_like(p)
        extra = dict(momentum=0.9) if optimizer == "FusedLARS" else {}
        opt = getattr(lamb_kernels, optimizer)([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}],
                                               backend=name, **extra)
        plans = opt._plan_step(None, None)
        assert len(plans) == 1, name
        backend, key, plan = plans[0]
        assert type(plan) is Plan, name
        assert key == (torch.device("cpu"), torch.float32, name, torch.float32)  # (device, dtype, backend, states)
        assert [seg.lr for seg in plan.segments] == [1e-3 if optimizer == "FusedLAMB" else 1.0, 0.5]
        assert all(a is b for a, b in zip(plan.params, params)) and len(plan.params) == 3, name
        assert all(a is b.grad for a, b in zip(plan.grads, params)), name
        states = ([opt.state[p]["exp_avg"] for p in params] if optimizer == "FusedLAMB"
                  else [opt.state[p]["momentum_buffer"] for p in params])
        assert all(a is b for a, b in zip(plan.exp_avgs or plan.momentum_buffers, states)), name
        assert plan.device == torch.device("cpu")
