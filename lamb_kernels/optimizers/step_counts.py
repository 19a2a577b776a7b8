"""Per-parameter step counts (``state[p]["step"]``, created by state.py) advanced (by 0 on a skipped
step, decided on the device), packed per bucket for reused steps (plan_cache.py), and the per-step
values derived from them on a reused step: LAMB's bias corrections, and the rounding keys of states
kept in bf16 or int8 (rounding.py). LAMB counts every parameter's steps; LARS those of parameters
whose momentum buffers are bf16 or int8 (their declarations' ``counts_steps``)."""
from __future__ import annotations

import torch

from ..rounding import mixed_positions as _mix_positions, tensor_keys


def advance_step_counts(steps: list, found_inf) -> None:
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
        return
    by_device = {}
    for t in steps:
        by_device.setdefault(t.device, []).append(t)
    for device, counts in by_device.items():
        # + 1, or + 0 when a grad was not finite: no host round trip.
        torch._foreach_add_(counts, 1.0 - (found_inf.to(device, torch.float32).reshape(()) != 0).float())


def _packed(steps: list):
    """The tensor whose elements `steps` are, in order, when they are (packed by an earlier step: kept,
    so that a CUDA graph captured since still advances the counts the state holds); else None."""
    base = steps[0]._base
    if base is None or base.dim() != 1 or base.numel() != len(steps) or base.stride(0) != 1:
        return None
    first = base.storage_offset()
    if all(t._base is base and t.storage_offset() == first + i for i, t in enumerate(steps)):
        return base
    return None


def mixed_positions(optimizer, seg, device=None):
    """The mixed positions (rounding.py) of a segment's tensors, kept on the segment: a numpy
    array, or with `device` an int64 tensor there (copied once: a captured step copies nothing)."""
    mixed = getattr(seg, "mixed_positions", None)
    if mixed is None:
        offsets = [0]
        for group in optimizer.param_groups:
            offsets.append(offsets[-1] + len(group["params"]))
        mixed = seg.mixed_positions = _mix_positions([offsets[g] + i for g, i in seg.positions])
    if device is None:
        return mixed
    on_device = getattr(seg, "mixed_positions_on_device", None)
    if on_device is None or on_device.device != device:
        on_device = seg.mixed_positions_on_device = torch.from_numpy(mixed.astype("int64")).to(device)
    return on_device


def rounding_keys(optimizer, group: dict, seg, counts, on_host: bool):
    """A bf16 segment's rounding keys for this step from its step counts (floats on the host, else a
    tensor on the counts' device); None for float32 states."""
    if seg.state_dtype == torch.float32:
        return None
    return tensor_keys(group.get("seed", 0), counts, mixed_positions(optimizer, seg, None if on_host else counts.device))


def pack_step_counts(cache, counted=lambda bucket: True) -> bool:
    """Each counted bucket's step counts packed into one tensor, each parameter's ``state["step"]`` a
    0-d view of it (its value, dtype and device unchanged): a reused step advances a bucket's counts
    with one add, and reads them with one copy. False when they cannot be (not 0-d fp32 on one device)."""
    for bucket in cache.buckets:
        if not counted(bucket):
            continue
        steps = [state.get("step") for state in bucket.states]
        if not all(torch.is_tensor(t) for t in steps):
            return False
        device = steps[0].device
        if any(t.dim() != 0 or t.dtype != torch.float32 or t.device != device for t in steps):
            return False
        packed = _packed(steps)
        if packed is None:
            packed = torch.stack(steps)
            for i, state in enumerate(bucket.states):
                state["step"] = packed[i]
        bucket.step_counts = packed
    return True


def advance_reused(optimizer, cache, found_inf, corrections=None) -> None:
    """A reused step's counts advanced, bucket by bucket, and what derives from them renewed on its
    segments: `corrections(group, counts)` (LAMB's bias corrections) and the rounding keys."""
    for bucket in cache.buckets:
        counts = bucket.step_counts
        if counts is None:
            continue
        advance_step_counts([counts], found_inf)
        values = counts.tolist() if counts.device.type == "cpu" else None
        for seg, group_index, first, end in bucket.segments:
            group = optimizer.param_groups[group_index]
            on_host = values is not None and not group.get("capturable")
            seg_counts = values[first:end] if on_host else counts[first:end]
            if corrections is not None:
                seg.bias_correction1, seg.bias_correction2 = corrections(group, seg_counts)
            seg.rounding_keys = rounding_keys(optimizer, group, seg, seg_counts, on_host)
