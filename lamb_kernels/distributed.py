"""Sharded parameters: DTensor, as FSDP2 (``fully_shard``), tensor parallel and 2-D meshes make them.

The math of LAMB and LARS is over the whole tensor, never a shard. A step runs every backend on the
local shards (``DTensor._local_tensor``: the same memory, no copy), and the backends return local
sums of squares per tensor. Those are summed over the mesh dimensions on which each tensor is split
(``Shard``, and the ``_StridedShard`` of FSDP over tensor parallel); a replicated dimension is not
summed, so no element is counted twice. The sums of every tensor that needs one mesh dimension go in
one all-reduce, whatever the number of tensors or buckets: LAMB does two such rounds per step (the
global grad norm, then the per-tensor ``||p||^2, ||u||^2`` table), LARS one (``||p||^2, ||g||^2``),
each one all-reduce per (mesh, mesh dimension): one on a 1-D FSDP mesh. The first round, made before
anything is written, also checks that every rank has grads for the same sharded parameters
(`ShardedGrads`); without clipping (LAMB) or adaptation (LARS) it carries only that check.

Plain tensors (and DTensors replicated on every mesh dimension, as DDP's or a replicated layer's)
need no collective. States of a DTensor parameter are DTensors with its mesh and placements
(``torch.zeros_like(p)``), so ``torch.distributed.checkpoint`` saves and reshards them.
"""
from __future__ import annotations

import functools
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
    for dim, placement in enumerate(p.placements):
        if placement.is_partial():
            raise ValueError(
                f"{label} has the placement {type(placement).__name__} on mesh dimension {dim}: a parameter must be "
                "sharded or replicated (its values known), not a pending reduction"
            )
    return _split(p)


def _split(p):
    """The Sharding of DTensor p, or None when it is replicated on every mesh dimension."""
    # Shard, and _StridedShard: each element on exactly one rank of the dimension.
    dims = tuple(dim for dim, placement in enumerate(p.placements) if not placement.is_replicate())
    return Sharding(p.device_mesh, dims) if dims else None


def code_blocks_cut(p, block: int):
    """Where the 8-bit block layout of DTensor p cuts its shape (docs/states.md, "Sharded
    parameters"), or None when p's shards cannot hold whole blocks (its 8-bit states are then kept
    in float32, or refused by name at the step: `check_code_blocks`).

    The kernels cut a tensor's states into blocks of `block` elements in memory order; on a DTensor
    they see the local shard, so a block must never cross a shard boundary, and the block scales are
    a DTensor with p's mesh and placements, of shape ``(*shape[:cut], prod(shape[cut:]) // block)``,
    whose local part is the local shard's blocks in order. With k the last tensor dimension p is split
    on, and the local shard dense in row-major order (FSDP2 and distribute_tensor make it so), that
    holds, uneven and empty shards included, when
    - p is split on no dimension (replicated): cut 0, the scales ``(n_blocks,)``;
    - the elements after dimension k number a multiple of `block` (FSDP2's Shard(0) of a weight whose
      rows are): cut k + 1, at every world size, and a shard boundary is always a block boundary;
    - or k is the last of two or more dimensions, a multiple of `block` long, split by one Shard
      (tensor parallel's rowwise weights), and every rank's part of it is a multiple of `block` too:
      cut k, blocks of `block` along it (another split is refused by name).
    The scales then split as p splits (the same sizes on the dimensions split), and the whole
    scales, flattened, are those of the same tensor in one process: blocks of the tensor's memory
    order, which a single process's checkpoint and a resharded one share bit for bit."""
    if not local(p).is_contiguous():  # (blocks follow memory order, the scales the shape's order)
        return None
    return _layout_of(p, block)[0]


def check_code_blocks(p, block: int, label: str) -> None:
    """Raises, naming p, when its 8-bit blocks would run along a split last dimension that some rank
    holds a part of that is not a multiple of `block` elements long (`code_blocks_cut`)."""
    why = _layout_of(p, block)[1]
    if why:
        raise ValueError(f"{label} ({tuple(p.shape)}) {why}. Use a tensor-parallel degree that splits it so, or "
                         "state_dtype=torch.bfloat16 for this parameter's group")


def _layout_of(p, block: int) -> tuple:
    """`_layout` of DTensor p (its arguments hashable)."""
    return _layout(tuple(p.shape), tuple(p.placements), tuple(p.device_mesh.shape), block)


@functools.lru_cache(maxsize=4096)
def _layout(shape: tuple, placements: tuple, mesh_shape: tuple, block: int) -> tuple:
    """(cut or None, why a layout that would hold whole blocks at other splits is refused here, or
    None): `code_blocks_cut` and `check_code_blocks` both read it (a model's parameters share a few
    shapes and placements: cached)."""
    # (mesh dimension, tensor dimension) of each placement that splits: Shard, and FSDP over tensor
    # parallel's _StridedShard. (Partial has no tensor dimension: `sharding_of` refuses it.)
    dims = [(mesh_dim, placement.dim) for mesh_dim, placement in enumerate(placements)
            if not placement.is_replicate() and getattr(placement, "dim", None) is not None]
    if not dims:
        return 0, None
    k = max(dim for _, dim in dims)
    inner = 1
    for size in shape[k + 1:]:
        inner *= size
    if inner % block == 0:
        return k + 1, None
    on_k = [mesh_dim for mesh_dim, dim in dims if dim == k]
    if not (k == len(shape) - 1 and k >= 1 and shape[k] % block == 0 and len(on_k) == 1
            and type(placements[on_k[0]]).__name__ == "Shard"):
        return None, None
    ranks = mesh_shape[on_k[0]]
    part = -(-shape[k] // ranks)
    if part % block:
        return None, (f"is split on its last dimension over {ranks} ranks, {part} elements each: 8-bit states "
                      f"keep one scale per {block} elements along it, and a rank's part must hold whole blocks "
                      f"(a multiple of {block})")
    return k, None


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
    located = _rows_of(shardings, positions)
    rounds = {}  # (mesh, dim) -> [(bucket, row), ...] in parameter order
    for position in sorted(located):
        bucket, row, sharding = located[position]
        for dim in sharding.dims:
            rounds.setdefault((sharding.mesh, dim), []).append((bucket, row))
    for (mesh, dim), members in rounds.items():
        _all_reduce_rows_(tables, members, mesh, dim)


def _rows_of(shardings: list, positions: list) -> dict:
    """position -> (bucket, row, Sharding) of each sharded tensor of the tables (`shardings` and
    `positions` as `all_reduce_sharded_` takes them)."""
    return {position: (bucket, row, sharding)
            for bucket, (bucket_shardings, bucket_positions) in enumerate(zip(shardings, positions))
            for row, (sharding, position) in enumerate(zip(bucket_shardings, bucket_positions))
            if sharding is not None}


def _all_reduce_rows_(tables: list, members: list, mesh, dim: int, columns: int | None = None, extra=None):
    """One all-reduce over mesh dimension `dim`: a table with a row per member, in order, each
    ``(bucket, row)`` of `tables` (or None: a row of zeros, `columns` wide, for a tensor this rank
    does not step), summed across the dimension's ranks and written back to `tables`. `extra`, a 1-D
    tensor, rides along in the same all-reduce; returned summed (None without)."""
    device = torch.device(mesh.device_type)
    if columns is None:
        first = tables[next(bucket for bucket, _ in filter(None, members))]
        columns = first[:1].numel()
    in_order = torch.zeros(len(members), columns, device=device)
    by_bucket = {}  # bucket -> [(row, place in the table), ...]
    for place, member in enumerate(members):
        if member is not None:
            by_bucket.setdefault(member[0], []).append((member[1], place))
    copied = []
    for bucket, items in by_bucket.items():
        table = tables[bucket]
        rows = torch.tensor([row for row, _ in items], device=table.device)
        places = torch.tensor([place for _, place in items], device=device)
        in_order.index_copy_(0, places, table.index_select(0, rows).reshape(len(items), -1).to(device, in_order.dtype))
        copied.append((table, rows, places))
    reduced = in_order.reshape(-1) if extra is None else torch.cat([in_order.reshape(-1), extra.to(device)])
    dist.all_reduce(reduced, group=mesh.get_group(dim))
    in_order = reduced[: in_order.numel()].reshape(in_order.shape)
    for table, rows, places in copied:
        part = in_order.index_select(0, places).reshape((len(rows), *table.shape[1:]))
        table.index_copy_(0, rows, part.to(table.device, table.dtype))
    return None if extra is None else reduced[in_order.numel():]


def sharded_grads(param_groups: list, state, sums: int, label_of) -> ShardedGrads | None:
    """The ShardedGrads of the step about to be planned, taken before it changes anything, or None
    when no parameter of `param_groups` is sharded. `sums`: the sums of squares per tensor of the
    step's first all-reduce (0: the presences alone); `label_of(group_index, param_index, group)`
    names a parameter. (Groups are read as they are: the step's checks, which come next, refuse
    what is not a list of tensors.)"""
    positions, shardings, present, stepping = [], [], [], []
    known = {}  # (mesh, placements) -> Sharding: the parameters of a model share a few
    for group_index, group in enumerate(param_groups):
        params = group.get("params") if isinstance(group, dict) else None
        for param_index, p in enumerate(params if isinstance(params, list) else ()):
            if not isinstance(p, torch.Tensor):
                continue
            if p.grad is not None:
                stepping.append(p)
            if not is_dtensor(p):
                continue
            key = (p.device_mesh, p.placements)
            sharding = known.get(key, key)
            if sharding is key:
                sharding = known[key] = _split(p)
            if sharding is not None:
                positions.append((group_index, param_index))
                shardings.append(sharding)
                present.append(p.grad is not None)
    if not positions:
        return None
    return ShardedGrads(positions, shardings, present, sums, _HostState(state, stepping),
                        lambda group_index, param_index: label_of(group_index, param_index,
                                                                  param_groups[group_index]))


class ShardedGrads:
    """Every sharded parameter of an optimizer and whether it has a grad on this rank, for the step's
    first all-reduce to find one that has a grad on some ranks and None on others before anything is
    written.

    Such a parameter would have the ranks all-reduce tables of different lengths (gloo aborts, or
    waits for its timeout), or, when the lengths happen to match, step different parameters. So the
    first all-reduce of a step on sharded parameters, made before the step writes anything on the
    device, has a row for every sharded parameter of the optimizer, with a grad here or not (zeros
    without), and the presences of their grads (1 with one): its length is the same on every rank
    whatever the grads. The presences ride on each of its all-reduces (one per mesh and mesh
    dimension), not only on those of their own tensor's dimensions, so every rank that takes part in
    one of them sees the same mismatch, undoes what the step changed on the host (`_HostState`) and
    raises a ValueError naming the parameter. (A mesh dimension no sharded tensor is split on, as
    HSDP's replicate dimension, has no all-reduce: its replicas each check their own ranks.)

    That all-reduce is the one of the sums of squares the algorithm needs before its first write:
    LAMB's grad norm when a group clips, LARS's norms when a group adapts. Without those (LAMB
    without clipping, whose next all-reduce comes after the moments are written; LARS without
    adaptation, which has none) it carries the presences alone: the one all-reduce a step makes for
    this check only, since no later one comes before a write that could not be undone. A rank
    without any grad takes part in it too (`MultiTensorOptimizer._plan_step`)."""

    def __init__(self, positions: list, shardings: list, present: list, sums: int, host, label_of):
        self.positions = positions  # (group index, index in the group) per sharded parameter, in order
        self.present = present  # per sharded parameter, whether it has a grad on this rank
        self.sums = sums  # sums of squares per tensor in the first all-reduce
        self.host = host  # what to restore if the check fails; dropped once it is made
        self.label_of = label_of
        self.rounds = {}  # (mesh, dim) -> indices of the parameters split on it: the same on every rank
        for index, sharding in enumerate(shardings):
            for dim in sharding.dims:
                self.rounds.setdefault((sharding.mesh, dim), []).append(index)

    def all_reduce_(self, tables: list, shardings: tuple = ()) -> None:
        """The step's first all-reduce. `tables` and `shardings` as `all_reduce_sharded_` takes them
        (``()``: no sharded row here), ``self.sums`` columns each: their sharded rows are summed as
        it sums them, the other parameters split on each (mesh, dim) taking zero rows. Then raises,
        on every rank of those all-reduces, a ValueError naming a parameter with a grad on some
        ranks only, with the host state as it was before the step."""
        located = {position: (bucket, row) for position, (bucket, row, _) in
                   (_rows_of(*shardings) if shardings else {}).items()}
        presence = torch.tensor(self.present, dtype=torch.float32)
        everywhere = 1  # the presence sum of a parameter with a grad on every rank
        for (mesh, dim), members in self.rounds.items():
            rows = [located.get(self.positions[index]) for index in members]  # (None: a row of zeros)
            presence = _all_reduce_rows_(tables, rows, mesh, dim, self.sums, presence)
            everywhere *= mesh.size(dim)
        # (A read on the host: on a GPU the host waits for this all-reduce before launching the writes.)
        mismatched = [index for index, count in enumerate(presence.tolist()) if 0 < count < everywhere]
        host, self.host = self.host, None
        if not mismatched:
            return
        host.restore()
        labels = [self.label_of(*self.positions[index]) for index in mismatched]
        others = f" (and {len(labels) - 1} more: {', '.join(labels[1:4])}{', ...' if len(labels) > 4 else ''})"
        raise ValueError(
            f"{labels[0]} has a grad on some ranks and None on others (on this rank: "
            f"{'a grad' if self.present[mismatched[0]] else 'None'}){others if len(labels) > 1 else ''}. A sharded "
            "parameter needs a grad on every rank or on none: each rank steps its shard, with norms summed "
            "across them. No rank took this step (params, states and step counts are as they were); give it "
            "a grad on every rank (zeros where it took no part in the loss), or set it to None on all")


class _HostState:
    """What a step may change on the host before its first all-reduce, for the parameters with a
    grad: whether each has a state dict and its entries (the step creates, converts and replaces
    some), and the values of their step counts (advanced in place)."""

    def __init__(self, state, params: list):
        self.state = state
        self.saved = []  # (p, whether it has a state, its state dict, a copy of its entries)
        self.steps = []
        for p in params:
            entries = state.get(p)
            copied = dict(entries) if isinstance(entries, dict) else None
            self.saved.append((p, p in state, entries, copied))
            if copied is not None and torch.is_tensor(copied.get("step")):
                self.steps.append(copied["step"])
        try:  # one copy of all, when they share a shape and a device (the usual 0-d counts on the CPU)
            self.step_values = torch.stack(self.steps) if self.steps else []
        except RuntimeError:
            self.step_values = [t.clone() for t in self.steps]

    def restore(self) -> None:
        for p, had_state, entries, copied in self.saved:
            if not had_state:
                self.state.pop(p, None)
                continue
            if self.state.get(p) is not entries:
                self.state[p] = entries
            if copied is not None:
                entries.clear()
                entries.update(copied)
        for t, value in zip(self.steps, self.step_values):
            t.copy_(value)


def distributed_like(p, value: torch.Tensor) -> torch.Tensor:
    """A full (unsharded) tensor as a DTensor with p's mesh and placements, each rank keeping its own
    part of it (no communication): how a full state dict's entries reach a sharded parameter."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
