"""Sharded parameters: DTensor, as FSDP2 (``fully_shard``), tensor parallel and 2-D meshes make them.

The math of LAMB and LARS is over the whole tensor, never a shard. A step runs every backend on the
local shards (``DTensor._local_tensor``: the same memory, no copy), and the backends return local
sums of squares per tensor. Those are summed over the mesh dimensions on which each tensor is split
(``Shard``, and the ``_StridedShard`` of FSDP over tensor parallel); a replicated dimension is not
summed, so no element is counted twice. The sums of every tensor that needs one mesh dimension go in
one all-reduce, whatever the number of tensors or buckets: LAMB does at most two such rounds per
step (the global grad norm, then the per-tensor ``||p||^2, ||u||^2`` table), LARS one
(``||p||^2, ||g||^2``), each one all-reduce per (mesh, mesh dimension): one on a 1-D FSDP mesh.

Plain tensors (and DTensors replicated on every mesh dimension, as DDP's or a replicated layer's)
need no collective. States of a DTensor parameter are DTensors with its mesh and placements
(``torch.zeros_like(p)``), so ``torch.distributed.checkpoint`` saves and reshards them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support: no parameter can be a DTensor
    dist = None
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The local shard of a DTensor (the same memory), or the tensor itself."""
    return t._local_tensor if is_dtensor(t) else t


@dataclass(frozen=True)
class Sharding:
    """How one tensor's local sums become global: summed over these dimensions of this mesh."""

    mesh: object  # torch.distributed.DeviceMesh
    dims: tuple  # mesh dimensions on which the tensor is split


def sharding_of(p, label: str):
    """The Sharding of parameter p, or None when its local sums are already global (a plain tensor,
    or a DTensor replicated on every mesh dimension). A placement the step cannot handle (``Partial``:
    the parameter's values are not known locally) raises, naming the parameter."""
    if not is_dtensor(p):
        return None
    dims = []
    for dim, placement in enumerate(p.placements):
        if placement.is_partial():
            raise ValueError(
                f"{label} has the placement {type(placement).__name__} on mesh dimension {dim}: a parameter must be "
                "sharded or replicated (its values known), not a pending reduction"
            )
        if not placement.is_replicate():
            dims.append(dim)  # Shard, and _StridedShard: each element on exactly one rank
    return Sharding(p.device_mesh, tuple(dims)) if dims else None


def check_not_flat(p, label: str) -> None:
    """Parameters that are slices of a flat buffer have no per-layer norms: refused by name."""
    if getattr(p, "_fsdp_flattened", False):
        raise ValueError(
            f"{label} was flattened by FSDP1 (FullyShardedDataParallel): each rank holds a slice of a "
            "flat buffer, so its norm is not the layer's and the trust ratio would be wrong. Shard with "
            "torch.distributed.fsdp.fully_shard (FSDP2), whose DTensor parameters keep their layers"
        )
    if hasattr(p, "ds_id"):
        raise ValueError(
            f"{label} is partitioned by DeepSpeed ZeRO-3: each rank holds a slice of a flat partition, "
            "so its norm is not the layer's and the trust ratio would be wrong. Use FSDP2 (fully_shard)"
        )


def check_grad(p, label: str) -> None:
    """A DTensor parameter's grad: a DTensor of the same mesh and placements (as FSDP2 and tensor
    parallel make them); a plain parameter's grad: not a DTensor."""
    g = p.grad
    if is_dtensor(p) != is_dtensor(g):
        kinds = ("a DTensor", "a plain tensor")
        raise ValueError(f"{label} is {kinds[not is_dtensor(p)]}, its grad {kinds[not is_dtensor(g)]}")
    if is_dtensor(p) and (g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements)):
        raise ValueError(
            f"the grad of {label} has placements {tuple(g.placements)} on {g.device_mesh}, the parameter "
            f"{tuple(p.placements)} on {p.device_mesh}: they must match (a Partial grad is not reduced yet)"
        )


def all_reduce_sharded_(tables: list, shardings: list, positions: list) -> None:
    """Sums, in place and across ranks, each row of `tables` that belongs to a sharded tensor, over
    the mesh dimensions on which it is sharded.

    `tables`: per bucket, a tensor whose first dimension runs over the bucket's tensors (``[n]`` or
    ``[n, k]``); `shardings`: per bucket, per tensor, a Sharding or None (not summed); `positions`:
    per bucket, per tensor, its place among the optimizer's parameters. One all-reduce per (mesh,
    mesh dimension) holds the rows of every bucket that need it, in parameter order: every rank
    holds the same parameters in the same order, though not always in the same buckets (a shard's
    layout may send it to another backend on another rank), so the rows line up across ranks. A
    tensor sharded on two dimensions is summed over one, then the other."""
    entries = sorted(
        (position, bucket, row, sharding)
        for bucket, (bucket_shardings, bucket_positions) in enumerate(zip(shardings, positions))
        for row, (sharding, position) in enumerate(zip(bucket_shardings, bucket_positions))
        if sharding is not None
    )
    rounds = {}  # (mesh, dim) -> [(bucket, row), ...] in parameter order
    for _, bucket, row, sharding in entries:
        for dim in sharding.dims:
            rounds.setdefault((sharding.mesh, dim), []).append((bucket, row))
    for (mesh, dim), members in rounds.items():
        by_bucket = {}  # bucket -> [(row, place in parameter order), ...]
        for place, (bucket, row) in enumerate(members):
            by_bucket.setdefault(bucket, []).append((row, place))
        picked, places = [], []
        for bucket, items in by_bucket.items():
            rows = torch.tensor([row for row, _ in items], device=tables[bucket].device)
            picked.append((bucket, rows, tables[bucket].index_select(0, rows)))
            places += [place for _, place in items]
        stacked = torch.cat([part.to(mesh.device_type) for _, _, part in picked])  # in bucket order
        places = torch.tensor(places, device=stacked.device)
        in_order = torch.empty_like(stacked).index_copy_(0, places, stacked)  # in parameter order
        dist.all_reduce(in_order, group=mesh.get_group(dim))
        summed = in_order.index_select(0, places)  # back in bucket order
        first = 0
        for bucket, rows, part in picked:
            tables[bucket].index_copy_(0, rows, summed[first : first + len(rows)].to(part.device))
            first += len(rows)


def distributed_like(p, value: torch.Tensor) -> torch.Tensor:
    """A full (unsharded) tensor as a DTensor with p's mesh and placements, each rank keeping its own
    part of it (no communication): how a full state dict's entries reach a sharded parameter."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
