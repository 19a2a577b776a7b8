"""The API reference holds: docs/api.md is what docs/make_api.py writes from the docstrings; every
argument of the public constructors and functions is documented, in order, with the default the code
has, where it comes from (apex, timm, or lamb_kernels only) and whether a param group may set it; every
group-only key is documented too. And `backends` and ``repr(opt)`` name the backend that ran."""
import importlib.util
import inspect
import pathlib
import re

import pytest
import torch

from lamb_kernels import FusedLAMB, FusedLARS, FusedMixedPrecisionLamb, available_backends, param_groups

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_api", ROOT / "docs" / "make_api.py")
make_api = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_api)

OPTIMIZERS = [FusedLAMB, FusedLARS, FusedMixedPrecisionLamb]
DOCUMENTED = [*OPTIMIZERS, available_backends, param_groups]
CPU = torch.device("cpu")


def test_api_page_is_up_to_date():
    assert make_api.API_PAGE.read_text(encoding="utf-8") == make_api.render(), (
        "docs/api.md is out of date with the docstrings: run `python docs/make_api.py`")


def test_check_mode_fails_on_a_stale_page_and_passes_once_written(tmp_path, monkeypatch, capsys):
    page = tmp_path / "api.md"
    page.write_text(make_api.render().replace("`FusedLARS`", "`FusedLars`"), encoding="utf-8")
    monkeypatch.setattr(make_api, "API_PAGE", page)
    assert make_api.main(["--check"]) == 1
    assert "docs/api.md is out of date" in capsys.readouterr().err
    monkeypatch.setattr(make_api, "ROOT", tmp_path)  # (the written path is printed relative to it)
    assert make_api.main([]) == 0
    assert make_api.main(["--check"]) == 0
    assert page.read_text(encoding="utf-8") == make_api.render()


def test_the_page_is_deterministic():
    assert make_api.render() == make_api.render()
    assert not re.search(r"0x[0-9a-f]{6,}", make_api.render())  # no object addresses


@pytest.mark.parametrize("obj", DOCUMENTED, ids=lambda obj: obj.__name__)
def test_every_parameter_is_documented_with_the_default_of_the_code(obj):
    signature = inspect.signature(obj)
    documented = make_api.parameters(obj)
    assert list(documented) == list(signature.parameters), (
        f"{obj.__name__}: the Parameters section of its docstring must list every argument of its signature, "
        "in order")
    for name, parameter in signature.parameters.items():
        kind, description = documented[name]
        assert description, f"{obj.__name__}({name}) has no description"
        if parameter.default is inspect.Parameter.empty:
            assert "default" not in kind, f"{obj.__name__}({name}) has no default in the code"
            continue
        _, sep, shown = kind.rpartition(", default ")
        assert sep, f"{obj.__name__}({name}): its type line must end with ', default <value>'"
        assert eval(shown, {"torch": torch}) == parameter.default, (
            f"{obj.__name__}({name}): documented default {shown}, the code's {parameter.default!r}")


def _optimizer(cls, **kwargs):
    return cls([torch.nn.Parameter(torch.zeros(3))], backend="torch", **kwargs)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_each_argument_says_where_it_comes_from_and_whether_a_group_may_set_it(cls):
    defaults = _optimizer(cls).defaults
    for name, (_, description) in make_api.parameters(cls).items():
        assert re.search(rf"\b(apex|timm): ``{name}``", description) or "lamb_kernels only" in description, (
            f"{cls.__name__}({name}): say which apex or timm argument it matches, or 'lamb_kernels only'")
        assert ("Per group" in description) == (name in defaults), (
            f"{cls.__name__}({name}): 'Per group' exactly when a param group may set it (a key of defaults)")


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_group_only_keys_are_documented_with_their_defaults(cls):
    defaults = _optimizer(cls).defaults
    arguments = {name for name, (_, description) in make_api.parameters(cls).items() if "Per group" in description}
    keys = make_api.group_keys(cls)
    assert set(keys) == (set(defaults) | {"layer_adaptation"}) - arguments
    for name, (kind, description) in keys.items():
        assert description
        shown = kind.rpartition(", default ")[2]
        assert eval(shown, {"torch": torch}) == defaults.get(name), f"{cls.__name__} group key {name}"


# -- which backend ran ----------------------------------------------------------------------------

def _step(opt, params):
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()


def _params():
    return [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 4).to(torch.bfloat16))]


@pytest.mark.parametrize("name", ["cpp", "torch", "triton"])
@pytest.mark.parametrize("cls", [FusedLAMB, FusedLARS], ids=lambda cls: cls.__name__)
def test_backends_names_the_backend_that_ran_and_repr_shows_it(cls, name):
    if name not in available_backends("cpu"):
        pytest.skip(f"no {name} backend here")
    params = _params()
    opt = cls(params, backend=name, weight_decay=0.01)
    assert opt.backends == {}
    assert f"backends: none yet (no step has run); {name!r} resolves to {{cpu: {name!r}}}" in repr(opt)
    _step(opt, params)
    assert opt.backends == {(CPU, torch.float32): name, (CPU, torch.bfloat16): name}
    assert opt.backend == name
    text = repr(opt)
    assert text.startswith(f"{cls.__name__} (\nParameter Group 0\n")
    ran = f"{{(cpu, torch.float32): {name!r}, (cpu, torch.bfloat16): {name!r}}}"
    assert text.endswith(f"\nbackend: {name!r}\nbackends: {ran}\n)")
    with pytest.raises(AttributeError):
        opt.backends = {}


def test_backends_is_what_auto_chose_at_the_last_step(monkeypatch, reused_steps):
    monkeypatch.delenv("LAMB_KERNELS_BACKEND", raising=False)
    chosen = available_backends("cpu")[0]
    params = _params()
    opt = FusedLAMB(params)
    assert f"'auto' resolves to {{cpu: {chosen!r}}}" in repr(opt)
    _step(opt, params)
    _step(opt, params)
    _step(opt, params)
    assert reused_steps(opt) > 0  # (a reused step ran the same buckets)
    assert opt.backend == "auto"
    assert opt.backends == {(CPU, torch.float32): chosen, (CPU, torch.bfloat16): chosen}
    monkeypatch.setenv("LAMB_KERNELS_BACKEND", "torch")
    _step(opt, params)
    assert opt.backends == {(CPU, torch.float32): "torch", (CPU, torch.bfloat16): "torch"}
    assert "backends: {(cpu, torch.float32): 'torch', (cpu, torch.bfloat16): 'torch'}" in repr(opt)


def test_backends_joins_two_backends_of_one_dtype():
    if "cpp" not in available_backends("cpu"):
        pytest.skip("no cpp backend here")
    strided = torch.nn.Parameter(torch.randn(6, 4)[:, ::2])  # gaps in memory: "auto" steps it with torch
    dense = torch.nn.Parameter(torch.randn(5))
    opt = FusedLARS([strided, dense], weight_decay=0.01, backend="auto")
    _step(opt, [strided, dense])
    assert opt.backends == {(CPU, torch.float32): "cpp+torch"}

