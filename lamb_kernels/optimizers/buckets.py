"""The parameters about to step, as segments in buckets: one bucket per (device, dtype, backend,
state dtype), one segment per param group in a bucket (backend_api.py), each with its tensors in
order and this step's per-tensor values (bias corrections, rounding keys) from the step counts.
What goes into a segment is the optimizer's declaration's (declaration.py)."""
from __future__ import annotations

import torch

from ..distributed import local, sharding_of
from .state import CODES, STATE_DTYPE, kept_state_dtype, local_scales, scales_key
from .step_counts import rounding_keys


def grad_for(p: torch.Tensor, shard: torch.Tensor, backend_name: str) -> torch.Tensor:
    """The grad the kernels read: multi-tensor kernels index p, g and the states alike, so a grad
    laid out unlike its parameter is copied into the parameter's layout (reading the user's grad,
    never writing it). `shard`: p's local shard (p itself unless p is a DTensor)."""
    g = p.grad if shard is p else p.grad._local_tensor
    if backend_name != "torch" and g.stride() != shard.stride() and g.numel() > 1:
        return torch.empty_like(shard).copy_(g)
    return g


def segments_by_bucket(optimizer, declaration, work: list, states: list) -> dict:
    """{(device, dtype, backend name, state dtype): [segment per group]} for `work` (validation.py)
    and its states (state.create_missing). A segment's ``params`` are the tensors the step updates:
    a parameter's fp32 master copy, with the parameter itself in ``low_precision_params``, or the
    parameter; the backends see plain tensors only (a DTensor's local shard)."""
    buckets = {}
    for (group, params), group_states in zip(work, states):
        group_state_dtype = declaration.bucket_state_dtype(group)
        values = declaration.segment_values(group)
        keeps, counts = declaration.keeps(group), declaration.counts_steps(group)
        segments_of_group, steps = {}, {}
        for (p, name, position, shard, _), (state, new) in zip(params, group_states):
            state_dtype = group_state_dtype if shard is p else kept_state_dtype(group_state_dtype, p)
            key = (p.device, p.dtype, name, state_dtype)
            seg = segments_of_group.get(key)
            if seg is None:
                seg = segments_of_group[key] = declaration.segment(**values, state_dtype=state_dtype)
                buckets.setdefault(key, []).append(seg)
            seg.grads.append(grad_for(p, shard, name))
            seg.shardings.append(None if shard is p else sharding_of(p, ""))
            seg.positions.append(position)  # (group, index): the same on every rank, whatever the buckets
            master = state.get("master_param")  # (state.create_missing keeps one exactly when p gets it)
            if master is None:
                seg.params.append(shard)
            else:
                seg.params.append(master if shard is p else local(master))
                seg.low_precision_params.append(shard)
            for entry in declaration.entries:
                if not entry.segment_field:
                    continue
                t = state[entry.key] if entry.key in keeps else None
                getattr(seg, entry.segment_field).append(t if t is None or shard is p else local(t))
                if t is not None and t.dtype in CODES:  # 8-bit states: this rank's scales
                    getattr(seg, entry.scales_field).append(local_scales(state[scales_key(entry.key)]))
            if declaration.first_values:  # (whether each tensor's state is new: its first value is set)
                seg.first_step.append(new)
            if counts:
                steps.setdefault(id(seg), []).append(state["step"])
        _add_step_values(optimizer, declaration, group, steps, list(segments_of_group.values()))
    return buckets


def _add_step_values(optimizer, declaration, group: dict, steps: dict, segments: list) -> None:
    """Each tensor's per-step values into its segment, from its (advanced) step count: the bias
    corrections (floats when the group's step counts are on the CPU, else one float32 tensor per
    segment computed on their device: no sync) and, for bf16 and int8 states, its rounding key
    (step_counts.rounding_keys), as a reused step renews them (step_counts.advance_reused)."""
    counted = [t for segment_steps in steps.values() for t in segment_steps]
    on_host = not group.get("capturable") and all(t.device.type == "cpu" for t in counted)
    corrections = declaration.bias_corrections
    for seg in segments:
        if corrections is None and seg.state_dtype == STATE_DTYPE:
            continue
        seg_counts = torch.cat([t.reshape(1) for t in steps[id(seg)]])
        seg_counts = seg_counts.tolist() if on_host else seg_counts
        if corrections is not None:
            seg.bias_correction1, seg.bias_correction2 = corrections(group, seg_counts)
        seg.rounding_keys = rounding_keys(optimizer, group, seg, seg_counts, on_host)
