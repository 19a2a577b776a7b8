"""One backend for every operator family that follows the stage schemas (schemas.py): the C++ and
CUDA operators (``torch.ops.lamb_kernels.<stage>``, dispatched by device) and the Triton ones
(``torch.ops.lamb_kernels.triton_<stage>``, CUDA, or CPU tensors under the interpreter); which
family a backend calls is its entry in backends.py. One operator call per stage and bucket,
whatever the number of tensors: LAMB 3 (2 without clipping), LARS 2 (1 when no group adapts); a
bucket with no sharded tensor takes the update stage, one call for both passes (LAMB 2 with clipping,
1 without; LARS 1)."""
from __future__ import annotations

import contextlib

import torch

from .backend_api import Plan, adapts, lamb_plan, lars_plan, mark_modified
from .hyper_table import lamb_hyper, lars_hyper
from .schemas import STAGES


def _lamb_states(plan: Plan) -> list:
    """What LAMB's moments pass writes: m, v and (8-bit states) their block scales."""
    return plan.exp_avgs + plan.exp_avg_sqs + plan.exp_avg_scales + plan.exp_avg_sq_scales


class OperatorBackend:
    """A backend over the operator family ``torch.ops.lamb_kernels.<prefix><stage>``, each tensor
    cut into chunks of `chunk_size` elements. One object per (device, dtype) bucket of an optimizer:
    it owns that bucket's hyperparameter tables."""

    def __init__(self, name: str, prefix: str, chunk_size: int, cache_bytes: int = 0):
        self.name = name
        self.chunk_size = chunk_size
        self.cache_bytes = cache_bytes  # the update stages' cache groups (schemas.py)
        self._stages = {stage: getattr(torch.ops.lamb_kernels, prefix + stage) for stage in STAGES}
        self._hyper = {}  # "lamb" / "lars" -> HyperTable on the bucket's device

    def _hyper_table(self, kind: str, segments, make) -> torch.Tensor:
        device = segments[0].params[0].device
        table = self._hyper.get(kind)
        if table is None or table.device != device:
            table = self._hyper[kind] = make(device)
        return table.update(segments)

    def refresh(self, plan: Plan, hyper_changed: bool = False) -> None:
        """A reused plan (backend_api.Backend.refresh): its table renewed from its segments' values."""
        plan.hyper = self._hyper_table(plan.kind, plan.segments, lamb_hyper if plan.kind == "lamb" else lars_hyper)

    def _op(self, stage: str):
        return self._stages[stage]

    @staticmethod
    def _on_device(plan):
        # Triton launches on the current CUDA device; parameters may live on another one.
        return torch.cuda.device(plan.device) if plan.device.type == "cuda" else contextlib.nullcontext()

    # -- LAMB, docs/design.md section 2 ----------------------------------------------------------

    def prepare_lamb(self, segments) -> Plan:
        plan = lamb_plan(segments)
        plan.hyper = self._hyper_table("lamb", segments, lamb_hyper)
        return plan

    def grad_sums_of_squares(self, plan: Plan) -> torch.Tensor:
        with self._on_device(plan):
            return self._op("sums_of_squares")(plan.grads, None, self.chunk_size)

    def lamb_moments_(self, plan: Plan, grad_sumsq, grad_scale=None, found_inf=None) -> torch.Tensor:
        with self._on_device(plan):
            norms = self._op("lamb_moments")(plan.params, plan.grads, plan.exp_avgs, plan.exp_avg_sqs,
                                             plan.exp_avg_scales, plan.exp_avg_sq_scales, plan.hyper, grad_sumsq,
                                             grad_scale, found_inf, self.chunk_size)
        mark_modified(_lamb_states(plan))
        return norms

    def lamb_apply_(self, plan: Plan, norms: torch.Tensor, found_inf=None) -> None:
        with self._on_device(plan):
            self._op("lamb_apply")(plan.params, plan.exp_avgs, plan.exp_avg_sqs, plan.exp_avg_scales,
                                   plan.exp_avg_sq_scales, plan.hyper, norms.contiguous(), found_inf, plan.low_precision_params,
                                   self.chunk_size)
        mark_modified(plan.written)

    def lamb_update_(self, plan: Plan, grad_sumsq, grad_scale=None, found_inf=None) -> None:
        with self._on_device(plan):
            self._op("lamb_update")(plan.params, plan.grads, plan.exp_avgs, plan.exp_avg_sqs, plan.exp_avg_scales,
                                    plan.exp_avg_sq_scales, plan.hyper, grad_sumsq, grad_scale, found_inf,
                                    plan.low_precision_params, self.chunk_size, self.cache_bytes)
        mark_modified(plan.written + _lamb_states(plan))

    # -- LARS, docs/design.md section 3 ----------------------------------------------------------

    def prepare_lars(self, segments) -> Plan:
        plan = lars_plan(segments)
        plan.hyper = self._hyper_table("lars", segments, lars_hyper)
        # A tensor without momentum gets an empty placeholder of its own (never read or written):
        # the operator's mutable buffer list never aliases the params, nor itself. Explicit dtype and
        # device: torch.set_default_device / dtype must not reach it.
        plan.momentum_buffers = [torch.empty(0, dtype=torch.float32, device=plan.device) if b is None else b
                                 for b in plan.momentum_buffers]
        return plan

    def lars_sums_of_squares(self, plan: Plan) -> torch.Tensor:
        with self._on_device(plan):
            return self._op("sums_of_squares")(plan.params, plan.grads, self.chunk_size)

    def lars_apply_(self, plan: Plan, norms, grad_scale=None, found_inf=None) -> None:
        with self._on_device(plan):
            self._op("lars_apply")(plan.params, plan.grads, plan.momentum_buffers, plan.momentum_buffer_scales,
                                   plan.hyper, norms, grad_scale, found_inf, plan.low_precision_params, self.chunk_size)
        mark_modified(plan.written)

    def lars_update_(self, plan: Plan, grad_scale=None, found_inf=None) -> None:
        with self._on_device(plan):
            self._op("lars_update")(plan.params, plan.grads, plan.momentum_buffers, plan.momentum_buffer_scales,
                                    plan.hyper, grad_scale, found_inf, plan.low_precision_params, adapts(plan),
                                    self.chunk_size, self.cache_bytes)
        mark_modified(plan.written)
