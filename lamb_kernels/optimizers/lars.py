"""FusedLARS (timm's signature, apex's LARC clipping): its hyperparameters and state, and
`lars_step`, the one place the order of LARS's stages lives (docs/design.md section 3)."""
from __future__ import annotations

import torch

from ..backend_api import LarsSegment
from ..distributed import all_reduce_sharded_, local
from .state_storage import STATE_DTYPE, STATE_DTYPES, new_state, storage_dtype
from .base import MultiTensorOptimizer, bucket_shardings, lr_of, on_device
from .checks import as_int as _as_int, check_flag, check_number, check_seed, check_state_dtype, hyperparameter
from .step_counts import (advance_reused, advance_step_counts, move_step_count_for, new_step_count, pack_step_counts,
                          rounding_keys)


def _validate_lars_group(group: dict, where: str = "") -> None:
    """Raise naming the hyperparameter that is out of range (ValueError) or of the wrong type
    (TypeError); `where` names the group."""
    for name in ("lr", "momentum", "dampening", "weight_decay", "trust_coeff", "eps"):
        check_number(name, hyperparameter(group, name, where), where)
    for name in ("nesterov", "trust_clip", "always_adapt"):
        check_flag(name, hyperparameter(group, name, where), where)
    check_flag("layer_adaptation", group.get("layer_adaptation"), where, none_ok=True)
    check_flag("capturable", group.get("capturable", False), where)
    check_state_dtype(group.get("state_dtype", STATE_DTYPE), STATE_DTYPES, where)
    check_seed(group.get("seed", 0), where)
    if group["nesterov"] and (float(group["momentum"]) <= 0 or float(group["dampening"]) != 0):
        raise ValueError(
            f"{where}nesterov=True needs momentum > 0 and dampening == 0, got momentum="
            f"{group['momentum']!r}, dampening={group['dampening']!r}"
        )


class FusedLARS(MultiTensorOptimizer):
    """LARS (You et al., 2017) with the signature, defaults and math of timm's ``Lars``, apex's LARC
    clipping included (``trust_clip=True``).

    Per parameter: with weight decay (or ``always_adapt``), the trust ratio
    ``r = trust_coeff ||p|| / (||g|| + wd ||p|| + eps)`` (1 when a norm is 0; ``min(r / lr, 1)``
    with ``trust_clip``) scales ``g + wd p``; then SGD momentum (``dampening``, ``nesterov``) and
    ``p <- p - lr d``. A group may set ``layer_adaptation`` (bool) to force the trust ratio and
    decay on or off, as ``lamb_kernels.param_groups`` does for biases and norm weights. State:
    ``momentum_buffer`` when ``momentum != 0``, created on a parameter's first step as in
    ``torch.optim.SGD``; timm checkpoints load as they are. Grads are read, never written.

    Parameters
    ----------
    params : iterable of Tensors or of dicts
        The parameters to optimize, or param groups: dicts with ``"params"`` and any of the keys marked
        per group below or listed under Param group keys. timm: ``params``.
    lr : float or Tensor, default 1.0
        The learning rate. A one-element tensor is read on the device at every step, so a scheduler
        may change it in place. Per group. timm: ``lr``.
    momentum : float, default 0.0
        The momentum factor; 0 keeps no momentum buffer. Per group. timm: ``momentum``.
    dampening : float, default 0.0
        Dampening of the momentum: ``buf <- momentum * buf + (1 - dampening) * d``. Per group.
        timm: ``dampening``.
    weight_decay : float, default 0.0
        L2 decay inside the adaptive branch, ``(g + wd p) * r``; 0 (without ``always_adapt``) turns
        off both the decay and the trust ratio. Per group. timm: ``weight_decay``.
    nesterov : bool, default False
        Nesterov momentum, ``d + momentum * buf``; needs ``momentum > 0`` and ``dampening == 0``.
        Per group. timm: ``nesterov``.
    trust_coeff : float, default 0.001
        The trust coefficient in ``r = trust_coeff ||p|| / (||g|| + wd ||p|| + eps)``. Per group.
        timm: ``trust_coeff``.
    eps : float, default 1e-8
        Added to the trust ratio's denominator. Per group. timm: ``eps``.
    trust_clip : bool, default False
        LARC clipping: ``r <- min(r / lr, 1)``. Per group. timm: ``trust_clip`` (apex LARC's
        ``clip=True``).
    always_adapt : bool, default False
        Apply the trust ratio (and the decay) even when ``weight_decay == 0``. Per group.
        timm: ``always_adapt``.
    foreach : bool or None, default None
        Accepted for compatibility with timm and has no effect: the step is always multi-tensor.
        Per group. timm: ``foreach``.
    master_weights : bool, default False
        Keep an fp32 copy of each bf16 or fp16 parameter in its state (``master_param``, saved by
        ``state_dict``); the step updates the copy and writes the parameter from it in the same pass
        (docs/mixed-precision.md). For the whole optimizer. lamb_kernels only.
    capturable : bool, default False
        Keep step counts (a parameter has one only with a bf16 or int8 momentum buffer) on the
        parameters' device, so that ``step()`` can be captured in a CUDA graph. Per group.
        lamb_kernels only (as torch.optim.Adam's ``capturable``).
    state_dtype : torch.dtype or str, default torch.float32
        What the momentum buffers are kept in: torch.float32; torch.bfloat16, written with
        stochastic rounding; or "int8", 8-bit blockwise codes with float32 block scales, also rounded
        stochastically (docs/states.md). Per group. lamb_kernels only.
    seed : int, default 0
        The seed of the stochastic rounding of bf16 and int8 buffers, in [0, 2**32): the same seed
        gives the same bits on every run. Per group. lamb_kernels only.
    backend : str, default "auto"
        Which kernels run the step: "auto" (the fastest available per device, or
        ``$LAMB_KERNELS_BACKEND``), "triton", "cuda", "cpp" or "torch". A named backend that cannot
        run on a parameter's device raises ValueError naming the available ones; see
        ``lamb_kernels.available_backends`` and docs/cpp-build.md. For the whole optimizer.
        lamb_kernels only.

    Param group keys
    ----------------
    Every argument marked per group above is also a key that a param group may set, overriding the
    constructor's value for that group. One key exists only in param groups:

    layer_adaptation : bool or None, default None
        Force the adaptive branch (trust ratio and decay) on (True) or off (False) for the group;
        None: on when ``weight_decay != 0`` or ``always_adapt``. ``lamb_kernels.param_groups`` sets
        False for biases and norm weights.

    Attributes
    ----------
    backend : str
        The backend asked for: "auto" unless a name was given.
    backends : dict
        Read-only: the backend that ran the last step for each (device, parameter dtype), such as
        ``{(device("cpu"), torch.float32): "cpp"}``; empty before the first step. ``repr(opt)``
        shows it.
    master_weights : bool
        As passed.

    Notes
    -----
    ``state_dtype=torch.bfloat16`` (per group too) keeps the momentum buffers in bf16, written with
    stochastic rounding (``seed``; each parameter of such a group with momentum then has a step
    count, ``state[p]["step"]``, for its rounding stream): 24 bytes per fp32 parameter and step
    instead of 28 (docs/states.md).

    Mixed precision: float32, bfloat16 and float16 parameters, fp32 arithmetic, fp32 states (bf16
    or int8 with ``state_dtype``), fp32 copies of the parameters with ``master_weights``.
    ``scaler.step(opt)`` with a ``torch.amp.GradScaler`` hands the step the scale and ``found_inf``:
    grads are unscaled in the kernels, and a non-finite grad skips the whole step on the device.
    """

    _STATE_TENSORS = ("momentum_buffer", "master_param")
    _SIGNED = {"momentum_buffer": True}
    _STATE_KEYS = (*_STATE_TENSORS, "step", "momentum_buffer_scales")  # (a step count only with bf16 or int8 buffers)
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
        state_dtype=torch.float32,
        seed=0,
        backend="auto",
    ):
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, always_adapt=always_adapt,
            foreach=foreach, capturable=capturable, state_dtype=state_dtype, seed=_as_int(seed),
        )
        super().__init__(params, defaults, backend, master_weights)

    def _init_state(self, work: list, found_inf) -> list:
        """A momentum buffer for each parameter of a group with momentum that has none. Returns per
        parameter (its state, whether its buffer is new): a new buffer becomes d in the first step,
        as in torch's SGD."""
        states = []
        for group, params in work:
            momentum = float(group["momentum"]) != 0
            dtype = self._state_dtype(group, "momentum_buffer")
            counted = momentum and dtype != STATE_DTYPE  # bf16 buffers: a step count seeds their rounding
            group_states = []
            for p, _, _, _, state in params:
                if state is None:  # (as torch's SGD: no state dict for a parameter that keeps nothing)
                    state = self.state[p] if momentum or counted or self._wants_master(p) else {}
                new = momentum and state.get("momentum_buffer") is None
                if new:
                    # Under a GradScaler that first step may be skipped on the device: the buffer
                    # then starts from zeros, which momentum * 0 + d reads as d again (exactly when
                    # dampening is 0).
                    if dtype == torch.int8:  # (zero codes and scales: nothing reads them before the first step)
                        new_state(p, dtype, "momentum_buffer_scales", state, "momentum_buffer")
                    else:
                        make = torch.empty_like if found_inf is None else torch.zeros_like
                        state["momentum_buffer"] = make(p, dtype=dtype, memory_format=torch.preserve_format)
                if counted:
                    if state.get("step") is None:
                        state["step"] = new_step_count(p, group)
                    move_step_count_for(found_inf, p, state)
                group_states.append((state, new))
            if counted:
                advance_step_counts([state["step"] for state, _ in group_states], found_inf)
            states.append(group_states)
        return states

    def _state_dtype(self, group, key: str) -> torch.dtype:
        if group is None or key != "momentum_buffer":
            return STATE_DTYPE
        return storage_dtype(group.get("state_dtype", STATE_DTYPE), signed=True)

    @staticmethod
    def _bucket_state_dtype(group: dict):
        """A bucket holds one buffer dtype: a group without momentum has no buffer, and joins float32's."""
        return group.get("state_dtype", STATE_DTYPE) if float(group["momentum"]) != 0 else STATE_DTYPE

    def _bucket(self, work: list, states: list) -> dict:
        """Per group, one LarsSegment per bucket it has parameters in."""
        buckets = {}
        for (group, params), group_states in zip(work, states):
            state_dtype = self._bucket_state_dtype(group)
            make_segment = _segment_maker(group, state_dtype)
            momentum = float(group["momentum"]) != 0
            segments_of_group, steps = {}, {}
            for (p, name, position, shard, _), (state, new) in zip(params, group_states):
                seg = self._segment_for(p, name, position, shard, segments_of_group, buckets, make_segment,
                                        state_dtype)
                seg.params.append(self._weights(p, shard, state, seg))
                buffer = state["momentum_buffer"] if momentum else None
                seg.momentum_buffers.append(buffer if buffer is None or shard is p else local(buffer))
                if buffer is not None and buffer.dtype == torch.int8:  # 8-bit buffers (never sharded)
                    seg.momentum_buffer_scales.append(state["momentum_buffer_scales"])
                seg.first_step.append(new)
                if state_dtype != STATE_DTYPE:
                    steps.setdefault(id(seg), []).append(state["step"])
            for seg in segments_of_group.values():
                if seg.state_dtype != STATE_DTYPE:
                    counts = torch.cat([t.reshape(1) for t in steps[id(seg)]])
                    on_host = not group.get("capturable") and counts.device.type == "cpu"
                    seg.rounding_keys = rounding_keys(self, group, seg, counts.tolist() if on_host else counts, on_host)
        return buckets

    def _prepare(self, backend, segments):
        return backend.prepare_lars(segments)

    # -- reused steps (plan_cache.py) ------------------------------------------------------------

    def _hyper_segment(self, group: dict) -> LarsSegment:
        return _segment_maker(group, self._bucket_state_dtype(group))()

    def _structure(self, group: dict) -> tuple:
        return (*super()._structure(group), float(group["momentum"]) != 0)

    def _reusable(self, states: list) -> bool:
        return not any(new for group_states in states for _, new in group_states)

    def _remember_step_counts(self, cache) -> bool:
        return pack_step_counts(cache, counted=lambda bucket: bucket.key[3] != STATE_DTYPE)

    def _advance_reused(self, cache, found_inf) -> None:
        advance_reused(self, cache, found_inf)

    @staticmethod
    def _run(plans: list, grad_scale, found_inf, sharded_grads=None) -> None:
        lars_step(plans, grad_scale, found_inf, sharded_grads)

    def _sums_before_writes(self) -> int:
        # ||p||^2 and ||g||^2 when a group adapts; else the step all-reduces nothing.
        return 2 if any(_adapts(group) for group in self.param_groups) else 0


def _adapts(group: dict) -> bool:
    """Whether a group's parameters get the trust ratio (and so their norms are taken)."""
    adaptation = group.get("layer_adaptation")
    if adaptation is None:
        return float(group["weight_decay"]) != 0 or bool(group["always_adapt"])
    return bool(adaptation)


def _segment_maker(group: dict, state_dtype: torch.dtype = STATE_DTYPE):
    """A function that makes an empty LarsSegment with `group`'s hyperparameters."""
    wd = float(group["weight_decay"])
    adaptation = _adapts(group)
    lr = lr_of(group)

    def make_segment():
        return LarsSegment(
            params=[], grads=[], momentum_buffers=[], first_step=[], lr=lr, momentum=float(group["momentum"]),
            dampening=float(group["dampening"]), weight_decay=wd, nesterov=bool(group["nesterov"]),
            trust_coeff=float(group["trust_coeff"]), eps=float(group["eps"]), trust_clip=bool(group["trust_clip"]),
            adaptation=bool(adaptation), state_dtype=state_dtype,
        )

    return make_segment


def lars_step(plans, grad_scale, found_inf, sharded_grads=None) -> None:
    """One LARS step on every bucket: the only place the order of its stages lives (docs/design.md
    section 3). `plans` and `sharded_grads` as in lamb_step."""
    # Per-tensor ||p||^2, ||g||^2 of every bucket (none without adaptation in the bucket: no pass
    # over memory for norms), those of sharded tensors summed over their ranks, then the update.
    # That all-reduce, the step's first, also finds a sharded parameter with a grad on some ranks
    # only, before anything is written; without adaptation, it carries only that.
    norms = [backend.lars_sums_of_squares(plan) if any(seg.adaptation for seg in plan.segments) else None
             for backend, _, plan in plans]
    reduced = [i for i, bucket_norms in enumerate(norms) if bucket_norms is not None]
    shardings = tuple([part[i] for i in reduced] for part in bucket_shardings(plans, adaptive_only=True))
    if sharded_grads is not None:
        sharded_grads.all_reduce_([norms[i] for i in reduced], shardings)
    elif shardings:
        all_reduce_sharded_([norms[i] for i in reduced], *shardings)
    for (backend, (device, *_), plan), bucket_norms in zip(plans, norms):
        backend.lars_apply_(plan, bucket_norms, on_device(grad_scale, device), on_device(found_inf, device))
