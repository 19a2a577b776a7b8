"""What FusedLAMB and FusedLARS share: a torch.optim.Optimizer whose step reads its optimizer's
declaration (declaration.py) and runs, top to bottom:

1. the plans of the last step, when every check of a full step would pass on them (plan_cache.py);
2. else the full path: every group, parameter, grad and state checked, raising before any change
   (validation.py); missing state entries created (state.py) and step counts advanced
   (step_counts.py); the parameters split into buckets of segments (buckets.py); each bucket's Plan
   from its backend (backends.py); the plans kept for the next step when they may be reused;
3. the declaration's stage function (stages.py: ``lamb_step`` or ``lars_step``) on every bucket.

Steps 1-2 are host work, run eagerly even under torch.compile; step 3 is only registered operators.
"""
from __future__ import annotations

import os
import warnings

import torch

from ..backends import ENV_VAR, check_backend_name, create_backend
from ..distributed import check_not_flat, is_dtensor, sharded_grads, sharding_of
from . import plan_cache
from .buckets import segments_by_bucket
from .checks import check_distinct, check_flag, check_scaler_tensor, group_key, param_label
from .declaration import check_group
from .state import create_missing
from .state_dict import fill_defaults, load_state_dict
from .step_counts import advance_step_counts
from .validation import check_param, params_to_step


class MultiTensorOptimizer(torch.optim.Optimizer):
    """What FusedLAMB and FusedLARS share: backend choice per (device, dtype), validation of groups,
    parameters, grads and state before anything changes, and state dict loading. A subclass sets
    ``DECLARATION`` (declaration.py) and its constructor's arguments."""

    DECLARATION = None  # the optimizer's Declaration
    initial_step = 0.0  # the step count a parameter's first step starts from (FusedMixedPrecisionLamb: ``step``)
    # GradScaler hands the step its scale and found_inf (as attributes, the way torch's fused
    # optimizers take them) instead of unscaling the grads and syncing on found_inf itself.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, backend: str, master_weights: bool = False):
        check_group(self.DECLARATION, defaults)
        check_flag("master_weights", master_weights, "")  # (as a group's switches are checked: "no" is no bool)
        self.backend = check_backend_name(backend)
        self.master_weights = bool(master_weights)
        self._reset_caches()
        super().__init__(params, defaults)
        self.state = plan_cache.tracked(self.state)

    def _reset_caches(self) -> None:
        """What the step remembers of its last checks, so that it checks again only what changed."""
        self._backends = {}  # (device, dtype, name, state dtype) -> backend object with its cached tables
        self._last_buckets = ()  # the bucket keys of the last step that stepped a parameter (`backends`)
        self._resolved = {}  # (device, $LAMB_KERNELS_BACKEND) -> backend name
        self._forget_checks()
        self._sharded_grads = None  # the sharded parameters of the step being planned (distributed.ShardedGrads)

    def _forget_checks(self) -> None:
        self._checked_params = {}  # id(param) -> (param, *validation.param_facts(...)) at its last check
        self._checked_groups = {}  # id(group) -> (group, group_key(group), its params) last validated
        self._step_cache = None  # the last full step's plans, while they hold (plan_cache.py)

    def _wants_master(self, p: torch.Tensor) -> bool:
        """Whether p gets an fp32 master copy in its state (``state[p]["master_param"]``). The one
        method a subclass overrides: FusedMixedPrecisionLamb decides by apex's rule."""
        return self.master_weights and p.dtype != torch.float32

    # -- the step --------------------------------------------------------------------------------

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
            self.DECLARATION.run(plans, grad_scale, found_inf, self._sharded_grads)
        return loss

    def _plan_step(self, grad_scale, found_inf) -> list:
        """Host-side bookkeeping, run eagerly even inside torch.compile: checks (raising before
        anything changes), state, step counts, and each bucket's Plan, as (backend, bucket key,
        plan). What follows (the stage function) is only the registered operators, which compile
        without a graph break."""
        declaration = self.DECLARATION
        check_scaler_tensor("grad_scale", grad_scale)
        check_scaler_tensor("found_inf", found_inf)
        if self._step_cache is not None:
            plans = plan_cache.reuse(self, grad_scale, found_inf)
            if plans is not None:
                return plans
            self._step_cache = None
        # With sharded parameters, the step's first all-reduce checks that every rank has a grad for
        # the same ones, and on a mismatch undoes what this planning changes (distributed.ShardedGrads).
        self._sharded_grads = sharded = sharded_grads(self.param_groups, self.state,
                                                      declaration.sums_before_writes(self.param_groups), param_label)
        work = params_to_step(self)
        if not work:
            if sharded is not None:
                sharded.all_reduce_([])  # the one other ranks make, which must learn that this rank has no grad
            return []
        states = create_missing(self, declaration, work, found_inf)
        for (group, _), group_states in zip(work, states):
            if declaration.counts_steps(group):
                advance_step_counts([state["step"] for state, _ in group_states], found_inf)
        buckets = segments_by_bucket(self, declaration, work, states)
        plans = []
        for key, segments in buckets.items():
            backend = self._backends.get(key)
            if backend is None:
                backend = self._backends[key] = create_backend(key[2])
            plans.append((backend, key, getattr(backend, declaration.prepare)(segments)))
        self._last_buckets = tuple(buckets)  # (a reused step runs these buckets again)
        # Kept unless this step created state (a first step differs from the next), or with sharded
        # parameters (a rank without their grads would skip the step's first all-reduce).
        if sharded is None and not any(new for group_states in states for _, new in group_states):
            self._step_cache = plan_cache.remember(self, work, plans, grad_scale, found_inf)
        return plans

    # -- groups, state and pickling ----------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """As torch.optim's, with every check of the constructor first; a parameter that is already
        in the optimizer (in this group or another), or shares memory with one, is refused."""
        group_index = len(self.param_groups)
        check_group(self.DECLARATION, {**self.defaults, **param_group}, f"param_groups[{group_index}]: ")
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
                check_param(self, p, env, group_index, param_index, group)
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

    def load_state_dict(self, state_dict: dict) -> None:
        """Everything is checked before anything is loaded: the saved groups' hyperparameters (as the
        constructor checks them) and the state entries this optimizer uses (tensors of their
        parameters' shapes, a numeric step count). Other entries are kept as torch.optim keeps them.
        Once loaded, each state tensor takes its parameter's memory layout (a checkpoint of a
        contiguous model may resume a channels_last one), states are in their group's state dtype
        (fp32 unless ``state_dtype`` says otherwise) whatever the parameter
        dtype, and step counts live on the CPU (where reading them costs no sync), or on the
        parameter's device with ``capturable=True``."""
        load_state_dict(self, state_dict, super().load_state_dict)

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
        self.state = plan_cache.tracked(self.state)
        fill_defaults(self)

    # -- what ran --------------------------------------------------------------------------------

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
