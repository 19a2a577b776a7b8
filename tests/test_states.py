"""Optimizer states kept in bfloat16 (``state_dtype=torch.bfloat16``), written with stochastic
rounding (lamb_kernels/rounding.py): the rounding itself (unbiased, deterministic, the same bits in
every implementation), FusedLAMB against the float64 reference within a bound derived from bf16's
precision, the backends against each other, checkpoints across state dtypes, and reused steps."""
import copy
import math

import numpy as np
import pytest
import torch

import lamb_kernels
from harness import on_every_backend
from lamb_float64 import Float64LAMB
from lamb_kernels import FusedLAMB
from lamb_kernels.hyper_table import WIDTH, LambColumn
from lamb_kernels.rounding import mix32, round_bf16_stochastic, tensor_keys

BF16 = torch.bfloat16
SHAPES = ((33, 7), (129,), (5,), (2, 3, 4))
ULP = 2.0**-7  # bf16 keeps 8 significant bits: neighbours are at most 2^-7 of a value apart


def make_params(device, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]


def grads_for(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen).to(p.device) for p in params]


def run(device, backend, steps, state_dtype=BF16, seed=0, **options):
    params = make_params(device)
    opt = FusedLAMB(params, backend=backend, state_dtype=state_dtype, seed=seed, lr=0.05, **options)
    for step in range(steps):
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        opt.step()
    return params, opt


def step_side_by_side(opt, params, resumed, copies, steps):
    """`opt` and a copy `resumed` from its checkpoint stepped with the same grads: `opt` reusing its
    plans, `resumed` taking every step in full (the same bits are expected of both)."""
    for step in steps:
        for ps in (params, copies):
            for p, g in zip(ps, grads_for(ps, step)):
                p.grad = g
        opt.step()
        resumed._step_cache = None
        resumed.step()


def assert_within_movement(params, make_reference, steps, bound):
    """Each element of `params` (after `steps` steps of the tests' grads) within `bound` (plus fp32
    rounding, 1e-5) of the total movement of the float64 reference's element over those steps."""
    start = make_params(params[0].device)
    reference = make_reference(start)
    movement = [torch.zeros_like(p, dtype=torch.float64) for p in start]
    for step in range(steps):
        before = [p.clone() for p in reference.groups[0]["params"]]
        reference.step([grads_for(start, step)])
        for total, b, a in zip(movement, before, reference.groups[0]["params"]):
            total += (a - b).abs()
    for p, ref, total in zip(params, reference.groups[0]["params"], movement):
        error = (p.detach().double().cpu() - ref.cpu()).abs()
        assert (error <= (bound + 1e-5) * total.cpu() + 1e-7).all(), float((error / total.cpu().clamp(min=1e-12)).max())


# -- 1. the rounding ------------------------------------------------------------------------------

def mix32_reference(x: int) -> int:
    """mix32 as rounding.py's docstring states it, on one int, every step reduced modulo 2^32."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_mix32_is_one_function_for_ints_numpy_and_torch():
    """The same values from Python ints, numpy arrays, int64 tensors and int32 tensors of bit patterns,
    over values whose 64-bit products wrap as well as small ones."""
    values = [0, 1, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    values += np.random.default_rng(0).integers(0, 2**32, 4096, dtype=np.int64).tolist()
    expected = [mix32_reference(v) for v in values]
    assert expected[:3] == [0, 1753845952, 2435775735]  # (pinned: the C++, CUDA and Triton copies follow it)
    assert [mix32(v) for v in values] == expected
    assert mix32(np.array(values, dtype=np.int64)).tolist() == expected
    assert mix32(np.array(values, dtype=np.uint32)).tolist() == expected
    assert mix32(torch.tensor(values, dtype=torch.int64)).tolist() == expected
    bit_patterns = torch.tensor([v - 2**32 if v >= 2**31 else v for v in values], dtype=torch.int32)
    assert (mix32(bit_patterns).to(torch.int64) & 0xFFFFFFFF).tolist() == expected


def test_stochastic_rounding_is_unbiased_and_within_one_ulp():
    """Mean over many independent roundings (keys) equals the fp32 value to within its standard
    error; each rounding is one of the two bf16 neighbours."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    lo = x.to(BF16).float()  # nearest; the neighbours are around it
    rounds = torch.stack([round_bf16_stochastic(x, key, 0).float() for key in range(400)])
    spacing = (x.abs() * ULP).clamp(min=1e-30)
    assert ((rounds - x).abs() <= spacing * 1.0001).all()
    mean_error = (rounds.mean(0) - x) / spacing  # in units of the local spacing
    # Each rounding's error has a standard deviation below 0.5 spacing: the mean of 400, below 0.025.
    assert mean_error.abs().mean() < 0.025 and mean_error.mean().abs() < 0.005
    assert not torch.equal(rounds[0], lo) or not torch.equal(rounds[1], lo)  # not round-to-nearest


def test_stochastic_rounding_keeps_specials_and_exact_values():
    x = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 1.0, -2.5, 3.3895e38, -3.3895e38])
    for key in range(20):
        r = round_bf16_stochastic(x, key, 1).float()
        assert r[0] == math.inf and r[1] == -math.inf and math.isnan(r[2])
        assert r[3:7].tolist() == [0.0, -0.0, 1.0, -2.5] and torch.isfinite(r[7:]).all()


def test_keys_depend_on_seed_step_and_position():
    mixed = [mix32(p) for p in range(3)]
    base = tensor_keys(0, [1.0, 1.0, 1.0], np.array(mixed, dtype=np.uint32))
    assert len(set(base)) == 3
    assert tensor_keys(1, [1.0] * 3, np.array(mixed, dtype=np.uint32)) != base
    assert tensor_keys(0, [2.0] * 3, np.array(mixed, dtype=np.uint32)) != base
    on_device = tensor_keys(0, torch.tensor([1.0, 1.0, 1.0]), np.array(mixed, dtype=np.uint32))
    assert on_device.tolist() == base


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_native_kernels_round_as_the_reference_bit_for_bit(backend):
    """m = g and v = g^2 exactly in fp32 (beta1 = beta2 = 0): the stored states are the reference's
    rounding of those values, element by element, across chunks."""
    if backend not in lamb_kernels.available_backends("cpu"):
        pytest.skip(f"{backend} unavailable")
    backend_object = lamb_kernels.backends.create_backend(backend)
    op = backend_object._op("lamb_moments")
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, generator=gen) for n in (40000, 7)]
    params = [torch.randn(n, generator=gen) for n in (40000, 7)]
    m = [torch.zeros(n, dtype=BF16) for n in (40000, 7)]
    v = [torch.zeros(n, dtype=BF16) for n in (40000, 7)]
    keys = [0x12345678, 0xFEDCBA98]
    hyper = torch.zeros(2, WIDTH)
    hyper[:, LambColumn.BETA3] = 1.0
    hyper[:, LambColumn.ONE_MINUS_BETA2] = 1.0
    hyper[:, LambColumn.BC1] = hyper[:, LambColumn.BC2] = 1.0
    hyper[:, LambColumn.EPS] = 1e-6
    for row, key in enumerate(keys):
        hyper[row, LambColumn.KEY_LO], hyper[row, LambColumn.KEY_HI] = key & 0xFFFF, key >> 16
    op(params, grads, m, v, [], [], hyper, None, None, None, backend_object.chunk_size)
    for g, m_i, v_i, key in zip(grads, m, v, keys):
        assert torch.equal(m_i, round_bf16_stochastic(g, key, 0))
        assert torch.equal(v_i, round_bf16_stochastic(g * g, key, 1))


# -- 2. FusedLAMB with bf16 states ----------------------------------------------------------------

@on_every_backend
def test_bf16_states_track_the_float64_reference_within_the_derived_bound(device, backend):
    """The bound: each stored m and v is within one bf16 spacing (2^-7 relative) of the fp32 value
    it rounds, and an error carries into later steps multiplied by beta < 1, so after N steps m and v
    are within N * 2^-7 relative of the exact ones; u = m / sqrt(v) then within 1.5 N 2^-7, and the
    trust ratio (a ratio of norms of u) as much again: each step's movement of a parameter is within
    3 N 2^-7 of the reference's, plus fp32 rounding (1e-5 of the movement)."""
    steps = 5
    params, opt = run(device, backend, steps)
    assert_within_movement(params, lambda start: Float64LAMB([{"params": start}], lr=0.05), steps, 3 * steps * ULP)
    assert all(opt.state[p]["exp_avg"].dtype == BF16 and opt.state[p]["exp_avg_sq"].dtype == BF16 for p in params)


@on_every_backend
def test_bf16_states_are_deterministic_and_depend_on_the_seed(device, backend):
    first, opt1 = run(device, backend, 3)
    second, opt2 = run(device, backend, 3)
    other, opt3 = run(device, backend, 3, seed=7)
    for a, b, c in zip(first, second, other):
        assert torch.equal(opt1.state[a]["exp_avg"], opt2.state[b]["exp_avg"])
        assert torch.equal(a, b)
    assert any(not torch.equal(opt1.state[a]["exp_avg_sq"], opt3.state[c]["exp_avg_sq"]) for a, c in zip(first, other))


def test_backends_agree_on_bf16_states():
    """The same rounding everywhere: the states differ only where fp32 arithmetic of two backends
    differs in its last bit at a rounding's threshold (rare), and then by one bf16 spacing."""
    backends = [b for b in ("cpp", "triton", "torch") if b in lamb_kernels.available_backends("cpu")]
    runs = {b: run("cpu", b, 3) for b in backends}
    base_params, base_opt = runs[backends[0]]
    for name in backends[1:]:
        params, opt = runs[name]
        for key in ("exp_avg", "exp_avg_sq"):
            a = torch.cat([base_opt.state[p][key].float().flatten() for p in base_params])
            b = torch.cat([opt.state[p][key].float().flatten() for p in params])
            assert (a != b).float().mean() < 1e-2, (name, key)
            assert ((a - b).abs() <= a.abs() * ULP * 1.0001 + 1e-30).all(), (name, key)


@on_every_backend
def test_bf16_state_bytes(device, backend):
    params, opt = run(device, backend, 1)
    state_bytes = sum(t.numel() * t.element_size() for p in params for k, t in opt.state[p].items()
                      if k in ("exp_avg", "exp_avg_sq"))
    assert state_bytes == 4 * sum(p.numel() for p in params)  # 2 + 2 bytes per parameter, against 8


# -- 3. checkpoints -------------------------------------------------------------------------------

@on_every_backend
def test_a_bf16_checkpoint_resumes_bit_for_bit(device, backend):
    params, opt = run(device, backend, 3)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["state"][0]["exp_avg"].dtype == BF16  # saved in its storage dtype
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = FusedLAMB(copies, backend=backend, lr=0.05, state_dtype=BF16)
    resumed.load_state_dict(saved)
    for step in (3, 4):
        for ps in (params, copies):
            for p, g in zip(ps, grads_for(ps, step)):
                p.grad = g
        opt.step()
        resumed.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["exp_avg_sq"], resumed.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("saved_dtype, loaded_dtype", [(torch.float32, BF16), (BF16, torch.float32)])
@on_every_backend
def test_checkpoints_load_into_another_state_dtype(device, backend, saved_dtype, loaded_dtype):
    params, opt = run(device, backend, 2, state_dtype=saved_dtype)
    saved = copy.deepcopy(opt.state_dict())
    target = FusedLAMB(make_params(device, seed=1), backend=backend, lr=0.05, state_dtype=loaded_dtype)
    target.load_state_dict(saved)
    loaded = target.param_groups[0]["params"]
    assert target.param_groups[0]["state_dtype"] == loaded_dtype
    for p, q in zip(params, loaded):
        for key in ("exp_avg", "exp_avg_sq"):
            assert target.state[q][key].dtype == loaded_dtype
            assert torch.equal(target.state[q][key], opt.state[p][key].to(loaded_dtype))
    for q, g in zip(loaded, grads_for(loaded, 9)):
        q.grad = g
    target.step()
    assert all(target.state[q]["exp_avg"].dtype == loaded_dtype for q in loaded)


@on_every_backend
def test_state_dtype_changed_between_steps_converts_the_states(device, backend):
    params, opt = run(device, backend, 2, state_dtype=torch.float32)
    before = [opt.state[p]["exp_avg"].clone() for p in params]
    opt.param_groups[0]["state_dtype"] = BF16
    for p, g in zip(params, grads_for(params, 5)):
        p.grad = g
    opt.step()
    assert all(opt.state[p]["exp_avg"].dtype == BF16 for p in params)
    assert not torch.equal(before[0].to(BF16), opt.state[params[0]]["exp_avg"])  # stepped, from the converted


def test_bad_state_dtype_and_seed_are_named():
    with pytest.raises(ValueError, match=r"state_dtype must be one of torch.float32, torch.bfloat16, 'int8', got torch.float16"):
        FusedLAMB(make_params("cpu"), state_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: state_dtype must be one of"):
        FusedLAMB([{"params": make_params("cpu")[:1]}, {"params": make_params("cpu")[1:], "state_dtype": torch.int8}])
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\), got -1"):
        FusedLAMB(make_params("cpu"), seed=-1)
    with pytest.raises(TypeError, match=r"seed must be an int"):
        FusedLARS(make_params("cpu"), seed="1")
    assert type(FusedLAMB(make_params("cpu"), seed=np.int64(5)).param_groups[0]["seed"]) is int


# -- 4. reused steps ------------------------------------------------------------------------------

@on_every_backend
def test_reused_steps_round_as_full_steps(device, backend, reused_steps):
    """The rounding keys advance with the step counts on the reused path too."""
    results = []
    for reuse in (True, False):
        params = make_params(device)
        opt = FusedLAMB(params, backend=backend, lr=0.05, state_dtype=BF16)
        for step in range(5):
            for p, g in zip(params, grads_for(params, step)):
                p.grad = g
            if not reuse:
                opt._step_cache = None
            opt.step()
        results.append((params, opt))
    (a, opt_a), (b, opt_b) = results
    assert reused_steps(opt_a) == 3 and reused_steps(opt_b) == 0
    for p, q in zip(a, b):
        assert torch.equal(p, q) and torch.equal(opt_a.state[p]["exp_avg"], opt_b.state[q]["exp_avg"])


@on_every_backend
def test_capturable_step_counts_round_as_host_ones(device, backend):
    """Step counts on the device (capturable): the keys are computed there, with the same bits."""
    runs = [run(device, backend, 3, capturable=capturable) for capturable in (False, True)]
    (a, opt_a), (b, opt_b) = runs
    for p, q in zip(a, b):
        assert torch.equal(p, q) and torch.equal(opt_a.state[p]["exp_avg_sq"], opt_b.state[q]["exp_avg_sq"])


@on_every_backend
def test_bf16_states_with_master_weights_and_a_skipped_step(device, backend):
    """bf16 parameters with fp32 masters and bf16 states; a GradScaler's non-finite step leaves
    every state bit, step count and parameter as it was."""
    params = [torch.nn.Parameter(p.detach().to(BF16)) for p in make_params(device)]
    opt = FusedLAMB(params, backend=backend, lr=0.05, state_dtype=BF16, master_weights=True)
    for step in range(2):
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g.to(BF16)
        opt.step()
    assert all(opt.state[p]["master_param"].dtype == torch.float32 and opt.state[p]["exp_avg"].dtype == BF16
               for p in params)
    assert_a_skipped_step_changes_nothing(opt, params, device)


def assert_a_skipped_step_changes_nothing(opt, params, device):
    """A step a GradScaler found a non-finite grad in leaves every state entry and parameter, bit for bit."""
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    opt.grad_scale = torch.ones(1, device=device)
    opt.found_inf = torch.ones(1, device=device)
    opt.step()
    after = opt.state_dict()
    for key, entry in before[0]["state"].items():
        for name, value in entry.items():
            assert torch.equal(after["state"][key][name], value), (key, name)
    assert all(torch.equal(p, q) for p, q in zip(params, before[1]))


# -- 5. FusedLARS with bf16 momentum buffers ------------------------------------------------------

from lamb_kernels import FusedLARS  # noqa: E402
from lamb_kernels.hyper_table import LarsColumn  # noqa: E402
from lars_float64 import Float64LARS  # noqa: E402

LARS = dict(lr=0.5, momentum=0.9, weight_decay=1e-4)


def run_lars(device, backend, steps, state_dtype=BF16, seed=0, **options):
    params = make_params(device)
    opt = FusedLARS(params, backend=backend, state_dtype=state_dtype, seed=seed, **{**LARS, **options})
    for step in range(steps):
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        opt.step()
    return params, opt


@on_every_backend
def test_lars_bf16_buffers_track_the_float64_reference_within_the_derived_bound(device, backend):
    """Each stored buffer is within 2^-7 of the fp32 value it rounds, and an error carries into later
    steps multiplied by momentum < 1: after N steps a buffer, and so a step's movement, is within
    N 2^-7 of the reference's; twice that bounds the trust ratio's second-order share too."""
    steps = 5
    params, opt = run_lars(device, backend, steps)
    assert_within_movement(params, lambda start: Float64LARS([{"params": start}], **LARS), steps, 2 * steps * ULP)
    assert all(opt.state[p]["momentum_buffer"].dtype == BF16 and float(opt.state[p]["step"]) == steps for p in params)


def test_lars_bf16_buffers_are_deterministic_and_agree_between_backends():
    backends = [b for b in ("cpp", "triton", "torch") if b in lamb_kernels.available_backends("cpu")]
    runs = {b: run_lars("cpu", b, 3) for b in backends}
    again = run_lars("cpu", backends[0], 3)
    other_seed = run_lars("cpu", backends[0], 3, seed=9)
    base_params, base_opt = runs[backends[0]]

    def buffers(params, opt):
        return torch.cat([opt.state[p]["momentum_buffer"].float().flatten() for p in params])

    assert torch.equal(buffers(*again), buffers(base_params, base_opt))
    assert not torch.equal(buffers(*other_seed), buffers(base_params, base_opt))
    for name in backends[1:]:
        a, b = buffers(base_params, base_opt), buffers(*runs[name])
        assert (a != b).float().mean() < 1e-2, name
        assert ((a - b).abs() <= a.abs() * ULP * 1.0001 + 1e-30).all(), name


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_native_lars_kernels_round_as_the_reference_bit_for_bit(backend):
    """A new buffer becomes d = g (no adaptation, lr 0): stored as the reference rounds g."""
    if backend not in lamb_kernels.available_backends("cpu"):
        pytest.skip(f"{backend} unavailable")
    backend_object = lamb_kernels.backends.create_backend(backend)
    gen = torch.Generator().manual_seed(4)
    sizes = (40000, 9)
    params = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    buffers = [torch.zeros(n, dtype=BF16) for n in sizes]
    keys = [0x0BADCAFE, 0x13572468]
    hyper = torch.zeros(2, WIDTH)
    hyper[:, LarsColumn.HAS_MOMENTUM] = hyper[:, LarsColumn.FIRST_STEP] = 1.0
    hyper[:, LarsColumn.MOMENTUM] = 0.9
    hyper[:, LarsColumn.ONE_MINUS_DAMPENING] = 1.0
    for row, key in enumerate(keys):
        hyper[row, LarsColumn.KEY_LO], hyper[row, LarsColumn.KEY_HI] = key & 0xFFFF, key >> 16
    backend_object._op("lars_apply")(params, grads, buffers, [], hyper, None, None, None, [], backend_object.chunk_size)
    for g, b, key in zip(grads, buffers, keys):
        assert torch.equal(b, round_bf16_stochastic(g, key, 0))


@on_every_backend
def test_lars_bf16_checkpoint_resumes_bit_for_bit_and_reused_steps_round_as_full_steps(device, backend, reused_steps):
    params, opt = run_lars(device, backend, 3)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["state"][0]["momentum_buffer"].dtype == BF16 and float(saved["state"][0]["step"]) == 3
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = FusedLARS(copies, backend=backend, state_dtype=BF16, **LARS)
    resumed.load_state_dict(saved)
    step_side_by_side(opt, params, resumed, copies, (3, 4, 5))
    assert reused_steps(opt) >= 3 and reused_steps(resumed) == 0
    for p, q in zip(params, copies):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["momentum_buffer"], resumed.state[q]["momentum_buffer"])


@on_every_backend
def test_lars_float32_buffers_keep_no_step_count_and_groups_without_momentum_none(device, backend):
    params, opt = run_lars(device, backend, 2, state_dtype=torch.float32)
    assert all("step" not in opt.state[p] and opt.state[p]["momentum_buffer"].dtype == torch.float32 for p in params)
    params, opt = run_lars(device, backend, 2, momentum=0.0)
    assert all("step" not in opt.state[p] and "momentum_buffer" not in opt.state[p] for p in params)
