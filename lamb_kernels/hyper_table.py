"""Per-tensor hyperparameter tables: float32 [n_tensors, 16], one row per tensor of a (device,
dtype) bucket, so one kernel launch or operator call serves every param group of the bucket.

The column layout is shared by the Triton kernels and the C++ operators (csrc/hyper_columns.h
mirrors it).

A value may be a Python number (or a list of them, one per tensor) or a tensor: the learning rate as
a tensor, the bias corrections computed on the device from device-side step counts. Numbers go into
a static table built on the host (`HyperTable` uploads it only when it changes); tensors are written
into the device table by device ops every step, so nothing waits on the host and a captured CUDA
graph reads the tensors' values at replay.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

from .backend_api import to_device
from .rounding import key_halves

WIDTH = 16


class LambColumn(IntEnum):
    LR = 0
    BETA1 = 1
    BETA2 = 2
    BETA3 = 3
    ONE_MINUS_BETA2 = 4
    EPS = 5
    WD_L2 = 6  # weight decay added to the grad (L2 mode), else 0
    WD_DECOUPLED = 7  # weight decay added to the update (AdamW mode), else 0
    BC1 = 8  # 1 - beta1^t, or 1 without bias correction
    BC2 = 9
    MAX_GRAD_NORM = 10  # 0: this tensor's group does not clip
    ADAPT = 11  # 1: apply the trust ratio
    RATIO_LO = 12
    RATIO_HI = 13
    KEY_LO = 14  # bf16 states: this step's rounding key, low and high 16 bits (lamb_kernels/rounding.py)
    KEY_HI = 15


class LarsColumn(IntEnum):
    LR = 0
    MOMENTUM = 1
    ONE_MINUS_DAMPENING = 2
    WEIGHT_DECAY = 3
    TRUST_COEFF = 4
    EPS = 5
    TRUST_CLIP = 6  # 1: LARC, r <- min(r / lr, 1)
    ADAPT = 7  # 1: trust ratio and weight decay apply
    NESTEROV = 8
    HAS_MOMENTUM = 9  # 0: no buffer
    FIRST_STEP = 10  # 1: the buffer is new and becomes d
    KEY_LO = 11  # bf16 buffers: this step's rounding key, low and high 16 bits (lamb_kernels/rounding.py)
    KEY_HI = 12


def _lamb_columns(seg):
    """(column, value) pairs of one LambSegment: a value is the group's scalar or one per tensor."""
    wd = seg.weight_decay
    c = LambColumn
    key_lo, key_hi = key_halves(seg.rounding_keys)
    return (
        (c.LR, seg.lr), (c.BETA1, seg.beta1), (c.BETA2, seg.beta2), (c.BETA3, seg.beta3),
        (c.ONE_MINUS_BETA2, 1.0 - seg.beta2), (c.EPS, seg.eps),
        (c.WD_L2, 0.0 if seg.adam_w_mode else wd), (c.WD_DECOUPLED, wd if seg.adam_w_mode else 0.0),
        (c.BC1, seg.bias_correction1), (c.BC2, seg.bias_correction2),
        (c.MAX_GRAD_NORM, seg.max_grad_norm), (c.ADAPT, float(seg.layer_adaptation)),
        (c.RATIO_LO, seg.trust_ratio_bounds[0]), (c.RATIO_HI, seg.trust_ratio_bounds[1]),
        (c.KEY_LO, key_lo), (c.KEY_HI, key_hi),
    )


def _lars_columns(seg):
    """(column, value) pairs of one LarsSegment."""
    c = LarsColumn
    key_lo, key_hi = key_halves(seg.rounding_keys)
    return (
        (c.LR, seg.lr), (c.MOMENTUM, seg.momentum), (c.ONE_MINUS_DAMPENING, 1.0 - seg.dampening),
        (c.WEIGHT_DECAY, seg.weight_decay), (c.TRUST_COEFF, seg.trust_coeff), (c.EPS, seg.eps),
        (c.TRUST_CLIP, float(seg.trust_clip)), (c.ADAPT, float(seg.adaptation)),
        (c.NESTEROV, float(seg.nesterov)), (c.HAS_MOMENTUM, float(seg.momentum != 0)),
        (c.FIRST_STEP, seg.first_step), (c.KEY_LO, key_lo), (c.KEY_HI, key_hi),
    )


def _table(segments, columns_of) -> np.ndarray:
    """The static table: tensor-valued entries are left 0 here (see `_tensor_writes`)."""
    rows = np.zeros((sum(len(seg.params) for seg in segments), WIDTH), dtype=np.float64)
    first = 0
    for seg in segments:
        block = rows[first : first + len(seg.params)]
        first += len(seg.params)
        for column, value in columns_of(seg):
            if not torch.is_tensor(value):
                block[:, column] = value
    return rows.astype(np.float32)


def _tensor_writes(segments, columns_of) -> list:
    """(first row, last row, column, tensor) for every tensor-valued entry: a one-element tensor fills
    the segment's rows, an ``[n_tensors]`` tensor gives one value per row."""
    writes, first = [], 0
    for seg in segments:
        last = first + len(seg.params)
        writes += [(first, last, column, value) for column, value in columns_of(seg) if torch.is_tensor(value)]
        first = last
    return writes


class HyperTable:
    """A bucket's hyperparameter table on its device. ``update(segments)`` returns it for this step:
    the static part is uploaded only when it differs from the last one (so a steady training loop,
    or a CUDA graph capture after warm-up, copies nothing from the host), then the tensor-valued
    entries are written on the device."""

    def __init__(self, columns_of, device: torch.device):
        self._columns_of = columns_of
        self.device = device
        self._static = None
        self.table = None

    def update(self, segments) -> torch.Tensor:
        static = _table(segments, self._columns_of)
        if self._static is None or not np.array_equal(static, self._static):
            self.table = to_device(static.copy(), self.device)  # a copy: its tensor entries are written below
            self._static = static
        for first, last, column, value in _tensor_writes(segments, self._columns_of):
            value = value.to(device=self.device, dtype=torch.float32)
            self.table[first:last, column] = value.reshape(-1) if value.numel() > 1 else value.reshape(())
        return self.table


def lamb_hyper(device: torch.device) -> HyperTable:
    return HyperTable(_lamb_columns, torch.device(device))


def lars_hyper(device: torch.device) -> HyperTable:
    return HyperTable(_lars_columns, torch.device(device))


def lamb_table(segments) -> np.ndarray:
    """The LAMB hyperparameters of every tensor of `segments` (LambSegment), in order."""
    return _table(segments, _lamb_columns)


def lars_table(segments) -> np.ndarray:
    """The LARS hyperparameters of every tensor of `segments` (LarsSegment), in order."""
    return _table(segments, _lars_columns)
