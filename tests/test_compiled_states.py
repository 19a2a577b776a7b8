"""torch.compile(opt.step) (inductor) against eager, for every state dtype: the params and every
stored state (fp32, bf16, 8-bit codes and their block scales) after a few steps, on tensors whose
last 256-element block of 8-bit states is partial."""
import pytest
import torch

import lamb_kernels
from lamb_kernels import FusedLAMB, FusedLARS
from test_states import grads_for, make_params
from tolerances import SAME_MATH_ATOL, SAME_MATH_RTOL

INT8 = "int8"
SHAPES = ((300,), (10, 100), (7,))  # 8-bit blocks: 1 whole + 44, 3 whole + 232, a lone partial one
OPTIMIZERS = {"lamb": (FusedLAMB, dict(lr=0.05)), "lars": (FusedLARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-4))}


def run(algorithm, backend, state_dtype, compiled, steps=3):
    cls, defaults = OPTIMIZERS[algorithm]
    params = make_params("cpu", shapes=SHAPES)
    opt = cls(params, backend=backend, state_dtype=state_dtype, **defaults)
    graphs = []

    def recording_inductor(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    step = torch.compile(opt.step, backend=recording_inductor) if compiled else opt.step
    for i in range(steps):
        for p, g in zip(params, grads_for(params, i)):
            p.grad = g
        step()
    assert graphs or not compiled, "nothing was compiled"
    return params, opt


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, INT8], ids=str)
@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
def test_a_compiled_step_stores_the_states_of_an_eager_one(algorithm, state_dtype, backend):
    """Bit for bit, but for the fp32 values of LAMB on the torch backend: eager moments come from
    ATen's fused foreach add and addcmul, inductor rounds the same products in other places, an ulp
    apart (test_mixed_precision.py). The codes and bf16 states they round stochastically are still
    the same bits: an ulp moves a rounding only within an ulp of its threshold (about 2^-20 of
    values), none of these."""
    if backend not in lamb_kernels.available_backends("cpu"):
        pytest.skip(f"{backend} unavailable")
    (params, opt), (compiled_params, compiled_opt) = (run(algorithm, backend, state_dtype, compiled)
                                                      for compiled in (False, True))
    fp32_exact = not (algorithm == "lamb" and backend == "torch")
    for p, q in zip(params, compiled_params):
        assert opt.state[p].keys() == compiled_opt.state[q].keys()
        pairs = [(key, opt.state[p][key], compiled_opt.state[q][key]) for key in sorted(opt.state[p])]
        pairs.append(("param", p.detach(), q.detach()))
        for key, eager, compiled in pairs:
            assert eager.dtype == compiled.dtype and eager.shape == compiled.shape, (key, p.shape)
            if fp32_exact or eager.dtype != torch.float32:
                assert torch.equal(compiled, eager), (key, p.shape)
            else:
                torch.testing.assert_close(compiled, eager, rtol=SAME_MATH_RTOL, atol=SAME_MATH_ATOL,
                                           msg=lambda m, key=key: f"{key} of {tuple(p.shape)}: {m}")
