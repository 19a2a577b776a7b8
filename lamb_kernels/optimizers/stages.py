"""The order of the stages of a step, per algorithm: `lamb_step` (docs/design.md section 2) and
`lars_step` (section 3), the only places it lives. Each calls its backends' stages on every bucket
(backend_api.py), with the all-reduces of sharded parameters' sums of squares between them
(lamb_kernels/distributed.py)."""
from __future__ import annotations

import torch

from ..backend_api import adapts, concatenated
from ..distributed import all_reduce_sharded_


def scaler_value_on(t, device):
    """A GradScaler's one-element tensor (scale or found_inf) as float32 [1] on `device`, or None."""
    return None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(1)


def bucket_shardings(plans, adaptive_only: bool = False) -> tuple:
    """(per bucket, per tensor, its Sharding or None; per bucket, per tensor, its position), or ()
    when no tensor is sharded. With `adaptive_only` (LARS), tensors whose group does not adapt get
    None: their norms are not read, and which bucket computes norms may differ between ranks."""
    if not any(plan.sharded for _, _, plan in plans):
        return ()
    shardings = [[s if not adaptive_only or seg.adaptation else None for seg in plan.segments for s in seg.shardings]
                 for _, _, plan in plans]
    if not any(s is not None for bucket in shardings for s in bucket):
        return ()
    return shardings, [concatenated(plan.segments, "positions") for _, _, plan in plans]


def lamb_step(plans, grad_scale, found_inf, sharded_grads=None) -> None:
    """One LAMB step on every bucket: the only place the order of its stages lives (docs/design.md
    section 2). `plans`: (backend, (device, dtype, backend name), plan) per bucket; `sharded_grads`:
    the optimizer's sharded parameters (distributed.ShardedGrads), None when it has none."""
    # 1. Global grad norm over every parameter with a grad, in all groups; skipped when no group
    # clips. Bucket sums are added in a fixed order, so reruns give the same bits. Under a
    # GradScaler these are sums over the scaled grads: the kernels divide the norm by the scale.
    # Sharded tensors' sums are summed over their ranks first (lamb_kernels/distributed.py), in the
    # step's first all-reduce, which also finds a sharded parameter with a grad on some ranks only
    # before anything is written: without clipping, it carries only that.
    shardings = bucket_shardings(plans)
    clips = any(_plan_clips(plan) for _, _, plan in plans)
    per_tensor = [backend.grad_sums_of_squares(plan) for backend, _, plan in plans] if clips else []
    if sharded_grads is not None:
        sharded_grads.all_reduce_(per_tensor, shardings if clips else ())
    elif clips and shardings:
        all_reduce_sharded_(per_tensor, *shardings)
    grad_sumsq = None
    if clips:
        sums = [sums.sum() for sums in per_tensor]
        grad_sumsq = sums[0]
        for partial in sums[1:]:
            grad_sumsq = grad_sumsq + partial.to(grad_sumsq.device)

    # A bucket with no sharded tensor: steps 2-7 in one update stage. The others: 2-5, then the
    # per-tensor ||p||^2, ||u||^2 of sharded tensors summed over their ranks, then 6-7.
    staged, norms, founds = [], [], []
    for i, (backend, (device, *_), plan) in enumerate(plans):
        scale, found = scaler_value_on(grad_scale, device), scaler_value_on(found_inf, device)
        bucket_sumsq = None if grad_sumsq is None else grad_sumsq.to(device)
        if not plan.sharded:
            backend.lamb_update_(plan, bucket_sumsq, scale, found)
            continue
        staged.append(i)
        norms.append(backend.lamb_moments_(plan, bucket_sumsq, scale, found))
        founds.append(found)
    if staged:
        all_reduce_sharded_(norms, *(_only(part, staged) for part in shardings))
    for i, bucket_norms, found in zip(staged, norms, founds):
        backend, _, plan = plans[i]
        backend.lamb_apply_(plan, bucket_norms, found)


def _only(per_bucket, indices) -> list:
    return [per_bucket[i] for i in indices]


def _plan_clips(plan) -> bool:
    """Whether any group in a LAMB plan clips (every backend's plan keeps its segments)."""
    return any(seg.max_grad_norm > 0 for seg in plan.segments)


def lars_step(plans, grad_scale, found_inf, sharded_grads=None) -> None:
    """One LARS step on every bucket: the only place the order of its stages lives (docs/design.md
    section 3). `plans` and `sharded_grads` as in lamb_step."""
    # A bucket with no sharded tensor: one update stage (its norms, when a group adapts, then the
    # update). The others: per-tensor ||p||^2, ||g||^2 (none without adaptation in the bucket: no
    # pass over memory for norms), those of sharded tensors summed over their ranks, then the update.
    # That all-reduce, the step's first, also finds a sharded parameter with a grad on some ranks
    # only, before anything is written; without adaptation, it carries only that.
    staged = [i for i, (_, _, plan) in enumerate(plans) if plan.sharded]
    norms = {i: plans[i][0].lars_sums_of_squares(plans[i][2]) for i in staged if adapts(plans[i][2])}
    reduced = list(norms)
    shardings = tuple(_only(part, reduced) for part in bucket_shardings(plans, adaptive_only=True))
    if sharded_grads is not None:
        sharded_grads.all_reduce_([norms[i] for i in reduced], shardings)
    elif shardings:
        all_reduce_sharded_([norms[i] for i in reduced], *shardings)
    for i, (backend, (device, *_), plan) in enumerate(plans):
        scale, found = scaler_value_on(grad_scale, device), scaler_value_on(found_inf, device)
        if plan.sharded:
            backend.lars_apply_(plan, norms.get(i), scale, found)
        else:
            backend.lars_update_(plan, scale, found)
