"""FusedLARS (timm's signature, apex's LARC clipping): its arguments, and LARS's declaration
(declaration.py): its hyperparameters, its state, its segments, and its stage function
(`lars_step`, stages.py)."""
from __future__ import annotations

import torch

from ..backend_api import LarsSegment
from .checks import as_int as _as_int
from .declaration import COMMON, Declaration, Flag, Number, StateEntry, lr_of
from .optimizer import MultiTensorOptimizer
from .stages import lars_step
from .state import STATE_DTYPE, state_dtype_of


def _nesterov_needs_momentum(group: dict, where: str) -> None:
    if group["nesterov"] and (float(group["momentum"]) <= 0 or float(group["dampening"]) != 0):
        raise ValueError(
            f"{where}nesterov=True needs momentum > 0 and dampening == 0, got momentum="
            f"{group['momentum']!r}, dampening={group['dampening']!r}"
        )


def _adapts(group: dict) -> bool:
    """Whether a group's parameters get the trust ratio (and so their norms are taken)."""
    adaptation = group.get("layer_adaptation")
    if adaptation is None:
        return float(group["weight_decay"]) != 0 or bool(group["always_adapt"])
    return bool(adaptation)


def _has_momentum(group: dict) -> bool:
    return float(group["momentum"]) != 0


def _segment_values(group: dict) -> dict:
    """The group-wide values of a LarsSegment of `group` (backend_api.py)."""
    return dict(
        lr=lr_of(group), momentum=float(group["momentum"]), dampening=float(group["dampening"]),
        weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]),
        trust_coeff=float(group["trust_coeff"]), eps=float(group["eps"]), trust_clip=bool(group["trust_clip"]),
        adaptation=_adapts(group),
    )


def _buffer_dtype(group: dict):
    """What a group's buckets keep buffers in: a group without momentum has none, and joins float32's."""
    return state_dtype_of(group) if _has_momentum(group) else STATE_DTYPE


LARS = Declaration(
    hyperparameters=(
        Number("lr"), Number("momentum"), Number("dampening"), Number("weight_decay"), Number("trust_coeff"),
        Number("eps"), Flag("nesterov"), Flag("trust_clip"), Flag("always_adapt"), *COMMON,
    ),
    rule=_nesterov_needs_momentum,
    entries=(
        StateEntry("momentum_buffer", signed=True, segment_field="momentum_buffers",
                   scales_field="momentum_buffer_scales"),
        # bf16 and int8 buffers only: a step count seeds their rounding
        StateEntry("step", counter=True),
    ),
    keeps=lambda group: ("momentum_buffer",) if _has_momentum(group) else (),
    counts_steps=lambda group: _buffer_dtype(group) != STATE_DTYPE,
    first_values=("momentum_buffer",),  # a new buffer becomes d in its first step, as in torch's SGD
    segment=LarsSegment,
    segment_values=_segment_values,
    bucket_state_dtype=_buffer_dtype,
    bias_corrections=None,
    structure=lambda group: (_has_momentum(group),),
    # ||p||^2 and ||g||^2 when a group adapts; else the step all-reduces nothing before its writes.
    sums_before_writes=lambda groups: 2 if any(_adapts(group) for group in groups) else 0,
    prepare="prepare_lars",
    run=lars_step,
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

    DECLARATION = LARS

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
