"""The checks every optimizer makes before a step or a load changes anything: numbers and switches
of a param group, the group's validation key, parameters and state tensors each stepped once, grads
that fit their parameters. Each error names the argument, the hyperparameter or the parameter."""
from __future__ import annotations

import math
import numbers
import operator

import numpy as np
import torch

from ..backend_api import is_dense
from ..distributed import local


def param_label(group_index: int, param_index: int, group: dict) -> str:
    names = group.get("param_names")
    label = f"param_groups[{group_index}]['params'][{param_index}]"
    return f"{label} ({names[param_index]!r})" if names and param_index < len(names) else label


def check_number(name: str, value, where: str, lo: float = 0.0, hi: float = math.inf, hi_open=False,
                 integral_tensor=False):
    """A real number, or a one-element floating-point tensor (its value is checked when it lives on
    the CPU: on a device, reading it would wait for the device). Strings are refused, as torch.optim
    refuses them. An integer or bool tensor is refused unless `integral_tensor` (a saved step count):
    a backend that computes in the tensor's own dtype would wrap around (``-lr`` of a uint8 1 is 255)."""
    if torch.is_tensor(value):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{where}{name} must be a number or a one-element real tensor, got a tensor of "
                             f"shape {tuple(value.shape)} and dtype {value.dtype}")
        if not value.is_floating_point() and not integral_tensor:
            raise TypeError(f"{where}{name} must be a number or a one-element floating-point tensor, got a "
                            f"tensor of dtype {value.dtype}")
        if value.device.type != "cpu":
            return
        number = float(value)
    elif isinstance(value, numbers.Real):
        number = float(value)
    else:
        raise TypeError(f"{where}{name} must be a number, got {value!r}")
    too_high = number >= hi if hi_open else number > hi
    if math.isnan(number) or number < lo or too_high:
        bracket = ")" if hi_open else "]"
        raise ValueError(f"{where}{name} must be in [{lo}, {hi}{bracket}, got {value!r}")


def check_flag(name: str, value, where: str, none_ok: bool = False) -> None:
    """A switch: a bool (or 0 / 1); None too where the group may leave the choice to the optimizer."""
    if value is None and none_ok:
        return
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return
    allowed = "True, False or None" if none_ok else "True or False"
    raise TypeError(f"{where}{name} must be {allowed}, got {value!r}")


def check_state_dtype(value, allowed, where: str) -> None:
    """A group's ``state_dtype``: one of `allowed` (torch dtypes, and "int8")."""
    if not any(value is d or (isinstance(d, str) and value == d) for d in allowed):
        names = ", ".join(repr(d) if isinstance(d, str) else f"torch.{str(d).split('.')[-1]}" for d in allowed)
        raise ValueError(f"{where}state_dtype must be one of {names}, got {value!r}")


def as_int(value):
    """An integral number (a numpy int, say) as a Python int, so that a state dict holds plain
    values (``torch.load(weights_only=True)`` reads no numpy scalar); anything else as it is, for
    the checks to name."""
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


def check_seed(value, where: str) -> None:
    """A group's ``seed`` for stochastic rounding: an int in [0, 2^32)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}seed must be an int in [0, 2**32), got {value!r}")
    if not 0 <= value < 2**32:
        raise ValueError(f"{where}seed must be an int in [0, 2**32), got {value!r}")


def hyperparameter(group: dict, name: str, where: str):
    """group[name], or a ValueError naming the missing hyperparameter."""
    try:
        return group[name]
    except KeyError:
        raise ValueError(f"{where}the hyperparameter {name!r} is missing") from None


class _Same:
    """Equal to another _Same of the very same object: how a group's key compares tensors (a tensor
    lr that a scheduler writes in place stays the same) and other objects without a plain value."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return type(other) is _Same and other.obj is self.obj

    __hash__ = None


def _frozen(value):
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if torch.is_tensor(value) and value.device.type == "cpu" and value.numel() == 1 and not value.is_complex():
        # A value written in place (lr.fill_(...)) is checked again; reading it on the CPU is free.
        return _Same(value), float(value)
    return _Same(value)


def group_key(group: dict) -> tuple:
    """What a group's validation depends on, besides which parameters it holds (see `same_items`):
    its hyperparameters."""
    return tuple((key, _frozen(value)) for key, value in group.items() if key not in ("params", "param_names"))


def same_items(items, known: tuple) -> bool:
    """Whether the list `items` holds the very objects of `known`, in order (by identity: comparing
    tensors with == would compare their elements)."""
    return len(items) == len(known) and all(map(operator.is_, items, known))


def _last_element(t: torch.Tensor) -> int:
    """How many elements past its first a (non-empty) tensor's last element lies in its storage."""
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def _memory_span(p: torch.Tensor) -> tuple:
    """(device, first byte, one past the last byte) of a dense tensor's elements."""
    extent = _last_element(p)
    start = p.data_ptr()
    device = (p.device.type, -1 if p.device.index is None else p.device.index)
    return device, start, start + (extent + 1) * p.element_size()


def check_distinct(groups, state=None, state_keys=()) -> None:
    """Each parameter at most once in an optimizer, and no two sharing memory, nor any two of their
    state tensors (`state_keys` of `state`): the fused step reads every parameter before it writes
    any, so an element stepped twice would be stepped from stale values (and, on the multi-tensor
    backends, written by two threads at once). Views with gaps (not dense) are left out of the
    memory check: their address ranges may interleave without a shared element."""
    seen = {}
    spans = []
    for group_index, group in enumerate(groups):
        for param_index, p in enumerate(group["params"]):
            label = param_label(group_index, param_index, group)
            first, first_group = seen.setdefault(id(p), (label, group_index))
            if first is not label:
                if first_group != group_index:  # (torch.optim's words, and which parameter)
                    raise ValueError(f"some parameters appear in more than one parameter group: {label} is {first}")
                raise ValueError(f"{label} is {first} again: each parameter may appear once in an optimizer")
            entries = state.get(p, {}) if state is not None else {}
            tensors = [(label, p)] + [(f"the {key!r} state of {label}", entries[key]) for key in state_keys
                                      if torch.is_tensor(entries.get(key))]
            for what, t in tensors:
                shard = local(t)
                if shard.numel() and is_dense(shard):
                    spans.append((*_memory_span(shard), what))
    spans.sort(key=lambda span: span[:2])
    device, reach, reach_label = None, 0, None
    for span_device, start, end, label in spans:
        if span_device == device and start < reach:
            raise ValueError(f"{label} and {reach_label} share memory: each element may be stepped once; "
                             "give the optimizer one of them")
        if span_device != device or end > reach:
            device, reach, reach_label = span_device, end, label


def check_distinct_groups(groups) -> None:
    """Each param group dict at most once in ``param_groups`` (``param_groups.append(param_groups[0])``
    would step its parameters twice): checked at every step, whatever the step last checked."""
    if len(set(map(id, groups))) == len(groups):
        return
    first = {}
    for group_index, group in enumerate(groups):
        known = first.setdefault(id(group), group_index)
        if known != group_index:
            raise ValueError(f"param_groups[{group_index}] is param_groups[{known}] again (the same dict): each "
                             "param group may appear once in an optimizer, or its parameters would step twice")


def check_storage(t: torch.Tensor, what: str) -> None:
    """A tensor whose storage holds every element its shape and strides reach: one freed in place
    (``t.untyped_storage().resize_(0)``, as FSDP-like code does) would be read and written past its
    end by every backend."""
    shard = local(t)
    if shard.numel() == 0 or shard.layout != torch.strided:
        return
    needed = (shard.storage_offset() + _last_element(shard) + 1) * shard.element_size()
    held = shard.untyped_storage().nbytes()
    if held < needed:
        raise ValueError(f"{what} has a storage of {held} bytes, but its shape {tuple(shard.shape)} and strides "
                         f"{shard.stride()} need {needed}: was its storage freed or resized in place? Give the "
                         "optimizer the tensor with its memory allocated")


def check_scaler_tensor(name: str, t) -> None:
    if t is not None and (not torch.is_tensor(t) or t.numel() != 1 or not t.is_floating_point()):
        raise TypeError(f"optimizer.{name} must be a one-element floating-point tensor (set by GradScaler), got {t!r}")


def raise_bad_grad(p: torch.Tensor, label: str, optimizer: str):
    g = p.grad
    if g.is_sparse:
        raise RuntimeError(f"the grad of {label} is sparse; {optimizer} does not support sparse gradients")
    if g.dtype != p.dtype:
        raise TypeError(f"the grad of {label} has dtype {g.dtype}, the parameter {p.dtype}")
    if g.device != p.device:
        raise ValueError(f"the grad of {label} is on {g.device}, the parameter on {p.device}")
    raise ValueError(f"the grad of {label} has shape {tuple(g.shape)}, the parameter {tuple(p.shape)}")
