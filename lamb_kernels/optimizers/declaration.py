"""What an optimizer declares, once, and the optimizer core reads: its hyperparameters with their
checks, its state entries, how a param group becomes a segment, and its stage function. lamb.py and
lars.py each state one `Declaration`; nothing in the core asks an optimizer anything else.

A hyperparameter is checked the same way wherever a value arrives: the constructor, a param group
added or edited between steps, a loaded state dict (`check_group`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .checks import check_flag, check_number, check_seed, check_state_dtype, hyperparameter
from .state import STATE_DTYPE, STATE_DTYPES, scales_key

_REQUIRED = object()  # a hyperparameter every group has (the constructor's defaults fill it)


@dataclass(frozen=True)
class Number:
    """A real number in [lo, hi] (hi excluded with `hi_open`), or a one-element floating-point
    tensor; None too with `none_ok`."""

    name: str
    hi: float = math.inf
    hi_open: bool = False
    none_ok: bool = False
    absent: object = _REQUIRED

    def check(self, value, where: str) -> None:
        if value is None and self.none_ok:
            return
        check_number(self.name, value, where, hi=self.hi, hi_open=self.hi_open)


@dataclass(frozen=True)
class Pair:
    """Two numbers, as `Number` checks them (`ordered`: the second at least the first); None too
    with `none_ok`. `shown` names the elements in the error."""

    name: str
    shown: str
    hi: float = math.inf
    hi_open: bool = False
    ordered: bool = False
    none_ok: bool = False
    absent: object = _REQUIRED

    def check(self, value, where: str) -> None:
        if value is None and self.none_ok:
            return
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(f"{where}{self.name} must be a pair {self.shown}, got {value!r}")
        check_number(f"{self.name}[0]", value[0], where, hi=self.hi, hi_open=self.hi_open)
        lo = float(value[0]) if self.ordered else 0.0
        check_number(f"{self.name}[1]", value[1], where, lo=lo, hi=self.hi, hi_open=self.hi_open)


@dataclass(frozen=True)
class Flag:
    """A switch: a bool (or 0 / 1); None too with `none_ok`."""

    name: str
    none_ok: bool = False
    absent: object = _REQUIRED

    def check(self, value, where: str) -> None:
        check_flag(self.name, value, where, none_ok=self.none_ok)


@dataclass(frozen=True)
class StateDtype:
    """``state_dtype``: torch.float32, torch.bfloat16 or "int8"."""

    name: str = "state_dtype"
    absent: object = STATE_DTYPE

    def check(self, value, where: str) -> None:
        check_state_dtype(value, STATE_DTYPES, where)


@dataclass(frozen=True)
class Seed:
    """``seed`` of the stochastic rounding: an int in [0, 2**32)."""

    name: str = "seed"
    absent: object = 0

    def check(self, value, where: str) -> None:
        check_seed(value, where)


# The switches every optimizer has, whatever its algorithm (an older checkpoint's group may lack
# them); each declaration places them among its own.
COMMON = (Flag("layer_adaptation", none_ok=True, absent=None), Flag("capturable", absent=False), StateDtype(), Seed())


@dataclass(frozen=True)
class StateEntry:
    """One entry of a parameter's state: a tensor shaped like it (`counter` False), or its step
    count (`counter`: a one-element float32 tensor). `signed`: the entry may be 8-bit codes, int8
    (True) or uint8 (False), with float32 block scales under ``key + "_scales"``; None: always
    float32. `required`: a non-empty state must have it. `segment_field`: the segment's list it
    joins (per tensor), and `scales_field` its codes' scales."""

    key: str
    signed: Optional[bool] = None
    required: bool = False
    counter: bool = False
    segment_field: str = ""
    scales_field: str = ""


@dataclass(frozen=True)
class Declaration:
    """One optimizer, as the core reads it.

    - `hyperparameters`: checked in this order (`COMMON` among them); `rule(group, where)` checks
      what depends on several;
    - `entries`: its state entries, in the order a first step creates them (``master_param``, for
      master weights, is common to all and comes last);
    - `keeps(group)`: the entries (besides the step count and ``master_param``) a parameter of
      `group` keeps; `counts_steps(group)`: whether it keeps a step count; `first_values`: the
      entries a first step sets to its first value (LARS's buffer becomes d) rather than zero;
    - `segment` and `segment_values(group)`: a segment (backend_api.py) and the group-wide values of
      a group's segments; `bucket_state_dtype(group)`: what its bucket's states are kept in;
    - `bias_corrections(group, counts)`: the per-step bias corrections from step counts, or None;
    - `structure(group)`: what of a group, besides ``capturable`` and ``state_dtype``, decides its
      state and segments' shape (a change plans the step afresh);
    - `sums_before_writes(groups)`: the sums of squares per sharded tensor that the step's first
      all-reduce carries (known from the hyperparameters alone, so the same on every rank);
    - `prepare`: the backend method that makes a bucket's Plan; `run`: the stage function."""

    hyperparameters: tuple
    rule: Callable[[dict, str], None]
    entries: tuple
    keeps: Callable[[dict], tuple]
    counts_steps: Callable[[dict], bool]
    first_values: tuple
    segment: type
    segment_values: Callable[[dict], dict]
    bucket_state_dtype: Callable[[dict], object]
    bias_corrections: Optional[Callable]
    structure: Callable[[dict], tuple]
    sums_before_writes: Callable[[list], int]
    prepare: str
    run: Callable

    def __post_init__(self):
        tensors = tuple(e.key for e in self.entries if not e.counter) + ("master_param",)
        coded = {e.key: e.signed for e in self.entries if e.signed is not None}
        object.__setattr__(self, "tensors", tensors)  # param-shaped entries
        object.__setattr__(self, "signed", coded)  # entries that may be 8-bit codes -> signed
        object.__setattr__(self, "required", tuple(e.key for e in self.entries if e.required))
        # Every entry a step reads: what its checks look at, on the full path and on a reused one.
        object.__setattr__(self, "state_keys", (*tensors, "step", *map(scales_key, coded)))


def check_group(declaration: Declaration, group: dict, where: str = "") -> None:
    """Raise naming the hyperparameter of `group` that is out of range (ValueError), of the wrong
    type (TypeError) or missing; `where` names the group."""
    for hyper in declaration.hyperparameters:
        if hyper.absent is _REQUIRED:
            value = hyperparameter(group, hyper.name, where)
        else:
            value = group.get(hyper.name, hyper.absent)
        hyper.check(value, where)
    declaration.rule(group, where)


def lr_of(group: dict):
    """The group's lr: a float, or the one-element tensor itself as a 0-d view (read on the device
    by the kernels, so a value a scheduler writes in place is the one used)."""
    lr = group["lr"]
    return lr.reshape(()) if torch.is_tensor(lr) else float(lr)
