"""The "cpp" backend: the C++ operators of csrc/ on CPU tensors (built or loaded by extension.py).

One operator call per stage and bucket, whatever the number of tensors: LAMB 3 (2 without
clipping), LARS 2 (1 when no group adapts). The operators chunk every tensor and share the chunks
among torch's threads (``torch.set_num_threads``).
"""
from __future__ import annotations

import torch

from . import extension
from .hyper import lamb_table, lars_table
from .ops import flat, lars_written, mark_modified

# Elements per chunk: large enough that scheduling costs nothing, small enough that a thread's four
# arrays of a chunk (p, g, m, v) stay in its L2 cache and a big tensor spreads over every core.
CHUNK = 16384


class LambPlan:
    def __init__(self, segments):
        self.params, self.grads, self.exp_avgs, self.exp_avg_sqs = (
            flat(segments, name) for name in ("params", "grads", "exp_avgs", "exp_avg_sqs"))
        self.hyper = torch.from_numpy(lamb_table(segments))


def _placeholder() -> torch.Tensor:
    # Explicit dtype and device: torch.set_default_device / dtype must not reach it.
    return torch.empty(0, dtype=torch.float32, device="cpu")


class LarsPlan:
    def __init__(self, segments):
        self.params, self.grads = flat(segments, "params"), flat(segments, "grads")
        # A tensor without momentum gets an empty placeholder of its own: the operator's mutable
        # buffer list never aliases the params, nor itself.
        self.momentum_buffers = [_placeholder() if b is None else b for b in flat(segments, "momentum_buffers")]
        self.modified = lars_written(segments)
        self.hyper = torch.from_numpy(lars_table(segments))


class CppBackend:
    name = "cpp"

    def __init__(self):
        extension.load()
        self._ops = torch.ops.lamb_kernels

    def prepare_lamb(self, segments) -> LambPlan:
        return LambPlan(segments)

    def grad_sumsq(self, plan: LambPlan) -> torch.Tensor:
        # A fixed-order sum of the per-tensor sums: the same bits on every run.
        return self._ops.sums_of_squares(plan.grads, None, CHUNK).sum()

    def lamb_update_norms_(self, plan: LambPlan, grad_sumsq) -> torch.Tensor:
        norms = self._ops.lamb_moments(plan.params, plan.grads, plan.exp_avgs, plan.exp_avg_sqs, plan.hyper,
                                       grad_sumsq, CHUNK)
        mark_modified(plan.exp_avgs + plan.exp_avg_sqs)
        return norms

    def lamb_apply_(self, plan: LambPlan, norms: torch.Tensor) -> None:
        self._ops.lamb_apply(plan.params, plan.exp_avgs, plan.exp_avg_sqs, plan.hyper, norms.contiguous(), CHUNK)
        mark_modified(plan.params)

    def prepare_lars(self, segments) -> LarsPlan:
        return LarsPlan(segments)

    def lars_norms(self, plan: LarsPlan) -> torch.Tensor:
        return self._ops.sums_of_squares(plan.params, plan.grads, CHUNK)

    def lars_apply_(self, plan: LarsPlan, norms) -> None:
        self._ops.lars_apply(plan.params, plan.grads, plan.momentum_buffers, plan.hyper, norms, CHUNK)
        mark_modified(plan.modified)
