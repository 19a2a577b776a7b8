"""What FusedLAMB and FusedLARS share: the step's outline, backend choice per bucket, the checks
before anything changes, and state dict loading. An optimizer module (lamb.py, lars.py) adds its
hyperparameters, its state, its segments and its algorithm's stage order.

A step, as `MultiTensorOptimizer._plan_step` runs it (host work, eager even under torch.compile):
1. `_params_to_step`: every group, parameter, grad and state checked; raises before any change;
2. `_init_state`: missing state entries created, step counts advanced;
3. `_bucket`: the parameters split into (device, dtype, backend) buckets of segments, one segment
   per param group in a bucket (backend_api.py);
4. the backend's ``prepare_*`` makes each bucket's Plan;
then `_run` (the optimizer's ``lamb_step`` or ``lars_step``) calls the backends' stages in order.
"""
from __future__ import annotations

import os
import warnings

import torch

from ..backend_api import concatenated, is_dense
from ..distributed import (check_grad, check_not_flat, distributed_like, is_dtensor, local, sharded_grads,
                           sharding_of)
from ..backends import ENV_VAR, check_backend_name, create_backend, resolve_backend
from .checks import (check_distinct, check_distinct_groups, check_flag, check_number, check_scaler_tensor,
                     check_storage, group_key, param_label, raise_bad_grad, same_items)
from ..quantization import dequantize, n_blocks
from .state_storage import CODES, FLOAT_STORAGE, INT8, STATE_DTYPE, convert, scales_fit, scales_key
from .plan_cache import (BucketCache, StepCache, device_of, layouts_function, python_layouts, state_lists,
                         tracked)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NO_STATE = {}  # the state a reused step reads for a parameter without any (never written)


def _sharded_alike(t, p) -> bool:
    """A state tensor of a DTensor parameter is a DTensor with its mesh and placements; of a plain
    parameter, a plain tensor."""
    if not is_dtensor(p):
        return not is_dtensor(t)
    return is_dtensor(t) and t.device_mesh == p.device_mesh and tuple(t.placements) == tuple(p.placements)


class MultiTensorOptimizer(torch.optim.Optimizer):
    """What FusedLAMB and FusedLARS share: backend choice per (device, dtype), validation of groups,
    parameters, grads and state before anything changes, and state dict loading."""

    _STATE_TENSORS = ()  # state entries shaped like their parameter
    _STATE_KEYS = ()  # the entries a step uses: those and the step count
    _REQUIRED_STATE = ()  # entries a non-empty state must have
    _SIGNED = {}  # state entries that may be 8-bit codes: key -> whether signed (their scales: key + "_scales")
    # GradScaler hands the step its scale and found_inf (as attributes, the way torch's fused
    # optimizers take them) instead of unscaling the grads and syncing on found_inf itself.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, backend: str, master_weights: bool = False):
        self._validate_group(defaults)
        check_flag("master_weights", master_weights, "")  # (as a group's switches are checked: "no" is no bool)
        self.backend = check_backend_name(backend)
        self.master_weights = bool(master_weights)
        self._reset_caches()
        super().__init__(params, defaults)
        self.state = tracked(self.state)

    def _reset_caches(self) -> None:
        """What the step remembers of its last checks, so that it checks again only what changed."""
        self._backends = {}  # (device, dtype, name, state dtype) -> backend object with its cached tables
        self._last_buckets = ()  # the bucket keys of the last step that stepped a parameter (`backends`)
        self._resolved = {}  # (device, $LAMB_KERNELS_BACKEND) -> backend name
        self._checked_params = {}  # id(param) -> (param, *_param_key(...)) at its last check
        self._checked_groups = {}  # id(group) -> (group, group_key(group), its params) last validated
        self._step_cache = None  # the last full step's plans, while they hold (plan_cache.py)
        self.reused_steps = 0  # steps that reused the plans of an earlier one (for tests and benchmarks)
        self._sharded_grads = None  # the sharded parameters of the step being planned (distributed.ShardedGrads)

    # -- what each optimizer defines -----------------------------------------------------------

    @staticmethod
    def _validate_group(group: dict, where: str = "") -> None:
        """Raise naming the hyperparameter of `group` that is out of range or of the wrong type."""
        raise NotImplementedError

    def _init_state(self, work: list, found_inf) -> list:
        """Create the missing state entries of the parameters about to step, and advance their step
        counts; returns, per group of `work` and per parameter, what `_bucket` needs of its state
        (its state dict; LARS: with whether its buffer is new)."""
        raise NotImplementedError

    def _bucket(self, work: list, states: list) -> dict:
        """The parameters about to step as segments, per (device, dtype, backend name) bucket."""
        raise NotImplementedError

    def _prepare(self, backend, segments):
        """The backend's Plan for one bucket (``backend.prepare_lamb`` or ``prepare_lars``)."""
        raise NotImplementedError

    def _hyper_segment(self, group: dict):
        """An empty segment with `group`'s hyperparameters (the template a reused step copies them from
        when a group's hyperparameters change)."""
        raise NotImplementedError

    def _settings(self) -> tuple:
        """The optimizer's own attributes a step's plans depend on (which parameters get masters)."""
        return self.backend, self.master_weights

    def _structure(self, group: dict) -> tuple:
        """What of a group's hyperparameters decides its state and segments' shape (not only their
        values): a change takes the full path."""
        return bool(group.get("capturable")), group.get("state_dtype", STATE_DTYPE)

    def _state_dtype(self, group: dict | None, key: str) -> torch.dtype:
        """The dtype the state entry `key` of a parameter of `group` is kept in."""
        return STATE_DTYPE

    def _reusable(self, states: list) -> bool:
        """Whether the plans of a step with these states (`_init_state`'s result) may be reused: not
        when this step created state (a first step differs from the next)."""
        raise NotImplementedError

    def _remember_step_counts(self, cache: StepCache) -> bool:
        """Prepares the step counts of a step whose plans are kept (LAMB packs them); False when
        they do not allow reuse."""
        return True

    def _advance_reused(self, cache: StepCache, found_inf) -> None:
        """The per-step values of a reused step (LAMB: step counts and bias corrections)."""

    def _sums_before_writes(self) -> int:
        """The sums of squares per sharded tensor that the step all-reduces before its first write,
        known from the groups' hyperparameters alone, so the same on every rank whatever the grads:
        the columns of a sharded step's first all-reduce (0: it carries the grads' presences alone)."""
        return 0

    @staticmethod
    def _run(plans: list, grad_scale, found_inf, sharded_grads=None) -> None:
        """The algorithm's stages on every bucket (``lamb_step`` or ``lars_step``); `sharded_grads`
        (a distributed.ShardedGrads, or None) makes their first all-reduce."""
        raise NotImplementedError

    # -- the step's outline ---------------------------------------------------------------------

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
            self._run(plans, grad_scale, found_inf, self._sharded_grads)
        return loss

    def _plan_step(self, grad_scale, found_inf) -> list:
        """Host-side bookkeeping, run eagerly even inside torch.compile: checks (raising before
        anything changes), state, step counts, and each bucket's Plan, as (backend, bucket key,
        plan). What follows (`_run`) is only the registered operators, which compile without a
        graph break."""
        check_scaler_tensor("grad_scale", grad_scale)
        check_scaler_tensor("found_inf", found_inf)
        if self._step_cache is not None:
            plans = self._reuse_plans(grad_scale, found_inf)
            if plans is not None:
                self.reused_steps += 1
                return plans
            self._step_cache = None
        # With sharded parameters, the step's first all-reduce checks that every rank has a grad for
        # the same ones, and on a mismatch undoes what this planning changes (distributed.ShardedGrads).
        self._sharded_grads = sharded = sharded_grads(self.param_groups, self.state, self._sums_before_writes(),
                                                      param_label)
        work = self._params_to_step()
        if not work:
            if sharded is not None:
                sharded.all_reduce_([])  # the one other ranks make, which must learn that this rank has no grad
            return []
        states = self._init_state(work, found_inf)
        buckets = self._bucket(work, states)
        plans = []
        for key, segments in buckets.items():
            backend = self._backend(key)
            plans.append((backend, key, self._prepare(backend, segments)))
        self._last_buckets = tuple(buckets)  # (a reused step runs these buckets again)
        # (Not with sharded parameters: a rank without their grads would skip that all-reduce.)
        if sharded is None and self._reusable(states):
            self._step_cache = self._remember(work, plans, grad_scale, found_inf)
        return plans

    # -- a steady loop's host path (plan_cache.py) ----------------------------------------------

    def _remember(self, work: list, plans: list, grad_scale, found_inf) -> StepCache | None:
        """The cache of a step that passed every check, or None when its plans cannot be reused: a
        sharded parameter, a grad copied into its parameter's layout, a CUDA graph being captured."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return None
        if any(torch.is_tensor(value) and value.device.type != "cpu" and key != "lr"
               for group in self.param_groups for key, value in group.items()):
            return None  # (read by every full step; a group's key compares such tensors by identity)
        stepped = [item for _, params in work for item in params]
        if any(shard is not p or p.grad is None for p, _, _, shard, _ in stepped):
            return None
        segments = [seg for _, _, plan in plans for seg in plan.segments]
        if sum(len(seg.grads) for seg in segments) != len(stepped):
            return None
        grad_at = {position: g for seg in segments for position, g in zip(seg.positions, seg.grads)}
        if any(grad_at[position] is not p.grad for p, _, position, _, _ in stepped):
            return None  # a grad was copied into its parameter's layout
        self.state = tracked(self.state)
        states = [self.state.get(p, _NO_STATE) for p, _, _, _, _ in stepped]
        cache = StepCache(
            state=self.state, version=self.state.version, env=os.environ.get(ENV_VAR), settings=self._settings(),
            scaler=(device_of(grad_scale), device_of(found_inf)),
            groups=[(group, group["params"], self._structure(group)) for group in self.param_groups],
            params=[p for group in self.param_groups for p in group["params"]],
            # On a GPU the host path is what a step may wait for: the C++ library is built for it.
            states=states, layouts=layouts_function(build=any(key[0].type == "cuda" for _, key, _ in plans)),
        )
        # Where each bucket's grads are in cache.params, and each segment's rows in its bucket.
        position = {(gi, pi): i for i, (gi, pi) in enumerate(
            (gi, pi) for gi, group in enumerate(self.param_groups) for pi in range(len(group["params"])))}
        state_at = {position: state for (_, _, position, _, _), state in zip(stepped, states)}
        for backend, key, plan in plans:
            index = [position[pos] for seg in plan.segments for pos in seg.positions]
            rows, first = [], 0
            for seg in plan.segments:
                rows.append((seg, seg.positions[0][0], first, first + len(seg.grads)))
                first += len(seg.grads)
            cache.buckets.append(BucketCache(
                backend, key, plan, None if index == list(range(len(cache.params))) else index, rows,
                [state_at[pos] for seg in plan.segments for pos in seg.positions]))
        if not self._remember_step_counts(cache):
            return None
        cache.signature = self._signature(cache, [p.grad for p in cache.params])
        return cache if cache.signature is not None else None

    def _signature(self, cache: StepCache, grads: list) -> tuple | None:
        """The layouts of the parameters, their state entries and grads; None when one of them is
        neither a tensor nor None (a state entry set by hand: the full path judges it)."""
        layouts = cache.layouts
        try:
            return (layouts(cache.params, True), *(layouts(entries, True) for entries in
                                                   state_lists(cache.states, self._STATE_KEYS)), layouts(grads, False))
        except TypeError:
            return None

    def _reuse_plans(self, grad_scale, found_inf) -> list | None:
        """The cached plans, with this step's grads and per-step values, when every check of a full
        step would pass on what they hold; else None (the full path then runs, and raises where a
        check fails). Raises only what the full path would: a group's new hyperparameter refused."""
        cache = self._step_cache
        if (self.state is not cache.state or self.state.version != cache.version
                or os.environ.get(ENV_VAR) != cache.env or self._settings() != cache.settings
                or (device_of(grad_scale), device_of(found_inf)) != cache.scaler
                or len(self.param_groups) != len(cache.groups)):
            return None
        revalidated = self._check_groups()  # raises for a refused hyperparameter, as the full path
        changed = set()
        for group, _, params in revalidated:
            index = next((i for i, known in enumerate(cache.groups) if known[0] is group), None)
            if index is None or params is not None or self._structure(group) != cache.groups[index][2]:
                return None  # another group or parameter list: planned afresh
            changed.add(index)
        if any(group is not known or group["params"] is not params
               for group, (known, params, _) in zip(self.param_groups, cache.groups)):
            return None
        grads = [p.grad for p in cache.params]
        if self._signature(cache, grads) != cache.signature:
            return None
        for group, key, _ in revalidated:
            self._checked_groups[id(group)] = (group, key, tuple(group["params"]))
        for bucket in cache.buckets:
            bucket_grads = grads if bucket.grad_index is None else [grads[i] for i in bucket.grad_index]
            for seg, group_index, first, end in bucket.segments:
                seg.grads = bucket_grads[first:end] if len(bucket.segments) > 1 else bucket_grads
                group = self.param_groups[group_index]
                if group_index in changed:
                    _copy_hyperparameters(self._hyper_segment(group), seg)
                elif torch.is_tensor(group["lr"]):
                    seg.lr = lr_of(group)  # (a view of it as it is now: ``lr.data = ...`` moves it)
            bucket.plan.grads = bucket_grads
        self._advance_reused(cache, found_inf)
        for bucket in cache.buckets:
            bucket.backend.refresh(bucket.plan, hyper_changed=bool(changed))
        return cache.plans()

    # -- what the optimizers' segments share ----------------------------------------------------

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
        seg.low_precision_params.append(shard)
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
            check_distinct([*self.param_groups, param_group])  # names the parameter
            raise
        group = self.param_groups[-1]
        env = os.environ.get(ENV_VAR)
        try:
            for param_index, p in enumerate(group["params"]):
                self._check_param(p, env, group_index, param_index, group)
                label = param_label(group_index, param_index, group)
                check_not_flat(p, label)
                if is_dtensor(p):
                    sharding_of(p, label)
            check_distinct(self.param_groups)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        self._checked_groups[id(group)] = (group, group_key(group), tuple(group["params"]))
        self._step_cache = None

    def _check_param(self, p: torch.Tensor, env, group_index: int, param_index: int, group: dict, shard=None) -> str:
        """Checks a parameter on its own; returns the backend name that will step it. `env` is the
        value of $LAMB_KERNELS_BACKEND, read once per step."""
        name = self._resolved.get((p.device, env))
        if name is None:
            name = self._resolved[(p.device, env)] = resolve_backend(self.backend, p.device)
        check_storage(p, param_label(group_index, param_index, group))
        if p.dtype in SUPPORTED_DTYPES and (name == "torch" or is_dense(local(p) if shard is None else shard)):
            return name
        if p.dtype in SUPPORTED_DTYPES and self.backend == "auto" and not env:
            return "torch"  # an automatic choice takes the backend that handles any layout
        label = param_label(group_index, param_index, group)
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
        # torch.optim adds 'differentiable' to the defaults of every optimizer it loads or unpickles,
        # for its own optimizers' step; ours has no such switch, and a group filled from it would
        # make state_dict() after a load differ from the dict loaded.
        self.defaults.pop("differentiable", None)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("master_weights", False)
        self._reset_caches()
        self.state = tracked(self.state)
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
        contiguous model may resume a channels_last one), states are in their group's state dtype
        (fp32 unless ``state_dtype`` says otherwise) whatever the parameter
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
        configured = [group.get("state_dtype") for group in self.param_groups]
        for param_id, saved in state_dict["state"].items():
            if param_id not in targets:
                placed[param_id] = saved
                continue
            p, saved_group = targets[param_id]
            capturable = saved_group.get("capturable", self.defaults.get("capturable"))
            group = self.param_groups[next(i for i, g in enumerate(saved_groups) if g is saved_group)]
            placed[p] = self._placed_state(p, saved, capturable, group)
        super().load_state_dict({**state_dict, "state": {}})
        # The states' dtypes are this optimizer's, whatever the checkpoint's (its states are converted).
        for group, state_dtype in zip(self.param_groups, configured):
            if state_dtype is not None:
                group["state_dtype"] = state_dtype
        self._fill_defaults()
        self.state = tracked(self.state)
        self.state.update(placed)
        self._checked_params.clear()  # holds the replaced state tensors otherwise
        self._checked_groups.clear()
        self._step_cache = None

    def _placed_state(self, p: torch.Tensor, saved: dict, capturable, group: dict | None = None) -> dict:
        """A saved state as this optimizer keeps it (see `_loaded_value`), its step count an fp32
        tensor on the CPU (on the parameter's device when capturable), its param-shaped tensors in
        the parameter's memory layout."""
        if is_dtensor(p):  # a full state dict's 8-bit codes: decoded whole (blocks do not follow shards)
            saved = dict(saved)
            for key in self._SIGNED:
                codes, scales = saved.get(key), saved.get(scales_key(key))
                if (torch.is_tensor(codes) and not is_dtensor(codes) and codes.dtype in CODES
                        and torch.is_tensor(scales)):
                    saved[key] = dequantize(codes, scales.float())
                    del saved[scales_key(key)]
        state = {key: self._loaded_value(p, key, value, group) for key, value in saved.items()}
        if "step" in state:
            device = p.device if capturable else "cpu"
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device=device)
        for key in self._STATE_TENSORS:
            t = state.get(key)
            if not torch.is_tensor(t):
                continue
            expected = self._state_dtype(group, key)
            if expected in CODES and is_dtensor(p):
                continue  # (8-bit states of sharded parameters: the step refuses them, by name)
            if t.dtype != expected or local(t).stride() != local(p).stride():
                convert(p, state, key, expected)
            elif expected not in CODES:
                state.pop(scales_key(key), None)  # (scales of codes this state no longer is)
        return state

    def _loaded_value(self, p: torch.Tensor, key, value, group: dict | None = None):
        """A saved state entry as this optimizer keeps it: its own param-shaped entries on the
        parameter's device in their dtype (`_state_dtype`: fp32, or the group's ``state_dtype``); any
        other tensor as torch.optim places it (the parameter's device, and its dtype when both are
        floating point); anything else as it is."""
        if not torch.is_tensor(value) or key == "step":
            return value
        if key in self._STATE_TENSORS:  # (converted to the group's storage by `_placed_state`)
            value = value.to(device=p.device, copy=True)
            # A full state dict's entry for a sharded parameter: each rank keeps its own part.
            return distributed_like(p, value) if is_dtensor(p) and not is_dtensor(value) else value
        if key in map(scales_key, self._SIGNED):  # 8-bit codes' block scales: float32, on the device
            return value.to(device=p.device, copy=True)
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
                label = param_label(group_index, param_index, group)
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
                    self._check_state_entry(key, value, entry, f"{where}[{key!r}] (for {label})", placed=False)
                    if value.shape != p.shape:
                        raise ValueError(
                            f"{where}[{key!r}] has shape {tuple(value.shape)}, but {label} has shape {tuple(p.shape)}"
                        )
                if "step" in entry:
                    check_number("['step']", entry["step"], where, integral_tensor=True)

    # -- the step ------------------------------------------------------------------------------

    def _params_to_step(self):
        """Every (group, params with grads) after checking them all: raises before any change. A
        parameter comes as (p, backend name, (group, index), its local shard, its state or None).

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
                    raise_bad_grad(p, param_label(group_index, param_index, group), type(self).__name__)
                shard = local(p)  # (looked up once: the host work per tensor is the step's cost on small ones)
                if shard is not p or is_dtensor(g):
                    label = param_label(group_index, param_index, group)
                    if group.get("state_dtype") == INT8:
                        raise NotImplementedError(
                            f"{label} is sharded (a DTensor): state_dtype='int8' (8-bit blockwise states) is not "
                            "supported for sharded parameters yet; use torch.bfloat16 or torch.float32 for its group")
                    check_grad(p, label)
                    sharding_of(p, label)  # raises for a placement the step cannot handle
                state = self.state.get(p)
                known = self._checked_params.get(id(p))  # (by id: a tensor's hash is a Python call)
                name = self._resolved.get((p.device, env))
                # Checked before with this backend, shape, layout, dtype, address and state: the
                # checks of _check_param passed then and would pass again.
                if name is None or not self._still_checked(known, p, shard, name, state, group):
                    name = self._check_param(p, env, group_index, param_index, group, shard)
                    if not self._still_checked(known, p, shard, name, state, group):
                        changed = True
                        if state:
                            label = param_label(group_index, param_index, group)
                            relayouts += [(p, state, k, dtype)
                                          for k, dtype in self._state_relayouts(p, state, name, label, group)]
                        rechecked.append((p, shard, name, group))
                params.append((p, name, (group_index, param_index), shard, state))
            if params:
                work.append((group, params))
        if changed:
            check_distinct(self.param_groups, self.state, self._STATE_KEYS)
        for p, state, k, dtype in relayouts:
            convert(p, state, k, dtype)
        # Remembered only now that every check has passed: a refused step is checked again in full.
        for group, key, _ in revalidated:
            self._checked_groups[id(group)] = (group, key, tuple(group["params"]))
        for p, shard, name, group in rechecked:
            self._checked_params[id(p)] = (p, *self._param_key(p, shard, name, self.state.get(p), group))
        return work

    def _still_checked(self, known, p: torch.Tensor, shard: torch.Tensor, name: str, state, group) -> bool:
        """Whether `known` (p's entry in _checked_params, or None) is of p as it is now."""
        return known is not None and known[0] is p and known[1] == self._param_key(p, shard, name, state, group)[0]

    def _param_key(self, p: torch.Tensor, shard: torch.Tensor, name: str, state, group) -> tuple:
        """What a parameter's last check depends on: its backend, shape, strides, dtype, device and
        address, and which objects its state entries are (by id) with, for tensors, their layouts and
        addresses (an entry aliased in place, ``t.set_(other)``, is checked again); with those
        objects, kept so that their ids cannot be reused while the key is."""
        objects = tuple(map(state.get, self._STATE_KEYS)) if state else ()
        key = (name, shard.shape, shard.stride(), shard.dtype, shard.device, shard.data_ptr(), *map(id, objects),
               group.get("state_dtype"),
               *(python_layouts([t], True) if torch.is_tensor(t) else None for t in objects))
        if shard is not p:
            key += (p.shape, tuple(p.placements), p.device_mesh)
        return key, objects

    def _check_groups(self) -> list:
        """Validates, as the constructor does, every group whose hyperparameters or parameter list
        changed since it was last validated (set by hand, by a scheduler or by a load); returns
        those groups as (group, key, None when only its hyperparameters changed, else True), to be
        remembered once the whole step has been checked."""
        check_distinct_groups(self.param_groups)
        revalidated = []
        for group_index, group in enumerate(self.param_groups):
            if not isinstance(group.get("params"), list):
                raise ValueError(f"param_groups[{group_index}] must hold its parameters as a list under 'params', "
                                 f"got {type(group.get('params')).__name__}")
            key = group_key(group)
            known = self._checked_groups.get(id(group))
            same_params = known is not None and known[0] is group and same_items(group["params"], known[2])
            if not same_params or known[1] != key:
                self._validate_group(group, f"param_groups[{group_index}]: ")
                for param_index, p in enumerate(group["params"]):
                    if not isinstance(p, torch.Tensor):
                        raise TypeError(f"{param_label(group_index, param_index, group)} is a {type(p).__name__}, "
                                        "not a tensor")
                revalidated.append((group, key, None if same_params else True))
        return revalidated

    def _check_state_entry(self, key: str, value, entry: dict, what: str, placed: bool) -> None:
        """One param-shaped state entry, as a load checks a saved one (`placed` False) and a step one
        set by hand (`placed`: its scales also contiguous on the codes' device): a floating-point
        tensor or, for a state that may be 8-bit, codes of its signedness with float32 block scales of
        their size, dense in memory (a block is a run of 256 elements in memory order: a view with
        gaps has none), each with the storage its shape needs. `what` names the entry and its parameter."""
        codes = key in self._SIGNED and torch.is_tensor(value) and value.dtype in CODES
        if not torch.is_tensor(value) or not (value.is_floating_point() or codes):
            raise TypeError(f"{what} must be a floating-point tensor (or 8-bit codes), got "
                            f"{type(value).__name__ if not torch.is_tensor(value) else value.dtype}")
        check_storage(value, what)
        if not codes:
            return
        if (value.dtype == torch.int8) != self._SIGNED[key]:
            raise TypeError(f"{what} must hold {'int8' if self._SIGNED[key] else 'uint8'} codes, got {value.dtype}")
        if not is_dense(local(value)):
            raise ValueError(f"{what} holds 8-bit codes as a view with gaps (strides {local(value).stride()}): "
                             "their blocks are runs of 256 elements in memory order, so codes must be dense in "
                             "memory; set a dense copy (with its scales) or the float values")
        scales = entry.get(scales_key(key))
        if not scales_fit(value, scales, placed=placed):
            shown = f"{tuple(scales.shape)} {scales.dtype}" if torch.is_tensor(scales) else repr(scales)
            raise ValueError(f"{what} holds 8-bit codes, so the state needs {scales_key(key)!r}: float32 block "
                             f"scales of shape ({n_blocks(value.numel())},)"
                             f"{', contiguous, on ' + str(value.device) if placed else ''}, got {shown}")
        check_storage(scales, f"the scales of {what}")

    def _state_relayouts(self, p: torch.Tensor, state: dict, backend_name: str, label: str, group=None) -> list:
        """(key, dtype) of the state entries to copy into p's memory layout, or into the dtype the
        group keeps them in (`_state_dtype`: a checkpoint or a group's ``state_dtype`` changed between
        float32 and bfloat16); raises unless the state fits p: its shape and device, and for the
        multi-tensor kernels (which index p and its state alike) that dtype."""
        relayouts = []
        fits = all(key in state for key in self._REQUIRED_STATE)
        if "step" in self._STATE_KEYS and "step" in state:
            # A one-element float tensor, on the CPU or on the parameter's device (capturable).
            step = state["step"]
            if torch.is_tensor(step):
                check_storage(step, f"the 'step' state of {label}")
            fits = fits and torch.is_tensor(step) and step.numel() == 1 and step.is_floating_point() and (
                step.device.type == "cpu" or step.device == p.device)
        for key in self._STATE_TENSORS:
            t = state.get(key)
            if t is None and key not in self._REQUIRED_STATE:
                continue
            if torch.is_tensor(t):  # (what a load checks of a saved entry, and more: see `_check_state_entry`)
                self._check_state_entry(key, t, state, f"the {key!r} state of {label}", placed=True)
            expected = self._state_dtype(group, key)
            if not torch.is_tensor(t) or t.shape != p.shape or t.device != p.device or not _sharded_alike(t, p):
                fits = False
            elif t.dtype != expected and (t.dtype in FLOAT_STORAGE or t.dtype in CODES or expected in CODES):
                relayouts.append((key, expected))  # (codes from any float: the torch backend takes any dtype)
            elif backend_name != "torch" and t.dtype != expected:
                fits = False
            elif local(t).stride() != local(p).stride() and is_dense(local(p)):
                relayouts.append((key, None))
        if not fits:
            self._raise_bad_state(p, state, label)
        return relayouts

    def _raise_bad_state(self, p: torch.Tensor, state: dict, label: str):
        details = ", ".join(
            f"{key}: {tuple(t.shape)} {t.dtype} on {t.device}, strides {t.stride()}" if torch.is_tensor(t)
            else f"{key}: {t!r}" if key in state else f"{key}: missing"
            for key, t in ((key, state.get(key))
                           for key in (*self._STATE_TENSORS, *map(scales_key, self._SIGNED), "step"))
            if key in state or key in self._REQUIRED_STATE
        )
        raise ValueError(
            f"the optimizer state of {label} ({tuple(p.shape)} {p.dtype} on {p.device}, strides "
            f"{p.stride()}) does not fit it: {details}. Was the parameter replaced after its state was "
            "created? Load a state dict that matches it, or delete optimizer.state[param] to start afresh"
        )

    def _segment_for(self, p: torch.Tensor, name: str, position: tuple, shard: torch.Tensor, segments_of_group: dict,
                     buckets: dict, make_segment, state_dtype: torch.dtype = STATE_DTYPE):
        """The segment of p's group in p's (device, dtype, backend, state dtype) bucket, created by
        `make_segment()` on first use; p's grad, sharding and position (group, index: the same on
        every rank, whatever the buckets) are appended to it (the caller appends the weights)."""
        key = (p.device, p.dtype, name, state_dtype)
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

    @property
    def backends(self) -> dict:
        """The backend that ran the last step, per (device, parameter dtype): ``{(device, dtype): name}``,
        such as ``{(device("cpu"), torch.float32): "cpp"}``; read-only, and empty before the first step.
        ``backend`` stays the one asked for ("auto"): this is what it chose. Where one (device, dtype)
        ran on two backends ("auto" steps a parameter with gaps in memory with "torch"), their names
        are joined: "cpp+torch"."""
        ran = {}
        for device, dtype, name, *_ in self._last_buckets:  # (bucket keys: also the state dtype)
            ran.setdefault((device, dtype), set()).add(name)
        return {key: "+".join(sorted(names)) for key, names in ran.items()}

    def __repr__(self) -> str:
        """torch.optim's listing of the param groups, then the backend asked for and the ones that ran
        the last step (before the first step, those the one asked for resolved to, per device)."""
        groups = super().__repr__().removesuffix(")")
        return f"{groups}backend: {self.backend!r}\n{self._backends_line()}\n)"

    def _backends_line(self) -> str:
        if self._last_buckets:
            ran = ", ".join(f"({device}, {dtype}): {name!r}" for (device, dtype), name in self.backends.items())
            return f"backends: {{{ran}}}"
        # Resolved when the parameters were added (a cached lookup: nothing is built or imported here).
        env = os.environ.get(ENV_VAR)
        devices = dict.fromkeys(p.device for group in self.param_groups for p in group["params"])
        chosen = ", ".join(f"{device}: {self._resolved[device, env]!r}" for device in devices
                           if (device, env) in self._resolved)
        resolved = f"; {self.backend!r} resolves to {{{chosen}}}" if chosen else ""
        return f"backends: none yet (no step has run){resolved}"


def _copy_hyperparameters(template, seg) -> None:
    """A segment's group-wide values from `template` (a segment of the group's new hyperparameters)."""
    for name in template.HYPERPARAMETERS:
        setattr(seg, name, getattr(template, name))


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


def on_device(t, device):
    return None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(1)


def lr_of(group: dict):
    """The group's lr: a float, or the one-element tensor itself as a 0-d view (read on the device
    by the kernels, so a value a scheduler writes in place is the one used)."""
    lr = group["lr"]
    return lr.reshape(()) if torch.is_tensor(lr) else float(lr)
