"""Per-tensor hyperparameter tables: float32 [n_tensors, 16], one row per tensor of a (device,
dtype) bucket, so one kernel launch or operator call serves every param group of the bucket.

The column layout is shared by the Triton kernels and the C++ operators (csrc/hyper_columns.h
mirrors it).
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np

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


def _lamb_columns(seg):
    """(column, value) pairs of one LambSegment: a value is the group's scalar or one per tensor."""
    wd = seg.weight_decay
    c = LambColumn
    return (
        (c.LR, seg.lr), (c.BETA1, seg.beta1), (c.BETA2, seg.beta2), (c.BETA3, seg.beta3),
        (c.ONE_MINUS_BETA2, 1.0 - seg.beta2), (c.EPS, seg.eps),
        (c.WD_L2, 0.0 if seg.adam_w_mode else wd), (c.WD_DECOUPLED, wd if seg.adam_w_mode else 0.0),
        (c.BC1, seg.bias_correction1), (c.BC2, seg.bias_correction2),
        (c.MAX_GRAD_NORM, seg.max_grad_norm), (c.ADAPT, float(seg.layer_adaptation)),
        (c.RATIO_LO, seg.trust_ratio_bounds[0]), (c.RATIO_HI, seg.trust_ratio_bounds[1]),
    )


def _lars_columns(seg):
    """(column, value) pairs of one LarsSegment."""
    c = LarsColumn
    return (
        (c.LR, seg.lr), (c.MOMENTUM, seg.momentum), (c.ONE_MINUS_DAMPENING, 1.0 - seg.dampening),
        (c.WEIGHT_DECAY, seg.weight_decay), (c.TRUST_COEFF, seg.trust_coeff), (c.EPS, seg.eps),
        (c.TRUST_CLIP, float(seg.trust_clip)), (c.ADAPT, float(seg.adaptation)),
        (c.NESTEROV, float(seg.nesterov)), (c.HAS_MOMENTUM, float(seg.momentum != 0)),
        (c.FIRST_STEP, seg.first_step),
    )


def _table(segments, columns_of) -> np.ndarray:
    rows = np.zeros((sum(len(seg.params) for seg in segments), WIDTH), dtype=np.float64)
    first = 0
    for seg in segments:
        block = rows[first : first + len(seg.params)]
        first += len(seg.params)
        for column, value in columns_of(seg):
            block[:, column] = value
    return rows.astype(np.float32)


def lamb_table(segments) -> np.ndarray:
    """The LAMB hyperparameters of every tensor of `segments` (LambSegment), in order."""
    return _table(segments, _lamb_columns)


def lars_table(segments) -> np.ndarray:
    """The LARS hyperparameters of every tensor of `segments` (LarsSegment), in order."""
    return _table(segments, _lars_columns)
