"""The "cpp" backend: the C++ operators of csrc/ on CPU tensors (built or loaded by extension.py).

One operator call per stage and bucket, whatever the number of tensors: LAMB 3 (2 without
clipping), LARS 2 (1 when no group adapts). The operators chunk every tensor and share the chunks
among torch's threads (``torch.set_num_threads``).
"""
from __future__ import annotations

import torch

from . import extension
from .hyper import lamb_hyper, lars_hyper
from .contract import flat, lars_written, mark_modified

# Elements per chunk: large enough that scheduling costs nothing, small enough that a thread's four
# arrays of a chunk (p, g, m, v) stay in its L2 cache and a big tensor spreads over every core.
CHUNK = 16384


class LambPlan:
    def __init__(self, segments, hyper: torch.Tensor):
        self.segments = segments
        self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.copies = (
            flat(segments, name) for name in ("params", "grads", "exp_avgs", "exp_avg_sqs", "copies"))
        self.hyper = hyper


def _placeholder() -> torch.Tensor:
    # Explicit dtype and device: torch.set_default_device / dtype must not reach it.
    return torch.empty(0, dtype=torch.float32, device="cpu")


class LarsPlan:
    def __init__(self, segments, hyper: torch.Tensor):
        self.segments = segments
        self.params, self.grads, self.copies = flat(segments, "params"), flat(segments, "grads"), flat(segments, "copies")
        # A tensor without momentum gets an empty placeholder of its own: the operator's mutable
        # buffer list never aliases the params, nor itself.
        self.momentum_buffers = [_placeholder() if b is None else b for b in flat(segments, "momentum_buffers")]
        self.modified = lars_written(segments)
        self.hyper = hyper


class CppBackend:
    """One object per (CPU, dtype) bucket; it keeps the bucket's hyperparameter table."""

    name = "cpp"

    def __init__(self):
        extension.load()
        self._ops = torch.ops.lamb_kernels
        self._lamb_hyper = lamb_hyper("cpu")
        self._lars_hyper = lars_hyper("cpu")

    def prepare_lamb(self, segments) -> LambPlan:
        return LambPlan(segments, self._lamb_hyper.update(segments))

    def grad_sums_of_squares(self, plan: LambPlan) -> torch.Tensor:
        return self._ops.sums_of_squares(plan.grads, None, CHUNK)

    def lamb_update_norms_(self, plan: LambPlan, grad_sumsq, grad_scale=None, found_inf=None) -> torch.Tensor:
        norms = self._ops.lamb_moments(plan.params, plan.grads, plan.exp_avgs, plan.exp_avg_sqs, plan.hyper,
                                       grad_sumsq, grad_scale, found_inf, CHUNK)
        mark_modified(plan.exp_avgs + plan.exp_avg_sqs)
        return norms

    def lamb_apply_(self, plan: LambPlan, norms: torch.Tensor, found_inf=None) -> None:
        self._ops.lamb_apply(plan.params, plan.exp_avgs, plan.exp_avg_sqs, plan.hyper, norms.contiguous(), found_inf,
                             plan.copies, CHUNK)
        mark_modified(plan.params + plan.copies)

    def prepare_lars(self, segments) -> LarsPlan:
        return LarsPlan(segments, self._lars_hyper.update(segments))

    def lars_norms(self, plan: LarsPlan) -> torch.Tensor:
        return self._ops.sums_of_squares(plan.params, plan.grads, CHUNK)

    def lars_apply_(self, plan: LarsPlan, norms, grad_scale=None, found_inf=None) -> None:
        self._ops.lars_apply(plan.params, plan.grads, plan.momentum_buffers, plan.hyper, norms, grad_scale, found_inf,
                             plan.copies, CHUNK)
        mark_modified(plan.modified)
