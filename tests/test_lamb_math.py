"""Every backend against the float64 reference: params AND moments after 7 steps (docs/design.md
sections 2 and 5)."""
import math

import pytest

from harness import assert_matches_reference, on_every_backend, run_both

from lamb_kernels.backends import CPP_CHUNK
from tolerances import ELEMENT_ATOL, PARAM_RTOL

try:
    from lamb_kernels.triton.multi_tensor import CHUNK
except ImportError:  # no triton: only the torch backend runs, any chunk size will do
    CHUNK = 8192

ODD = [(1,), (17,), (4097,), (18011,), (3, 5, 7)]

CASES = {
    "apex_defaults": dict(specs=[dict(sizes=ODD)]),
    "no_weight_decay_no_adaptation": dict(specs=[dict(sizes=ODD, weight_decay=0.0)]),
    "no_weight_decay_nvlamb": dict(specs=[dict(sizes=ODD, weight_decay=0.0, use_nvlamb=True)]),
    "l2_mode": dict(specs=[dict(sizes=ODD, weight_decay=0.05)], kwargs=dict(adam_w_mode=False)),
    "no_grad_averaging": dict(specs=[dict(sizes=ODD, grad_averaging=False)]),
    "no_bias_correction": dict(specs=[dict(sizes=ODD, bias_correction=False)]),
    "clipping_huge_grads": dict(specs=[dict(sizes=ODD)], grad_scale=1e3),
    "clipping_enabled_not_reached": dict(specs=[dict(sizes=ODD)], grad_scale=1e-4),
    "clipping_off_none": dict(specs=[dict(sizes=ODD)], grad_scale=30.0, kwargs=dict(max_grad_norm=None)),
    "clipping_off_zero": dict(specs=[dict(sizes=ODD)], grad_scale=30.0, kwargs=dict(max_grad_norm=0)),
    "clipping_off_inf": dict(specs=[dict(sizes=ODD)], grad_scale=30.0, kwargs=dict(max_grad_norm=math.inf)),
    "zero_norm_param": dict(specs=[dict(sizes=ODD, zero=(2,))]),
    "zero_grad_param": dict(specs=[dict(sizes=ODD, zero_grad=(1, 3))]),
    "zero_size_first_middle_last": dict(specs=[dict(sizes=[(0,), (17,), (0, 5), (4097,), (0,)])]),
    "many_tensors": dict(specs=[dict(sizes=[((i * 37) % 300 + 1,) for i in range(150)])], steps=7),
    "chunk_boundaries": dict(specs=[dict(sizes=[(CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (2 * CHUNK + 17,)])]),
    "cpp_chunk_boundaries": dict(specs=[dict(sizes=[(CPP_CHUNK - 1,), (CPP_CHUNK + 1,), (2 * CPP_CHUNK + 77,)])],
                                 steps=3),
    "several_groups": dict(specs=[
        dict(sizes=[(17,), (4097,)]),
        dict(sizes=[(33,), (5, 7)], lr=5e-3, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1, adam_w_mode=False),
        dict(sizes=[(129,)], weight_decay=0.0, layer_adaptation=True, max_grad_norm=None),
        dict(sizes=[(64,), (1,)], weight_decay=0.02, layer_adaptation=False, lr=2e-3),
    ], grad_scale=0.05),
    "trust_ratio_bounds": dict(specs=[dict(sizes=ODD, trust_ratio_bounds=(0.1, 0.5))]),
    # Bounds apply only when both norms are > 0: the zero-norm param keeps r = 1, not r = 2.
    "trust_ratio_bounds_zero_norm": dict(specs=[dict(sizes=ODD, zero=(2,), trust_ratio_bounds=(2.0, 5.0))]),
    # Params 1 and 3 never get a grad; params 2 and 4 only on even steps, so step counts diverge.
    "params_without_grads": dict(specs=[dict(sizes=ODD)],
                                 has_grad=lambda step, gi, pi: pi not in (1, 3) and (pi in (0,) or step % 2 == 0)),
}


@pytest.mark.parametrize("case", list(CASES))
@on_every_backend
def test_lamb_matches_float64_reference(device, backend, case):
    spec = CASES[case]
    result = run_both(device, backend, spec["specs"], steps=spec.get("steps", 7),
                      grad_scale=spec.get("grad_scale", 1.0), has_grad=spec.get("has_grad"),
                      **spec.get("kwargs", {}))
    assert_matches_reference(*result)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf / inf inside the interpreter
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@on_every_backend
def test_non_finite_grads_propagate_like_the_reference(device, backend, bad_value):
    """No silent skip (docs/design.md section 2): a NaN makes G NaN, so nothing clips; an inf makes G inf, so every
    finite grad clips to 0. Params must follow the float64 reference, NaNs in the same places."""
    import torch

    from lamb_float64 import Float64LAMB
    from lamb_kernels import FusedLAMB

    gen = torch.Generator().manual_seed(3)
    params0 = [torch.randn(n, generator=gen) for n in (17, 4097, 33)]
    grads = [torch.randn(p.shape, generator=gen) for p in params0]
    grads[1][5] = bad_value
    reference = Float64LAMB([{"params": params0}])
    reference.step([grads])
    params = [torch.nn.Parameter(p.to(device, copy=True)) for p in params0]
    opt = FusedLAMB(params, backend=backend)
    for p, g in zip(params, grads):
        p.grad = g.to(device)
    opt.step()
    for p, expected in zip(params, reference.groups[0]["params"]):
        torch.testing.assert_close(p.detach().cpu().double(), expected, rtol=PARAM_RTOL, atol=ELEMENT_ATOL, equal_nan=True)
    assert params[1].isnan().any()
