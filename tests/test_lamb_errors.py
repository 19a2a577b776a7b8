"""Bad input: a clear error naming the argument or parameter, params and state left untouched."""
import copy
import dataclasses
import math

import pytest
import torch

import lamb_kernels.backends
from harness import on_every_backend
from lamb_kernels import FusedLAMB


def make_params():
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(4,), (3, 2), (5,)]]


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1e-3), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(eps=-1e-6), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(betas=(1.0, 0.999)), "betas[0]"),
    (dict(betas=(0.9, -0.1)), "betas[1]"),
    (dict(betas=(0.9,)), "betas"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(trust_ratio_bounds=(2.0, 1.0)), "trust_ratio_bounds[1]"),
    (dict(trust_ratio_bounds=(-1.0, 1.0)), "trust_ratio_bounds[0]"),
    (dict(amsgrad=True), "amsgrad"),
    (dict(backend="cudnn"), "backend"),
])
def test_invalid_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        FusedLAMB(make_params(), **kwargs)


def test_invalid_group_is_rejected_and_not_added():
    params = make_params()
    opt = FusedLAMB(params[:2], backend="torch")
    with pytest.raises(ValueError, match=r"param_groups\[1\]: lr"):
        opt.add_param_group({"params": params[2:], "lr": -1.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match=r"param_groups\[0\]: weight_decay"):
        FusedLAMB([{"params": params, "weight_decay": -1.0}])


def test_unavailable_backend_names_the_available_ones(monkeypatch):
    import lamb_kernels.triton

    monkeypatch.setattr(lamb_kernels.triton, "INTERPRETED", False)  # triton: no kernels on CPU tensors
    with pytest.raises(ValueError, match=r"backend='triton' is not available on cpu.*Available on cpu: (cpp, )?torch$"):
        FusedLAMB(make_params(), backend="triton")
    monkeypatch.setenv("LAMB_KERNELS_BACKEND", "triton")
    with pytest.raises(ValueError, match="LAMB_KERNELS_BACKEND='triton' is not available"):
        FusedLAMB(make_params())
    monkeypatch.setenv("LAMB_KERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="LAMB_KERNELS_BACKEND='fast' is not a backend"):
        FusedLAMB(make_params())


def test_missing_triton_leaves_torch_working(monkeypatch):
    def no_triton(device_type):
        return "triton cannot be imported (test)"

    entry = dataclasses.replace(lamb_kernels.backends.BACKENDS["triton"], unavailable=no_triton)
    monkeypatch.setitem(lamb_kernels.backends.BACKENDS, "triton", entry)
    assert "triton" not in lamb_kernels.available_backends("cpu")
    with pytest.raises(ValueError, match="triton cannot be imported"):
        FusedLAMB(make_params(), backend="triton")


def test_unsupported_parameter_dtypes_name_the_parameter():
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\] is complex"):
        FusedLAMB([torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] has dtype torch.float64"):
        FusedLAMB([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))])


@on_every_backend
def test_non_dense_parameter_needs_the_torch_backend(device, backend):
    base = torch.randn(6, 4, device=device)
    strided = torch.nn.Parameter(base[:, ::2])  # a view with gaps between its elements
    if backend == "torch":
        FusedLAMB([strided], backend=backend)
    else:
        with pytest.raises(ValueError, match=r"\['params'\]\[0\] is not dense"):
            FusedLAMB([strided], backend=backend)


def corrupt_sparse(p):
    p.grad = torch.randn(p.shape).to_sparse()


def corrupt_dtype(p):
    p.grad = torch.randn(p.shape)
    p.grad.data = torch.randn(p.shape, dtype=torch.float64)


def corrupt_shape(p):
    p.grad = torch.randn(p.shape)
    p.grad.data = torch.randn(p.numel() + 1)


@pytest.mark.parametrize("corrupt, error, message", [
    (corrupt_sparse, RuntimeError, r"grad of param_groups\[1\]\['params'\]\[0\] is sparse"),
    (corrupt_dtype, TypeError, r"grad of param_groups\[1\]\['params'\]\[0\] has dtype torch.float64"),
    (corrupt_shape, ValueError, r"grad of param_groups\[1\]\['params'\]\[0\] has shape \(6,\)"),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_grad_raises_before_anything_changes(corrupt, error, message, backend):
    if backend not in lamb_kernels.available_backends("cpu"):
        pytest.skip(f"{backend} unavailable")
    params = make_params()
    opt = FusedLAMB([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2, backend=backend)
    for p in params[:2]:
        p.grad = torch.randn_like(p)
    params[2].grad = torch.randn_like(params[2])
    opt.step()  # a good step first, so there is state to protect
    before = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    for p in params[:2]:
        p.grad = torch.randn_like(p)
    corrupt(params[2])
    with pytest.raises(error, match=message):
        opt.step()
    after = opt.state_dict()
    for p, p_before in zip(params, before[0]):
        assert torch.equal(p, p_before)
    for key, entry in before[1]["state"].items():
        for name, value in entry.items():
            assert torch.equal(after["state"][key][name], value), (key, name)


def test_infinite_max_grad_norm_is_accepted():
    FusedLAMB(make_params(), max_grad_norm=math.inf)
    FusedLAMB(make_params(), max_grad_norm=None)
