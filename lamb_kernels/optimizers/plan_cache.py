"""The host path of a steady training loop: what a full step planned (its segments and each bucket's
Plan), kept for the next steps while nothing it depends on has changed (docs/design.md section 10).

A full step (validation.py's `params_to_step` and what follows) checks every group, parameter,
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
Python does the same work where the C++ library is not built: validation.py's `layouts_function`),
makes the checks every step makes (validation.check_every_step), which revalidate a group whose
hyperparameters changed (a scheduler's new lr) as the constructor would, and on any other difference
takes the full path, which raises what a full step raises, or plans afresh. So every check of a full
step holds for the tensors a reused plan hands the kernels, and the same inputs step the same way,
bit for bit, by either path.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..backends import ENV_VAR
from .declaration import lr_of
from .state import state_dtype_of
from .step_counts import advance_reused, pack_step_counts
from .validation import check_every_step, layouts_function, remember_groups

_NO_STATE = {}  # the state a reused step reads for a parameter without any (never written)


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
    settings: tuple  # optimizer.plan_settings(opt)
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


def plan_settings(opt) -> tuple:
    """The optimizer's own attributes a step's plans depend on: its backend, and which parameters
    get master weights."""
    return opt.backend, opt.master_weights, getattr(opt, "reduced_precision_dtype", None)


def group_structure(declaration, group: dict) -> tuple:
    """What of a group's hyperparameters decides its state and segments' shape (not only their
    values): a change takes the full path."""
    return (bool(group.get("capturable")), state_dtype_of(group), *declaration.structure(group))


def remember(opt, work: list, plans: list, grad_scale, found_inf) -> StepCache | None:
    """The cache of a step that passed every check, or None when its plans cannot be reused: a
    sharded parameter, a grad copied into its parameter's layout, a CUDA graph being captured."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return None
    if any(torch.is_tensor(value) and value.device.type != "cpu" and key != "lr"
           for group in opt.param_groups for key, value in group.items()):
        return None  # (read by every full step; a group's key compares such tensors by identity)
    stepped = [item for _, params in work for item in params]
    if any(shard is not p or p.grad is None for p, _, _, shard, _ in stepped):
        return None
    segments = [seg for _, _, plan in plans for seg in plan.segments]
    if sum(len(seg.grads) for seg in segments) != len(stepped):
        return None
    grad_at = {position: g for seg in segments for position, g in zip(seg.positions, seg.grads)}
    if any(grad_at[position] is not p.grad for p, _, position, _, _ in stepped):
        return None  # a grad was copied into its parameter's layout
    declaration = opt.DECLARATION
    opt.state = tracked(opt.state)
    states = [opt.state.get(p, _NO_STATE) for p, _, _, _, _ in stepped]
    cache = StepCache(
        state=opt.state, version=opt.state.version, env=os.environ.get(ENV_VAR), settings=plan_settings(opt),
        scaler=(device_of(grad_scale), device_of(found_inf)),
        groups=[(group, group["params"], group_structure(declaration, group)) for group in opt.param_groups],
        params=[p for group in opt.param_groups for p in group["params"]],
        # On a GPU the host path is what a step may wait for: the C++ library is built for it.
        states=states, layouts=layouts_function(build=any(key[0].type == "cuda" for _, key, _ in plans)),
    )
    # Where each bucket's grads are in cache.params, and each segment's rows in its bucket.
    position = {(gi, pi): i for i, (gi, pi) in enumerate(
        (gi, pi) for gi, group in enumerate(opt.param_groups) for pi in range(len(group["params"])))}
    state_at = {position: state for (_, _, position, _, _), state in zip(stepped, states)}
    for backend, key, plan in plans:
        index = [position[pos] for seg in plan.segments for pos in seg.positions]
        rows, first = [], 0
        for seg in plan.segments:
            rows.append((seg, seg.positions[0][0], first, first + len(seg.grads)))
            first += len(seg.grads)
        cache.buckets.append(BucketCache(
            backend, key, plan, None if index == list(range(len(cache.params))) else index, rows,
            [state_at[pos] for seg in plan.segments for pos in seg.positions]))
    counted = lambda bucket: declaration.counts_steps(opt.param_groups[bucket.segments[0][1]])  # noqa: E731
    if not pack_step_counts(cache, counted):
        return None
    cache.signature = _signature(declaration, cache, [p.grad for p in cache.params])
    return cache if cache.signature is not None else None


def _signature(declaration, cache: StepCache, grads: list) -> tuple | None:
    """The layouts of the parameters, their state entries (the declaration's ``state_keys``, which
    the full path's checks read too) and grads; None when one of them is neither a tensor nor None
    (a state entry set by hand: the full path judges it)."""
    layouts = cache.layouts
    try:
        return (layouts(cache.params, True), *(layouts(entries, True) for entries in
                                               state_lists(cache.states, declaration.state_keys)),
                layouts(grads, False))
    except TypeError:
        return None


def reuse(opt, grad_scale, found_inf) -> list | None:
    """The cached plans, with this step's grads and per-step values, when every check of a full
    step would pass on what they hold; else None (the full path then runs, and raises where a
    check fails). Raises only what the full path would: a group's new hyperparameter refused."""
    cache = opt._step_cache
    declaration = opt.DECLARATION
    if (opt.state is not cache.state or opt.state.version != cache.version
            or os.environ.get(ENV_VAR) != cache.env or plan_settings(opt) != cache.settings
            or (device_of(grad_scale), device_of(found_inf)) != cache.scaler
            or len(opt.param_groups) != len(cache.groups)):
        return None
    revalidated = check_every_step(opt)  # raises as the full path would
    changed = set()
    for group, _, params in revalidated:
        index = next((i for i, known in enumerate(cache.groups) if known[0] is group), None)
        if index is None or params is not None or group_structure(declaration, group) != cache.groups[index][2]:
            return None  # another group or parameter list: planned afresh
        changed.add(index)
    if any(group is not known or group["params"] is not params
           for group, (known, params, _) in zip(opt.param_groups, cache.groups)):
        return None
    grads = [p.grad for p in cache.params]
    if _signature(declaration, cache, grads) != cache.signature:
        return None
    remember_groups(opt, revalidated)
    for bucket in cache.buckets:
        bucket_grads = grads if bucket.grad_index is None else [grads[i] for i in bucket.grad_index]
        for seg, group_index, first, end in bucket.segments:
            seg.grads = bucket_grads[first:end] if len(bucket.segments) > 1 else bucket_grads
            group = opt.param_groups[group_index]
            if group_index in changed:
                for name, value in declaration.segment_values(group).items():
                    setattr(seg, name, value)
            elif torch.is_tensor(group["lr"]):
                seg.lr = lr_of(group)  # (a view of it as it is now: ``lr.data = ...`` moves it)
        bucket.plan.grads = bucket_grads
    advance_reused(opt, cache, found_inf, corrections=declaration.bias_corrections)
    for bucket in cache.buckets:
        bucket.backend.refresh(bucket.plan, hyper_changed=bool(changed))
    return cache.plans()
