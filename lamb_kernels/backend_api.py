"""What a backend computes: the contract between the optimizers and every backend, and the helpers the
backends share. Backends depend on this module alone; the choice among them is in backends.py.

The optimizers split their parameters into buckets, one per (device, dtype), and hand each bucket to
one backend object as a list of segments (one per param group present in the bucket). Per bucket and
step a backend provides:

LAMB (`LambSegment`, docs/design.md section 2)
- ``prepare_lamb(segments) -> Plan``: the bucket's tensor lists and whatever the backend needs to
  launch (the operator backends' hyperparameter table, the torch backend's scratch); once per step;
- ``grad_sums_of_squares(plan) -> Tensor``: per tensor, the sum of squares of its grad (``[n_tensors]``
  fp32), for the global grad norm of step 1 (the optimizer adds them, in a fixed order, after
  summing a sharded tensor's over its ranks);
- ``lamb_moments_(plan, grad_sumsq, grad_scale, found_inf) -> Tensor``: steps 1-5 (moments
  updated in place) and the per-tensor sums of squares ``[n_tensors, 2]`` = (||p||^2, ||u||^2), with
  p taken before the update; ``grad_sumsq`` is None when no group clips;
- ``lamb_apply_(plan, norms, found_inf)``: steps 6-7, u recomputed from the moments;
- ``lamb_update_(plan, grad_sumsq, grad_scale, found_inf)``: steps 1-7 of a bucket with no sharded
  tensor, with the bits of lamb_moments_ then lamb_apply_ (the C++ operators run it by cache groups,
  docs/benchmark.md "The schedule").

LARS (`LarsSegment`, docs/design.md section 3)
- ``prepare_lars(segments) -> Plan``;
- ``lars_sums_of_squares(plan) -> Tensor``: per-tensor sums of squares ``[n_tensors, 2]`` = (||p||^2, ||g||^2);
- ``lars_apply_(plan, norms, grad_scale, found_inf)``: trust ratio, weight decay, momentum and the
  update;
- ``lars_update_(plan, grad_scale, found_inf)``: the whole step of a bucket with no sharded tensor, the
  norms (when a group adapts) then lars_apply_, with their bits.

Mixed precision and GradScaler (every backend): params and grads may be float32, bfloat16 or
float16, arithmetic and states are float32. ``grad_scale`` (one-element fp32 tensor or None): the
grads arrive multiplied by it; each grad element is multiplied by ``1 / grad_scale`` before use, and
norms of grads are divided by it (so clipping sees unscaled grads). ``found_inf`` (one-element fp32
tensor or None): when nonzero, nothing is written (params, low-precision params, moments, buffers), decided on the
device.

The norm stage and the apply stage are separate calls so the per-tensor sums can be all-reduced
across ranks between them when parameters are sharded (lamb_kernels/distributed.py); a bucket with
no sharded tensor takes the update stage instead, one call. Every tensor
a backend sees is a plain tensor: a DTensor's local shard.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Protocol, runtime_checkable

import torch


@dataclass(kw_only=True)
class LambSegment:
    """One param group's tensors inside one (device, dtype) bucket, with that group's hyperparameters.

    ``params`` are the weights the step reads and updates: the parameters themselves, or their fp32
    master copies when the optimizer keeps master weights; then ``low_precision_params`` holds the model's
    low-precision parameters, written from the updated masters in the same pass (else it is empty).
    A per-tensor value (bias corrections) is a list of floats, or a float32 tensor ``[n_tensors]``
    on the step counts' device when those live on a device (``capturable``); ``lr`` is a float or
    a one-element tensor. Tensors reach the kernels through device-side writes into the
    hyperparameter table, so a captured CUDA graph reads their values at replay."""

    params: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    exp_avgs: list = field(default_factory=list)
    exp_avg_sqs: list = field(default_factory=list)
    bias_correction1: list = field(default_factory=list)  # per tensor: 1 - beta1^t (1.0 without bias correction)
    bias_correction2: list = field(default_factory=list)  # per tensor: 1 - beta2^t
    lr: float
    beta1: float
    beta2: float
    beta3: float  # 1 - beta1 with grad averaging, else 1
    eps: float
    weight_decay: float
    adam_w_mode: bool
    layer_adaptation: bool
    max_grad_norm: float  # 0.0 means: no clipping for this group
    trust_ratio_bounds: tuple = field(default=(0.0, math.inf))
    # of exp_avgs and exp_avg_sqs: torch.float32, torch.bfloat16, or "int8" (8-bit codes, int8 for m
    # and uint8 for v, with their float32 block scales in exp_avg_scales, exp_avg_sq_scales: quantization.py)
    state_dtype: object = torch.float32
    # bfloat16 and int8 states: per tensor, this step's stochastic-rounding key (lamb_kernels/rounding.py):
    # a list of ints, or an int64 tensor on the step counts' device; None for float32 states.
    rounding_keys: Optional[object] = None
    exp_avg_scales: list = field(default_factory=list)  # int8 states: per tensor, m's block scales
    exp_avg_sq_scales: list = field(default_factory=list)  # and v's
    low_precision_params: list = field(default_factory=list)
    shardings: list = field(default_factory=list)  # per tensor: distributed.Sharding or None
    positions: list = field(default_factory=list)  # per tensor: (group, index), the same on every rank


@dataclass(kw_only=True)
class LarsSegment:
    """One param group's tensors inside one (device, dtype) bucket, with that group's hyperparameters;
    ``params`` and ``low_precision_params`` as in LambSegment."""

    params: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    momentum_buffers: list = field(default_factory=list)  # per tensor: the buffer, or None when the group has no momentum
    first_step: list = field(default_factory=list)  # per tensor: True when its buffer is new (it becomes d, as in torch's SGD)
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    trust_coeff: float
    eps: float
    trust_clip: bool
    adaptation: bool
    state_dtype: object = torch.float32  # of the momentum buffers: torch.float32, torch.bfloat16, or "int8"
    rounding_keys: Optional[object] = None  # bf16 and int8 buffers: per tensor, as LambSegment's
    # int8 buffers: per tensor, the buffer's block scales (empty for float buffers; a bucket of int8
    # buffers holds only groups with momentum)
    momentum_buffer_scales: list = field(default_factory=list)
    low_precision_params: list = field(default_factory=list)
    shardings: list = field(default_factory=list)  # per tensor: distributed.Sharding or None
    positions: list = field(default_factory=list)  # per tensor: (group, index), the same on every rank


@dataclass(eq=False)
class Plan:
    """One step of one bucket, as every backend's ``prepare_lamb`` / ``prepare_lars`` returns it
    (`lamb_plan`, `lars_plan`): the bucket's segments, their per-tensor fields flattened in order (the
    lists one multi-tensor launch takes), and what the backend keeps for its launches."""

    segments: list
    device: torch.device
    params: list
    grads: list
    low_precision_params: list
    written: list  # what the apply stage writes: params, copies, and LARS's momentum buffers
    exp_avgs: list = field(default_factory=list)  # LAMB
    exp_avg_sqs: list = field(default_factory=list)  # LAMB
    momentum_buffers: list = field(default_factory=list)  # LARS: per tensor, its buffer or None
    # 8-bit states' block scales, per tensor (empty lists for float states)
    exp_avg_scales: list = field(default_factory=list)  # LAMB
    exp_avg_sq_scales: list = field(default_factory=list)  # LAMB
    momentum_buffer_scales: list = field(default_factory=list)  # LARS
    hyper: Optional[torch.Tensor] = None  # operator backends: the hyperparameter table (hyper_table.py)
    scratch: list = field(default_factory=list)  # torch backend: per segment, fp32 tensors like seg.params
    step_values: list = field(default_factory=list)  # torch backend: per segment, the values a step changes
    kind: str = ""  # "lamb" or "lars"
    sharded: bool = False  # whether any tensor is a shard of a DTensor (its norms are all-reduced)


def _plan(segments, kind: str, **lists) -> Plan:
    params, copies = concatenated(segments, "params"), concatenated(segments, "low_precision_params")
    sharded = any(s is not None for seg in segments for s in seg.shardings)
    return Plan(segments=segments, device=params[0].device, params=params, grads=concatenated(segments, "grads"),
                low_precision_params=copies, written=params + copies, kind=kind, sharded=sharded, **lists)


def lamb_plan(segments) -> Plan:
    """The plan of a bucket of LambSegments, before the backend adds what it keeps."""
    return _plan(segments, "lamb", exp_avgs=concatenated(segments, "exp_avgs"), exp_avg_sqs=concatenated(segments, "exp_avg_sqs"),
                 exp_avg_scales=concatenated(segments, "exp_avg_scales"), exp_avg_sq_scales=concatenated(segments, "exp_avg_sq_scales"))


def adapts(plan: Plan) -> bool:
    """Whether any group of a LARS plan takes the trust ratio: the bucket's norms pass runs only then."""
    return any(seg.adaptation for seg in plan.segments)


def lars_plan(segments) -> Plan:
    """The plan of a bucket of LarsSegments, before the backend adds what it keeps."""
    plan = _plan(segments, "lars", momentum_buffers=concatenated(segments, "momentum_buffers"),
                 momentum_buffer_scales=concatenated(segments, "momentum_buffer_scales"))
    plan.written += [b for b in plan.momentum_buffers if b is not None] + plan.momentum_buffer_scales
    return plan


@runtime_checkable
class Backend(Protocol):
    """What every backend provides, per (device, dtype) bucket and step (docs/design.md section 7).
    ``prepare_*`` is called once per step and returns the bucket's `Plan`; the stages take it."""

    name: str

    def prepare_lamb(self, segments: list) -> Plan: ...

    def grad_sums_of_squares(self, plan: Plan) -> torch.Tensor: ...

    def lamb_moments_(self, plan: Plan, grad_sumsq: Optional[torch.Tensor],
                      grad_scale: Optional[torch.Tensor] = None,
                      found_inf: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    def lamb_apply_(self, plan: Plan, norms: torch.Tensor, found_inf: Optional[torch.Tensor] = None) -> None: ...

    def lamb_update_(self, plan: Plan, grad_sumsq: Optional[torch.Tensor], grad_scale: Optional[torch.Tensor] = None,
                     found_inf: Optional[torch.Tensor] = None) -> None: ...

    def prepare_lars(self, segments: list) -> Plan: ...

    def refresh(self, plan: Plan, hyper_changed: bool = False) -> None:
        """A plan of an earlier step, reused: its segments now hold this step's grads (``plan.grads``
        too) and per-tensor values (bias corrections), and with `hyper_changed` new group-wide
        hyperparameters; the backend renews what it derived from them. Its tensors are otherwise
        the very ones it was prepared with (optimizers/plan_cache.py)."""

    def lars_sums_of_squares(self, plan: Plan) -> torch.Tensor: ...

    def lars_apply_(self, plan: Plan, norms: Optional[torch.Tensor], grad_scale: Optional[torch.Tensor] = None,
                    found_inf: Optional[torch.Tensor] = None) -> None: ...

    def lars_update_(self, plan: Plan, grad_scale: Optional[torch.Tensor] = None,
                     found_inf: Optional[torch.Tensor] = None) -> None: ...


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one block of memory, whatever the strides."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda size_stride: size_stride[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def concatenated(segments, field_name: str) -> list:
    """Every entry of one per-tensor field (``"params"``, ``"grads"``, ...) of `segments`, in order:
    the bucket-wide lists that the multi-tensor backends hand to one launch."""
    return [t for seg in segments for t in getattr(seg, field_name)]


def to_device(array, device: torch.device) -> torch.Tensor:
    """A numpy array as a tensor on `device` (shares the array's memory on the CPU)."""
    host = torch.from_numpy(array)
    if device.type == "cpu":
        return host
    # Through pinned memory: a copy from pageable memory may wait for the stream. torch's pinned
    # allocator keeps the staging buffer alive until the asynchronous copy has finished.
    return host.pin_memory().to(device, non_blocking=True)


def mark_modified(tensors) -> None:
    """Bump the autograd version counters of tensors a kernel wrote through raw pointers, as an
    in-place torch op would: autograd then refuses a backward that needs their old values. Under
    torch.compile the graph's own bookkeeping of the operators' declared mutations does this."""
    if torch.compiler.is_compiling():
        return
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch before 2.5 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)
