"""FusedLAMB as a torch.optim.Optimizer: state dicts (ours and apex's), determinism, grads left
alone, zero_grad, closures, hooks, param groups, backend choice."""
import copy
import inspect
import io

import pytest
import torch

import lamb_kernels
from harness import on_every_backend
from lamb_kernels import FusedLAMB, available_backends
from tolerances import SAME_MATH_ATOL, SAME_MATH_RTOL

SHAPES = [(17,), (4097,), (0,), (3, 5, 7)]


def make_params(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in SHAPES]


def train(opt, params, steps, seed=1, first_step=0):
    """Steps with grads that depend only on (seed, step index), so runs can be resumed."""
    for step in range(first_step, first_step + steps):
        gen = torch.Generator().manual_seed(seed * 1000 + step)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 3).to(p.device)
        opt.step()


def snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_same_bits(a, b):
    params_a, state_a = a
    params_b, state_b = b
    for x, y in zip(params_a, params_b):
        assert torch.equal(x, y)
    assert state_a["state"].keys() == state_b["state"].keys()
    for key, entry in state_a["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, state_b["state"][key][name]), (key, name)


@on_every_backend
def test_identical_runs_give_identical_bits(device, backend):
    runs = []
    for _ in range(2):
        params = make_params(device)
        opt = FusedLAMB(params, lr=1e-2, backend=backend)
        train(opt, params, 5)
        runs.append(snapshot(opt, params))
    assert_same_bits(*runs)


@on_every_backend
def test_state_dict_round_trip_resumes_bit_identically(device, backend):
    params = make_params(device)
    opt = FusedLAMB(params, lr=1e-2, weight_decay=0.05, backend=backend)
    train(opt, params, 8)
    straight = snapshot(opt, params)

    params = make_params(device)
    opt = FusedLAMB(params, lr=1e-2, weight_decay=0.05, backend=backend)
    train(opt, params, 4)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_params = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    resumed = FusedLAMB(resumed_params, lr=1e-2, weight_decay=0.05, backend=backend)
    resumed.load_state_dict(saved["opt"])
    train(resumed, resumed_params, 4, first_step=4)
    assert_same_bits(straight, snapshot(resumed, resumed_params))


def to_apex_format(state_dict):
    """What apex FusedLAMB.state_dict() holds: moments per param, one int step per group, and
    none of our extra group keys."""
    apex = copy.deepcopy(state_dict)
    steps = {int(entry.pop("step")) for entry in apex["state"].values()}
    assert len(steps) == 1
    for group in apex["param_groups"]:
        for key in ("adam_w_mode", "use_nvlamb", "trust_ratio_bounds"):
            group.pop(key)
        group["step"] = steps.pop() if steps else group.get("step")
    return apex


@on_every_backend
def test_loads_apex_state_dict_and_resumes_exactly(device, backend):
    params = make_params(device)
    opt = FusedLAMB(params, lr=1e-2, backend=backend)
    train(opt, params, 7)
    straight = snapshot(opt, params)

    params = make_params(device)
    opt = FusedLAMB(params, lr=1e-2, backend=backend)
    train(opt, params, 3)
    apex_state = to_apex_format(opt.state_dict())
    assert all("step" not in entry for entry in apex_state["state"].values())
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = FusedLAMB(resumed_params, lr=1e-2, backend=backend)
    resumed.load_state_dict(apex_state)
    assert all(float(resumed.state[p]["step"]) == 3 for p in resumed_params)
    assert "step" not in resumed.param_groups[0] and resumed.param_groups[0]["adam_w_mode"] is True
    train(resumed, resumed_params, 4, first_step=3)
    assert_same_bits(straight, snapshot(resumed, resumed_params))


@on_every_backend
def test_grads_are_read_never_written(device, backend):
    params = make_params(device)
    opt = FusedLAMB(params, lr=1e-2, adam_w_mode=False, backend=backend)  # L2 mode changes g inside
    grads = [torch.randn(p.shape).to(device) * 100 for p in params]  # large enough to clip
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


def test_zero_grad_follows_set_grad_none():
    params = make_params("cpu")
    for set_grad_none, expect_none in ((True, True), (False, False)):
        opt = FusedLAMB(params, set_grad_none=set_grad_none, backend="torch")
        for p in params:
            p.grad = torch.ones_like(p)
        opt.zero_grad()
        assert all((p.grad is None) == expect_none for p in params)
        if not expect_none:
            assert all(not p.grad.any() for p in params)
    opt = FusedLAMB(params, set_grad_none=False, backend="torch")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params)


@on_every_backend
def test_closure_hooks_and_param_groups(device, backend):
    model = torch.nn.Linear(5, 3).to(device)
    extra = torch.nn.Parameter(torch.randn(4, device=device))
    opt = FusedLAMB(model.parameters(), lr=1e-2, backend=backend)
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    x = torch.randn(8, 5, device=device)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean() + extra.square().sum()
        loss.backward()
        return loss

    before = model.weight.detach().clone()
    loss = opt.step(closure)
    assert loss is not None and calls == ["pre", "post"]
    assert not torch.equal(model.weight, before)
    opt.add_param_group({"params": [extra], "lr": 1e-3, "weight_decay": 0.0})
    assert opt.param_groups[1]["betas"] == (0.9, 0.999)
    opt.step(closure)
    assert float(opt.state[extra]["step"]) == 1 and float(opt.state[model.weight]["step"]) == 2


@on_every_backend
def test_optimizer_survives_deepcopy_and_pickle(device, backend):
    params = make_params(device)
    opt = FusedLAMB(params, lr=1e-2, backend=backend, set_grad_none=False)
    train(opt, params, 2)
    clone = copy.deepcopy(opt)
    assert clone.backend == backend and clone.set_grad_none is False
    cloned_params = clone.param_groups[0]["params"]
    train(opt, params, 2, first_step=2)
    train(clone, cloned_params, 2, first_step=2)
    for a, b in zip(params, cloned_params):
        assert torch.equal(a, b)


def test_signature_and_defaults_are_apex():
    names = list(inspect.signature(FusedLAMB).parameters)
    assert names[:12] == ["params", "lr", "bias_correction", "betas", "eps", "weight_decay", "amsgrad",
                          "adam_w_mode", "grad_averaging", "set_grad_none", "max_grad_norm", "use_nvlamb"]
    params = make_params("cpu")
    opt = FusedLAMB(params, 1e-3, True, (0.9, 0.999), 1e-6, 0.01, False, True, True, True, 1.0, False)
    group = opt.param_groups[0]
    assert (group["lr"], group["bias_correction"], group["betas"], group["eps"], group["weight_decay"],
            group["grad_averaging"], group["max_grad_norm"], group["adam_w_mode"], group["use_nvlamb"]) == (
        1e-3, True, (0.9, 0.999), 1e-6, 0.01, True, 1.0, True, False)


@on_every_backend
def test_param_without_grad_is_skipped(device, backend):
    params = make_params(device)
    opt = FusedLAMB(params, backend=backend)
    before = params[1].detach().clone()
    for p in params[:1] + params[2:]:
        p.grad = torch.randn_like(p)
    opt.step()
    assert params[1] not in opt.state and torch.equal(params[1], before)


@on_every_backend
def test_step_bumps_autograd_versions_like_an_in_place_op(device, backend):
    """A step between forward and backward must make backward fail, as with torch.optim."""
    params = make_params(device)
    opt = FusedLAMB(params, lr=1e-2, backend=backend)
    train(opt, params, 1)
    loss = sum((p * p).sum() for p in params)
    versions = [p._version for p in params]
    state_versions = [opt.state[p]["exp_avg"]._version for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(p._version > v for p, v in zip(params, versions))
    assert all(opt.state[p]["exp_avg"]._version > v for p, v in zip(params, state_versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_auto_takes_torch_for_a_non_dense_parameter():
    base = torch.randn(6, 4)
    strided = torch.nn.Parameter(base[:, ::2])  # a view with gaps between its elements
    dense = torch.nn.Parameter(torch.randn(5))
    opt = FusedLAMB([strided, dense], lr=1e-2)
    for p in (strided, dense):
        p.grad = torch.randn_like(p)
    before = strided.detach().clone()
    opt.step()
    assert not torch.equal(strided, before)
    assert {key[2] for key in opt._backends} == {"torch", available_backends("cpu")[0]}


def test_auto_backend_and_environment_override(monkeypatch):
    # The C++ backend when it built, else torch; interpreted triton is never the CPU default.
    expected = "cpp" if "cpp" in available_backends("cpu") else "torch"
    assert available_backends("cpu")[0] == expected
    params = make_params("cpu")
    opt = FusedLAMB(params, backend="auto")
    train(opt, params, 1)
    assert {key[2] for key in opt._backends} == {expected}
    if "triton" in available_backends("cpu"):
        monkeypatch.setenv("LAMB_KERNELS_BACKEND", "triton")
        opt = FusedLAMB(params, backend="auto")
        train(opt, params, 1)
        assert {key[2] for key in opt._backends} == {"triton"}
        opt = FusedLAMB(params, backend="torch")  # an explicit choice wins over the variable
        train(opt, params, 1)
        assert {key[2] for key in opt._backends} == {"torch"}


def test_public_names():
    assert set(lamb_kernels.__all__) >= {"FusedLAMB", "available_backends"}
    assert "torch" in available_backends("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend_name", ["triton", "cuda", "torch"])
def test_cuda_step_never_synchronises_with_the_host(backend_name):
    if backend_name not in available_backends("cuda"):
        pytest.skip(f"{backend_name} unavailable: {lamb_kernels.backends._unavailable_reason(backend_name, 'cuda')}")
    params = make_params("cuda")
    opt = FusedLAMB(params, lr=1e-2, backend=backend_name)
    train(opt, params, 2)  # first steps build tables and compile
    for p in params:
        p.grad = torch.randn_like(p)
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@on_every_backend
def test_grad_laid_out_unlike_its_parameter(device, backend):
    """A channels_last parameter with a contiguous grad (and the reverse) steps like the torch
    backend on plain contiguous copies."""
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(2, 3, 4, 5, generator=gen) for _ in range(2)]
    grads = [torch.randn(2, 3, 4, 5, generator=gen) for _ in range(2)]
    params = [torch.nn.Parameter(base[0].to(device, memory_format=torch.channels_last)),
              torch.nn.Parameter(base[1].to(device, copy=True))]
    expected = [torch.nn.Parameter(b.clone()) for b in base]
    opt = FusedLAMB(params, lr=1e-2, backend=backend)
    opt_expected = FusedLAMB(expected, lr=1e-2, backend="torch")
    for step in range(3):
        params[0].grad = grads[0].to(device) * (step + 1)  # contiguous grad, channels_last param
        params[1].grad = (grads[1] * (step + 1)).to(device, memory_format=torch.channels_last)
        for p, g in zip(expected, grads):
            p.grad = g * (step + 1)
        opt.step()
        opt_expected.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().cpu(), e.detach(), rtol=SAME_MATH_RTOL, atol=SAME_MATH_ATOL)
        assert p.grad.dtype == e.grad.dtype  # the user's grad tensors were not replaced
    assert params[0].is_contiguous(memory_format=torch.channels_last)


@on_every_backend
def test_step_without_any_grad_or_with_only_empty_params(device, backend):
    params = [torch.nn.Parameter(torch.randn(0, device=device)), torch.nn.Parameter(torch.randn(3, device=device))]
    opt = FusedLAMB(params, backend=backend)
    assert opt.step() is None and not opt.state  # no grads at all: nothing happens
    params[0].grad = torch.randn(0, device=device)
    opt.step()
    assert float(opt.state[params[0]]["step"]) == 1 and params[1] not in opt.state


@on_every_backend
def test_contiguous_checkpoint_resumes_a_channels_last_model(device, backend):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(2, 3, 4, 5, generator=gen)
    grads = [torch.randn(2, 3, 4, 5, generator=gen) for _ in range(4)]

    def run(channels_last_after_resume):
        p = torch.nn.Parameter(base.to(device, copy=True))
        opt = FusedLAMB([p], lr=1e-2, backend=backend)
        for g in grads[:2]:
            p.grad = g.to(device)
            opt.step()
        layout = torch.channels_last if channels_last_after_resume else torch.contiguous_format
        q = torch.nn.Parameter(p.detach().to(memory_format=layout, copy=True))
        resumed = FusedLAMB([q], lr=1e-2, backend=backend)
        resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
        assert resumed.state[q]["exp_avg"].stride() == q.stride()
        for g in grads[2:]:
            q.grad = g.to(device).to(memory_format=layout)
            resumed.step()
        return q.detach().cpu().contiguous()

    torch.testing.assert_close(run(True), run(False), rtol=SAME_MATH_RTOL, atol=SAME_MATH_ATOL)


@on_every_backend
def test_checkpoint_of_other_shapes_is_refused_before_loading(device, backend):
    params = make_params(device)
    opt = FusedLAMB(params, backend=backend)
    train(opt, params, 1)
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][1]["exp_avg"] = torch.zeros(10)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[1\]\['exp_avg'\] has shape \(10,\), but "
                                         r"param_groups\[0\]\['params'\]\[1\] has shape \(4097,\)"):
        opt.load_state_dict(saved)
    assert_same_bits(before, snapshot(opt, params))


@on_every_backend
def test_state_that_does_not_fit_its_param_is_refused_before_the_step(device, backend):
    params = make_params(device)
    opt = FusedLAMB(params, backend=backend)
    train(opt, params, 1)
    opt.state[params[1]]["exp_avg"] = torch.zeros(10, device=device)  # set by hand, wrongly
    before = [p.detach().clone() for p in params]
    steps = [float(opt.state[p]["step"]) for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match=r"optimizer state of param_groups\[0\]\['params'\]\[1\].*does not fit"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert [float(opt.state[p]["step"]) for p in params] == steps


def test_loaded_step_counts_become_cpu_float32():
    params = make_params("cpu")
    opt = FusedLAMB(params, backend="torch")
    train(opt, params, 2)
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["step"] = 2  # a plain int, as older checkpoints hold
    saved["state"][1]["step"] = torch.tensor(2.0, dtype=torch.float64)
    opt.load_state_dict(saved)
    for p in params:
        step = opt.state[p]["step"]
        assert step.device.type == "cpu" and step.dtype == torch.float32 and float(step) == 2


def test_broken_triton_install_leaves_import_working(tmp_path):
    """A triton that raises something other than ImportError on import must not break us. (torch's
    own compile machinery imports triton too and fails then, so only our side is checked.)"""
    import os
    import pathlib
    import subprocess
    import sys

    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise RuntimeError('driver not found')\n")
    root = pathlib.Path(__file__).parent.parent
    code = ("import lamb_kernels, lamb_kernels.backends\n"
            "assert 'triton' not in lamb_kernels.available_backends('cpu'), lamb_kernels.available_backends('cpu')\n"
            "try:\n"
            "    lamb_kernels.backends.resolve_backend('triton', 'cpu')\n"
            "except ValueError as e:\n"
            "    assert 'RuntimeError: driver not found' in str(e), e\n"
            "else:\n"
            "    raise AssertionError('backend=triton should raise')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)]), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
