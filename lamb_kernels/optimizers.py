"""The torch.optim.Optimizer subclasses: hyperparameters, state, validation, and the order of the
stages. No arithmetic on parameters happens here; the backends (contract.py) do it."""
from __future__ import annotations

import math
import numbers
import os
import warnings

import numpy as np
import torch

from .distributed import (all_reduce_sharded_, check_grad, check_not_flat, distributed_like, is_dtensor, local,
                          sharding_of)
from .contract import LambSegment, LarsSegment, flat, is_dense
from .ops import ENV_VAR, check_backend_name, create_backend, resolve_backend

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPE = torch.float32  # moments, momentum buffers and master weights, whatever the parameter dtype


def _param_label(group_index: int, param_index: int, group: dict) -> str:
    names = group.get("param_names")
    label = f"param_groups[{group_index}]['params'][{param_index}]"
    return f"{label} ({names[param_index]!r})" if names and param_index < len(names) else label


def _check_number(name: str, value, where: str, lo: float = 0.0, hi: float = math.inf, hi_open=False):
    """A real number, or a one-element tensor (its value is checked when it lives on the CPU: on a
    device, reading it would wait for the device). Strings are refused, as torch.optim refuses them."""
    if torch.is_tensor(value):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{where}{name} must be a number or a one-element real tensor, got a tensor of "
                             f"shape {tuple(value.shape)} and dtype {value.dtype}")
        if value.device.type != "cpu":
            return
        number = float(value)
    elif isinstance(value, numbers.Real):
        number = float(value)
    else:
        raise TypeError(f"{where}{name} must be a number, got {value!r}")
    too_high = number >= hi if hi_open else number > hi
    if math.isnan(number) or number < lo or too_high:
        bracket = ")" if hi_open else "]"
        raise ValueError(f"{where}{name} must be in [{lo}, {hi}{bracket}, got {value!r}")


def _check_flag(name: str, value, where: str, none_ok: bool = False) -> None:
    """A switch: a bool (or 0 / 1); None too where the group may leave the choice to the optimizer."""
    if value is None and none_ok:
        return
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return
    allowed = "True, False or None" if none_ok else "True or False"
    raise TypeError(f"{where}{name} must be {allowed}, got {value!r}")


def _entry(group: dict, name: str, where: str):
    """group[name], or a ValueError naming the missing hyperparameter."""
    try:
        return group[name]
    except KeyError:
        raise ValueError(f"{where}the hyperparameter {name!r} is missing") from None


def _validate_lamb_group(group: dict, where: str = "") -> None:
    """Raise naming the hyperparameter that is out of range (ValueError) or of the wrong type
    (TypeError); `where` names the group."""
    for name in ("lr", "eps", "weight_decay"):
        _check_number(name, _entry(group, name, where), where)
    betas = _entry(group, "betas", where)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}betas must be a pair (beta1, beta2), got {betas!r}")
    _check_number("betas[0]", betas[0], where, hi=1.0, hi_open=True)
    _check_number("betas[1]", betas[1], where, hi=1.0, hi_open=True)
    if _entry(group, "max_grad_norm", where) is not None:
        _check_number("max_grad_norm", group["max_grad_norm"], where)
    for name in ("bias_correction", "grad_averaging", "adam_w_mode", "use_nvlamb"):
        _check_flag(name, _entry(group, name, where), where)
    _check_flag("layer_adaptation", group.get("layer_adaptation"), where, none_ok=True)
    _check_flag("capturable", group.get("capturable", False), where)
    bounds = group.get("trust_ratio_bounds")
    if bounds is not None:
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise ValueError(f"{where}trust_ratio_bounds must be a pair (lo, hi), got {bounds!r}")
        _check_number("trust_ratio_bounds[0]", bounds[0], where)
        _check_number("trust_ratio_bounds[1]", bounds[1], where, lo=float(bounds[0]))


def _validate_lars_group(group: dict, where: str = "") -> None:
    """Raise naming the hyperparameter that is out of range (ValueError) or of the wrong type
    (TypeError); `where` names the group."""
    for name in ("lr", "momentum", "dampening", "weight_decay", "trust_coeff", "eps"):
        _check_number(name, _entry(group, name, where), where)
    for name in ("nesterov", "trust_clip", "always_adapt"):
        _check_flag(name, _entry(group, name, where), where)
    _check_flag("layer_adaptation", group.get("layer_adaptation"), where, none_ok=True)
    _check_flag("capturable", group.get("capturable", False), where)
    if group["nesterov"] and (float(group["momentum"]) <= 0 or float(group["dampening"]) != 0):
        raise ValueError(
            f"{where}nesterov=True needs momentum > 0 and dampening == 0, got momentum="
            f"{group['momentum']!r}, dampening={group['dampening']!r}"
        )


class _Same:
    """Equal to another _Same of the very same object: how a group's key compares tensors (a tensor
    lr that a scheduler writes in place stays the same) and other objects without a plain value."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return type(other) is _Same and other.obj is self.obj

    __hash__ = None


def _frozen(value):
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if torch.is_tensor(value) and value.device.type == "cpu" and value.numel() == 1 and not value.is_complex():
        # A value written in place (lr.fill_(...)) is checked again; reading it on the CPU is free.
        return _Same(value), float(value)
    return _Same(value)


def _group_key(group: dict) -> tuple:
    """What a group's validation depends on: its hyperparameters, and which parameters it holds (the
    parameters themselves, so that their ids cannot be reused while the key is kept)."""
    hyper = tuple((key, _frozen(value)) for key, value in group.items() if key not in ("params", "param_names"))
    return hyper, tuple(_Same(p) for p in group["params"])


def _memory_span(p: torch.Tensor) -> tuple:
    """(device, first byte, one past the last byte) of a dense tensor's elements."""
    extent = sum((size - 1) * stride for size, stride in zip(p.shape, p.stride()))
    start = p.data_ptr()
    device = (p.device.type, -1 if p.device.index is None else p.device.index)
    return device, start, start + (extent + 1) * p.element_size()


def _check_distinct(groups, state=None, state_keys=()) -> None:
    """Each parameter at most once in an optimizer, and no two sharing memory, nor any two of their
    state tensors (`state_keys` of `state`): the fused step reads every parameter before it writes
    any, so an element stepped twice would be stepped from stale values (and, on the multi-tensor
    backends, written by two threads at once). Views with gaps (not dense) are left out of the
    memory check: their address ranges may interleave without a shared element."""
    seen = {}
    spans = []
    for group_index, group in enumerate(groups):
        for param_index, p in enumerate(group["params"]):
            label = _param_label(group_index, param_index, group)
            first = seen.setdefault(id(p), label)
            if first is not label:
                raise ValueError(f"{label} is {first} again: each parameter may appear once in an optimizer")
            entries = state.get(p, {}) if state is not None else {}
            tensors = [(label, p)] + [(f"the {key!r} state of {label}", entries[key]) for key in state_keys
                                      if torch.is_tensor(entries.get(key))]
            for what, t in tensors:
                shard = local(t)
                if shard.numel() and is_dense(shard):
                    spans.append((*_memory_span(shard), what))
    spans.sort(key=lambda span: span[:2])
    device, reach, reach_label = None, 0, None
    for span_device, start, end, label in spans:
        if span_device == device and start < reach:
            raise ValueError(f"{label} and {reach_label} share memory: each element may be stepped once; "
                             "give the optimizer one of them")
        if span_device != device or end > reach:
            device, reach, reach_label = span_device, end, label


def _sharded_alike(t, p) -> bool:
    """A state tensor of a DTensor parameter is a DTensor with its mesh and placements; of a plain
    parameter, a plain tensor."""
    if not is_dtensor(p):
        return not is_dtensor(t)
    return is_dtensor(t) and t.device_mesh == p.device_mesh and tuple(t.placements) == tuple(p.placements)


def _in_layout_of(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A copy of state tensor t in p's memory layout (its values and dtype unchanged)."""
    return torch.empty_like(p, dtype=t.dtype).copy_(t)


def _clip_threshold(max_grad_norm) -> float:
    """docs/design.md section 2, step 1: None, 0 and inf all disable clipping, encoded as 0.0 for the backends."""
    if max_grad_norm is None or not 0 < float(max_grad_norm) < math.inf:
        return 0.0
    return float(max_grad_norm)


class _MultiTensorOptimizer(torch.optim.Optimizer):
    """What FusedLAMB and FusedLARS share: backend choice per (device, dtype), validation of groups,
    parameters, grads and state before anything changes, and state dict loading."""

    _STATE_TENSORS = ()  # state entries shaped like their parameter
    _STATE_KEYS = ()  # the entries a step uses: those and the step count
    _REQUIRED_STATE = ()  # entries a non-empty state must have
    # GradScaler hands the step its scale and found_inf (as attributes, the way torch's fused
    # optimizers take them) instead of unscaling the grads and syncing on found_inf itself.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, backend: str, master_weights: bool = False):
        self._validate_group(defaults)
        self.backend = check_backend_name(backend)
        self.master_weights = bool(master_weights)
        self._reset_caches()
        super().__init__(params, defaults)

    def _reset_caches(self) -> None:
        """What the step remembers of its last checks, so that it checks again only what changed."""
        self._backends = {}  # (device, dtype, name) -> backend object with its cached tables
        self._resolved = {}  # (device, $LAMB_KERNELS_BACKEND) -> backend name
        self._checked_params = {}  # param -> _param_key(...) at its last check
        self._checked_groups = {}  # id(group) -> (group, _group_key(group)) last validated

    @staticmethod
    def _validate_group(group: dict, where: str = "") -> None:
        raise NotImplementedError

    def _bucket_segments(self, work) -> dict:
        """State for the params about to step, and their split into (device, dtype, backend) buckets."""
        raise NotImplementedError

    def _step_buckets(self, buckets: dict) -> None:
        """The optimizer's stages, on every bucket."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """One step. Under a GradScaler (``scaler.step(opt)``) the scale and ``found_inf`` arrive as
        the attributes ``grad_scale`` and ``found_inf``: the kernels unscale the grads, and a
        non-finite grad leaves params, states and step counts unchanged, decided on the device."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        plan_step = self._plan_step
        if torch.compiler.is_compiling():  # (wrapped here: importing dynamo must not be needed to step)
            plan_step = torch.compiler.disable(plan_step)
        plans = plan_step(grad_scale, found_inf)
        if plans:
            self._run_plans(plans, grad_scale, found_inf)
        return loss

    def _plan_step(self, grad_scale, found_inf):
        """Host-side bookkeeping, run eagerly even inside torch.compile: checks (raising before
        anything changes), state creation, step counts, and each bucket's launch plan. What follows
        (`_run_plans`) is only the registered operators, which compile without a graph break."""
        _check_scaler_tensor("grad_scale", grad_scale)
        _check_scaler_tensor("found_inf", found_inf)
        work = self._params_to_step()
        if not work:
            return []
        buckets = self._bucket_segments(work, found_inf)
        return [(self._backend(key), key, self._prepare(self._backend(key), segments)) for key, segments in buckets.items()]

    def _prepare(self, backend, segments):
        """The backend's launch plan for one bucket (tables, pointer lists); host work."""
        raise NotImplementedError

    def _run_plans(self, plans, grad_scale, found_inf) -> None:
        raise NotImplementedError

    def _wants_master(self, p: torch.Tensor) -> bool:
        """Whether p gets an fp32 master copy in its state (``state[p]["master_param"]``)."""
        return self.master_weights and p.dtype != torch.float32

    def _weights(self, p: torch.Tensor, shard: torch.Tensor, state: dict, seg) -> torch.Tensor:
        """The tensor the step updates for p: its fp32 master copy (created here on first use, from
        the parameter), with p itself appended to the segment's copies; else p. `shard` is p's
        local shard (p itself unless p is a DTensor): the backends see plain tensors only."""
        if not self._wants_master(p):
            # A master left from when p was low precision is stale once p is not: a later return to
            # low precision starts a new one from p.
            state.pop("master_param", None)
            return shard
        master = state.get("master_param")
        if master is None:
            master = state["master_param"] = p.detach().to(STATE_DTYPE, memory_format=torch.preserve_format)
        seg.copies.append(shard)
        return master if shard is p else local(master)

    # -- groups, state and pickling -------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """As torch.optim's, with every check of the constructor first; a parameter that is already
        in the optimizer (in this group or another), or shares memory with one, is refused."""
        group_index = len(self.param_groups)
        where = f"param_groups[{group_index}]: "
        self._validate_group({**self.defaults, **param_group}, where)
        try:
            with warnings.catch_warnings():  # a duplicate inside the group is refused below
                warnings.filterwarnings("ignore", message="optimizer contains a parameter group with duplicate")
                super().add_param_group(param_group)
        except ValueError as exc:
            if "more than one parameter group" not in str(exc):
                raise
            _check_distinct([*self.param_groups, param_group])  # names the parameter
            raise
        group = self.param_groups[-1]
        env = os.environ.get(ENV_VAR)
        try:
            for param_index, p in enumerate(group["params"]):
                self._check_param(p, env, group_index, param_index, group)
                label = _param_label(group_index, param_index, group)
                check_not_flat(p, label)
                if is_dtensor(p):
                    sharding_of(p, label)
            _check_distinct(self.param_groups)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        self._checked_groups[id(group)] = (group, _group_key(group))

    def _check_param(self, p: torch.Tensor, env, group_index: int, param_index: int, group: dict, shard=None) -> str:
        """Checks a parameter on its own; returns the backend name that will step it. `env` is the
        value of $LAMB_KERNELS_BACKEND, read once per step."""
        name = self._resolved.get((p.device, env))
        if name is None:
            name = self._resolved[(p.device, env)] = resolve_backend(self.backend, p.device)
        if p.dtype in SUPPORTED_DTYPES and (name == "torch" or is_dense(local(p) if shard is None else shard)):
            return name
        if p.dtype in SUPPORTED_DTYPES and self.backend == "auto" and not env:
            return "torch"  # an automatic choice takes the backend that handles any layout
        label = _param_label(group_index, param_index, group)
        if p.is_complex():
            raise TypeError(f"{label} is complex; {type(self).__name__} supports real parameters only")
        if p.dtype not in SUPPORTED_DTYPES:
            supported = ", ".join(str(d) for d in SUPPORTED_DTYPES)
            raise TypeError(f"{label} has dtype {p.dtype}; supported parameter dtypes: {supported}")
        raise ValueError(
            f"{label} is not dense in memory (strides {p.stride()}); the {name} backend needs "
            "dense parameters, backend='torch' takes any layout"
        )

    def __getstate__(self):
        state = super().__getstate__()
        state["backend"] = self.backend
        state["master_weights"] = self.master_weights
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("master_weights", False)
        self._reset_caches()
        self._fill_defaults()

    def _fill_defaults(self) -> None:
        # Groups saved by an older version, by apex or by timm may lack hyperparameters added since.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict) -> None:
        """Everything is checked before anything is loaded: the saved groups' hyperparameters (as the
        constructor checks them) and the state entries this optimizer uses (tensors of their
        parameters' shapes, a numeric step count). Other entries are kept as torch.optim keeps them.
        Once loaded, each state tensor takes its parameter's memory layout (a checkpoint of a
        contiguous model may resume a channels_last one), states are fp32 whatever the parameter
        dtype, and step counts live on the CPU (where reading them costs no sync), or on the
        parameter's device with ``capturable=True``."""
        for group_index, saved in enumerate(state_dict["param_groups"]):
            hyper = {key: value for key, value in saved.items() if key not in ("params", "param_names")}
            self._validate_group({**self.defaults, **hyper}, f"state_dict['param_groups'][{group_index}]: ")
        self._check_saved_state(state_dict)
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            super().load_state_dict(state_dict)  # raises, explaining the mismatch, before any change
        # Every value is placed before anything changes: one that cannot be (a tensor with no data)
        # raises with the optimizer as it was. torch's loader would cast every state tensor to its
        # parameter's dtype (bf16 moments and masters for a bf16 model): it loads only the groups.
        targets = {param_id: (p, saved_group) for saved_group, group in zip(saved_groups, self.param_groups)
                   for param_id, p in zip(saved_group["params"], group["params"])}
        placed = {}
        for param_id, saved in state_dict["state"].items():
            if param_id not in targets:
                placed[param_id] = saved
                continue
            p, saved_group = targets[param_id]
            capturable = saved_group.get("capturable", self.defaults.get("capturable"))
            placed[p] = self._placed_state(p, saved, capturable)
        super().load_state_dict({**state_dict, "state": {}})
        self._fill_defaults()
        self.state.update(placed)
        self._checked_params.clear()  # holds the replaced state tensors otherwise
        self._checked_groups.clear()

    def _placed_state(self, p: torch.Tensor, saved: dict, capturable) -> dict:
        """A saved state as this optimizer keeps it (see `_loaded_value`), its step count an fp32
        tensor on the CPU (on the parameter's device when capturable), its param-shaped tensors in
        the parameter's memory layout."""
        state = {key: self._loaded_value(p, key, value) for key, value in saved.items()}
        if "step" in state:
            device = p.device if capturable else "cpu"
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device=device)
        for key in self._STATE_TENSORS:
            if torch.is_tensor(state.get(key)) and local(state[key]).stride() != local(p).stride():
                state[key] = _in_layout_of(p, state[key])
        return state

    def _loaded_value(self, p: torch.Tensor, key, value):
        """A saved state entry as this optimizer keeps it: its own param-shaped entries fp32 on the
        parameter's device; any other tensor as torch.optim places it (the parameter's device, and
        its dtype when both are floating point); anything else as it is."""
        if not torch.is_tensor(value) or key == "step":
            return value
        if key in self._STATE_TENSORS:
            value = value.to(device=p.device, dtype=STATE_DTYPE, copy=True)
            # A full state dict's entry for a sharded parameter: each rank keeps its own part.
            return distributed_like(p, value) if is_dtensor(p) and not is_dtensor(value) else value
        if p.is_floating_point() and value.is_floating_point():
            return value.to(device=p.device, dtype=p.dtype, copy=True)
        return value.to(device=p.device, copy=True)

    def _check_saved_state(self, state_dict: dict) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            return  # torch's load_state_dict explains this mismatch itself
        for group_index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                return
            for param_index, (p, param_id) in enumerate(zip(group["params"], saved["params"])):
                entry = state_dict["state"].get(param_id, {})
                where = f"state_dict['state'][{param_id}]"
                label = _param_label(group_index, param_index, group)
                if not isinstance(entry, dict):
                    raise TypeError(
                        f"{where} (for {label}) must be a dict of state entries, got {type(entry).__name__}")
                missing = [key for key in self._REQUIRED_STATE if entry.get(key) is None]
                if entry and missing:
                    raise ValueError(f"{where} (for {label}) has no {', '.join(map(repr, missing))}: a "
                                     f"{type(self).__name__} state needs {', '.join(map(repr, self._REQUIRED_STATE))}")
                for key in self._STATE_TENSORS:
                    value = entry.get(key)
                    if value is None:
                        continue
                    if not torch.is_tensor(value) or not value.is_floating_point():
                        raise TypeError(f"{where}[{key!r}] must be a floating-point tensor (for {label}), got "
                                        f"{type(value).__name__ if not torch.is_tensor(value) else value.dtype}")
                    if value.shape != p.shape:
                        raise ValueError(
                            f"{where}[{key!r}] has shape {tuple(value.shape)}, but {label} has shape {tuple(p.shape)}"
                        )
                if "step" in entry:
                    _check_number("['step']", entry["step"], where)

    # -- the step ------------------------------------------------------------------------------

    def _params_to_step(self):
        """Every (group, params with grads) after checking them all: raises before any change.

        What cannot change unseen is checked at every step (grads, dtypes, backends); what rarely
        changes is checked again whenever it did: a group's hyperparameters or parameter list, and a
        parameter's shape, layout, dtype, device or memory, or its state tensors (a load, a hand
        edit). A state in another memory layout than its parameter (``model.to(memory_format=
        torch.channels_last)`` after some steps) is copied into the parameter's layout, once every
        check has passed."""
        env = os.environ.get(ENV_VAR)
        revalidated = self._check_groups()
        changed = bool(revalidated)
        work, relayouts, rechecked = [], [], []
        for group_index, group in enumerate(self.param_groups):
            params = []
            for param_index, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse or g.dtype != p.dtype or g.device != p.device or g.shape != p.shape:
                    _raise_bad_grad(p, _param_label(group_index, param_index, group), type(self).__name__)
                shard = local(p)  # (looked up once: the host work per tensor is the step's cost on small ones)
                if shard is not p or is_dtensor(g):
                    label = _param_label(group_index, param_index, group)
                    check_grad(p, label)
                    sharding_of(p, label)  # raises for a placement the step cannot handle
                name = self._check_param(p, env, group_index, param_index, group, shard)
                state = self.state.get(p)
                known = self._checked_params.get(p)
                if known is None or known[0] != self._param_key(p, shard, name, state)[0]:
                    changed = True
                    if state:
                        label = _param_label(group_index, param_index, group)
                        relayouts += [(p, state, k) for k in self._state_relayouts(p, state, name, label)]
                    rechecked.append((p, shard, name))
                params.append((p, name, (group_index, param_index), shard))
            if params:
                work.append((group, params))
        if changed:
            _check_distinct(self.param_groups, self.state, self._STATE_KEYS)
        for p, state, k in relayouts:
            state[k] = _in_layout_of(p, state[k])
        # Remembered only now that every check has passed: a refused step is checked again in full.
        for group, key in revalidated:
            self._checked_groups[id(group)] = (group, key)
        for p, shard, name in rechecked:
            self._checked_params[p] = self._param_key(p, shard, name, self.state.get(p))
        return work

    def _param_key(self, p: torch.Tensor, shard: torch.Tensor, name: str, state) -> tuple:
        """What a parameter's last check depends on: its backend, shape, strides, dtype, device and
        address, and which objects its state entries are (by id); with those objects, kept so that
        their ids cannot be reused while the key is."""
        objects = tuple(map(state.get, self._STATE_KEYS)) if state else ()
        key = (name, shard.shape, shard.stride(), shard.dtype, shard.device, shard.data_ptr(), *map(id, objects))
        if shard is not p:
            key += (p.shape, tuple(p.placements), p.device_mesh)
        return key, objects

    def _check_groups(self) -> list:
        """Validates, as the constructor does, every group whose hyperparameters or parameter list
        changed since it was last validated (set by hand, by a scheduler or by a load); returns
        those groups with their keys, to be remembered once the whole step has been checked."""
        revalidated = []
        for group_index, group in enumerate(self.param_groups):
            if not isinstance(group.get("params"), list):
                raise ValueError(f"param_groups[{group_index}] must hold its parameters as a list under 'params', "
                                 f"got {type(group.get('params')).__name__}")
            key = _group_key(group)
            known = self._checked_groups.get(id(group))
            if known is None or known[0] is not group or known[1] != key:
                self._validate_group(group, f"param_groups[{group_index}]: ")
                for param_index, p in enumerate(group["params"]):
                    if not isinstance(p, torch.Tensor):
                        raise TypeError(f"{_param_label(group_index, param_index, group)} is a {type(p).__name__}, "
                                        "not a tensor")
                revalidated.append((group, key))
        return revalidated

    def _state_relayouts(self, p: torch.Tensor, state: dict, backend_name: str, label: str) -> list:
        """The state entries to copy into p's memory layout; raises unless the state fits p: its
        shape and device, and for the multi-tensor kernels (which index p and its state alike) fp32."""
        relayouts = []
        fits = all(key in state for key in self._REQUIRED_STATE)
        if "step" in self._REQUIRED_STATE and "step" in state:
            # A one-element float tensor, on the CPU or on the parameter's device (capturable).
            step = state["step"]
            fits = fits and torch.is_tensor(step) and step.numel() == 1 and step.is_floating_point() and (
                step.device.type == "cpu" or step.device == p.device)
        for key in self._STATE_TENSORS:
            t = state.get(key)
            if t is None and key not in self._REQUIRED_STATE:
                continue
            if not torch.is_tensor(t) or t.shape != p.shape or t.device != p.device or not _sharded_alike(t, p):
                fits = False
            elif backend_name != "torch" and t.dtype != STATE_DTYPE:
                fits = False
            elif local(t).stride() != local(p).stride() and is_dense(local(p)):
                relayouts.append(key)
        if not fits:
            self._raise_bad_state(p, state, label)
        return relayouts

    def _raise_bad_state(self, p: torch.Tensor, state: dict, label: str):
        details = ", ".join(
            f"{key}: {tuple(t.shape)} {t.dtype} on {t.device}, strides {t.stride()}" if torch.is_tensor(t)
            else f"{key}: {t!r}" if key in state else f"{key}: missing"
            for key, t in ((key, state.get(key)) for key in (*self._STATE_TENSORS, "step"))
            if key in state or key in self._REQUIRED_STATE
        )
        raise ValueError(
            f"the optimizer state of {label} ({tuple(p.shape)} {p.dtype} on {p.device}, strides "
            f"{p.stride()}) does not fit it: {details}. Was the parameter replaced after its state was "
            "created? Load a state dict that matches it, or delete optimizer.state[param] to start afresh"
        )

    def _segment_for(self, p: torch.Tensor, name: str, position: tuple, shard: torch.Tensor, segments_of_group: dict,
                     buckets: dict, make_segment):
        """The segment of p's group in p's (device, dtype, backend) bucket, created by
        `make_segment()` on first use; p's grad, sharding and position (group, index: the same on
        every rank, whatever the buckets) are appended to it (the caller appends the weights)."""
        key = (p.device, p.dtype, name)
        seg = segments_of_group.get(key)
        if seg is None:
            seg = segments_of_group[key] = make_segment()
            buckets.setdefault(key, []).append(seg)
        seg.grads.append(self._grad_for(p, shard, name))
        seg.shardings.append(None if shard is p else sharding_of(p, ""))
        seg.positions.append(position)
        return seg

    @staticmethod
    def _grad_for(p: torch.Tensor, shard: torch.Tensor, backend_name: str) -> torch.Tensor:
        # Multi-tensor kernels index p, g, m and v alike; a grad laid out unlike its parameter is
        # copied into the parameter's layout (reading the user's grad, never writing it).
        g = p.grad if shard is p else p.grad._local_tensor
        if backend_name != "torch" and g.stride() != shard.stride() and g.numel() > 1:
            return torch.empty_like(shard).copy_(g)
        return g

    def _backend(self, key):
        backend = self._backends.get(key)
        if backend is None:
            backend = self._backends[key] = create_backend(key[2])
        return backend


class FusedLAMB(_MultiTensorOptimizer):
    """LAMB (You et al., 2019) with the signature, defaults and math of apex's FusedLAMB.

    Differences from apex: grads are read, never overwritten; the kernels run on CPU and CUDA with
    no compilation at install; bf16 parameters; per-group overrides of every hyperparameter, including
    ``max_grad_norm``, ``adam_w_mode``, ``use_nvlamb`` and ``layer_adaptation`` (bool: force the
    trust ratio on or off for a group); optional ``trust_ratio_bounds=(lo, hi)``; per-parameter step
    counts in ``state[p]["step"]``. ``load_state_dict`` also accepts a state dict saved by apex.

    Mixed precision: float32, bfloat16 and float16 parameters, fp32 arithmetic and fp32 states.
    ``master_weights=True`` keeps an fp32 copy of each low-precision parameter in its state
    (``master_param``, saved in ``state_dict``); the step updates it, and writes the parameter from
    it in the same pass. ``scaler.step(opt)`` with a ``torch.amp.GradScaler`` hands the step the
    scale and ``found_inf``: grads are unscaled in the kernels, and a non-finite grad skips the whole
    step on the device. ``lr`` may be a tensor; ``capturable=True`` keeps step counts on the
    parameters' device, so ``step()`` can be captured in a CUDA graph.

    ``backend``: "auto" (the fastest available per device, or ``$LAMB_KERNELS_BACKEND``), "triton",
    "cpp" or "torch"; see ``lamb_kernels.available_backends``.
    """

    _STATE_TENSORS = ("exp_avg", "exp_avg_sq", "master_param")
    _STATE_KEYS = (*_STATE_TENSORS, "step")
    _REQUIRED_STATE = ("step", "exp_avg", "exp_avg_sq")
    _validate_group = staticmethod(_validate_lamb_group)

    def __init__(
        self,
        params,
        lr=1e-3,
        bias_correction=True,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=0.01,
        amsgrad=False,
        adam_w_mode=True,
        grad_averaging=True,
        set_grad_none=True,
        max_grad_norm=1.0,
        use_nvlamb=False,
        *,
        trust_ratio_bounds=None,
        master_weights=False,
        capturable=False,
        backend="auto",
    ):
        if amsgrad:
            raise ValueError("amsgrad=True: FusedLAMB does not support the AMSGrad variant (nor does apex)")
        defaults = dict(
            lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
            grad_averaging=grad_averaging, max_grad_norm=max_grad_norm, adam_w_mode=adam_w_mode,
            use_nvlamb=use_nvlamb, trust_ratio_bounds=trust_ratio_bounds, capturable=bool(capturable),
        )
        self.set_grad_none = set_grad_none
        super().__init__(params, defaults, backend, master_weights)

    @staticmethod
    def _new_step_count(p: torch.Tensor, group: dict) -> torch.Tensor:
        return _new_step_count(p, group)

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        super().zero_grad(set_to_none=self.set_grad_none if set_to_none is None else set_to_none)

    def load_state_dict(self, state_dict: dict) -> None:
        """Also accepts apex FusedLAMB's format, whose step count is a per-group int."""
        super().load_state_dict(_state_dict_from_apex(state_dict))

    def __getstate__(self):
        state = super().__getstate__()
        state["set_grad_none"] = self.set_grad_none
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("set_grad_none", True)

    def _bucket_segments(self, work, found_inf) -> dict:
        """Initialise state, advance step counts, and split into (device, dtype, backend) buckets."""
        buckets = {}
        for group, params in work:
            states = [self.state[p] for p, *_ in params]
            for (p, *_), state in zip(params, states):
                if not state:
                    state["step"] = self._new_step_count(p, group)
                    state["exp_avg"] = torch.zeros_like(p, dtype=STATE_DTYPE, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=STATE_DTYPE, memory_format=torch.preserve_format)
                _move_step_count_for(found_inf, p, state)
            steps = [state["step"] for state in states]
            _advance_step_counts(steps, found_inf)
            on_host = not group.get("capturable") and all(t.device.type == "cpu" for t in steps)
            beta1, beta2 = (float(b) for b in group["betas"])
            wd = float(group["weight_decay"])
            adaptation = group.get("layer_adaptation")
            if adaptation is None:
                adaptation = bool(group["use_nvlamb"]) or wd != 0
            bounds = group.get("trust_ratio_bounds") or (0.0, math.inf)

            def make_segment():
                return LambSegment(
                    params=[], grads=[], exp_avgs=[], exp_avg_sqs=[], bias_correction1=[],
                    bias_correction2=[], lr=_lr_of(group), beta1=beta1, beta2=beta2,
                    beta3=1.0 - beta1 if group["grad_averaging"] else 1.0, eps=float(group["eps"]),
                    weight_decay=wd, adam_w_mode=bool(group["adam_w_mode"]),
                    layer_adaptation=bool(adaptation), max_grad_norm=_clip_threshold(group["max_grad_norm"]),
                    trust_ratio_bounds=(float(bounds[0]), float(bounds[1])),
                )

            segments_of_group = {}
            step_counts = {}  # segment -> its step count tensors, for bias corrections on the device
            counts = torch.stack(steps).tolist() if on_host and group["bias_correction"] else [None] * len(steps)
            for (p, name, position, shard), state, step, t in zip(params, states, steps, counts):
                seg = self._segment_for(p, name, position, shard, segments_of_group, buckets, make_segment)
                seg.params.append(self._weights(p, shard, state, seg))
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                seg.exp_avgs.append(exp_avg if shard is p else exp_avg._local_tensor)
                seg.exp_avg_sqs.append(exp_avg_sq if shard is p else exp_avg_sq._local_tensor)
                if not group["bias_correction"]:
                    seg.bias_correction1.append(1.0)
                    seg.bias_correction2.append(1.0)
                elif on_host:  # (t is 0 only when a GradScaler skipped a first step: nothing reads it)
                    seg.bias_correction1.append(1.0 - beta1 ** max(t, 1.0))
                    seg.bias_correction2.append(1.0 - beta2 ** max(t, 1.0))
                else:
                    step_counts.setdefault(id(seg), (seg, []))[1].append(step)
            for seg, seg_steps in step_counts.values():
                # In float64 on the step counts' device, then rounded once, as the host path rounds.
                t = torch.stack(seg_steps).to(torch.float64).clamp(min=1.0)
                seg.bias_correction1 = (1.0 - torch.pow(beta1, t)).to(torch.float32)
                seg.bias_correction2 = (1.0 - torch.pow(beta2, t)).to(torch.float32)
        return buckets

    def _prepare(self, backend, segments):
        return backend.prepare_lamb(segments)

    def _run_plans(self, plans, grad_scale, found_inf) -> None:
        lamb_step(plans, grad_scale, found_inf)

def lamb_step(plans, grad_scale, found_inf) -> None:
    """One LAMB step on every bucket: the only place the order of its stages lives (docs/design.md
    section 2). `plans`: (backend, (device, dtype, backend name), plan) per bucket."""
    # 1. Global grad norm over every parameter with a grad, in all groups; skipped when no group
    # clips. Bucket sums are added in a fixed order, so reruns give the same bits. Under a
    # GradScaler these are sums over the scaled grads: the kernels divide the norm by the scale.
    # Sharded tensors' sums are summed over their ranks first (lamb_kernels/distributed.py).
    shardings = _shardings(plans)
    grad_sumsq = None
    if any(plan_clips(plan) for _, _, plan in plans):
        per_tensor = [backend.grad_sums_of_squares(plan) for backend, _, plan in plans]
        if shardings:
            all_reduce_sharded_(per_tensor, *shardings)
        sums = [sums.sum() for sums in per_tensor]
        grad_sumsq = sums[0]
        for partial in sums[1:]:
            grad_sumsq = grad_sumsq + partial.to(grad_sumsq.device)

    # 2-5 on every bucket, then the per-tensor ||p||^2, ||u||^2 of sharded tensors summed over
    # their ranks, then 6-7.
    norms, founds = [], []
    for backend, (device, _, _), plan in plans:
        scale, found = _on(grad_scale, device), _on(found_inf, device)
        norms.append(backend.lamb_moments_(plan, None if grad_sumsq is None else grad_sumsq.to(device), scale, found))
        founds.append(found)
    if shardings:
        all_reduce_sharded_(norms, *shardings)
    for (backend, _, plan), bucket_norms, found in zip(plans, norms, founds):
        backend.lamb_apply_(plan, bucket_norms, found)


def _shardings(plans, adaptive_only: bool = False) -> tuple:
    """(per bucket, per tensor, its Sharding or None; per bucket, per tensor, its position), or ()
    when no tensor is sharded. With `adaptive_only` (LARS), tensors whose group does not adapt get
    None: their norms are not read, and which bucket computes norms may differ between ranks."""
    shardings = [[s if not adaptive_only or seg.adaptation else None for seg in plan.segments for s in seg.shardings]
                 for _, _, plan in plans]
    if not any(s is not None for bucket in shardings for s in bucket):
        return ()
    return shardings, [flat(plan.segments, "positions") for _, _, plan in plans]


def plan_clips(plan) -> bool:
    """Whether any group in a LAMB plan clips (every backend's plan keeps its segments)."""
    return any(seg.max_grad_norm > 0 for seg in plan.segments)


def _on(t, device):
    return None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(1)


def _check_scaler_tensor(name: str, t) -> None:
    if t is not None and (not torch.is_tensor(t) or t.numel() != 1 or not t.is_floating_point()):
        raise TypeError(f"optimizer.{name} must be a one-element floating-point tensor (set by GradScaler), got {t!r}")


def _lr_of(group: dict):
    """The group's lr: a float, or the one-element tensor itself as a 0-d view (read on the device
    by the kernels, so a value a scheduler writes in place is the one used)."""
    lr = group["lr"]
    return lr.reshape(()) if torch.is_tensor(lr) else float(lr)


def _new_step_count(p: torch.Tensor, group: dict) -> torch.Tensor:
    # On the CPU, where reading it costs no sync; with capturable, on the parameter's device.
    return torch.zeros((), dtype=torch.float32, device=p.device if group.get("capturable") else "cpu")


def _move_step_count_for(found_inf, p: torch.Tensor, state: dict) -> None:
    """A GradScaler's found_inf on a device decides whether step counts advance: they move to the
    parameter's device (once), so that decision never waits on the host, as in torch's fused optimizers."""
    if found_inf is not None and found_inf.device.type != "cpu" and state["step"].device != p.device:
        state["step"] = state["step"].to(p.device)


def _advance_step_counts(steps: list, found_inf) -> None:
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
        return
    by_device = {}
    for t in steps:
        by_device.setdefault(t.device, []).append(t)
    for device, counts in by_device.items():
        # + 1, or + 0 when a grad was not finite: no host round trip.
        torch._foreach_add_(counts, 1.0 - (found_inf.to(device, torch.float32).reshape(()) != 0).float())


def _raise_bad_grad(p: torch.Tensor, label: str, optimizer: str):
    g = p.grad
    if g.is_sparse:
        raise RuntimeError(f"the grad of {label} is sparse; {optimizer} does not support sparse gradients")
    if g.dtype != p.dtype:
        raise TypeError(f"the grad of {label} has dtype {g.dtype}, the parameter {p.dtype}")
    if g.device != p.device:
        raise ValueError(f"the grad of {label} is on {g.device}, the parameter on {p.device}")
    raise ValueError(f"the grad of {label} has shape {tuple(g.shape)}, the parameter {tuple(p.shape)}")


def _state_dict_from_apex(state_dict: dict) -> dict:
    """apex keeps one int step per group (``param_groups[i]["step"]``); we keep one per parameter."""
    groups = state_dict["param_groups"]
    if not any("step" in group for group in groups):
        return state_dict
    state = {key: dict(value) for key, value in state_dict["state"].items()}
    converted_groups = []
    for group in groups:
        group = dict(group)
        step = group.pop("step", None)
        if step is not None:
            for param_id in group["params"]:
                if param_id in state:
                    state[param_id].setdefault("step", torch.tensor(float(step)))
        converted_groups.append(group)
    return {**state_dict, "state": state, "param_groups": converted_groups}


class FusedLARS(_MultiTensorOptimizer):
    """LARS (You et al., 2017) with the signature, defaults and math of timm's ``Lars``, apex's LARC
    clipping included (``trust_clip=True``).

    Per parameter: with weight decay (or ``always_adapt``), the trust ratio
    ``r = trust_coeff ||p|| / (||g|| + wd ||p|| + eps)`` (1 when a norm is 0; ``min(r / lr, 1)``
    with ``trust_clip``) scales ``g + wd p``; then SGD momentum (``dampening``, ``nesterov``) and
    ``p <- p - lr d``. A group may set ``layer_adaptation`` (bool) to force the trust ratio and
    decay on or off, as ``lamb_kernels.param_groups`` does for biases and norm weights. State:
    ``momentum_buffer`` when ``momentum != 0``, created on a parameter's first step as in
    ``torch.optim.SGD``; timm checkpoints load as they are. Grads are read, never written.
    ``foreach`` is accepted for compatibility with timm and has no effect: the step is always
    multi-tensor.

    Mixed precision: float32, bfloat16 and float16 parameters, fp32 arithmetic and fp32 states.
    ``master_weights=True`` keeps an fp32 copy of each low-precision parameter in its state
    (``master_param``, saved in ``state_dict``); the step updates it, and writes the parameter from
    it in the same pass. ``scaler.step(opt)`` with a ``torch.amp.GradScaler`` hands the step the
    scale and ``found_inf``: grads are unscaled in the kernels, and a non-finite grad skips the whole
    step on the device. ``lr`` may be a tensor; ``capturable=True`` keeps step counts on the
    parameters' device, so ``step()`` can be captured in a CUDA graph.

    ``backend``: "auto" (the fastest available per device, or ``$LAMB_KERNELS_BACKEND``), "triton",
    "cpp" or "torch"; see ``lamb_kernels.available_backends``.
    """

    _STATE_TENSORS = ("momentum_buffer", "master_param")
    _STATE_KEYS = _STATE_TENSORS
    _REQUIRED_STATE = ()
    _validate_group = staticmethod(_validate_lars_group)

    def __init__(
        self,
        params,
        lr=1.0,
        momentum=0.0,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
        trust_coeff=0.001,
        eps=1e-8,
        trust_clip=False,
        always_adapt=False,
        foreach=None,
        *,
        master_weights=False,
        capturable=False,
        backend="auto",
    ):
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, always_adapt=always_adapt,
            foreach=foreach, capturable=bool(capturable),
        )
        super().__init__(params, defaults, backend, master_weights)

    def _bucket_segments(self, work, found_inf) -> dict:
        """Create momentum buffers, and split into (device, dtype, backend) buckets."""
        buckets = {}
        for group, params in work:
            momentum = float(group["momentum"])
            wd = float(group["weight_decay"])
            adaptation = group.get("layer_adaptation")
            if adaptation is None:
                adaptation = wd != 0 or bool(group["always_adapt"])

            def make_segment():
                return LarsSegment(
                    params=[], grads=[], momentum_buffers=[], first_step=[], lr=_lr_of(group),
                    momentum=momentum, dampening=float(group["dampening"]), weight_decay=wd,
                    nesterov=bool(group["nesterov"]), trust_coeff=float(group["trust_coeff"]),
                    eps=float(group["eps"]), trust_clip=bool(group["trust_clip"]),
                    adaptation=bool(adaptation),
                )

            segments_of_group = {}
            for p, name, position, shard in params:
                state = self.state[p]
                buffer, first_step = None, False
                if momentum != 0:
                    buffer = state.get("momentum_buffer")
                    if buffer is None:  # filled with d by the first step, as torch's SGD does
                        # Under a GradScaler that first step may be skipped on the device: the
                        # buffer then starts from zeros, which momentum * 0 + d reads as d again
                        # (exactly when dampening is 0).
                        new = torch.empty_like if found_inf is None else torch.zeros_like
                        buffer = state["momentum_buffer"] = new(p, dtype=STATE_DTYPE, memory_format=torch.preserve_format)
                        first_step = True
                seg = self._segment_for(p, name, position, shard, segments_of_group, buckets, make_segment)
                seg.params.append(self._weights(p, shard, state, seg))
                seg.momentum_buffers.append(buffer if shard is p else local(buffer))
                seg.first_step.append(first_step)
        return buckets

    def _prepare(self, backend, segments):
        return backend.prepare_lars(segments)

    def _run_plans(self, plans, grad_scale, found_inf) -> None:
        lars_step(plans, grad_scale, found_inf)

def lars_step(plans, grad_scale, found_inf) -> None:
    """One LARS step on every bucket: the only place the order of its stages lives (docs/design.md
    section 3). `plans` as in lamb_step."""
    # Per-tensor ||p||^2, ||g||^2 of every bucket (none without adaptation in the bucket: no pass
    # over memory for norms), those of sharded tensors summed over their ranks, then the update.
    norms = [backend.lars_sums_of_squares(plan) if any(seg.adaptation for seg in plan.segments) else None
             for backend, _, plan in plans]
    shardings = _shardings(plans, adaptive_only=True)
    if shardings:
        reduced = [i for i, bucket_norms in enumerate(norms) if bucket_norms is not None]
        all_reduce_sharded_([norms[i] for i in reduced], *([part[i] for i in reduced] for part in shardings))
    for (backend, (device, _, _), plan), bucket_norms in zip(plans, norms):
        backend.lars_apply_(plan, bucket_norms, _on(grad_scale, device), _on(found_inf, device))


class FusedMixedPrecisionLamb(FusedLAMB):
    """A drop-in for apex's ``FusedMixedPrecisionLamb``: its signature and defaults, FusedLAMB's math.

    As in apex: parameters of ``reduced_precision_dtype`` get fp32 master weights (here in the state,
    saved by ``state_dict``), ``lr`` lives as a tensor on the parameters' device, step counts too
    (``capturable``), and the step takes a GradScaler's scale and ``found_inf`` without a host sync.
    ``step`` is the step count every parameter starts from. Unlike apex, the step count is kept per
    parameter, a group may mix dtypes, and every backend runs it (apex: CUDA only).
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        step=0,
        bias_correction=True,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=0.01,
        amsgrad=False,
        adam_w_mode=True,
        grad_averaging=True,
        max_grad_norm=1.0,
        use_nvlamb=False,
        reduced_precision_dtype=None,
        *,
        backend="auto",
    ):
        if reduced_precision_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                f"reduced_precision_dtype must be None, torch.bfloat16 or torch.float16, got {reduced_precision_dtype!r}"
            )
        _check_number("step", step, "")
        self.reduced_precision_dtype = reduced_precision_dtype
        self.initial_step = float(step)
        super().__init__(
            params, lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, adam_w_mode=adam_w_mode, grad_averaging=grad_averaging, max_grad_norm=max_grad_norm,
            use_nvlamb=use_nvlamb, master_weights=reduced_precision_dtype is not None, capturable=True,
            backend=backend,
        )
        for group in self.param_groups:
            if not torch.is_tensor(group["lr"]) and group["params"]:
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=group["params"][0].device)

    def _wants_master(self, p: torch.Tensor) -> bool:
        return self.reduced_precision_dtype is not None and p.dtype == self.reduced_precision_dtype

    def _new_step_count(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        return super()._new_step_count(p, group).fill_(self.initial_step)

    def __getstate__(self):
        state = super().__getstate__()
        state["reduced_precision_dtype"] = self.reduced_precision_dtype
        state["initial_step"] = self.initial_step
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("reduced_precision_dtype", None)
        self.__dict__.setdefault("initial_step", 0.0)
