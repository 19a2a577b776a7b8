"""8-bit blockwise optimizer states (``state_dtype="int8"``, lamb_kernels/quantization.py): the code
format and its round trip per block, stochastic rounding (unbiased, deterministic, the same codes in
every implementation), FusedLAMB and FusedLARS against the float64 references, the backends against
each other, checkpoints across state dtypes, reused steps, and bad checkpoints refused by name."""
import copy
import math

import pytest
import torch

import lamb_kernels
from harness import on_every_backend
from lamb_float64 import Float64LAMB
from lars_float64 import Float64LARS
from lamb_kernels import FusedLAMB, FusedLARS
from lamb_kernels.hyper_table import WIDTH, LambColumn, LarsColumn
from lamb_kernels.quantization import (BLOCK, code_values, dequantize, n_blocks, quantize, quantize_stochastic,
                                       smallest_code)
from test_states import assert_a_skipped_step_changes_nothing, grads_for, make_params, step_side_by_side

INT8 = "int8"
SPACING = 2.0**-3  # the largest gap between neighbouring nonzero codes, relative to the lower one
LARS = dict(lr=0.5, momentum=0.9, weight_decay=1e-4)


def wide_range(n, seed=0):
    """Values over seven decades, both signs, in one tensor (many blocks, a partial last one)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) * 10.0 ** (-7 * torch.rand(n, generator=gen))


def neighbours(x, scales, signed):
    """The two codes' values around each x (relative to its block's scale, times the scale)."""
    values = code_values(signed)
    s = torch.repeat_interleave(scales, BLOCK)[: x.numel()]
    y = (x.abs() / s).clamp(max=1.0)
    upper = torch.searchsorted(values, y).clamp(max=values.numel() - 1)
    lower = (upper - 1).clamp(min=0)
    return values[lower] * s, values[upper] * s


# -- 1. the format --------------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False])
def test_code_values_are_a_small_float_format_up_to_the_block_scale(signed):
    values = code_values(signed)
    assert values[0] == 0 and values[1] == smallest_code(signed) and values[-1] == 1.0
    assert values.numel() == (122 if signed else 250)  # 15 or 31 binades of 8 codes, and 0 and 1
    gaps = values[2:] / values[1:-1] - 1
    assert (gaps > 0).all() and gaps.max() <= SPACING + 1e-7 and gaps.min() >= 1 / 15 - 1e-7
    # Every code's value is encoded back to that code, and the block's largest value is exact.
    x = values * 3.0 if not signed else torch.cat([values, -values]) * 3.0
    codes, scales = quantize(x, signed)
    assert torch.equal(dequantize(codes, scales), x) and scales[0] == 3.0


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_per_block(signed):
    """Nearest rounding: every value within half a gap (1/16 of it) of itself, or within half the
    smallest code of its block (values below 2^-15, or 2^-31, of the block's largest); each block's
    scale is its largest magnitude, which comes back exactly."""
    x = wide_range(10 * BLOCK + 37)
    x = x if signed else x.abs()
    codes, scales = quantize(x, signed)
    assert codes.dtype == (torch.int8 if signed else torch.uint8) and scales.shape == (n_blocks(x.numel()),)
    blocks = torch.nn.functional.pad(x.abs(), (0, scales.numel() * BLOCK - x.numel())).view(-1, BLOCK)
    assert torch.equal(scales, blocks.amax(dim=1))
    error = (dequantize(codes, scales) - x).abs()
    floor = torch.repeat_interleave(scales, BLOCK)[: x.numel()] * smallest_code(signed)
    assert (error <= torch.maximum(x.abs() * SPACING / 2, floor / 2) * 1.0001).all()
    assert torch.equal(torch.sign(dequantize(codes, scales)) * (codes != 0), torch.sign(x) * (codes != 0))


@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(signed):
    x = wide_range(4 * BLOCK, seed=1)
    x = x if signed else x.abs()
    results = []
    for key in range(300):
        codes, scales = quantize_stochastic(x, key, 0 if signed else 1, signed)
        results.append(dequantize(codes, scales))
    results = torch.stack(results)
    lower, upper = neighbours(x, scales, signed)
    exact = x.abs()
    picked = (results.abs() == lower) | (results.abs() == upper)
    assert picked.all()
    gap = (upper - lower).clamp(min=1e-30)
    mean_error = (results.abs().mean(0) - exact) / gap  # in units of the local gap
    # Each rounding's error has a standard deviation under half a gap: the mean of 300, under 0.03.
    assert mean_error.abs().mean() < 0.03 and mean_error.mean().abs() < 0.01
    assert not torch.equal(results[0], results[1])


def test_blocks_with_zeros_and_non_finite_values():
    x = torch.zeros(3 * BLOCK)
    x[BLOCK + 5] = math.inf
    x[2 * BLOCK + 1] = math.nan
    x[2] = -0.0
    codes, scales = quantize(x, True)
    values = dequantize(codes, scales)
    assert scales[0] == 0 and (values[:BLOCK] == 0).all()  # a block of zeros stays zeros
    assert scales[1] == math.inf and values[BLOCK + 5] == math.inf
    assert values[BLOCK:2 * BLOCK].isnan().sum() == BLOCK - 1
    assert scales[2].isnan() and values[2 * BLOCK:].isnan().all()  # non-finite values spread over their block


# -- 2. the kernels encode as the reference -----------------------------------------------------

def native_backends():
    return [b for b in ("cpp", "triton") if b in lamb_kernels.available_backends("cpu")]


def keyed_table(columns, keys, **values):
    """A hyperparameter table, a row per tensor with its rounding key, and `values` by column name."""
    hyper = torch.zeros(len(keys), WIDTH)
    for name, value in values.items():
        hyper[:, columns[name]] = value
    for row, key in enumerate(keys):
        hyper[row, columns.KEY_LO], hyper[row, columns.KEY_HI] = key & 0xFFFF, key >> 16
    return hyper


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_native_kernels_encode_as_the_reference_bit_for_bit(backend):
    """m = g, v = g^2 exactly (beta1 = beta2 = 0): the stored codes and scales are the reference's
    stochastic encoding of those values, across chunks and a partial last block; the apply pass then
    reads the decoded values."""
    if backend not in native_backends():
        pytest.skip(f"{backend} unavailable")
    backend_object = lamb_kernels.backends.create_backend(backend)
    gen = torch.Generator().manual_seed(3)
    sizes = (40000, 7)
    grads = [torch.randn(n, generator=gen) for n in sizes]
    params = [torch.randn(n, generator=gen) for n in sizes]
    m = [torch.zeros(n, dtype=torch.int8) for n in sizes]
    v = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
    m_scales = [torch.zeros(n_blocks(n)) for n in sizes]
    v_scales = [torch.zeros(n_blocks(n)) for n in sizes]
    keys = [0x12345678, 0xFEDCBA98]
    hyper = keyed_table(LambColumn, keys, BETA3=1.0, ONE_MINUS_BETA2=1.0, BC1=1.0, BC2=1.0, EPS=1e-6)
    backend_object._op("lamb_moments")(params, grads, m, v, m_scales, v_scales, hyper, None, None, None,
                                       backend_object.chunk_size)
    for g, codes, scale, sq_codes, sq_scale, key in zip(grads, m, m_scales, v, v_scales, keys):
        expected, expected_scale = quantize_stochastic(g, key, 0, True)
        assert torch.equal(codes, expected) and torch.equal(scale, expected_scale)
        expected, expected_scale = quantize_stochastic(g * g, key, 1, False)
        assert torch.equal(sq_codes, expected) and torch.equal(sq_scale, expected_scale)
    # apply with lr 1, no adaptation: p <- p - u, u from the decoded codes (bias corrections 1).
    hyper[:, LambColumn.LR] = 1.0
    before = [p.clone() for p in params]
    backend_object._op("lamb_apply")(params, m, v, m_scales, v_scales, hyper, torch.ones(2, 2), None, [],
                                     backend_object.chunk_size)
    for p, p0, codes, scale, sq_codes, sq_scale in zip(params, before, m, m_scales, v, v_scales):
        u = dequantize(codes, scale) / (dequantize(sq_codes, sq_scale).sqrt() + 1e-6)
        torch.testing.assert_close(p, p0 - u, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_native_lars_kernels_encode_as_the_reference_bit_for_bit(backend):
    if backend not in native_backends():
        pytest.skip(f"{backend} unavailable")
    backend_object = lamb_kernels.backends.create_backend(backend)
    gen = torch.Generator().manual_seed(4)
    sizes = (40000, 9)
    params = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    buffers = [torch.zeros(n, dtype=torch.int8) for n in sizes]
    scales = [torch.zeros(n_blocks(n)) for n in sizes]
    keys = [0x0BADCAFE, 0x13572468]
    hyper = keyed_table(LarsColumn, keys, HAS_MOMENTUM=1.0, FIRST_STEP=1.0, MOMENTUM=0.9, ONE_MINUS_DAMPENING=1.0,
                        LR=1.0)
    before = [p.clone() for p in params]
    backend_object._op("lars_apply")(params, grads, buffers, scales, hyper, None, None, None, [],
                                     backend_object.chunk_size)
    for p, p0, g, b, s, key in zip(params, before, grads, buffers, scales, keys):
        expected, expected_scale = quantize_stochastic(g, key, 0, True)
        assert torch.equal(b, expected) and torch.equal(s, expected_scale)
        assert torch.equal(p, p0 - dequantize(expected, expected_scale))  # the step from the stored buffer


def test_operators_refuse_missing_or_misshapen_scales_by_name():
    if "cpp" not in native_backends():
        pytest.skip("cpp unavailable")
    ops = torch.ops.lamb_kernels
    p, g = [torch.randn(300)], [torch.randn(300)]
    m, v = [torch.zeros(300, dtype=torch.int8)], [torch.zeros(300, dtype=torch.uint8)]
    hyper = torch.zeros(1, WIDTH)
    with pytest.raises(RuntimeError, match=r"lamb_moments: exp_avg_scales has 0 tensors, the codes have 1"):
        ops.lamb_moments(p, g, m, v, [], [], hyper, None, None, None, 256)
    with pytest.raises(RuntimeError, match=r"exp_avg_sq_scales\[0\] must be a contiguous float32 tensor of 2 elements"):
        ops.lamb_moments(p, g, m, v, [torch.zeros(2)], [torch.zeros(3)], hyper, None, None, None, 256)
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\] has dtype Char, expected float32, bfloat16 or uint8"):
        ops.lamb_moments(p, g, m, [v[0].to(torch.int8)], [torch.zeros(2)], [torch.zeros(2)], hyper, None, None,
                         None, 256)
    with pytest.raises(RuntimeError, match=r"chunk_size must be a multiple of 256 with 8-bit states"):
        ops.lamb_apply(p, m, v, [torch.zeros(2)], [torch.zeros(2)], hyper, torch.ones(1, 2), None, [], 16 * 17)
    assert (m[0] == 0).all() and (v[0] == 0).all()


# -- 3. the optimizers ----------------------------------------------------------------------------

def run(device, backend, steps, state_dtype=INT8, seed=0, optimizer=FusedLAMB, **options):
    params = make_params(device)
    defaults = dict(lr=0.05) if optimizer is FusedLAMB else LARS
    opt = optimizer(params, backend=backend, state_dtype=state_dtype, seed=seed, **{**defaults, **options})
    for step in range(steps):
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        opt.step()
    return params, opt


def movement_error(params, make_reference, steps):
    """Per parameter, the norm of its difference from the float64 reference over the norm of the
    reference's movement."""
    start = make_params(params[0].device)
    reference = make_reference(start)
    for step in range(steps):
        reference.step([grads_for(start, step)])
    errors = []
    for p, ref, s in zip(params, reference.groups[0]["params"], start):
        ref, s = ref.detach().cpu(), s.detach().double().cpu()
        errors.append(float((p.detach().double().cpu() - ref).norm() / (ref - s).norm()))
    return errors


@pytest.mark.parametrize("optimizer", [FusedLAMB, FusedLARS])
@on_every_backend
def test_int8_states_track_the_float64_reference(device, backend, optimizer):
    """Each stored value is within one gap (2^-3 of it) of the fp32 value it rounds, the rounding
    unbiased and independent between elements and steps: over a tensor, the errors of its movement
    add as a random walk, not in one direction, and their norm stays under one gap's share (2^-3)
    of the movement's norm (measured: 0.020 to 0.053 after 5 steps, cpp). (The elementwise worst case,
    3 N 2^-3 after N steps, says nothing useful at 8 bits.)"""
    steps = 5
    params, opt = run(device, backend, steps, optimizer=optimizer)
    if optimizer is FusedLAMB:
        errors = movement_error(params, lambda start: Float64LAMB([{"params": start}], lr=0.05), steps)
        keys = ("exp_avg", "exp_avg_sq")
    else:
        errors = movement_error(params, lambda start: Float64LARS([{"params": start}], **LARS), steps)
        keys = ("momentum_buffer",)
    assert max(errors) < SPACING, errors
    for p in params:
        for key in keys:
            assert opt.state[p][key].dtype in (torch.int8, torch.uint8)
            assert opt.state[p][key + "_scales"].shape == (n_blocks(p.numel()),)


@on_every_backend
def test_int8_states_are_deterministic_and_depend_on_the_seed(device, backend):
    first, opt1 = run(device, backend, 3)
    second, opt2 = run(device, backend, 3)
    other, opt3 = run(device, backend, 3, seed=7)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_scales", "exp_avg_sq_scales"):
            assert torch.equal(opt1.state[a][key], opt2.state[b][key])
    assert any(not torch.equal(opt1.state[a]["exp_avg_sq"], opt3.state[c]["exp_avg_sq"]) for a, c in zip(first, other))


@pytest.mark.parametrize("optimizer", [FusedLAMB, FusedLARS])
def test_backends_agree_on_int8_states(optimizer):
    """The same codes everywhere, but where two backends' fp32 arithmetic differs in its last bit at a
    rounding's threshold (rare: one code apart); the scales, maxima of fp32 values, within an ulp."""
    backends = [b for b in ("torch", "cpp", "triton") if b in lamb_kernels.available_backends("cpu")]
    runs = {b: run("cpu", b, 3, optimizer=optimizer) for b in backends}
    keys = ("exp_avg", "exp_avg_sq") if optimizer is FusedLAMB else ("momentum_buffer",)
    base_params, base_opt = runs[backends[0]]
    for name in backends[1:]:
        params, opt = runs[name]
        for key in keys:
            a = torch.cat([base_opt.state[p][key].flatten().int() for p in base_params])
            b = torch.cat([opt.state[p][key].flatten().int() for p in params])
            assert (a != b).float().mean() < 1e-2 and (a - b).abs().max() <= 1, (name, key)
            a = torch.cat([base_opt.state[p][key + "_scales"] for p in base_params])
            b = torch.cat([opt.state[p][key + "_scales"] for p in params])
            torch.testing.assert_close(a, b, rtol=3e-7, atol=0)
        for p, q in zip(base_params, params):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@on_every_backend
def test_int8_state_bytes(device, backend):
    params, opt = run(device, backend, 1)
    state_bytes = sum(t.numel() * t.element_size() for p in params for k, t in opt.state[p].items()
                      if k.startswith("exp_avg"))
    n = sum(p.numel() for p in params)
    assert state_bytes == 2 * n + 8 * sum(n_blocks(p.numel()) for p in params)  # 1 + 1 bytes, + 8 per block


# -- 4. checkpoints and conversions ---------------------------------------------------------------

@pytest.mark.parametrize("optimizer", [FusedLAMB, FusedLARS])
@on_every_backend
def test_an_int8_checkpoint_resumes_bit_for_bit(device, backend, optimizer, reused_steps):
    params, opt = run(device, backend, 3, optimizer=optimizer)
    saved = copy.deepcopy(opt.state_dict())
    key = "exp_avg" if optimizer is FusedLAMB else "momentum_buffer"
    assert saved["state"][0][key].dtype == torch.int8 and saved["state"][0][key + "_scales"].dtype == torch.float32
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    defaults = dict(lr=0.05) if optimizer is FusedLAMB else LARS
    resumed = optimizer(copies, backend=backend, state_dtype=INT8, **defaults)
    resumed.load_state_dict(saved)
    step_side_by_side(opt, params, resumed, copies, (3, 4, 5))
    assert reused_steps(opt) >= 2 and reused_steps(resumed) == 0
    for p, q in zip(params, copies):
        assert torch.equal(p, q) and torch.equal(opt.state[p][key], resumed.state[q][key])


@pytest.mark.parametrize("saved_dtype, loaded_dtype", [(torch.float32, INT8), (INT8, torch.float32),
                                                        (torch.bfloat16, INT8), (INT8, torch.bfloat16)])
@on_every_backend
def test_checkpoints_load_into_another_state_dtype(device, backend, saved_dtype, loaded_dtype):
    """Converted on load through float32 values: codes from the nearest code (no step keys them),
    floats from the decoded codes, exactly (then rounded to the nearest bf16)."""
    params, opt = run(device, backend, 2, state_dtype=saved_dtype)
    saved = copy.deepcopy(opt.state_dict())
    target = FusedLAMB(make_params(device, seed=1), backend=backend, lr=0.05, state_dtype=loaded_dtype)
    target.load_state_dict(saved)
    loaded = target.param_groups[0]["params"]
    assert target.param_groups[0]["state_dtype"] == loaded_dtype
    for p, q in zip(params, loaded):
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            state, value = target.state[q], opt.state[p][key]
            if loaded_dtype == INT8:
                expected = quantize(value.float(), signed)
                assert torch.equal(state[key], expected[0]) and torch.equal(state[key + "_scales"], expected[1])
            else:
                decoded = dequantize(value, opt.state[p][key + "_scales"])
                assert key + "_scales" not in state and torch.equal(state[key], decoded.to(loaded_dtype))
    for q, g in zip(loaded, grads_for(loaded, 9)):
        q.grad = g
    target.step()


@on_every_backend
def test_an_apex_float32_checkpoint_loads_into_an_int8_optimizer(device, backend):
    """apex keeps its step count per group and its moments in fp32."""
    params, opt = run(device, backend, 2, state_dtype=torch.float32)
    saved = copy.deepcopy(opt.state_dict())
    for entry in saved["state"].values():
        del entry["step"]
    saved["param_groups"][0]["step"] = 2
    target = FusedLAMB(make_params(device, seed=1), backend=backend, lr=0.05, state_dtype=INT8)
    target.load_state_dict(saved)
    q = target.param_groups[0]["params"][0]
    assert target.state[q]["exp_avg"].dtype == torch.int8 and float(target.state[q]["step"]) == 2
    torch.testing.assert_close(dequantize(target.state[q]["exp_avg"], target.state[q]["exp_avg_scales"]),
                               opt.state[params[0]]["exp_avg"], rtol=SPACING / 2, atol=1e-9)


@pytest.mark.parametrize("optimizer", [FusedLAMB, FusedLARS])
@on_every_backend
def test_state_dtype_changed_between_steps_converts_the_states(device, backend, optimizer):
    params, opt = run(device, backend, 2, state_dtype=torch.float32, optimizer=optimizer)
    key = "exp_avg" if optimizer is FusedLAMB else "momentum_buffer"
    opt.param_groups[0]["state_dtype"] = INT8
    for p, g in zip(params, grads_for(params, 5)):
        p.grad = g
    opt.step()
    assert all(opt.state[p][key].dtype == torch.int8 and key + "_scales" in opt.state[p] for p in params)
    opt.param_groups[0]["state_dtype"] = torch.float32
    opt.step()
    assert all(opt.state[p][key].dtype == torch.float32 and key + "_scales" not in opt.state[p] for p in params)


@on_every_backend
def test_a_new_memory_layout_encodes_the_codes_afresh(device, backend):
    """Blocks are runs of elements in memory order: a parameter turned channels_last gets codes
    encoded in its new order, of the same values (to within a nearest rounding)."""
    if backend == "torch":
        pytest.skip("the torch backend keeps any layout")
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 6, 5, 3, generator=gen).to(device))]
    opt = FusedLAMB(params, backend=backend, lr=0.05, state_dtype=INT8)
    params[0].grad = torch.randn(params[0].shape, generator=gen).to(device)
    opt.step()
    values = dequantize(opt.state[params[0]]["exp_avg"], opt.state[params[0]]["exp_avg_scales"])
    params[0].data = params[0].data.to(memory_format=torch.channels_last)
    params[0].grad = torch.zeros_like(params[0])
    opt._step_cache = None
    state = opt.state[params[0]]
    converted = [state[k] for k in ("exp_avg",)]
    opt.step()
    state = opt.state[params[0]]
    assert state["exp_avg"].stride() == params[0].stride() and state["exp_avg"] is not converted[0]
    # two roundings: the new layout's encoding (to the nearest, half a gap) and the step's (stochastic,
    # under one gap); the bound was one gap, which 1 draw in 60 exceeded (0.1265)
    torch.testing.assert_close(dequantize(state["exp_avg"], state["exp_avg_scales"]), 0.9 * values,
                               rtol=(1 + SPACING / 2) * (1 + SPACING) - 1, atol=1e-9)


def test_bad_int8_checkpoints_are_refused_by_name_and_change_nothing():
    params, opt = run("cpu", "torch", 2)
    saved = copy.deepcopy(opt.state_dict())
    target = FusedLAMB(make_params("cpu", seed=1), backend="torch", lr=0.05, state_dtype=INT8)
    before = copy.deepcopy(target.state_dict())
    missing = copy.deepcopy(saved)
    del missing["state"][1]["exp_avg_sq_scales"]
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[1\]\['exp_avg_sq'\] .* needs 'exp_avg_sq_scales'"):
        target.load_state_dict(missing)
    swapped = copy.deepcopy(saved)
    swapped["state"][0]["exp_avg"] = swapped["state"][0]["exp_avg"].to(torch.uint8)
    with pytest.raises(TypeError, match=r"\['exp_avg'\] .* must hold int8 codes, got torch.uint8"):
        target.load_state_dict(swapped)
    assert target.state_dict() == before
    with pytest.raises(ValueError, match=r"state_dtype must be one of .*'int8', got 'int4'"):
        FusedLARS(make_params("cpu"), state_dtype="int4")


@on_every_backend
def test_int8_states_edited_by_hand_are_refused_before_any_change(device, backend):
    params, opt = run(device, backend, 1)
    opt.state[params[0]]["exp_avg_scales"] = torch.zeros(2, device=device)  # the wrong number of blocks (1)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"the 'exp_avg' state of param_groups\[0\]\['params'\]\[0\] holds 8-bit "
                                         r"codes, so the state needs 'exp_avg_scales': float32 block scales of shape "
                                         r"\(1,\), contiguous, on \S+, got \(2,\) torch.float32"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


# -- 5. reused steps, capturable counts, master weights, a skipped step --------------------------

@on_every_backend
def test_reused_steps_and_capturable_counts_encode_as_full_host_steps(device, backend, reused_steps):
    runs = []
    for reuse, capturable in ((True, False), (False, False), (True, True)):
        params = make_params(device)
        opt = FusedLAMB(params, backend=backend, lr=0.05, state_dtype=INT8, capturable=capturable)
        for step in range(4):
            for p, g in zip(params, grads_for(params, step)):
                p.grad = g
            if not reuse:
                opt._step_cache = None
            opt.step()
        runs.append((params, opt))
    assert reused_steps(runs[0][1]) >= 2 and reused_steps(runs[1][1]) == 0
    for params, opt in runs[1:]:
        for p, q in zip(runs[0][0], params):
            assert torch.equal(p, q) and torch.equal(runs[0][1].state[p]["exp_avg_sq"], opt.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("optimizer", [FusedLAMB, FusedLARS])
@on_every_backend
def test_int8_states_with_master_weights_and_a_skipped_step(device, backend, optimizer):
    """bf16 parameters with fp32 masters and int8 states; a GradScaler's non-finite step leaves every
    code, scale, step count and parameter as it was."""
    params = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in make_params(device)]
    defaults = dict(lr=0.05) if optimizer is FusedLAMB else LARS
    opt = optimizer(params, backend=backend, state_dtype=INT8, master_weights=True, **defaults)
    for step in range(2):
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g.to(torch.bfloat16)
        opt.step()
    key = "exp_avg" if optimizer is FusedLAMB else "momentum_buffer"
    assert all(opt.state[p]["master_param"].dtype == torch.float32 and opt.state[p][key].dtype == torch.int8
               for p in params)
    assert_a_skipped_step_changes_nothing(opt, params, device)


def test_the_torch_backend_keeps_codes_on_a_skipped_step():
    """Re-encoding decoded values may move a code by one (the division by the scale rounds), so the
    torch backend keeps the old codes and scales where a GradScaler found a non-finite grad."""
    from lamb_kernels.torch_backend import _store_codes_

    codes, scales = quantize(wide_range(3 * BLOCK), True)
    kept = codes.clone(), scales.clone()
    new_values = [wide_range(3 * BLOCK, seed=5)]
    _store_codes_([codes], [scales], new_values, [123], 0, True, torch.ones(1))
    assert torch.equal(codes, kept[0]) and torch.equal(scales, kept[1])
    _store_codes_([codes], [scales], new_values, [123], 0, True, torch.zeros(1))
    assert torch.equal(codes, quantize_stochastic(new_values[0], 123, 0, True)[0])


# -- 6. found by review: small elements, subnormal blocks, dtypes edited by hand -------------------

def test_a_nonzero_v_never_rounds_to_zero():
    """Below v's smallest code a nonzero value takes that code (biased up), whatever the random bits:
    were v to round to 0 while m did not, the element's update would be m / eps."""
    x = torch.zeros(BLOCK)
    x[0] = 1.0
    x[1:] = torch.logspace(-45, -9, BLOCK - 1)  # from under 2^-31 of the largest to above it
    for key in range(50):
        codes, scales = quantize_stochastic(x, key, 1, False)
        assert ((codes != 0) == (x != 0)).all()
    codes, _ = quantize(x, False)
    assert (codes[x < 2.0**-31] == 1).all()


@on_every_backend
def test_small_elements_beside_a_large_one_get_no_outsized_update(device, backend):
    """One grad of 1 and 255 of 1e-5 in a block, the trust ratio held at 1: the small elements' per-step
    update stays within the float32 one's size (measured over 300 steps: half of it on average, 1.5
    times at most), where v rounding to 0 gave them m / eps, up to 30 times it."""
    updates = {}
    for state_dtype in (torch.float32, INT8):
        p = torch.nn.Parameter(torch.zeros(BLOCK, device=device))
        opt = FusedLAMB([p], lr=1.0, weight_decay=0.0, max_grad_norm=0.0, trust_ratio_bounds=(1.0, 1.0),
                        state_dtype=state_dtype, backend=backend)
        grad = torch.full((BLOCK,), 1e-5, device=device)
        grad[0] = 1.0
        moves = []
        for _ in range(60):
            before = p.detach().clone()
            p.grad = grad.clone()
            opt.step()
            moves.append((before - p.detach())[1:].cpu())
        updates[state_dtype] = torch.stack(moves[20:])
    reference = updates[torch.float32].max()
    assert updates[INT8].max() < 2 * reference and updates[INT8].mean() > 0.2 * reference


def test_a_block_of_subnormal_values_is_stored_as_zeros():
    """A block whose largest magnitude is subnormal (its reciprocal would overflow) gets the scale 0:
    zeros stay zeros, and every value is within 2^-126 of itself."""
    x = torch.zeros(2 * BLOCK)
    x[:BLOCK] = torch.randn(BLOCK) * 1e-39
    x[BLOCK] = 1.0
    for codes, scales in (quantize(x, True), quantize_stochastic(x, 3, 0, True), quantize(x.abs(), False)):
        assert scales[0] == 0 and (codes[:BLOCK] == 0).all() and scales[1] == 1.0
        assert (dequantize(codes, scales) - (x if codes.dtype == torch.int8 else x.abs())).abs().max() < 2.0**-126


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_native_kernels_store_subnormal_blocks_as_zeros(backend):
    if backend not in native_backends():
        pytest.skip(f"{backend} unavailable")
    backend_object = lamb_kernels.backends.create_backend(backend)
    g = torch.zeros(3 * BLOCK)
    g[:BLOCK] = torch.randn(BLOCK) * 1e-39
    g[2 * BLOCK:] = torch.randn(BLOCK)
    m, v = [torch.ones(g.numel(), dtype=torch.int8)], [torch.ones(g.numel(), dtype=torch.uint8)]
    m_scales, v_scales = [torch.ones(3)], [torch.ones(3)]
    hyper = keyed_table(LambColumn, [77], BETA3=1.0, ONE_MINUS_BETA2=1.0, BC1=1.0, BC2=1.0, EPS=1e-6)
    backend_object._op("lamb_moments")([torch.zeros_like(g)], [g], m, v, m_scales, v_scales, hyper, None, None, None,
                                       backend_object.chunk_size)
    expected, expected_scales = quantize_stochastic(g, 77, 0, True)
    assert torch.equal(m[0], expected) and torch.equal(m_scales[0], expected_scales)
    assert m_scales[0][0] == 0 and m_scales[0][1] == 0 and (m[0][:2 * BLOCK] == 0).all()
    expected, expected_scales = quantize_stochastic(g * g, 77, 1, False)
    assert torch.equal(v[0], expected) and torch.equal(v_scales[0], expected_scales)


@pytest.mark.parametrize("optimizer", [FusedLAMB, FusedLARS])
def test_a_state_set_by_hand_in_another_float_dtype_is_encoded(optimizer):
    """The torch backend keeps a float16 or float64 state set by hand in a float group; in an int8
    group it is encoded at the next step, like a float32 one."""
    params, opt = run("cpu", "torch", 1, optimizer=optimizer)
    key = "exp_avg" if optimizer is FusedLAMB else "momentum_buffer"
    state = opt.state[params[0]]
    state[key] = dequantize(state[key], state[key + "_scales"]).to(torch.float16)
    del state[key + "_scales"]
    for p, g in zip(params, grads_for(params, 1)):
        p.grad = g
    opt.step()
    assert state[key].dtype == torch.int8 and state[key + "_scales"].shape == (n_blocks(params[0].numel()),)


def test_a_step_refusing_bad_scales_names_them():
    params, opt = run("cpu", "cpp" if "cpp" in native_backends() else "torch", 1)
    opt.state[params[0]]["exp_avg_sq_scales"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"'exp_avg_sq_scales': float32 block scales of shape .*got \(5,\) torch.float32"):
        opt.step()


def test_lars_operators_take_an_int8_bucket_of_empty_tensors():
    """Codes are told by their dtype, empty ones too (the CUDA operator cannot read which tensors have
    momentum): every buffer empty, none marked as having momentum, the scales are still taken."""
    if "cpp" not in native_backends():
        pytest.skip("cpp unavailable")
    params, grads = [torch.zeros(0), torch.zeros(0, 3)], [torch.zeros(0), torch.zeros(0, 3)]
    buffers = [torch.zeros(0, dtype=torch.int8), torch.zeros(0, 3, dtype=torch.int8)]
    torch.ops.lamb_kernels.lars_apply(params, grads, buffers, [torch.zeros(0), torch.zeros(0)], torch.zeros(2, WIDTH),
                                      None, None, None, [], 256)


def test_the_triton_operators_refuse_v_codes_of_the_wrong_dtype():
    if "triton" not in native_backends():
        pytest.skip("triton unavailable")
    ops = torch.ops.lamb_kernels
    p, g = [torch.randn(300)], [torch.randn(300)]
    m, v = [torch.zeros(300, dtype=torch.int8)], [torch.zeros(300, dtype=torch.int8)]
    with pytest.raises(ValueError, match=r"exp_avg_sqs must be uint8 codes exactly where exp_avgs are int8 codes"):
        ops.triton_lamb_moments(p, g, m, v, [torch.zeros(2)], [torch.zeros(2)], torch.zeros(1, WIDTH), None, None,
                                None, 8192)
