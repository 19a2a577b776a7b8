"""What a step checks before anything changes, in one pass over the optimizer as it is: its param
groups, parameters, grads and state. Raises naming the argument, the hyperparameter or the
parameter; returns the parameters about to step.

Some checks are asked at every step, whatever changed (`check_every_step`: the group list, and
each group whose hyperparameters or parameter list changed since it was last
checked). The others depend only on facts that `param_facts` lists: a parameter's backend, shape,
strides, dtype, device and address, and its state entries (which objects they are, their layouts and
addresses). A parameter whose facts are those of its last check passed then and would pass again,
so it is not checked again; the same facts, read in bulk by `layouts` (csrc/host.cpp), are what a
reused step compares (plan_cache.py). Both paths read the declaration's ``state_keys``, so a question
asked on one path cannot be missing on the other.
"""
from __future__ import annotations

import os

import torch

from .. import extension
from ..backend_api import is_dense
from ..backends import ENV_VAR, backend_for_layout, resolve_backend
from ..distributed import check_code_blocks, check_grad, is_dtensor, local, sharding_of
from .checks import (check_distinct, check_distinct_groups, check_storage, group_key,
                     param_label, raise_bad_grad, same_items)
from .declaration import check_group
from .state import convert, conversions
from ..quantization import BLOCK, INT8

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# -- the facts a check depends on ---------------------------------------------------------------------

def _address(t: torch.Tensor) -> int:
    try:
        return t.data_ptr()
    except RuntimeError:  # no storage: a DTensor or another wrapper
        return -2


def _layout(t, addresses: bool):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"layouts: {type(t).__name__} is not a tensor or None")
    strided = t.layout == torch.strided
    return (type(t), t.dtype, t.layout, t.device, t.shape, t.stride() if strided else None,
            _address(t) if addresses and strided else None)


def python_layouts(items: list, addresses: bool) -> tuple:
    """Per item: its Python type, dtype, layout, device, sizes, strides and (with `addresses`) address;
    what csrc/host.cpp's ``layouts`` reads, in Python (comparable with == like its bytes). Raises
    TypeError, as it does, for an item that is neither a tensor nor None."""
    return tuple(map(lambda t: _layout(t, addresses), items))


def layouts_function(build: bool = False):
    """csrc/host.cpp's ``layouts`` when the C++ library is loaded or loads without a build (or, with
    `build`, once built: a minute, the first time on a machine), else `python_layouts`, which costs
    about what the full path's checks cost."""
    if build:
        try:
            extension.load()
        except extension.ExtensionUnavailable:
            pass
    module = extension.host_module()
    return python_layouts if module is None else module.layouts


def param_facts(state_keys, p: torch.Tensor, shard: torch.Tensor, name: str, state, group) -> tuple:
    """What a parameter's checks depend on: its backend, shape, strides, dtype, device and address,
    and which objects its state entries are (by id) with, for tensors, their layouts and addresses
    (an entry aliased in place, ``t.set_(other)``, is checked again); with those objects, kept so
    that their ids cannot be reused while the facts are."""
    objects = tuple(map(state.get, state_keys)) if state else ()
    facts = (name, shard.shape, shard.stride(), shard.dtype, shard.device, shard.data_ptr(), *map(id, objects),
             group.get("state_dtype"),
             *(python_layouts([t], True) if torch.is_tensor(t) else None for t in objects))
    if shard is not p:
        facts += (p.shape, tuple(p.placements), p.device_mesh)
    return facts, objects


def _still_checked(opt, known, p, shard, name: str, state, group) -> bool:
    """Whether `known` (p's entry in opt._checked_params, or None) is of p as it is now."""
    return (known is not None and known[0] is p
            and known[1] == param_facts(opt.DECLARATION.state_keys, p, shard, name, state, group)[0])


# -- the checks -----------------------------------------------------------------------------------------

def check_every_step(opt) -> list:
    """The checks both paths of a step make whatever changed (after the GradScaler's tensors,
    checked before either path): each param group dict at most once; and, as the constructor checks them, every group whose hyperparameters
    or parameter list changed since it was last checked (set by hand, by a scheduler or by a load).
    Returns those groups as (group, key, None when only its hyperparameters changed, else True), to
    be remembered (`remember_groups`) once the whole step has been checked."""
    check_distinct_groups(opt.param_groups)
    revalidated = []
    for group_index, group in enumerate(opt.param_groups):
        if not isinstance(group.get("params"), list):
            raise ValueError(f"param_groups[{group_index}] must hold its parameters as a list under 'params', "
                             f"got {type(group.get('params')).__name__}")
        key = group_key(group)
        known = opt._checked_groups.get(id(group))
        same_params = known is not None and known[0] is group and same_items(group["params"], known[2])
        if not same_params or known[1] != key:
            check_group(opt.DECLARATION, group, f"param_groups[{group_index}]: ")
            for param_index, p in enumerate(group["params"]):
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"{param_label(group_index, param_index, group)} is a {type(p).__name__}, "
                                    "not a tensor")
            revalidated.append((group, key, None if same_params else True))
    return revalidated


def remember_groups(opt, revalidated: list) -> None:
    for group, key, _ in revalidated:
        opt._checked_groups[id(group)] = (group, key, tuple(group["params"]))


def check_param(opt, p: torch.Tensor, env, group_index: int, param_index: int, group: dict, shard=None) -> str:
    """Checks a parameter on its own; returns the backend name that will step it (backends.py:
    "auto" steps a parameter with gaps in memory with a backend that takes any layout). `env` is
    the value of $LAMB_KERNELS_BACKEND, read once per step."""
    name = opt._resolved.get((p.device, env))
    if name is None:
        name = opt._resolved[(p.device, env)] = resolve_backend(opt.backend, p.device)
    check_storage(p, param_label(group_index, param_index, group))
    if p.dtype in SUPPORTED_DTYPES:
        chosen = backend_for_layout(name, is_dense(local(p) if shard is None else shard),
                                    opt.backend == "auto" and not env)
        if chosen is not None:
            return chosen
    label = param_label(group_index, param_index, group)
    if p.is_complex():
        raise TypeError(f"{label} is complex; {type(opt).__name__} supports real parameters only")
    if p.dtype not in SUPPORTED_DTYPES:
        supported = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{label} has dtype {p.dtype}; supported parameter dtypes: {supported}")
    raise ValueError(
        f"{label} is not dense in memory (strides {p.stride()}); the {name} backend needs "
        "dense parameters, backend='torch' takes any layout"
    )


def params_to_step(opt) -> list:
    """Every (group, params with grads) after checking them all: raises before any change. A
    parameter comes as (p, backend name, (group, index), its local shard, its state or None).

    What cannot change unseen is checked at every step (grads, dtypes, backends); what rarely
    changes is checked again whenever it did (`param_facts`). A state in another memory layout than
    its parameter (``model.to(memory_format=torch.channels_last)`` after some steps), or in another
    dtype than its group's ``state_dtype``, is converted once every check has passed."""
    declaration = opt.DECLARATION
    env = os.environ.get(ENV_VAR)
    revalidated = check_every_step(opt)
    changed = bool(revalidated)
    work, converted, rechecked = [], [], []
    for group_index, group in enumerate(opt.param_groups):
        params = []
        for param_index, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse or g.dtype != p.dtype or g.device != p.device or g.shape != p.shape:
                raise_bad_grad(p, param_label(group_index, param_index, group), type(opt).__name__)
            shard = local(p)  # (looked up once: the host work per tensor is the step's cost on small ones)
            if shard is not p or is_dtensor(g):
                label = param_label(group_index, param_index, group)
                check_grad(p, label)
                sharding_of(p, label)  # raises for a placement the step cannot handle
                if declaration.bucket_state_dtype(group) == INT8:
                    check_code_blocks(p, BLOCK, label)
            state = opt.state.get(p)
            known = opt._checked_params.get(id(p))  # (by id: a tensor's hash is a Python call)
            name = opt._resolved.get((p.device, env))
            # Checked before with this backend, shape, layout, dtype, address and state: the
            # checks of check_param passed then and would pass again.
            if name is None or not _still_checked(opt, known, p, shard, name, state, group):
                name = check_param(opt, p, env, group_index, param_index, group, shard)
                if not _still_checked(opt, known, p, shard, name, state, group):
                    changed = True
                    if state:
                        label = param_label(group_index, param_index, group)
                        converted += [(p, state, key, dtype)
                                      for key, dtype in conversions(declaration, p, state, name, label, group)]
                    rechecked.append((p, shard, name, group))
            params.append((p, name, (group_index, param_index), shard, state))
        if params:
            work.append((group, params))
    if changed:
        check_distinct(opt.param_groups, opt.state, declaration.state_keys)
    for p, state, key, dtype in converted:
        convert(p, state, key, dtype)
    # Remembered only now that every check has passed: a refused step is checked again in full.
    remember_groups(opt, revalidated)
    for p, shard, name, group in rechecked:
        opt._checked_params[id(p)] = (p, *param_facts(declaration.state_keys, p, shard, name, opt.state.get(p), group))
    return work
