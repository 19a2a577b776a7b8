"""The "triton" backend: multi-tensor Triton kernels, compiled on CUDA, interpreted on CPU tensors
when TRITON_INTERPRET=1 was set before import. The kernels run inside registered operators
(``torch.ops.lamb_kernels.triton_*``), so torch.compile sees each launch as one opaque node."""
import contextlib

import torch

from ..hyper import lamb_hyper, lars_hyper
from ..contract import flat, lars_written, mark_modified
from . import lamb, lars
from .multi_tensor import INTERPRETED, sums_of_squares


class Plan:
    """One step of one bucket: the tensor lists each operator takes, and the hyperparameter table."""

    def __init__(self, segments, hyper: torch.Tensor, names):
        self.segments = segments
        self.hyper = hyper
        self.device = hyper.device
        for name in names:
            setattr(self, name, flat(segments, name))


class TritonBackend:
    """One object per (device, dtype) bucket of an optimizer: it owns that bucket's hyperparameter
    table (the pointer tables are cached per operator, multi_tensor.table_for)."""

    name = "triton"

    def __init__(self):
        self._hyper = None

    def _hyper_table(self, segments, make):
        device = segments[0].params[0].device
        if self._hyper is None or self._hyper.device != device:
            self._hyper = make(device)
        return self._hyper.update(segments)

    @staticmethod
    def _on_device(plan):
        # Triton launches on the current CUDA device; parameters may live on another one.
        return torch.cuda.device(plan.device) if plan.device.type == "cuda" else contextlib.nullcontext()

    def prepare_lamb(self, segments) -> Plan:
        return Plan(segments, self._hyper_table(segments, lamb_hyper),
                    ("params", "grads", "exp_avgs", "exp_avg_sqs", "copies"))

    def grad_sums_of_squares(self, plan):
        with self._on_device(plan):
            return sums_of_squares(plan.grads, [])

    def lamb_update_norms_(self, plan, grad_sumsq, grad_scale=None, found_inf=None):
        with self._on_device(plan):
            norms = lamb.lamb_moments(plan.params, plan.grads, plan.exp_avgs, plan.exp_avg_sqs, plan.hyper,
                                      grad_sumsq, grad_scale, found_inf)
        mark_modified(plan.exp_avgs + plan.exp_avg_sqs)
        return norms

    def lamb_apply_(self, plan, norms, found_inf=None):
        with self._on_device(plan):
            lamb.lamb_apply(plan.params, plan.exp_avgs, plan.exp_avg_sqs, plan.hyper, norms, found_inf, plan.copies)
        mark_modified(plan.params + plan.copies)

    def prepare_lars(self, segments) -> Plan:
        plan = Plan(segments, self._hyper_table(segments, lars_hyper), ("params", "grads", "copies"))
        # A tensor without momentum gets an empty placeholder of its own (never read or written).
        plan.momentum_buffers = [torch.empty(0, dtype=torch.float32, device=plan.device) if b is None else b
                                 for b in flat(segments, "momentum_buffers")]
        plan.modified = lars_written(segments)
        return plan

    def lars_norms(self, plan):
        with self._on_device(plan):
            return sums_of_squares(plan.params, plan.grads)

    def lars_apply_(self, plan, norms, grad_scale=None, found_inf=None):
        with self._on_device(plan):
            lars.lars_apply(plan.params, plan.grads, plan.momentum_buffers, plan.hyper, norms, grad_scale, found_inf,
                            plan.copies)
        mark_modified(plan.modified)


__all__ = ["INTERPRETED", "TritonBackend"]
