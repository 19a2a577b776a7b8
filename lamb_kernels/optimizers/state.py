"""A parameter's optimizer state: the one place its entries are created, checked and converted, at
a step and at a load (docs/states.md).

An entry is stored per its group's ``state_dtype``: float32, bfloat16, or "int8", 8-bit codes with
one float32 scale per block (quantization.py), kept under the entry's key and the key + ``"_scales"``.
Step counts are one-element float32 tensors, on the CPU (reading them costs no sync) or, with
``capturable``, on the parameter's device. Conversions (a checkpoint of another ``state_dtype``, a
group's ``state_dtype`` changed between steps, a parameter's memory layout changed) go through
float32 values, rounded to the nearest (bfloat16, or the nearest code).

What each optimizer keeps is its declaration's (declaration.py): its entries, which of them a
group keeps, whether they may be codes.
"""
from __future__ import annotations

import torch

from ..backend_api import is_dense
from ..distributed import DTensor, code_blocks_cut, distributed_like, is_dtensor, local
from ..quantization import BLOCK, CODE_DTYPES, INT8, dequantize, n_blocks, quantize
from .checks import check_storage

STATE_DTYPE = torch.float32  # moments, momentum buffers and master weights, whatever the parameter dtype
STATE_DTYPES = (torch.float32, torch.bfloat16, INT8)  # what `state_dtype` may be
FLOAT_STORAGE = (torch.float32, torch.bfloat16)
CODES = tuple(CODE_DTYPES.values())


def scales_key(key: str) -> str:
    return key + "_scales"


def storage_dtype(state_dtype, signed: bool) -> torch.dtype:
    """The dtype a state of a group with `state_dtype` is kept in (int8: its codes')."""
    return CODE_DTYPES[signed] if state_dtype == INT8 else state_dtype


def state_dtype_of(group: dict):
    """A group's ``state_dtype`` (float32 where the group does not say)."""
    return group.get("state_dtype", STATE_DTYPE)


def codes_fit(p) -> bool:
    """Whether p's states can be 8-bit codes: a plain tensor's always; a DTensor's when its shards hold
    whole blocks at every world size (distributed.code_blocks_cut), else they are kept in float32."""
    return not is_dtensor(p) or code_blocks_cut(p, BLOCK) is not None


def kept_state_dtype(state_dtype, p):
    """What p's states are kept in when its group's (or bucket's) is `state_dtype`."""
    return STATE_DTYPE if state_dtype == INT8 and not codes_fit(p) else state_dtype


def entry_dtype(declaration, group: dict | None, key: str, p) -> torch.dtype:
    """The dtype the state entry `key` of parameter p of `group` is kept in: the group's
    ``state_dtype`` for an entry that follows it (codes' dtype for "int8", float32 where p's shards
    cannot hold whole blocks), else float32."""
    signed = declaration.signed.get(key)
    if group is None or signed is None:
        return STATE_DTYPE
    return storage_dtype(kept_state_dtype(state_dtype_of(group), p), signed)


# -- 8-bit codes of DTensor parameters: blocks within each rank's shard -----------------------------

def blocks_shape(shape, cut: int) -> tuple:
    """The shape of the block scales of a tensor of `shape` cut at `cut` (code_blocks_cut)."""
    numel = 1
    for size in shape[cut:]:
        numel *= size
    return (n_blocks(numel),) if cut == 0 else (*shape[:cut], numel // BLOCK)


def _like(p, local_value: torch.Tensor, shape) -> torch.Tensor:
    """`local_value` as this rank's part of a DTensor of `shape` with p's mesh and placements."""
    strides, stride = [], 1
    for size in reversed(shape):
        strides.insert(0, stride)
        stride *= max(size, 1)
    return DTensor.from_local(local_value, p.device_mesh, p.placements, run_check=False,
                              shape=torch.Size(shape), stride=tuple(strides))


def sharded_scales(p, scales: torch.Tensor) -> torch.Tensor:
    """The block scales of DTensor p's codes as a DTensor with its mesh and placements, from this
    rank's (`scales`: 1-D, the local shard's blocks in order)."""
    cut = code_blocks_cut(p, BLOCK)
    return _like(p, scales.view(blocks_shape(local(p).shape, cut)), blocks_shape(p.shape, cut))


def local_scales(scales: torch.Tensor) -> torch.Tensor:
    """Block scales as the kernels read them: 1-D, this rank's."""
    return local(scales).view(-1) if is_dtensor(scales) else scales


def decoded(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 values of codes and their scales (a DTensor's: each rank decodes its shard)."""
    if not is_dtensor(codes):
        return dequantize(codes, scales.float().reshape(-1))
    return _like(codes, dequantize(local(codes), local_scales(scales)), tuple(codes.shape))


def encoded(p, values: torch.Tensor, signed: bool) -> tuple:
    """(codes, scales) of float32 `values` laid out as p, rounded to the nearest code."""
    if not is_dtensor(p):
        return quantize(values, signed)
    codes, scales = quantize(local(values), signed)
    return _like(p, codes, tuple(p.shape)), sharded_scales(p, scales)


# -- created ----------------------------------------------------------------------------------------

def zero_entry(p: torch.Tensor, dtype: torch.dtype, state: dict, key: str) -> None:
    """A zero state entry for p in `dtype` (p's memory layout), and its zero scales for codes."""
    state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    if dtype in CODES:
        scales = torch.zeros(n_blocks(local(p).numel()), dtype=torch.float32, device=p.device)
        state[scales_key(key)] = sharded_scales(p, scales) if is_dtensor(p) else scales


def new_step_count(p: torch.Tensor, group: dict, start: float = 0.0) -> torch.Tensor:
    # On the CPU, where reading it costs no sync; with capturable, on the parameter's device.
    count = torch.zeros((), dtype=torch.float32, device=p.device if group.get("capturable") else "cpu")
    return count.fill_(start) if start else count


def move_step_count_for(found_inf, p: torch.Tensor, state: dict) -> None:
    """A GradScaler's found_inf on a device decides whether step counts advance: they move to the
    parameter's device (once), so that decision never waits on the host, as in torch's fused optimizers."""
    if found_inf is not None and found_inf.device.type != "cpu" and state["step"].device != p.device:
        state["step"] = state["step"].to(p.device)


def create_missing(optimizer, declaration, work: list, found_inf) -> list:
    """The state entries that the parameters about to step lack, created in the declaration's order
    (zeros; an entry of `first_values` is the first step's value: left uninitialized, or zeros
    under a GradScaler, whose first step may be skipped on the device, and momentum * 0 + d is d
    again), then ``master_param`` for a parameter that gets master weights (dropped for one that no
    longer does: a later return to low precision starts afresh from the parameter), and step counts
    moved next to found_inf. No state dict is made for a parameter that keeps nothing (as torch's
    SGD without momentum). Returns per group of `work`, per parameter, (its state, whether an
    entry was created)."""
    states = []
    for group, params in work:
        keeps, counts = declaration.keeps(group), declaration.counts_steps(group)
        group_states = []
        for p, _, _, _, state in params:
            master = optimizer._wants_master(p)
            if state is None:
                state = optimizer.state[p] if keeps or counts or master else {}
            new = False
            for entry in declaration.entries:
                if entry.counter:
                    if counts and state.get("step") is None:
                        state["step"] = new_step_count(p, group, optimizer.initial_step)
                elif entry.key in keeps and state.get(entry.key) is None:
                    new = True
                    dtype = entry_dtype(declaration, group, entry.key, p)
                    if entry.key in declaration.first_values and dtype not in CODES:
                        make = torch.empty_like if found_inf is None else torch.zeros_like
                        state[entry.key] = make(p, dtype=dtype, memory_format=torch.preserve_format)
                    else:
                        zero_entry(p, dtype, state, entry.key)
            if not master:
                state.pop("master_param", None)
            elif state.get("master_param") is None:
                state["master_param"] = p.detach().to(STATE_DTYPE, memory_format=torch.preserve_format)
            if counts:
                move_step_count_for(found_inf, p, state)
            group_states.append((state, new))
        states.append(group_states)
    return states


# -- checked ----------------------------------------------------------------------------------------

def scales_fit(codes: torch.Tensor, scales, placed: bool = True) -> bool:
    """Whether `scales` are the block scales codes need: float32, one per block; with `placed` (not
    for a saved state, which loading places) as the kernels read them: for plain codes 1-D and
    contiguous on their device, for a DTensor's a DTensor as `sharded_scales` makes it."""
    if not (torch.is_tensor(scales) and scales.dtype == torch.float32 and scales.dim() >= 1
            and scales.numel() == n_blocks(codes.numel())):
        return False
    if not placed:
        return True
    if not is_dtensor(codes):
        return not is_dtensor(scales) and scales.dim() == 1 and scales.device == codes.device and scales.is_contiguous()
    cut = code_blocks_cut(codes, BLOCK)
    return (cut is not None and is_dtensor(scales) and scales.device_mesh == codes.device_mesh
            and tuple(scales.placements) == tuple(codes.placements) and tuple(scales.shape) == blocks_shape(codes.shape, cut)
            and local(scales).device == local(codes).device and local(scales).is_contiguous()
            and local(scales).numel() == n_blocks(local(codes).numel()))


def check_entry(declaration, key: str, value, entry: dict, what: str, placed: bool) -> None:
    """One param-shaped state entry, as a load checks a saved one (`placed` False) and a step one
    set by hand (`placed`: its scales also contiguous on the codes' device): a floating-point
    tensor or, for an entry that may be 8-bit, codes of its signedness with float32 block scales of
    their size, dense in memory (a block is a run of 256 elements in memory order: a view with
    gaps has none), each with the storage its shape needs. `what` names the entry and its parameter."""
    signed = declaration.signed.get(key)
    codes = signed is not None and torch.is_tensor(value) and value.dtype in CODES
    if not torch.is_tensor(value) or not (value.is_floating_point() or codes):
        raise TypeError(f"{what} must be a floating-point tensor (or 8-bit codes), got "
                        f"{type(value).__name__ if not torch.is_tensor(value) else value.dtype}")
    check_storage(value, what)
    if not codes:
        return
    if (value.dtype == torch.int8) != signed:
        raise TypeError(f"{what} must hold {'int8' if signed else 'uint8'} codes, got {value.dtype}")
    if not is_dense(local(value)):
        raise ValueError(f"{what} holds 8-bit codes as a view with gaps (strides {local(value).stride()}): "
                         "their blocks are runs of 256 elements in memory order, so codes must be dense in "
                         "memory; set a dense copy (with its scales) or the float values")
    scales = entry.get(scales_key(key))
    if not scales_fit(value, scales, placed=placed):
        shown = f"{tuple(scales.shape)} {scales.dtype}" if torch.is_tensor(scales) else repr(scales)
        sharded = placed and is_dtensor(value)
        cut = code_blocks_cut(value, BLOCK) if sharded else 0
        if cut is None:
            raise ValueError(f"{what} holds 8-bit codes, but the shards of its parameter cannot hold whole blocks of "
                             f"{BLOCK} (docs/states.md, 'Sharded parameters'): its states are kept in float32; "
                             "set float values")
        wanted = (f"a DTensor with the codes' mesh and placements, of shape {blocks_shape(value.shape, cut)}"
                  if sharded else f"of shape ({n_blocks(value.numel())},)")
        raise ValueError(f"{what} holds 8-bit codes, so the state needs {scales_key(key)!r}: float32 block "
                         f"scales {wanted}{', contiguous, on ' + str(value.device) if placed else ''}, got {shown}")
    check_storage(scales, f"the scales of {what}")


def _sharded_alike(t, p) -> bool:
    """A state tensor of a DTensor parameter is a DTensor with its mesh and placements; of a plain
    parameter, a plain tensor."""
    if not is_dtensor(p):
        return not is_dtensor(t)
    return is_dtensor(t) and t.device_mesh == p.device_mesh and tuple(t.placements) == tuple(p.placements)


def conversions(declaration, p: torch.Tensor, state: dict, backend_name: str, label: str, group=None) -> list:
    """(key, dtype) of the state entries to copy into p's memory layout, or into the dtype the
    group keeps them in (a checkpoint or a group's ``state_dtype`` changed between float32 and
    bfloat16; dtype None: its own); raises unless the state fits p: its shape and device, and for
    the multi-tensor kernels (which index p and its state alike) that dtype."""
    found = []
    fits = all(key in state for key in declaration.required)
    if "step" in state:
        # A one-element float tensor, on the CPU or on the parameter's device (capturable).
        step = state["step"]
        if torch.is_tensor(step):
            check_storage(step, f"the 'step' state of {label}")
        fits = fits and torch.is_tensor(step) and step.numel() == 1 and step.is_floating_point() and (
            step.device.type == "cpu" or step.device == p.device)
    for key in declaration.tensors:
        t = state.get(key)
        if t is None and key not in declaration.required:
            continue
        if torch.is_tensor(t):  # (what a load checks of a saved entry, and more: see `check_entry`)
            check_entry(declaration, key, t, state, f"the {key!r} state of {label}", placed=True)
        expected = entry_dtype(declaration, group, key, p)
        if not torch.is_tensor(t) or t.shape != p.shape or t.device != p.device or not _sharded_alike(t, p):
            fits = False
        elif t.dtype != expected and (t.dtype in FLOAT_STORAGE or t.dtype in CODES or expected in CODES):
            found.append((key, expected))  # (codes from any float: the torch backend takes any dtype)
        elif backend_name != "torch" and t.dtype != expected:
            fits = False
        elif local(t).stride() != local(p).stride() and is_dense(local(p)):
            found.append((key, None))
    if not fits:
        _raise_bad_state(declaration, p, state, label)
    return found


def _raise_bad_state(declaration, p: torch.Tensor, state: dict, label: str):
    details = ", ".join(
        f"{key}: {tuple(t.shape)} {t.dtype} on {t.device}, strides {t.stride()}" if torch.is_tensor(t)
        else f"{key}: {t!r}" if key in state else f"{key}: missing"
        for key, t in ((key, state.get(key))
                       for key in (*declaration.tensors, *map(scales_key, declaration.signed), "step"))
        if key in state or key in declaration.required
    )
    raise ValueError(
        f"the optimizer state of {label} ({tuple(p.shape)} {p.dtype} on {p.device}, strides "
        f"{p.stride()}) does not fit it: {details}. Was the parameter replaced after its state was "
        "created? Load a state dict that matches it, or delete optimizer.state[param] to start afresh"
    )


# -- converted --------------------------------------------------------------------------------------

def float_value(state: dict, key: str) -> torch.Tensor:
    """A state entry's values as a float tensor (codes decoded to float32) in its own layout."""
    t = state[key]
    return decoded(t, state[scales_key(key)]) if t.dtype in CODES else t


def convert(p: torch.Tensor, state: dict, key: str, dtype: torch.dtype | None) -> None:
    """state[key] in p's memory layout and in `dtype` (None: its own), its scales alongside for
    codes (a float state drops any it had). Codes whose layout changes are encoded afresh: a block
    is a run of elements in memory order."""
    t = state[key]
    dtype = t.dtype if dtype is None else dtype
    if dtype not in CODES:
        state[key] = torch.empty_like(p, dtype=dtype).copy_(float_value(state, key))
        state.pop(scales_key(key), None)
        return
    values = torch.empty_like(p, dtype=torch.float32).copy_(float_value(state, key))
    state[key], state[scales_key(key)] = encoded(p, values, dtype == torch.int8)


def placed(declaration, p: torch.Tensor, saved: dict, capturable, group: dict | None = None) -> dict:
    """A saved state as this optimizer keeps it (see `_loaded_value`), its step count an fp32
    tensor on the CPU (on the parameter's device when capturable), its param-shaped tensors in
    the parameter's memory layout and the group's state dtype."""
    if is_dtensor(p):  # a full state dict's 8-bit codes: each rank keeps its blocks, or decodes them
        saved = dict(saved)
        for key in declaration.signed:
            codes, scales = saved.get(key), saved.get(scales_key(key))
            if not (torch.is_tensor(codes) and not is_dtensor(codes) and codes.dtype in CODES
                    and torch.is_tensor(scales)):
                continue
            if entry_dtype(declaration, group, key, p) in CODES and codes.is_contiguous():
                # (the whole scales, flattened, are the blocks of the tensor's memory order: code_blocks_cut;
                # the codes are split as every whole entry is, by `_loaded_value`)
                whole = scales.float().to(p.device).reshape(blocks_shape(p.shape, code_blocks_cut(p, BLOCK)))
                saved[scales_key(key)] = distributed_like(p, whole)
            else:
                saved[key] = decoded(codes, scales)
                del saved[scales_key(key)]
    state = {key: _loaded_value(declaration, p, key, value) for key, value in saved.items()}
    if "step" in state:
        device = p.device if capturable else "cpu"
        state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device=device)
    for key in declaration.tensors:
        t = state.get(key)
        if not torch.is_tensor(t):
            continue
        expected = entry_dtype(declaration, group, key, p)
        if t.dtype != expected or local(t).stride() != local(p).stride():
            convert(p, state, key, expected)
        elif expected not in CODES:
            state.pop(scales_key(key), None)  # (scales of codes this state no longer is)
    return state


def _loaded_value(declaration, p: torch.Tensor, key, value):
    """A saved state entry as this optimizer keeps it: its own param-shaped entries on the
    parameter's device (`placed` converts them to the group's storage); scales of codes float32 on
    the device; any other tensor as torch.optim places it (the parameter's device, and its dtype
    when both are floating point); anything else as it is."""
    if not torch.is_tensor(value) or key == "step":
        return value
    if key in declaration.tensors:
        value = value.to(device=p.device, copy=True)
        # A full state dict's entry for a sharded parameter: each rank keeps its own part.
        return distributed_like(p, value) if is_dtensor(p) and not is_dtensor(value) else value
    if key in map(scales_key, declaration.signed):  # (whole scales of a sharded run: flattened, the same blocks)
        value = value.to(device=p.device, copy=True)
        return value if is_dtensor(value) else value.reshape(-1)
    if p.is_floating_point() and value.is_floating_point():
        return value.to(device=p.device, dtype=p.dtype, copy=True)
    return value.to(device=p.device, copy=True)
