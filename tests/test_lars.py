"""FusedLARS: every backend against the float64 reference (params AND momentum buffers after 7
steps, docs/design.md sections 3 and 5), and the optimizer behaviours LAMB is tested for."""
import io

import pytest
import torch

import lamb_kernels
from harness import count_table_builds, on_every_backend, rel_error, run_both
from lamb_kernels import FusedLARS
from lars_float64 import Float64LARS

from lamb_kernels.backends import CPP_CHUNK
from tolerances import ELEMENT_ATOL, PARAM_RTOL, UPDATE_RTOL

try:
    from lamb_kernels.triton.multi_tensor import CHUNK
except ImportError:  # no triton: only the torch backend runs, any chunk size will do
    CHUNK = 8192

ODD = [(1,), (17,), (4097,), (18011,), (3, 5, 7)]
RESNET = dict(lr=0.2, momentum=0.9, weight_decay=1e-4)

CASES = {
    "timm_defaults_plain_sgd": dict(specs=[dict(sizes=ODD)], kwargs=dict(lr=0.1)),
    "momentum_and_weight_decay": dict(specs=[dict(sizes=ODD)], kwargs=RESNET),
    "momentum_zero_with_decay": dict(specs=[dict(sizes=ODD)], kwargs=dict(lr=0.2, weight_decay=1e-4)),
    "nesterov": dict(specs=[dict(sizes=ODD)], kwargs=dict(RESNET, nesterov=True)),
    "dampening": dict(specs=[dict(sizes=ODD)], kwargs=dict(RESNET, dampening=0.3)),
    "trust_clip_larc": dict(specs=[dict(sizes=ODD)], kwargs=dict(RESNET, lr=0.01, trust_clip=True,
                                                                  trust_coeff=0.02)),
    "always_adapt_no_decay": dict(specs=[dict(sizes=ODD)], kwargs=dict(lr=0.2, momentum=0.9, always_adapt=True)),
    "no_decay_no_adaptation": dict(specs=[dict(sizes=ODD)], kwargs=dict(lr=0.2, momentum=0.9)),
    "zero_norm_param": dict(specs=[dict(sizes=ODD, zero=(2,))], kwargs=RESNET),
    "zero_grad_param": dict(specs=[dict(sizes=ODD, zero_grad=(1, 3))], kwargs=RESNET),
    # LARC with lr > 1 (timm's default lr is 1.0; SimCLR uses about 4.8): a zero-norm param and a
    # zero grad keep r = 1, which the clip still turns into 1 / lr.
    "trust_clip_lr_above_one_zero_norms": dict(specs=[dict(sizes=ODD, zero=(2,), zero_grad=(1,))],
                                               kwargs=dict(RESNET, lr=2.0, trust_clip=True)),
    "trust_clip_lr_zero": dict(specs=[dict(sizes=ODD, zero_grad=(2,))], kwargs=dict(RESNET, lr=0.0, trust_clip=True)),
    "zero_size_first_middle_last": dict(specs=[dict(sizes=[(0,), (17,), (0, 5), (4097,), (0,)])], kwargs=RESNET),
    "many_tensors": dict(specs=[dict(sizes=[((i * 37) % 300 + 1,) for i in range(150)])], kwargs=RESNET),
    "chunk_boundaries": dict(specs=[dict(sizes=[(CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (2 * CHUNK + 17,)])],
                             kwargs=RESNET),
    "cpp_chunk_boundaries": dict(specs=[dict(sizes=[(CPP_CHUNK - 1,), (CPP_CHUNK + 1,), (2 * CPP_CHUNK + 77,)])],
                                 kwargs=RESNET),
    "several_groups": dict(specs=[
        dict(sizes=[(17,), (4097,)]),
        dict(sizes=[(33,), (5, 7)], lr=0.05, momentum=0.0, weight_decay=1e-3),
        dict(sizes=[(129,)], weight_decay=0.0, layer_adaptation=False, nesterov=True),
        dict(sizes=[(64,), (1,)], trust_clip=True, dampening=0.1),
    ], kwargs=RESNET),
    # Params 1 and 3 never get a grad; params 2 and 4 only on odd steps: buffers start late.
    "params_without_grads": dict(specs=[dict(sizes=ODD)], kwargs=RESNET,
                                 has_grad=lambda step, gi, pi: pi not in (1, 3) and (pi == 0 or step % 2 == 1)),
}


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # trust_clip_lr_zero: r / 0 = inf
@pytest.mark.parametrize("case", list(CASES))
@on_every_backend
def test_lars_matches_float64_reference(device, backend, case):
    spec = CASES[case]
    groups, model, opt, reference = run_both(device, backend, spec["specs"], has_grad=spec.get("has_grad"),
                                             optimizer=FusedLARS, reference=Float64LARS, **spec.get("kwargs", {}))
    for gi, (group, params) in enumerate(zip(groups, model)):
        for pi, (p0, p) in enumerate(zip(group["params"], params)):
            where = f"group {gi} param {pi} {tuple(p.shape)}"
            ref_p = reference.groups[gi]["params"][pi]
            ref_buf = reference.state.get((gi, pi))
            buf = opt.state[p].get("momentum_buffer") if p in opt.state else None
            assert (buf is None) == (ref_buf is None), f"{where}: momentum buffer presence"
            if p.numel() == 0:
                continue
            assert rel_error(p, ref_p) <= PARAM_RTOL, f"{where}: param error {rel_error(p, ref_p):.2e}"
            if buf is not None:
                assert rel_error(buf, ref_buf) <= PARAM_RTOL, f"{where}: buffer error {rel_error(buf, ref_buf):.2e}"
            if not torch.equal(ref_p, p0.double()):
                err = rel_error(p.detach().cpu() - p0, ref_p - p0.double())
                assert err <= UPDATE_RTOL, f"{where}: update error {err:.2e}"


def make_params(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in [(17,), (4097,), (0,), (3, 5)]]


def train(opt, params, steps, first_step=0):
    for step in range(first_step, first_step + steps):
        gen = torch.Generator().manual_seed(1000 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.device)
        opt.step()


def snapshot(opt, params):
    return [p.detach().clone() for p in params] + [t.clone() for s in opt.state_dict()["state"].values()
                                                   for t in s.values()]


def same_bits(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@on_every_backend
def test_lars_state_dict_round_trip_and_identical_reruns(device, backend):
    params = make_params(device)
    opt = FusedLARS(params, backend=backend, **RESNET)
    train(opt, params, 6)
    straight = snapshot(opt, params)

    again = make_params(device)
    opt_again = FusedLARS(again, backend=backend, **RESNET)
    train(opt_again, again, 6)
    assert same_bits(straight, snapshot(opt_again, again))

    params = make_params(device)
    opt = FusedLARS(params, backend=backend, **RESNET)
    train(opt, params, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = FusedLARS(resumed_params, backend=backend, **RESNET)
    resumed.load_state_dict(torch.load(buffer))
    train(resumed, resumed_params, 3, first_step=3)
    assert same_bits(straight, snapshot(resumed, resumed_params))


@on_every_backend
def test_lars_reads_grads_and_keeps_no_state_without_momentum(device, backend):
    params = make_params(device)
    opt = FusedLARS(params, lr=0.1, weight_decay=1e-4, nesterov=False, backend=backend)
    grads = [torch.randn(p.shape).to(device) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert not any(opt.state[p] for p in params if p in opt.state)


@on_every_backend
def test_empty_parameters_step_beside_others_with_and_without_momentum(device, backend):
    """Parameters with no element (a 2-D one included) in groups with and without momentum: the
    others step as they would alone, and the empty ones are left as they are."""
    groups = {"no momentum": [(0, 5), (7,)], "momentum": [(0,), (3, 4)]}
    runs = []
    for with_empty in (True, False):
        gen = torch.Generator().manual_seed(0)
        made = {name: [torch.nn.Parameter(torch.randn(shape, generator=gen).to(device)) for shape in shapes
                       if with_empty or 0 not in shape] for name, shapes in groups.items()}
        opt = FusedLARS([{"params": made["no momentum"], "momentum": 0.0}, {"params": made["momentum"]}],
                        lr=0.1, momentum=0.9, weight_decay=1e-4, backend=backend)
        params = made["no momentum"] + made["momentum"]
        for step in range(2):
            for p in params:
                p.grad = torch.full_like(p, 1.0 + step)
            opt.step()
        runs.append([p for p in params if p.numel()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lars_signature_and_defaults_are_timm():
    import inspect

    signature = inspect.signature(FusedLARS)
    expected = dict(lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, trust_coeff=0.001,
                    eps=1e-8, trust_clip=False, always_adapt=False, foreach=None)
    assert {name: signature.parameters[name].default for name in expected} == expected
    assert list(signature.parameters)[:11] == ["params", *expected]


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-0.1), "lr"),
    (dict(momentum=-0.9), "momentum"),
    (dict(weight_decay=-1e-4), "weight_decay"),
    (dict(eps=-1e-8), "eps"),
    (dict(trust_coeff=-1.0), "trust_coeff"),
    (dict(dampening=-0.1), "dampening"),
    (dict(nesterov=True), "nesterov=True needs momentum > 0"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), "nesterov=True needs momentum > 0 and dampening == 0"),
    (dict(backend="fast"), "backend"),
])
def test_lars_invalid_hyperparameters_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedLARS(make_params("cpu"), **kwargs)


@on_every_backend
def test_lars_bad_grad_raises_before_anything_changes(device, backend):
    params = make_params(device)
    opt = FusedLARS(params, backend=backend, **RESNET)
    train(opt, params, 1)
    before = snapshot(opt, params)
    for p in params[:2]:
        p.grad = torch.randn_like(p)
    params[3].grad = torch.randn(params[3].shape).to_sparse().to(device)
    with pytest.raises(RuntimeError, match=r"grad of param_groups\[0\]\['params'\]\[3\] is sparse; FusedLARS"):
        opt.step()
    assert same_bits(before, snapshot(opt, params))


def test_lars_launches_and_tables(monkeypatch):
    if "triton" not in lamb_kernels.available_backends("cpu"):
        pytest.skip("interpreted triton unavailable")
    from lamb_kernels.triton import lars, multi_tensor

    builds = count_table_builds(monkeypatch)

    launches = []

    def counting(module, name):
        kernel = getattr(module, name)

        class Counting:
            def __getitem__(self, grid):
                launches.append(name)
                return kernel[grid]

        monkeypatch.setattr(module, name, Counting())

    for module, name in ((multi_tensor, "_chunk_sumsq_kernel"), (multi_tensor, "_segment_sum_kernel"),
                         (lars, "_lars_apply_kernel")):
        counting(module, name)
    counts = []
    multi_tensor._TABLES.clear()
    for n in (3, 60):
        params = [torch.nn.Parameter(torch.randn(7 + i)) for i in range(n)]
        grads = [torch.randn_like(p) for p in params]
        opt = FusedLARS(params, backend="triton", **RESNET)
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g
            launches.clear()
            opt.step()
        counts.append(sorted(launches))
        assert all(builds(table) == {"chunks": 1, "pointers": 1} for table in multi_tensor._TABLES.values())
    # Two passes over memory (norms; apply) and one fixed-order reduction, whatever the tensor count.
    assert counts[0] == counts[1] == sorted(["_chunk_sumsq_kernel", "_segment_sum_kernel", "_lars_apply_kernel"])
    # No group adapts (plain SGD with momentum): no norm pass, 20 bytes per parameter.
    params = [torch.nn.Parameter(torch.randn(7 + i)) for i in range(10)]
    opt = FusedLARS(params, backend="triton", lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.randn_like(p)
    launches.clear()
    opt.step()
    assert launches == ["_lars_apply_kernel"]


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf - inf inside the interpreter
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@on_every_backend
def test_lars_non_finite_grads_propagate_like_the_reference(device, backend, bad_value):
    gen = torch.Generator().manual_seed(3)
    params0 = [torch.randn(n, generator=gen) for n in (17, 4097, 33)]
    grads = [torch.randn(p.shape, generator=gen) for p in params0]
    grads[1][5] = bad_value
    reference = Float64LARS([{"params": params0}], **RESNET)
    params = [torch.nn.Parameter(p.to(device, copy=True)) for p in params0]
    opt = FusedLARS(params, backend=backend, **RESNET)
    for _ in range(2):
        for p, g in zip(params, grads):
            p.grad = g.to(device)
        opt.step()
        reference.step([grads])
    for p, expected in zip(params, reference.groups[0]["params"]):
        torch.testing.assert_close(p.detach().cpu().double(), expected, rtol=PARAM_RTOL, atol=ELEMENT_ATOL, equal_nan=True)


@on_every_backend
def test_lars_checkpoint_of_other_shapes_is_refused(device, backend):
    params = make_params(device)
    opt = FusedLARS(params, backend=backend, **RESNET)
    train(opt, params, 1)
    saved = opt.state_dict()
    saved["state"][0]["momentum_buffer"] = torch.zeros(3)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[0\]\['momentum_buffer'\] has shape \(3,\)"):
        opt.load_state_dict(saved)
    assert same_bits(before, snapshot(opt, params))


@on_every_backend
def test_step_bumps_autograd_versions_of_params_and_buffers(device, backend):
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in ODD]
    opt = FusedLARS(params, backend=backend, **RESNET)
    train(opt, params, 1)
    versions = [(p._version, opt.state[p]["momentum_buffer"]._version) for p in params]
    train(opt, params, 1, first_step=1)
    for p, (param_version, buffer_version) in zip(params, versions):
        assert p._version > param_version and opt.state[p]["momentum_buffer"]._version > buffer_version
