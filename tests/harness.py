"""Runs an optimizer and its float64 reference side by side (docs/design.md section 5); and
`on_every_backend`, the (device, backend) cases a test runs on when it runs on every backend."""
import pytest
import torch

from lamb_float64 import Float64LAMB
from lamb_kernels import FusedLAMB, available_backends
from tolerances import PARAM_RTOL, UPDATE_RTOL


def backend_cases():
    """(device, backend) pairs: every backend available here; CUDA cases skip without a GPU."""
    cases = [pytest.param("cpu", name, id=f"cpu-{name}") for name in available_backends("cpu")]
    if torch.cuda.is_available():
        cases += [pytest.param("cuda", name, id=f"cuda-{name}", marks=pytest.mark.gpu)
                  for name in available_backends("cuda")]
    else:
        cases += [pytest.param("cuda", name, id=f"cuda-{name}",
                               marks=[pytest.mark.gpu, pytest.mark.skip(reason="no CUDA device")])
                  for name in ("triton", "cuda", "torch")]
    return cases


# Runs a test once per (device, backend) case of backend_cases(), with ids cpu-cpp, ..., cuda-triton.
on_every_backend = pytest.mark.parametrize(("device", "backend"), backend_cases())


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    err = float((actual.detach().cpu().double() - expected).norm())
    ref = float(expected.norm())
    return err / ref if ref > 0 else (0.0 if err == 0 else float("inf"))


def make_groups(group_specs, seed=1234):
    """group_specs: dicts with "sizes" (shapes), optional "zero" (indices of all-zero params),
    "zero_grad" (indices of params whose grads are all zero, used by run_both) and hyperparameter
    overrides. Returns float32 CPU tensors per group and the overrides."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for spec in group_specs:
        params = [torch.randn(shape, generator=gen) for shape in spec["sizes"]]
        for index in spec.get("zero", ()):
            params[index].zero_()
        options = {k: v for k, v in spec.items() if k not in ("sizes", "zero", "zero_grad")}
        groups.append({**options, "params": params})
    return groups, gen


def run_both(device, backend, group_specs, steps=7, grad_scale=1.0, has_grad=None,
             optimizer=FusedLAMB, reference=Float64LAMB, **kwargs):
    """Steps `optimizer` and its float64 `reference` with the same fresh random grads; returns
    (groups as created, the model's params per group, the optimizer, the reference)."""
    groups, gen = make_groups(group_specs)
    reference = reference(groups, **kwargs)
    model = [[torch.nn.Parameter(p.to(device, copy=True)) for p in group["params"]] for group in groups]
    opt = optimizer([{**group, "params": params} for group, params in zip(groups, model)],
                    backend=backend, **kwargs)
    for step in range(steps):
        grads = [[torch.randn(p.shape, generator=gen) * grad_scale
                  if has_grad is None or has_grad(step, gi, pi) else None
                  for pi, p in enumerate(params)] for gi, params in enumerate(model)]
        for spec, group_grads in zip(group_specs, grads):
            for index in spec.get("zero_grad", ()):  # params whose grad is all zeros
                group_grads[index].zero_()
        for params, group_grads in zip(model, grads):
            for p, g in zip(params, group_grads):
                p.grad = None if g is None else g.to(device)
        opt.step()
        reference.step(grads)
    return groups, model, opt, reference


def assert_matches_reference(groups, model, opt, reference):
    for gi, (group, params) in enumerate(zip(groups, model)):
        for pi, (p0, p) in enumerate(zip(group["params"], params)):
            where = f"group {gi} param {pi} {tuple(p.shape)}"
            ref_p = reference.groups[gi]["params"][pi]
            ref_state = reference.state.get((gi, pi))
            if ref_state is None:
                assert p not in opt.state or not opt.state[p], f"{where}: state created without a grad"
                assert torch.equal(p.detach().cpu(), p0), f"{where}: changed without a grad"
                continue
            state = opt.state[p]
            assert float(state["step"]) == ref_state["step"], where
            if p.numel() == 0:
                continue
            assert rel_error(p, ref_p) <= PARAM_RTOL, f"{where}: param error {rel_error(p, ref_p):.2e}"
            for key in ("exp_avg", "exp_avg_sq"):
                err = rel_error(state[key], ref_state[key])
                assert err <= PARAM_RTOL, f"{where}: {key} error {err:.2e}"
            err = rel_error(p.detach().cpu() - p0, ref_p - p0.double())
            assert err <= UPDATE_RTOL, f"{where}: update error {err:.2e}"


def count_table_builds(monkeypatch):
    """``builds(table)``: how many times each Triton multi-tensor table (lamb_kernels/triton/
    multi_tensor.py) built its chunk map and its pointer table, {"chunks": n, "pointers": n}, from
    now on in this test (the library keeps no counter: this wraps the two build methods)."""
    from lamb_kernels.triton import multi_tensor

    builds = {}
    for kind, method in (("chunks", "_build_chunk_map"), ("pointers", "_build_pointers")):
        def counting(table, *args, _build=getattr(multi_tensor.MultiTensorTable, method), _kind=kind):
            counts = builds.setdefault(id(table), {"chunks": 0, "pointers": 0})
            counts[_kind] += 1
            return _build(table, *args)

        monkeypatch.setattr(multi_tensor.MultiTensorTable, method, counting)
    return lambda table: builds.get(id(table), {"chunks": 0, "pointers": 0})
