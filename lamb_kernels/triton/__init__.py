"""The "triton" backend: multi-tensor Triton kernels, compiled on CUDA, interpreted on CPU tensors
when TRITON_INTERPRET=1 was set before import."""
from __future__ import annotations

import contextlib

import torch

from ..ops import mark_modified
from . import lamb, lars
from .multi_tensor import INTERPRETED, MultiTensorTable


class TritonBackend:
    """One object per (device, dtype) bucket of an optimizer: it owns that bucket's cached tables."""

    name = "triton"

    def __init__(self):
        self.table = None

    def _table_for(self, segments) -> MultiTensorTable:
        device = segments[0].params[0].device
        if self.table is None or self.table.device != device:
            self.table = MultiTensorTable(device)
        return self.table

    def _on_device(self):
        # Triton launches on the current CUDA device; parameters may live on another one.
        device = self.table.device
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    def prepare_lamb(self, segments):
        return lamb.prepare(self._table_for(segments), segments)

    def grad_sumsq(self, plan):
        with self._on_device():
            return lamb.grad_sumsq(plan)

    def lamb_update_norms_(self, plan, grad_sumsq):
        with self._on_device():
            norms = lamb.lamb_update_norms_(plan, grad_sumsq)
        mark_modified(plan.modified[1])
        return norms

    def lamb_apply_(self, plan, norms):
        with self._on_device():
            lamb.lamb_apply_(plan, norms)
        mark_modified(plan.modified[0])

    def prepare_lars(self, segments):
        return lars.prepare(self._table_for(segments), segments)

    def lars_norms(self, plan):
        with self._on_device():
            return lars.lars_norms(plan)

    def lars_apply_(self, plan, norms):
        with self._on_device():
            lars.lars_apply_(plan, norms)
        mark_modified(plan.modified[0])


__all__ = ["INTERPRETED", "TritonBackend"]
