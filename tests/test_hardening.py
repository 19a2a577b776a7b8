"""What users change between steps, and the edges where backends used to part ways: a parameter
replaced or re-laid out after its state exists, hyperparameters edited in param_groups or loaded,
tensor and string learning rates, a parameter given twice, non-finite trust ratios, unknown state
entries, and the torch backend's sums of squares over very long tensors."""
import copy

import pytest
import torch

import lamb_kernels
import lamb_kernels.torch_backend
from harness import on_every_backend, rel_error
from lamb_float64 import Float64LAMB
from lamb_kernels import FusedLAMB, FusedLARS, FusedMixedPrecisionLamb
from tolerances import BACKENDS_EXTREME_RTOL, LONG_SUM_RTOL, PARAM_RTOL, SAME_MATH_ATOL, SAME_MATH_RTOL

LARS_OPTIONS = dict(lr=0.2, momentum=0.9, weight_decay=1e-4)
OPTIMIZERS = [pytest.param(FusedLAMB, {}, id="lamb"), pytest.param(FusedLARS, LARS_OPTIONS, id="lars")]


def make_params(device, shapes=((5,), (3, 4), (7,)), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)


def train(opt, params, steps, first=0):
    for step in range(first, first + steps):
        set_grads(params, 100 + step)
        opt.step()


def snapshot(opt, params):
    """Every bit a failed step must leave alone: params, state tensors, step counts, groups."""
    state = {i: {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in opt.state[p].items()}
             for i, p in enumerate(params) if p in opt.state}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return [p.detach().clone() for p in params], state, copy.deepcopy(groups)


def assert_unchanged(before, after):
    for a, b in zip(before[0], after[0]):
        assert a.shape != b.shape or torch.equal(a, b)
    assert before[1].keys() == after[1].keys()
    for i, entry in before[1].items():
        assert entry.keys() == after[1][i].keys()
        for key, value in entry.items():
            other = after[1][i][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (i, key)



def assert_refused(opt, params, error, match):
    """A step raises `error` matching `match`, and every parameter, state tensor and step count is
    as it was."""
    before = snapshot(opt, params)
    with pytest.raises(error, match=match):
        opt.step()
    assert_unchanged(before, snapshot(opt, params))

# -- 1. a parameter replaced or re-laid out after its state exists ---------------------------------

@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_parameter_of_another_shape_is_refused_before_any_change(device, backend, optimizer, options):
    params = make_params(device)
    opt = optimizer(params, backend=backend, **options)
    train(opt, params, 2)  # two steps: the state check is cached by then
    params[0].data = torch.randn(1000, device=device)
    set_grads(params, 7)
    assert_refused(opt, params, ValueError,
                   r"optimizer state of param_groups\[0\]\['params'\]\[0\] \(\(1000,\).*does not fit it.*replaced")
    del opt.state[params[0]]  # the way out the message names: the parameter starts afresh
    opt.step()
    assert opt.state[params[0]] and all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_state_follows_a_parameter_moved_to_channels_last(device, backend, optimizer, options):
    """``module.to(memory_format=torch.channels_last)`` after some steps: the state is copied into
    the new layout, and the run continues as if the layout had never changed."""
    def run(switch):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 4, 3).to(device)
        params = list(conv.parameters())
        opt = optimizer(params, backend=backend, **options)
        train(opt, params, 2)
        if switch:
            conv.to(memory_format=torch.channels_last)
            assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        train(opt, params, 3, first=2)
        state = opt.state[conv.weight]
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key in state:
                assert state[key].stride() == conv.weight.stride(), key
        return [p.detach().cpu().contiguous() for p in params], [
            state[key].cpu().contiguous() for key in sorted(state) if key != "step"]

    switched, straight = run(True), run(False)
    for a, b in zip(switched[0] + switched[1], straight[0] + straight[1]):
        torch.testing.assert_close(a, b, rtol=SAME_MATH_RTOL, atol=SAME_MATH_ATOL)


# -- 2-4. hyperparameters edited in param_groups, strings, tensor learning rates --------------------

LAMB_BAD_EDITS = [
    ("betas", (0.9,), ValueError, r"param_groups\[0\]: betas must be a pair"),
    ("betas", 0.9, ValueError, r"param_groups\[0\]: betas must be a pair"),
    ("trust_ratio_bounds", (1.0,), ValueError, r"param_groups\[0\]: trust_ratio_bounds must be a pair"),
    ("weight_decay", "abc", TypeError, r"param_groups\[0\]: weight_decay must be a number, got 'abc'"),
    ("lr", "0.1", TypeError, r"param_groups\[0\]: lr must be a number, got '0.1'"),
    ("lr", torch.tensor([0.1, 0.2]), ValueError, r"param_groups\[0\]: lr must be a number or a one-element"),
    ("eps", -1.0, ValueError, r"param_groups\[0\]: eps must be in"),
    ("max_grad_norm", "1", TypeError, r"param_groups\[0\]: max_grad_norm must be a number"),
    ("adam_w_mode", "no", TypeError, r"param_groups\[0\]: adam_w_mode must be True or False"),
    ("layer_adaptation", torch.tensor([1.0, 0.0]), TypeError, r"param_groups\[0\]: layer_adaptation must be"),
]
LARS_BAD_EDITS = [
    ("momentum", "0.9", TypeError, r"param_groups\[0\]: momentum must be a number"),
    ("lr", torch.tensor([0.1, 0.2, 0.3]), ValueError, r"param_groups\[0\]: lr must be a number or a one-element"),
    ("nesterov", True, ValueError, r"param_groups\[0\]: nesterov=True needs"),  # with dampening below
    ("trust_coeff", -1.0, ValueError, r"param_groups\[0\]: trust_coeff must be in"),
]


@pytest.mark.parametrize("optimizer, options, edit", [
    *[pytest.param(FusedLAMB, {}, edit, id=f"lamb-{edit[0]}-{i}") for i, edit in enumerate(LAMB_BAD_EDITS)],
    *[pytest.param(FusedLARS, dict(LARS_OPTIONS, dampening=0.1), edit, id=f"lars-{edit[0]}-{i}")
      for i, edit in enumerate(LARS_BAD_EDITS)],
])
@on_every_backend
def test_hyperparameter_edited_in_param_groups_is_refused_before_any_change(device, backend, optimizer, options, edit):
    name, value, error, message = edit
    params = make_params(device)
    opt = optimizer(params, backend=backend, **options)
    train(opt, params, 2)
    good = opt.param_groups[0].get(name)
    opt.param_groups[0][name] = value
    set_grads(params, 9)
    assert_refused(opt, params, error, message)
    opt.param_groups[0][name] = good  # put right, the step runs again
    opt.step()


@on_every_backend
def test_missing_hyperparameter_is_named(device, backend):
    params = make_params(device)
    opt = FusedLAMB(params, backend=backend)
    train(opt, params, 1)
    del opt.param_groups[0]["betas"]
    assert_refused(opt, params, ValueError, r"param_groups\[0\]: the hyperparameter 'betas' is missing")


def test_betas_edited_in_place_are_checked_again():
    params = make_params("cpu")
    opt = FusedLAMB(params, betas=[0.9, 0.999], backend="torch")
    train(opt, params, 1)
    opt.param_groups[0]["betas"][1] = 1.5  # the same list object, mutated
    with pytest.raises(ValueError, match=r"betas\[1\] must be in"):
        opt.step()


@pytest.mark.parametrize("optimizer", [FusedLAMB, FusedLARS])
def test_string_lr_is_refused_like_torch_optim(optimizer):
    with pytest.raises(TypeError, match="lr must be a number, got '0.1'"):
        optimizer(make_params("cpu"), lr="0.1")
    with pytest.raises(TypeError):
        torch.optim.SGD(make_params("cpu"), lr="0.1")  # the behaviour we follow


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_lr_tensor_must_have_one_element(device, backend, optimizer, options):
    options = {k: v for k, v in options.items() if k != "lr"}
    with pytest.raises(ValueError, match="lr must be a number or a one-element"):
        optimizer(make_params(device), lr=torch.tensor([0.1, 0.1, 0.1]), backend=backend, **options)
    # A one-element tensor (of any shape) steps as the float does, on every backend.
    runs = []
    for lr in (0.05, torch.tensor([[0.05]], device=device)):
        params = make_params(device)
        opt = optimizer(params, lr=lr, backend=backend, **options)
        train(opt, params, 3)
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=SAME_MATH_RTOL, atol=SAME_MATH_ATOL)


@on_every_backend
def test_saved_groups_are_validated_before_loading(device, backend):
    params = make_params(device)
    opt = FusedLAMB(params, backend=backend)
    train(opt, params, 2)
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["betas"] = (0.9,)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"state_dict\['param_groups'\]\[0\]: betas must be a pair"):
        opt.load_state_dict(saved)
    assert_unchanged(before, snapshot(opt, params))
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][1]["step"] = "two"
    with pytest.raises(TypeError, match=r"state_dict\['state'\]\[1\]\['step'\] must be a number"):
        opt.load_state_dict(saved)
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][2]["exp_avg"] = [0.0] * 7
    with pytest.raises(TypeError, match=r"state_dict\['state'\]\[2\]\['exp_avg'\] .*must be a floating-point tensor"):
        opt.load_state_dict(saved)
    assert_unchanged(before, snapshot(opt, params))


# -- 5. the same parameter twice ----------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", [FusedLAMB, FusedLARS])
def test_same_parameter_twice_is_refused(optimizer):
    p, q = make_params("cpu")[:2]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] is param_groups\[0\]\['params'\]\[0\] again"):
        optimizer([p, p])
    with pytest.raises(ValueError, match=r"some parameters appear in more than one parameter group: "
                                         r"param_groups\[1\]\['params'\]\[0\] is param_groups\[0\]\['params'\]\[0\]"):
        optimizer([{"params": [p]}, {"params": [p, q]}])
    opt = optimizer([p])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[1\] is param_groups\[0\]\['params'\]\[0\]"):
        opt.add_param_group({"params": [q, p]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("optimizer", [FusedLAMB, FusedLARS])
def test_parameters_sharing_memory_are_refused(optimizer):
    base = torch.randn(10)
    with pytest.raises(ValueError, match=r"share memory"):
        optimizer([torch.nn.Parameter(base), torch.nn.Parameter(base)])
    with pytest.raises(ValueError, match=r"\['params'\]\[1\] and param_groups\[0\]\['params'\]\[0\] share memory"):
        optimizer([torch.nn.Parameter(base[:6]), torch.nn.Parameter(base[4:])])
    # Adjacent views do not overlap; interleaved ones (not dense) are the torch backend's to take.
    optimizer([torch.nn.Parameter(base[:5]), torch.nn.Parameter(base[5:])])
    grid = torch.randn(4, 6)
    optimizer([torch.nn.Parameter(grid[:, ::2]), torch.nn.Parameter(grid[:, 1::2])], backend="torch")


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_duplicate_made_after_construction_is_refused_at_the_step(device, backend, optimizer, options):
    params = make_params(device, shapes=((5,), (3, 4), (5,)))
    opt = optimizer(params, backend=backend, **options)
    train(opt, params, 2)
    opt.param_groups[0]["params"].append(params[0])  # by hand
    set_grads(params, 5)
    assert_refused(opt, params, ValueError, r"\['params'\]\[3\] is param_groups\[0\]\['params'\]\[0\] again")
    opt.param_groups[0]["params"].pop()
    params[2].data = params[0].data  # tied by hand: two parameters, one memory
    assert_refused(opt, params, ValueError,
                   r"param_groups\[0\]\['params'\]\[\d\] and param_groups\[0\]\['params'\]\[\d\] share memory")


# -- 6. a trust ratio that is not a number -------------------------------------------------------

def _huge_run(device, backend, optimizer, options, steps=2):
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter((torch.rand(s, generator=gen) + 1).mul(1e38).to(device)) for s in ((6,), (2, 3))]
    params.append(torch.nn.Parameter(torch.randn(4, generator=gen).to(device)))  # an ordinary tensor beside them
    opt = optimizer(params, backend=backend, **options)
    train(opt, params, steps)
    return [p.detach().cpu() for p in params]


NON_FINITE_CASES = [
    # ||p||^2 and ||u||^2 both overflow (u holds wd * p): the ratio is NaN, and so are the params.
    pytest.param(FusedLAMB, dict(weight_decay=0.01), "nan", id="lamb-nan"),
    pytest.param(FusedLAMB, dict(weight_decay=0.01, trust_ratio_bounds=(0.0, 10.0)), "nan", id="lamb-nan-bounds"),
    # Only ||p||^2 overflows (no decay, adaptation on): the ratio is +inf, which the bounds clamp.
    pytest.param(FusedLAMB, dict(weight_decay=0.0, use_nvlamb=True), "inf", id="lamb-inf"),
    pytest.param(FusedLAMB, dict(weight_decay=0.0, use_nvlamb=True, trust_ratio_bounds=(0.0, 10.0)), "clamped",
                 id="lamb-inf-bounds"),
    pytest.param(FusedLARS, dict(LARS_OPTIONS), "nan", id="lars-nan"),
    pytest.param(FusedLARS, dict(LARS_OPTIONS, trust_clip=True), "nan", id="lars-nan-clip"),
]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # (the Triton interpreter's numpy)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("optimizer, options, ratio", NON_FINITE_CASES)
@on_every_backend
def test_non_finite_trust_ratio_behaves_alike_on_every_backend(device, backend, optimizer, options, ratio):
    """docs/robustness.md: a NaN ratio propagates into the params (as in apex and timm);
    trust_ratio_bounds clamp an infinite ratio, never a NaN one. Every backend gives the torch
    backend's values, and the other tensors of the bucket are not touched by it."""
    expected = _huge_run("cpu", "torch", optimizer, options)
    actual = _huge_run(device, backend, optimizer, options)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=BACKENDS_EXTREME_RTOL, atol=0, equal_nan=True)
    huge = expected[0]
    if ratio == "nan":
        assert huge.isnan().all()
    elif ratio == "inf":
        assert not torch.isfinite(huge).any()
    else:
        assert torch.isfinite(huge).all()
    assert torch.isfinite(expected[2]).all()


# -- 7. state entries this optimizer does not use --------------------------------------------------

@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_unknown_state_entries_load_as_torch_optim_keeps_them(device, backend, optimizer, options):
    params = make_params(device)
    opt = optimizer(params, backend=backend, **options)
    train(opt, params, 2)
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][1]["extra"] = torch.tensor(3.0, dtype=torch.float64)
    saved["state"][1]["count"] = torch.tensor([1, 2, 3])
    saved["state"][1]["note"] = "kept"
    resumed = optimizer(make_params(device), backend=backend, **options)
    resumed.load_state_dict(saved)
    state = resumed.state[resumed.param_groups[0]["params"][1]]
    assert state["extra"].dtype == torch.float32 and state["extra"].device.type == device  # as torch.optim
    assert float(state["extra"]) == 3.0 and state["note"] == "kept"
    assert torch.equal(state["count"].cpu(), torch.tensor([1, 2, 3]))
    train(resumed, resumed.param_groups[0]["params"], 1, first=2)
    assert resumed.state_dict()["state"][1]["note"] == "kept"


# -- 8. the torch backend on very long tensors -----------------------------------------------------

def test_torch_backend_sums_of_squares_are_accurate_whatever_the_length():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=gen).add_(0.5) for n in (3, 16384, 16385, 5_000_000)]
    tensors.append(torch.randn(40, 2500, 30, generator=gen).permute(2, 0, 1))  # dense, not contiguous
    tensors.append(torch.randn(3000, 20, generator=gen)[:, ::2])  # not dense
    sums = lamb_kernels.torch_backend._sums_of_squares(tensors)
    for t, s in zip(tensors, sums):
        exact = float(t.double().square().sum())
        assert abs(float(s) - exact) <= LONG_SUM_RTOL * exact, t.shape


def test_torch_backend_lamb_step_on_50m_elements_matches_float64():
    """docs/design.md section 5 on one 50M-element tensor (torch's own fp32 norm is 7e-3 off at this size)."""
    gen = torch.Generator().manual_seed(0)
    n = 50_000_000
    p0 = torch.randn(n, generator=gen).add_(0.5)
    g = torch.randn(n, generator=gen).add_(0.25)
    p = torch.nn.Parameter(p0.clone())
    p.grad = g
    FusedLAMB([p], lr=0.1, backend="torch").step()  # clipping on: the global grad norm too
    reference = Float64LAMB([{"params": [p0]}], lr=0.1)
    del p0
    reference.step([[g]])
    assert rel_error(p, reference.groups[0]["params"][0]) <= PARAM_RTOL


@on_every_backend
def test_a_refused_step_is_checked_again_in_full(device, backend):
    """The same mistake twice, with the step put right between: refused both times (found by the
    property-based tests: the first refusal used to be remembered as checked)."""
    params = make_params(device)
    opt = FusedLARS(params, backend=backend, **LARS_OPTIONS)
    train(opt, params, 2)  # two steps: every check is cached by then
    for _ in range(2):  # no step between the two: nothing else looks at the groups again
        opt.param_groups[0]["params"].append(params[0])
        with pytest.raises(ValueError, match="again"):
            opt.step()
        opt.param_groups[0]["params"].pop()
    opt.step()


@on_every_backend
def test_state_of_another_optimizer_is_refused_on_load(device, backend):
    """A FusedLARS checkpoint into FusedLAMB: its momentum buffers would be kept as unknown entries,
    and the moments a LAMB step needs are missing: refused at the load, not at the next step."""
    params = make_params(device)
    lars = FusedLARS(params, backend=backend, **LARS_OPTIONS)
    train(lars, params, 2)
    lamb = FusedLAMB(make_params(device), backend=backend)
    before = snapshot(lamb, lamb.param_groups[0]["params"])
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[0\] \(for param_groups\[0\]\['params'\]\[0\]\) "
                                         r"has no 'step', 'exp_avg', 'exp_avg_sq'"):
        lamb.load_state_dict(lars.state_dict())
    assert_unchanged(before, snapshot(lamb, lamb.param_groups[0]["params"]))


@on_every_backend
def test_step_count_set_by_hand_is_checked(device, backend):
    params = make_params(device, shapes=((5,), (3, 4)))
    opt = FusedLAMB([{"params": params[:1]}, {"params": params[1:]}], backend=backend)
    train(opt, params, 2)
    opt.state[params[1]]["step"] = 2  # a Python int, in the second group
    set_grads(params, 3)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"optimizer state of param_groups\[1\]\['params'\]\[0\].*step: 2"):
        opt.step()
    assert_unchanged(before, snapshot(opt, params))  # the first group's count did not move either
    opt.state[params[1]]["step"] = torch.tensor(2.0)
    opt.step()
    assert [float(opt.state[p]["step"]) for p in params] == [3.0, 3.0]


def test_non_tensor_put_into_a_group_is_named():
    params = make_params("cpu")
    opt = FusedLAMB(params, backend="torch")
    train(opt, params, 1)
    opt.param_groups[0]["params"].append([1.0, 2.0])
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[3\] is a list, not a tensor"):
        opt.step()


# -- found by review ------------------------------------------------------------------------------

@on_every_backend
def test_cpu_tensor_hyperparameters_written_in_place_are_checked_again(device, backend):
    params = make_params(device)
    lr, wd = torch.tensor(0.01), torch.tensor(0.01)
    opt = FusedLAMB(params, lr=lr, weight_decay=wd, backend=backend)
    train(opt, params, 2)
    for tensor, name in ((lr, "lr"), (wd, "weight_decay")):
        good = float(tensor)
        tensor.fill_(float("nan"))  # the same tensor object, a bad value
        set_grads(params, 4)
        assert_refused(opt, params, ValueError, rf"param_groups\[0\]: {name} must be in")
        tensor.fill_(good)
    opt.step()


@on_every_backend
def test_a_stale_master_is_not_reused_after_a_round_trip_through_fp32(device, backend):
    p = torch.nn.Parameter(torch.randn(8, device=device).bfloat16())
    opt = FusedLARS([p], lr=0.1, backend=backend, master_weights=True)
    train(opt, [p], 2)
    p.data = p.data.float()  # model.float(): the parameter is its own master now
    train(opt, [p], 2, first=2)
    assert "master_param" not in opt.state[p]
    p.data = p.data.bfloat16()  # and back: a new master, from the parameter as it is now
    fp32_value = opt.param_groups[0]["params"][0].detach().float().clone()
    p.grad = torch.zeros(8, device=device, dtype=torch.bfloat16)
    opt.step()  # no weight decay, no momentum: a zero grad leaves everything in place
    assert torch.equal(opt.state[p]["master_param"], fp32_value)
    assert torch.equal(p.detach().float(), fp32_value)


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_state_tensors_shared_between_parameters_are_refused(device, backend, optimizer, options):
    params = make_params(device, shapes=((5,), (5,)))
    opt = optimizer(params, backend=backend, **options)
    train(opt, params, 2)
    key = "exp_avg" if optimizer is FusedLAMB else "momentum_buffer"
    opt.state[params[1]][key] = opt.state[params[0]][key]  # by hand
    set_grads(params, 6)
    assert_refused(opt, params, ValueError, rf"the '{key}' state of param_groups\[0\]\['params'\]\[\d\] and the "
                                            rf"'{key}' state of param_groups\[0\]\['params'\]\[\d\] share memory")


def test_load_state_dict_changes_nothing_when_a_value_cannot_be_placed():
    params = make_params("cpu")
    opt = FusedLAMB(params, lr=0.1, backend="torch")
    train(opt, params, 2)
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["lr"] = 0.5
    saved["state"][2]["extra"] = torch.empty(3, device="meta")  # a tensor with no data
    before = snapshot(opt, params)
    with pytest.raises(NotImplementedError):
        opt.load_state_dict(saved)
    assert_unchanged(before, snapshot(opt, params))
    assert opt.param_groups[0]["lr"] == 0.1


def test_saved_states_lacking_or_not_dicts_are_refused_at_load():
    params = make_params("cpu")
    opt = FusedLAMB(params, backend="torch")
    train(opt, params, 1)
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["exp_avg"] = None
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[0\] \(for param_groups\[0\]\['params'\]\[0\]\) "
                                         r"has no 'exp_avg'"):
        opt.load_state_dict(saved)
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][1] = [1, 2]
    with pytest.raises(TypeError, match=r"state_dict\['state'\]\[1\] .* must be a dict of state entries, got list"):
        opt.load_state_dict(saved)


def test_groups_edited_out_of_shape_are_named():
    model = torch.nn.Linear(3, 2)
    opt = FusedLAMB(lamb_kernels.param_groups(model, 0.01, with_names=True), backend="torch")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.param_groups[0]["params"].append(model.weight)  # a group with names, a parameter without one
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] is param_groups\[0\]\['params'\]\[0\] "
                                         r"\('weight'\) again"):
        opt.step()
    opt.param_groups[0]["params"].pop()
    del opt.param_groups[1]["params"]
    with pytest.raises(ValueError, match=r"param_groups\[1\] must hold its parameters as a list under 'params'"):
        opt.step()


# -- round two: what a hostile campaign found (issue 25) --------------------------------------------

def _transposed_grads(params, seed):
    """Grads laid out unlike their parameters: the multi-tensor backends copy them, so no step is
    reused and every step takes the full path."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(tuple(reversed(p.shape)), generator=gen).to(p.device).t() if p.dim() == 2 else \
            torch.randn(p.shape, generator=gen).to(p.device)


GROUP_DUPLICATIONS = {
    "appended": lambda groups: groups.append(groups[0]),
    "inserted": lambda groups: groups.insert(0, groups[1]),
    "written over another": lambda groups: groups.__setitem__(1, groups[0]),
}


@pytest.mark.parametrize("full_path", [False, True], ids=["steady", "full-path"])
@pytest.mark.parametrize("duplicate", GROUP_DUPLICATIONS)
@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_the_same_group_dict_twice_is_refused_on_every_path(device, backend, optimizer, options, duplicate, full_path):
    params = make_params(device, shapes=((5,), (3, 4), (7,)))
    opt = optimizer([{"params": params[:2]}, {"params": params[2:]}], backend=backend, **options)
    grads = _transposed_grads if full_path else set_grads
    for step in range(3):
        grads(params, step)
        opt.step()
    GROUP_DUPLICATIONS[duplicate](opt.param_groups)
    grads(params, 7)
    assert_refused(opt, params, ValueError,
                   r"param_groups\[\d\] is param_groups\[\d\] again \(the same dict\).*would step twice")


@pytest.mark.parametrize("what", ["param", "state"])
@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_a_tensor_whose_storage_was_freed_is_refused_before_any_change(device, backend, optimizer, options, what):
    params = make_params(device)
    opt = optimizer(params, backend=backend, **options)
    train(opt, params, 2)
    set_grads(params, 5)
    key = "exp_avg_sq" if optimizer is FusedLAMB else "momentum_buffer"
    kept = (params[1] if what == "param" else opt.state[params[1]][key]).detach().clone()
    freed = params[1] if what == "param" else opt.state[params[1]][key]
    before = snapshot(opt, [params[0], params[2]])
    freed.untyped_storage().resize_(0)  # as FSDP-like code frees an unsharded parameter
    named = r"param_groups\[0\]\['params'\]\[1\]" if what == "param" else rf"the '{key}' state of param_groups\[0\]\['params'\]\[1\]"
    with pytest.raises(ValueError, match=named + r" has a storage of 0 bytes, but its shape .* need 48: was its storage freed"):
        opt.step()
    assert_unchanged(before, snapshot(opt, [params[0], params[2]]))
    freed.untyped_storage().resize_(kept.numel() * kept.element_size())  # allocated again: the step goes on
    freed.detach().copy_(kept)
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)


@on_every_backend
def test_codes_set_by_hand_as_a_view_with_gaps_are_refused(device, backend):
    params = make_params(device, shapes=((300,), (20,)))
    opt = FusedLAMB(params, backend=backend, state_dtype="int8")
    train(opt, params, 2)
    codes = opt.state[params[0]]["exp_avg"]
    spaced = torch.zeros(2 * codes.numel(), dtype=codes.dtype, device=device)
    spaced[::2] = codes
    opt.state[params[0]]["exp_avg"] = spaced.as_strided(codes.shape, (2,))  # the same values, with gaps
    set_grads(params, 5)
    assert_refused(opt, params, ValueError,
                   r"the 'exp_avg' state of param_groups\[0\]\['params'\]\[0\] holds 8-bit codes as a view with "
                   r"gaps \(strides \(2,\)\).*must be dense")
    opt.state[params[0]]["exp_avg"] = spaced[::2].clone()  # a dense copy steps as the codes did
    opt.step()


NON_FLOATING_LRS = [torch.tensor(1, dtype=torch.uint8), torch.tensor(True), torch.tensor([1], dtype=torch.int64)]


@pytest.mark.parametrize("lr", NON_FLOATING_LRS, ids=lambda t: str(t.dtype))
@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_a_non_floating_lr_tensor_is_refused_by_name_on_every_backend(device, backend, optimizer, options, lr):
    params = make_params(device)
    with pytest.raises(TypeError, match=rf"^lr must be a number or a one-element floating-point tensor, got a "
                                        rf"tensor of dtype {lr.dtype}"):
        optimizer(params, backend=backend, **{**options, "lr": lr})
    opt = optimizer(params, backend=backend, **options)
    train(opt, params, 2)
    opt.param_groups[0]["lr"] = lr.to(device)
    set_grads(params, 5)
    assert_refused(opt, params, TypeError,
                   rf"param_groups\[0\]: lr must be a number or a one-element floating-point tensor, .*{lr.dtype}")
    opt.param_groups[0]["lr"] = lr.to(device, torch.float32)  # converted: the step goes downhill
    opt.step()


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, "int8"], ids=str)
@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_an_integer_state_entry_set_by_hand_is_refused_before_any_change(device, backend, optimizer, options,
                                                                         state_dtype):
    params = make_params(device, shapes=((5,), (300,)))
    opt = optimizer(params, backend=backend, state_dtype=state_dtype, **options)
    train(opt, params, 2)
    key = "exp_avg" if optimizer is FusedLAMB else "momentum_buffer"
    opt.state[params[1]][key] = torch.ones(300, dtype=torch.int32, device=device)
    set_grads(params, 5)
    assert_refused(opt, params, TypeError, rf"the '{key}' state of param_groups\[0\]\['params'\]\[1\] must be a "
                                           r"floating-point tensor \(or 8-bit codes\), got torch.int32")
    saved = opt.state_dict()  # a load refuses the same entry with the same words
    with pytest.raises(TypeError, match=rf"\['{key}'\] \(for param_groups\[0\]\['params'\]\[1\]\) must be a "
                                        r"floating-point tensor \(or 8-bit codes\), got torch.int32"):
        optimizer(make_params(device, shapes=((5,), (300,))), backend=backend, **options).load_state_dict(saved)


@pytest.mark.parametrize("switch, value", [("capturable", "False"), ("master_weights", "no"), ("capturable", 2),
                                           ("master_weights", None)])
@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
def test_constructor_switches_are_checked_as_group_edits_are(optimizer, options, switch, value):
    with pytest.raises(TypeError, match=rf"^{switch} must be True or False, got {value!r}"):
        optimizer(make_params("cpu"), backend="torch", **{**options, switch: value})
    if switch == "capturable":  # a group's copy of the switch, edited, is refused in the same words
        params = make_params("cpu")
        opt = optimizer(params, backend="torch", **options)
        opt.param_groups[0]["capturable"] = value
        set_grads(params, 1)
        assert_refused(opt, params, TypeError, rf"param_groups\[0\]: capturable must be True or False, got {value!r}")


# -- torch.optim's conventions (its TestOptimRenewed and timm's optimizer tests) ---------------------

@pytest.mark.parametrize("optimizer, options", [*OPTIMIZERS, pytest.param(FusedMixedPrecisionLamb, {}, id="mp-lamb")])
def test_save_load_save_is_the_identity(optimizer, options):
    params = make_params("cpu")
    opt = optimizer(params, backend="torch", **options)
    train(opt, params, 2)
    saved = opt.state_dict()
    other = optimizer(make_params("cpu", seed=1), backend="torch", **options)
    other.load_state_dict(copy.deepcopy(saved))
    again = other.state_dict()
    assert again["param_groups"] == saved["param_groups"]  # no key of torch's own ('differentiable') added
    assert again["state"].keys() == saved["state"].keys()
    other.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})
    assert other.param_groups[-1].keys() == other.param_groups[0].keys()


def test_lars_without_momentum_keeps_no_state():
    params = make_params("cpu")
    for backend in lamb_kernels.available_backends("cpu"):
        opt = FusedLARS(params, backend=backend, lr=0.1, weight_decay=1e-4)
        train(opt, params, 3)
        assert dict(opt.state) == {} and opt.state_dict()["state"] == {}, backend  # as torch's SGD
    opt = FusedLARS(params, backend="torch", lr=0.1, momentum=0.9)
    train(opt, params, 1)
    assert list(opt.state_dict()["state"][0]) == ["momentum_buffer"]

