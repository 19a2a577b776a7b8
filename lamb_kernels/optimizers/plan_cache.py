"""The host path of a steady training loop: what a full step planned (its segments and each bucket's
Plan), kept for the next steps while nothing it depends on has changed (docs/design.md section 10).

A full step (`MultiTensorOptimizer._params_to_step` and what follows) checks every group, parameter,
grad and state entry, in Python, per tensor. Most steps change none of that but the grads, which are
new tensors of the same shape, dtype, device and layout, and the step counts. So once a full step has
passed, a `StepCache` records:

- the objects the checks passed on: the optimizer's state dict (and its version, `TrackedState`),
  each group (and its validation key and parameter list), $LAMB_KERNELS_BACKEND, the devices of a
  GradScaler's scale and found_inf;
- `layouts`: per tensor, its Python type, dtype, layout, device, sizes, strides and (for the
  parameters and their state entries) address, for the parameters, every state entry a step uses
  (looked up again in each parameter's state dict), and the grads (None for a parameter without
  one);
- the Plans, and where each bucket's grads come from.

A later step compares these, in one call per list (csrc/host.cpp reads a whole list's metadata in C;
Python does the same work where the C++ library is not built), revalidates a group whose
hyperparameters changed (a scheduler's new lr) as the constructor would, and on any other difference
takes the full path, which raises what a full step raises, or plans afresh. So every check of a full
step holds for the tensors a reused plan hands the kernels, and the same inputs step the same way,
bit for bit, by either path.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .. import extension


class TrackedState(defaultdict):
    """``optimizer.state``: torch.optim's defaultdict(dict), counting its changes in ``version``, so that
    a step can tell in O(1) that no parameter's state dict was replaced, added or removed. (Entries
    of a parameter's own state dict are compared by `layouts` instead.)"""

    version = 0  # (a class default: an unpickled or copied one starts here)

    def _changed(self):
        self.version += 1

    def __setitem__(self, key, value):
        self._changed()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._changed()
        super().__delitem__(key)

    def __ior__(self, other):
        self._changed()
        return super().__ior__(other)

    def pop(self, *args):
        self._changed()
        return super().pop(*args)

    def popitem(self):
        self._changed()
        return super().popitem()

    def clear(self):
        self._changed()
        super().clear()

    def update(self, *args, **kwargs):
        self._changed()
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        self._changed()
        return super().setdefault(key, default)


def tracked(state) -> TrackedState:
    """`state` as a TrackedState (itself when it is one already)."""
    return state if type(state) is TrackedState else TrackedState(dict, state)


def _address(t: torch.Tensor) -> int:
    try:
        return t.data_ptr()
    except RuntimeError:  # no storage: a DTensor or another wrapper
        return -2


def python_layouts(items: list, addresses: bool) -> tuple:
    """What csrc/host.cpp's ``layouts`` reads, in Python (comparable with == like its bytes); raises
    TypeError, as it does, for an item that is neither a tensor nor None."""
    return tuple(map(lambda t: _layout(t, addresses), items))


def _layout(t, addresses: bool):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"layouts: {type(t).__name__} is not a tensor or None")
    strided = t.layout == torch.strided
    return (type(t), t.dtype, t.layout, t.device, t.shape, t.stride() if strided else None,
            _address(t) if addresses and strided else None)


def layouts_function(build: bool = False):
    """csrc/host.cpp's ``layouts`` when the C++ library is loaded or loads without a build (or, with
    `build`, once built: a minute, the first time on a machine), else `python_layouts`, which costs
    about what the full path's checks cost."""
    if build:
        try:
            extension.load()
        except extension.ExtensionUnavailable:
            pass
    module = extension.host_module()
    return python_layouts if module is None else module.layouts


@dataclass(eq=False)
class BucketCache:
    """One bucket of a reused step: its Plan, which of the cache's grads are its (None: all of them,
    in order), and per segment (segment, group index, first row, end row)."""

    backend: object
    key: tuple
    plan: object
    grad_index: list | None
    segments: list
    states: list = field(default_factory=list)  # per row, its parameter's state dict
    step_counts: torch.Tensor | None = None  # LAMB: the bucket's packed step counts (lamb.py)


@dataclass(eq=False)
class StepCache:
    state: TrackedState
    version: int
    env: str | None
    settings: tuple  # MultiTensorOptimizer._settings()
    scaler: tuple  # devices of grad_scale and found_inf (None where absent)
    groups: list  # per group: (group, its params list, structure key)
    params: list  # every parameter of every group, in order
    states: list  # the state dict of each parameter with a grad, in work order
    layouts: object  # layouts_function()
    signature: tuple = ()  # per list (params, each state entry, grads): its layouts
    buckets: list = field(default_factory=list)

    def plans(self) -> list:
        return [(b.backend, b.key, b.plan) for b in self.buckets]


def device_of(t) -> torch.device | None:
    return None if t is None else t.device


def state_lists(states: list, keys) -> list:
    """Per state key, that entry of every state dict (None where there is none)."""
    return [[state.get(key) for state in states] for key in keys]
