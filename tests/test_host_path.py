"""The host path of a steady loop (lamb_kernels/optimizers/plan_cache.py): once a full step has
passed, a step whose parameters, state entries and grads' layouts are as they were reuses its plans.
Each test here first takes that path (asserting it did), then changes one thing a user may change
between steps: the step must then raise what a full step raises, leaving params and states as they
were, or step exactly as a full step would."""
import copy

import pytest
import torch

from harness import on_every_backend
from lamb_kernels import FusedLAMB, FusedLARS
from lamb_kernels.optimizers import validation

LARS_OPTIONS = dict(lr=0.2, momentum=0.9, weight_decay=1e-4)
OPTIMIZERS = [pytest.param(FusedLAMB, {}, id="lamb"), pytest.param(FusedLARS, LARS_OPTIONS, id="lars")]
SHAPES = ((5,), (3, 4), (7,))


def make_params(device, shapes=SHAPES, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)


def warm(opt, params, steps=3):
    """Steps until the plans are reused (the first step creates state, the second plans the loop),
    and asserts the last one reused them (it kept the cache it found: a full step makes a new one)."""
    for step in range(steps):
        set_grads(params, 100 + step)
        cache = opt._step_cache
        opt.step()
    assert cache is not None and opt._step_cache is cache


def snapshot(opt, params):
    state = {i: {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in opt.state[p].items()}
             for i, p in enumerate(params) if p in opt.state}
    return [p.detach().clone() for p in params], state


def assert_same(before, after):
    for a, b in zip(before[0], after[0]):
        assert a.shape == b.shape and torch.equal(a, b)
    assert before[1].keys() == after[1].keys()
    for i, entry in before[1].items():
        assert entry.keys() == after[1][i].keys()
        for key, value in entry.items():
            other = after[1][i][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (i, key)


def assert_steps_as_a_full_step(make, change, seed):
    """After reused steps, new grads (from `seed`), `change(opt, params)` and one more step: the same
    bits whether that step may reuse the plans or must take the full path. `make()` returns
    (optimizer, params)."""
    runs = []
    for reuse in (True, False):
        opt, params = make()
        warm(opt, params)
        set_grads(params, seed)
        change(opt, params)
        if not reuse:
            opt._step_cache = None
        opt.step()
        runs.append(snapshot(opt, params))
    assert_same(*runs)
    return opt


def assert_refused(opt, params, error, match):
    before = snapshot(opt, params)
    with pytest.raises(error, match=match):
        opt.step()
    assert_same(before, snapshot(opt, params))


# -- 1. the loop reuses its plans, and steps as the full path does, bit for bit --------------------

def _loop(device, backend, optimizer, options, steps, reuse, master=False):
    """A run with two groups, a parameter without a grad, a learning rate that changes every step
    (a scheduler), and with `master` bf16 parameters with fp32 masters; `reuse=False` drops the
    cache before every step, so each one takes the full path."""
    dtype = torch.bfloat16 if master else torch.float32
    params = make_params(device, shapes=((5,), (3, 4), (7,), (2, 3)), dtype=dtype)
    groups = [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}]
    opt = optimizer(groups, backend=backend, master_weights=master, **options)
    base_lr = opt.param_groups[0]["lr"]
    for step in range(steps):
        set_grads(params, 200 + step)
        params[3].grad = None if step % 3 == 2 else params[3].grad  # (a step without it: planned afresh)
        for group in opt.param_groups:
            group["lr"] = base_lr * (1.0 - 0.05 * step)
        if not reuse:
            opt._step_cache = None
        opt.step()
    return params, opt


@pytest.mark.parametrize("master", [False, True], ids=["fp32", "bf16-master"])
@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_reused_steps_match_full_steps_bit_for_bit(device, backend, optimizer, options, master, reused_steps):
    reused, opt = _loop(device, backend, optimizer, options, steps=8, reuse=True, master=master)
    full, full_opt = _loop(device, backend, optimizer, options, steps=8, reuse=False, master=master)
    assert reused_steps(opt) >= 2 and reused_steps(full_opt) == 0
    assert_same(snapshot(full_opt, full), snapshot(opt, reused))


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_a_steady_loop_reuses_every_step_after_the_second(device, backend, optimizer, options, reused_steps):
    params = make_params(device)
    opt = optimizer(params, backend=backend, **options)
    for step in range(5):
        set_grads(params, step)
        opt.step()
    assert reused_steps(opt) == 3


@on_every_backend
def test_lamb_step_counts_are_views_that_save_and_load(device, backend):
    params = make_params(device)
    opt = FusedLAMB(params, backend=backend)
    warm(opt, params)
    steps = [opt.state[p]["step"] for p in params]
    assert all(t.dim() == 0 and t.dtype == torch.float32 and t.device.type == "cpu" for t in steps)
    assert [float(t) for t in steps] == [3.0] * 3
    other = FusedLAMB(make_params(device), backend=backend)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert [float(other.state[p]["step"]) for p in other.param_groups[0]["params"]] == [3.0] * 3


# -- 2. what a user changes between steps, after the plans were reused -----------------------------

def _grad_dtype(params):
    params[1].grad.data = torch.randn(params[1].shape, dtype=torch.float64, device=params[1].device)


def _grad_shape(params):
    params[1].grad.data = torch.randn(13, device=params[1].device)


def _grad_sparse(params):
    params[1].grad = torch.randn(params[1].shape, device=params[1].device).to_sparse()


@pytest.mark.parametrize("corrupt, error, match", [
    (_grad_dtype, TypeError, r"grad of param_groups\[0\]\['params'\]\[1\] has dtype torch.float64"),
    (_grad_shape, ValueError, r"grad of param_groups\[0\]\['params'\]\[1\] has shape \(13,\)"),
    (_grad_sparse, RuntimeError, r"grad of param_groups\[0\]\['params'\]\[1\] is sparse"),
], ids=["dtype", "shape", "sparse"])
@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_a_bad_grad_after_reused_steps_is_refused(device, backend, optimizer, options, corrupt, error, match):
    params = make_params(device)
    opt = optimizer(params, backend=backend, **options)
    warm(opt, params)
    set_grads(params, 9)
    corrupt(params)
    assert_refused(opt, params, error, match)
    set_grads(params, 10)
    opt.step()  # put right: steps again


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_a_grad_on_another_device_after_reused_steps_is_refused(device, backend, optimizer, options):
    if device == "cpu":
        pytest.skip("needs a second device type: a CPU grad's data cannot be put on another one here")
    params = make_params(device)
    opt = optimizer(params, backend=backend, **options)
    warm(opt, params)
    set_grads(params, 9)
    params[1].grad.data = params[1].grad.data.cpu()
    assert_refused(opt, params, ValueError, r"grad of param_groups\[0\]\['params'\]\[1\] is on cpu")


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_a_grad_in_another_layout_steps_as_a_full_step(device, backend, optimizer, options):
    """A grad with the parameter's shape but other strides (a transposed copy) is copied into the
    parameter's layout by the full path: the reused plans must not hand it to the kernels."""
    def make():
        params = make_params(device)
        return optimizer(params, backend=backend, **options), params

    def transpose(opt, params):
        params[1].grad = params[1].grad.t().contiguous().t()  # (3, 4) with strides (1, 3)

    assert_steps_as_a_full_step(make, transpose, seed=11)


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_grads_in_another_layout_at_every_step_step_as_full_steps(device, backend, optimizer, options):
    """Grads laid out unlike their parameter at every step (a model's backward that writes them
    transposed): each is copied into its parameter's layout, however many steps come."""
    runs = []
    for reuse in (True, False):
        params = make_params(device)
        opt = optimizer(params, backend=backend, **options)
        for step in range(4):
            set_grads(params, 400 + step)
            params[1].grad = params[1].grad.t().contiguous().t()
            if not reuse:
                opt._step_cache = None
            opt.step()
        runs.append(snapshot(opt, params))
    assert_same(*runs)


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_a_parameter_replaced_in_place_is_refused(device, backend, optimizer, options):
    params = make_params(device)
    opt = optimizer(params, backend=backend, **options)
    warm(opt, params)
    params[0].data = torch.randn(11, device=device)
    set_grads(params, 12)
    assert_refused(opt, params, ValueError, r"optimizer state of param_groups\[0\]\['params'\]\[0\] .*does not fit")


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_a_parameter_moved_to_other_memory_steps_from_there(device, backend, optimizer, options):
    def make():
        params = make_params(device)
        return optimizer(params, backend=backend, **options), params

    def move(opt, params):
        params[2].data = params[2].data.clone()  # same values, new memory: the old is stale now

    assert_steps_as_a_full_step(make, move, seed=13)


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_state_replaced_by_hand_is_checked_or_used(device, backend, optimizer, options):
    key = "exp_avg" if optimizer is FusedLAMB else "momentum_buffer"
    params = make_params(device, shapes=((5,), (3, 4), (5,)))
    opt = optimizer(params, backend=backend, **options)
    warm(opt, params)
    right = opt.state[params[1]][key]
    opt.state[params[1]][key] = torch.zeros(5, device=device)  # the wrong shape
    set_grads(params, 14)
    assert_refused(opt, params, ValueError, r"optimizer state of param_groups\[0\]\['params'\]\[1\] .*does not fit")
    opt.state[params[1]][key] = right
    own = opt.state[params[2]][key]
    opt.state[params[2]][key] = opt.state[params[0]][key]  # shared with another parameter's
    assert_refused(opt, params, ValueError, "share memory")
    opt.state[params[2]][key] = own
    fresh = torch.full(params[1].shape, 0.5, device=device)  # a new tensor of the right shape: used
    opt.state[params[1]][key] = fresh
    opt.step()
    assert opt.state[params[1]][key] is fresh and not torch.equal(fresh, torch.full_like(fresh, 0.5))


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_state_replaced_by_an_equal_tensor_is_the_one_stepped(device, backend, optimizer, options, reused_steps):
    """A state entry replaced by a new tensor of the same shape, dtype and layout (only its memory
    differs): the step must update the new tensor, as a full step does."""
    def make():
        params = make_params(device)
        return optimizer(params, backend=backend, **options), params

    def replace(opt, params):
        for key in opt.DECLARATION.tensors:
            if key in opt.state[params[1]]:
                opt.state[params[1]][key] = opt.state[params[1]][key].clone()

    opt = assert_steps_as_a_full_step(make, replace, seed=22)
    assert reused_steps(opt) == 1  # (warm's step; the last one is planned afresh)


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_a_parameter_made_to_share_memory_is_refused(device, backend, optimizer, options):
    params = make_params(device, shapes=((5,), (3, 4), (5,)))
    opt = optimizer(params, backend=backend, **options)
    warm(opt, params)
    params[2].data = params[0].data  # model surgery: two parameters on one memory
    set_grads(params, 23)
    assert_refused(opt, params, ValueError, r"param_groups\[0\]\['params'\]\[\d\] and param_groups\[0\]\['params'\]"
                                            r"\[\d\] share memory")


@on_every_backend
def test_step_count_replaced_by_a_number_is_refused(device, backend):
    params = make_params(device)
    opt = FusedLAMB(params, backend=backend)
    warm(opt, params)
    opt.state[params[2]]["step"] = 3
    set_grads(params, 15)
    assert_refused(opt, params, ValueError, r"optimizer state of param_groups\[0\]\['params'\]\[2\].*step: 3")
    opt.state[params[2]]["step"] = torch.tensor(3.0)
    opt.step()
    assert [float(opt.state[p]["step"]) for p in params] == [4.0] * 3


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_state_deleted_or_replaced_starts_afresh_as_in_a_full_step(device, backend, optimizer, options):
    def make():
        params = make_params(device)
        return optimizer(params, backend=backend, **options), params

    def forget(opt, params):
        del opt.state[params[0]]
        opt.state[params[1]] = {}

    assert_steps_as_a_full_step(make, forget, seed=16)


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_a_loaded_state_dict_is_the_state_stepped(device, backend, optimizer, options):
    params, other_params = make_params(device), make_params(device, seed=1)
    opt = optimizer(params, backend=backend, **options)
    other = optimizer(other_params, backend=backend, **options)
    warm(opt, params)
    for step in range(4):
        set_grads(other_params, 300 + step)
        other.step()
    saved = copy.deepcopy(other.state_dict())
    opt.load_state_dict(saved)
    fresh = optimizer(make_params(device), backend=backend, **options)
    fresh.load_state_dict(copy.deepcopy(saved))
    fresh_params = fresh.param_groups[0]["params"]
    with torch.no_grad():
        for p, q in zip(params, fresh_params):
            q.copy_(p)
    set_grads(params, 17)
    set_grads(fresh_params, 17)
    opt.step()
    fresh.step()
    assert_same(snapshot(fresh, fresh_params), snapshot(opt, params))


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_an_added_group_is_stepped(device, backend, optimizer, options):
    params = make_params(device)
    opt = optimizer(params, backend=backend, **options)
    warm(opt, params)
    extra = make_params(device, shapes=((4,),), seed=2)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [params[0]]})
    opt.add_param_group({"params": extra, "lr": 0.05})
    before = extra[0].detach().clone()
    set_grads(params + extra, 18)
    opt.step()
    assert not torch.equal(before, extra[0]) and extra[0] in opt.state


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_group_edits_after_reused_steps_are_checked(device, backend, optimizer, options):
    params = make_params(device)
    opt = optimizer(params, backend=backend, **options)
    warm(opt, params)
    set_grads(params, 19)
    opt.param_groups[0]["lr"] = -1.0
    assert_refused(opt, params, ValueError, r"param_groups\[0\]: lr must be in")
    opt.param_groups[0]["lr"] = 0.01
    opt.param_groups[0]["params"].append(params[0])  # in place: the same list object
    assert_refused(opt, params, ValueError, "again")
    opt.param_groups[0]["params"].pop()
    opt.param_groups[0]["params"][1] = make_params(device, shapes=((3, 4),), seed=3)[0]  # swapped in place
    set_grads(opt.param_groups[0]["params"], 20)
    opt.step()
    assert opt.param_groups[0]["params"][1] in opt.state


@on_every_backend
def test_momentum_switched_on_creates_buffers(device, backend):
    params = make_params(device)
    opt = FusedLARS(params, lr=0.1, momentum=0.0, backend=backend)
    warm(opt, params)
    assert all("momentum_buffer" not in opt.state[p] for p in params)
    opt.param_groups[0]["momentum"] = 0.9
    set_grads(params, 20)
    opt.step()
    assert all("momentum_buffer" in opt.state[p] for p in params)


@on_every_backend
def test_a_new_hyperparameter_value_is_used_at_once(device, backend):
    """weight_decay from 0 to 0.1 turns layer adaptation on in a reused step: as a full step."""
    def make():
        params = make_params(device)
        return FusedLAMB(params, weight_decay=0.0, backend=backend), params

    def edit(opt, params):
        opt.param_groups[0]["weight_decay"] = 0.1
        opt.param_groups[0]["betas"] = (0.8, 0.99)

    assert_steps_as_a_full_step(make, edit, seed=21)


# -- 3. the layouts a reused step compares --------------------------------------------------------

def _layouts_implementations():
    found = [pytest.param(validation.python_layouts, id="python")]
    try:
        validation.extension.load()  # (builds the C++ library if needed: its layouts are tested too)
    except validation.extension.ExtensionUnavailable:
        pass
    module = validation.extension.host_module()
    if module is not None:
        found.append(pytest.param(module.layouts, id="c"))
    return found


@pytest.mark.parametrize("layouts", _layouts_implementations())
def test_layouts_tell_every_difference_the_checks_depend_on(layouts):
    base = torch.randn(3, 4)
    same = [base, None]
    variants = {
        "dtype": [base.double(), None], "shape": [base.reshape(4, 3), None], "strides": [base.t().contiguous().t(), None],
        "device": [torch.empty(3, 4, device="meta"), None], "sparse": [base.to_sparse(), None],
        "type": [torch.nn.Parameter(base), None], "none": [None, None], "tensor": [base, base],
    }
    assert layouts(same, True) == layouts([base, None], True)
    for name, other in variants.items():
        assert layouts(other, False) != layouts(same, False), name  # (metadata only: not the address)
    moved = [base.clone(), None]  # same metadata, other memory
    assert layouts(moved, False) == layouts(same, False)
    assert layouts(moved, True) != layouts(same, True)
    with pytest.raises(TypeError):
        layouts([base, 3], True)


# -- found by review ------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_master_weights_switched_after_reused_steps_step_as_full_steps(device, backend, optimizer, options):
    for before in (True, False):
        def make():
            params = make_params(device, dtype=torch.bfloat16)
            return optimizer(params, backend=backend, master_weights=before, **options), params

        def switch(opt, params):
            opt.master_weights = not before

        opt = assert_steps_as_a_full_step(make, switch, seed=30)
        assert all(("master_param" in opt.state[p]) is (not before) for p in opt.param_groups[0]["params"])


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_state_aliased_in_place_is_refused_even_with_a_new_lr(device, backend, optimizer, options):
    key = "exp_avg" if optimizer is FusedLAMB else "momentum_buffer"
    params = make_params(device, shapes=((5,), (3, 4), (5,)))
    opt = optimizer(params, backend=backend, **options)
    warm(opt, params)
    opt.state[params[2]][key].set_(opt.state[params[0]][key])  # the same tensor object, aliased
    set_grads(params, 31)
    assert_refused(opt, params, ValueError, "share memory")
    opt.param_groups[0]["lr"] = 0.002
    assert_refused(opt, params, ValueError, "share memory")


@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
@on_every_backend
def test_one_grad_shared_by_parameters_of_two_layouts(device, backend, optimizer, options):
    """p0 contiguous, p1 a transposed view of the same shape, both given the one grad tensor, laid
    out as p1: p0's copy into its own layout must be made at every step."""
    runs = []
    for reuse in (True, False):
        p0 = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(5)).to(device))
        p1 = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(6)).to(device).t())
        opt = optimizer([p0, p1], backend=backend, **options)
        for step in range(4):
            g = torch.randn(4, 3, generator=torch.Generator().manual_seed(step)).to(device).t()
            p0.grad, p1.grad = g, g
            if not reuse:
                opt._step_cache = None
            opt.step()
        runs.append(snapshot(opt, [p0, p1]))
    assert_same(*runs)


@on_every_backend
def test_step_counts_of_any_one_element_shape_without_bias_correction(device, backend):
    params = make_params(device)
    opt = FusedLAMB(params, bias_correction=False, backend=backend)
    warm(opt, params)
    opt.state[params[0]]["step"] = torch.tensor([5.0])  # (as some checkpoints hold it)
    set_grads(params, 32)
    opt.step()
    assert float(opt.state[params[0]]["step"]) == 6.0


@on_every_backend
def test_packed_step_counts_are_kept_by_a_later_full_step(device, backend):
    """A CUDA graph captured during a reused step advances the packed counts: a later full step
    (a plan made afresh) keeps the very tensors the state holds."""
    params = make_params(device)
    opt = FusedLAMB(params, backend=backend)
    warm(opt, params)
    counts = [opt.state[p]["step"] for p in params]
    opt._step_cache = None
    set_grads(params, 33)
    opt.step()
    assert all(opt.state[p]["step"] is t for p, t in zip(params, counts))
    assert [float(t) for t in counts] == [4.0] * 3
