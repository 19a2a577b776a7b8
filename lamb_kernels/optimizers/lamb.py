"""FusedLAMB (apex's signature) and FusedMixedPrecisionLamb: their arguments, and LAMB's
declaration (declaration.py): its hyperparameters, its state, its segments, and its stage function
(`lamb_step`, stages.py)."""
from __future__ import annotations

import math

import torch

from ..backend_api import LambSegment
from .checks import as_int as _as_int, check_number
from .declaration import COMMON, Declaration, Flag, Number, Pair, StateEntry, lr_of
from .optimizer import MultiTensorOptimizer
from .stages import lamb_step
from .state import state_dtype_of


def _clip_threshold(max_grad_norm) -> float:
    """docs/design.md section 2, step 1: None, 0 and inf all disable clipping, encoded as 0.0 for the backends."""
    if max_grad_norm is None or not 0 < float(max_grad_norm) < math.inf:
        return 0.0
    return float(max_grad_norm)


def _segment_values(group: dict) -> dict:
    """The group-wide values of a LambSegment of `group` (backend_api.py)."""
    beta1, beta2 = (float(b) for b in group["betas"])
    wd = float(group["weight_decay"])
    adaptation = group.get("layer_adaptation")
    if adaptation is None:
        adaptation = bool(group["use_nvlamb"]) or wd != 0
    bounds = group.get("trust_ratio_bounds") or (0.0, math.inf)
    return dict(
        lr=lr_of(group), beta1=beta1, beta2=beta2, beta3=1.0 - beta1 if group["grad_averaging"] else 1.0,
        eps=float(group["eps"]), weight_decay=wd, adam_w_mode=bool(group["adam_w_mode"]),
        layer_adaptation=bool(adaptation), max_grad_norm=_clip_threshold(group["max_grad_norm"]),
        trust_ratio_bounds=(float(bounds[0]), float(bounds[1])),
    )


def _corrections(group: dict, counts) -> tuple:
    """(1 - beta1^t, 1 - beta2^t) per tensor of step count t: `counts` a list of floats (the result:
    lists of floats, a value computed once when all counts agree) or a tensor on the step counts'
    device (the result: float32 tensors, computed there in float64 and rounded once, as the host
    rounds). 1.0 without bias correction. (t is 0 only when a GradScaler skipped a first step:
    nothing reads it then.)"""
    n = len(counts)
    if not group["bias_correction"]:
        return [1.0] * n, [1.0] * n
    beta1, beta2 = (float(b) for b in group["betas"])
    if isinstance(counts, list):
        if n and min(counts) == max(counts):
            t = max(counts[0], 1.0)
            return [1.0 - beta1 ** t] * n, [1.0 - beta2 ** t] * n
        return [1.0 - beta1 ** max(t, 1.0) for t in counts], [1.0 - beta2 ** max(t, 1.0) for t in counts]
    t = counts.to(torch.float64).clamp(min=1.0)
    return (1.0 - torch.pow(beta1, t)).to(torch.float32), (1.0 - torch.pow(beta2, t)).to(torch.float32)


LAMB = Declaration(
    hyperparameters=(
        Number("lr"), Number("eps"), Number("weight_decay"), Pair("betas", "(beta1, beta2)", hi=1.0, hi_open=True),
        Number("max_grad_norm", none_ok=True), Flag("bias_correction"), Flag("grad_averaging"),
        Flag("adam_w_mode"), Flag("use_nvlamb"), *COMMON,
        Pair("trust_ratio_bounds", "(lo, hi)", ordered=True, none_ok=True, absent=None),
    ),
    rule=lambda group, where: None,
    entries=(
        StateEntry("step", counter=True, required=True),
        StateEntry("exp_avg", signed=True, required=True, segment_field="exp_avgs", scales_field="exp_avg_scales"),
        StateEntry("exp_avg_sq", signed=False, required=True, segment_field="exp_avg_sqs",
                   scales_field="exp_avg_sq_scales"),
    ),
    keeps=lambda group: ("exp_avg", "exp_avg_sq"),
    counts_steps=lambda group: True,
    first_values=(),
    segment=LambSegment,
    segment_values=_segment_values,
    bucket_state_dtype=state_dtype_of,
    bias_corrections=_corrections,
    structure=lambda group: (),
    # The grad norm's ||g||^2 when a group clips; else the first all-reduce, ||p||^2 and ||u||^2,
    # comes after the moments are written.
    sums_before_writes=lambda groups: int(any(_clip_threshold(group["max_grad_norm"]) > 0 for group in groups)),
    prepare="prepare_lamb",
    run=lamb_step,
)


class FusedLAMB(MultiTensorOptimizer):
    """LAMB (You et al., 2019) with the signature, defaults and math of apex's FusedLAMB.

    Differences from apex: grads are read, never overwritten; the kernels run on CPU and CUDA with
    no compilation at install; bf16 parameters; per-group overrides of every hyperparameter, including
    ``max_grad_norm``, ``adam_w_mode``, ``use_nvlamb`` and ``layer_adaptation`` (bool: force the
    trust ratio on or off for a group); optional ``trust_ratio_bounds=(lo, hi)``; per-parameter step
    counts in ``state[p]["step"]``. ``load_state_dict`` also accepts a state dict saved by apex.

    Parameters
    ----------
    params : iterable of Tensors or of dicts
        The parameters to optimize, or param groups: dicts with ``"params"`` and any of the keys marked
        per group below or listed under Param group keys. apex: ``params``.
    lr : float or Tensor, default 1e-3
        The learning rate. A one-element tensor is read on the device at every step, so a scheduler
        may change it in place. Per group. apex: ``lr``.
    bias_correction : bool, default True
        Divide m by 1 - beta1^t and v by 1 - beta2^t, t the parameter's step count (docs/design.md
        section 2, step 4). Per group. apex: ``bias_correction``.
    betas : tuple of float, default (0.9, 0.999)
        (beta1, beta2), each in [0, 1): the decay rates of m and v. Per group. apex: ``betas``.
    eps : float, default 1e-6
        Added to sqrt(v / bc2) in the update's denominator. Per group. apex: ``eps``.
    weight_decay : float, default 0.01
        Decoupled decay added to the update (``adam_w_mode=True``) or L2 decay added to the grad
        (``adam_w_mode=False``); a non-zero value also turns the trust ratio on. Per group.
        apex: ``weight_decay``.
    amsgrad : bool, default False
        Accepted for apex's signature; True raises ValueError, as in apex. apex: ``amsgrad``.
    adam_w_mode : bool, default True
        True: AdamW-style decay, ``wd * p`` added to the update; False: L2, added to the grad. Per
        group. apex: ``adam_w_mode``.
    grad_averaging : bool, default True
        The grad's coefficient in m: 1 - beta1 when True, 1 when False. Per group.
        apex: ``grad_averaging``.
    set_grad_none : bool, default True
        What ``zero_grad()`` called without ``set_to_none`` does: True sets the grads to None, False
        zeroes them. apex: ``set_grad_none``.
    max_grad_norm : float or None, default 1.0
        Clip threshold of the global grad norm, taken over every grad in every group: grads are
        divided by ``G / max_grad_norm`` when the norm G exceeds it. None, 0 or inf disable clipping
        (and its pass over the grads). Per group. apex: ``max_grad_norm``.
    use_nvlamb : bool, default False
        Apply the trust ratio also to groups with ``weight_decay == 0`` (NVLAMB). Per group.
        apex: ``use_nvlamb``.
    trust_ratio_bounds : tuple of float or None, default None
        (lo, hi): clamp the trust ratio r to [lo, hi] when both norms are > 0; None leaves it
        unbounded. Per group. lamb_kernels only.
    master_weights : bool, default False
        Keep an fp32 copy of each bf16 or fp16 parameter in its state (``master_param``, saved by
        ``state_dict``); the step updates the copy and writes the parameter from it in the same pass
        (docs/mixed-precision.md). For the whole optimizer. lamb_kernels only (apex's
        ``FusedMixedPrecisionLamb`` does this for its ``reduced_precision_dtype``).
    capturable : bool, default False
        Keep step counts on the parameters' device and compute the bias corrections there, so that
        ``step()`` can be captured in a CUDA graph. Per group. lamb_kernels only (as
        torch.optim.Adam's ``capturable``).
    state_dtype : torch.dtype or str, default torch.float32
        What m and v are kept in: torch.float32; torch.bfloat16, written with stochastic rounding; or
        "int8", 8-bit blockwise codes with float32 block scales, also rounded stochastically
        (docs/states.md). Per group. lamb_kernels only.
    seed : int, default 0
        The seed of the stochastic rounding of bf16 and int8 states, in [0, 2**32): the same seed gives
        the same bits on every run. Per group. lamb_kernels only.
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
        Force the trust ratio on (True) or off (False) for the group; None: on when ``use_nvlamb`` or
        ``weight_decay != 0``. ``lamb_kernels.param_groups`` sets False for biases and norm weights.

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
    set_grad_none : bool
        As passed; ``zero_grad()`` reads it.

    Notes
    -----
    ``state_dtype=torch.bfloat16`` (per group too) keeps m and v in bf16, written with stochastic
    rounding from a counter-based stream (``seed``, the step count, the parameter's position):
    32 bytes per fp32 parameter and step instead of 44, 4 bytes of state per parameter instead of 8,
    the same bits on every run (docs/states.md). The default, float32, is unchanged.

    Mixed precision: float32, bfloat16 and float16 parameters, fp32 arithmetic, fp32 states (bf16
    or int8 with ``state_dtype``), fp32 copies of the parameters with ``master_weights``.
    ``scaler.step(opt)`` with a ``torch.amp.GradScaler`` hands the step the scale and ``found_inf``:
    grads are unscaled in the kernels, and a non-finite grad skips the whole step on the device.
    """

    DECLARATION = LAMB

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
        state_dtype=torch.float32,
        seed=0,
        backend="auto",
    ):
        if amsgrad:
            raise ValueError("amsgrad=True: FusedLAMB does not support the AMSGrad variant (nor does apex)")
        defaults = dict(
            lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
            grad_averaging=grad_averaging, max_grad_norm=max_grad_norm, adam_w_mode=adam_w_mode,
            use_nvlamb=use_nvlamb, trust_ratio_bounds=trust_ratio_bounds, capturable=capturable,
            state_dtype=state_dtype, seed=_as_int(seed),
        )
        self.set_grad_none = set_grad_none
        super().__init__(params, defaults, backend, master_weights)

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """As torch.optim's; without ``set_to_none`` (None), the constructor's ``set_grad_none`` decides:
        True sets the grads to None, False zeroes them (apex's behaviour)."""
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


class FusedMixedPrecisionLamb(FusedLAMB):
    """A drop-in for apex's ``FusedMixedPrecisionLamb``: its signature and defaults, FusedLAMB's math.

    As in apex: parameters of ``reduced_precision_dtype`` get fp32 master weights (here in the state,
    saved by ``state_dict``), ``lr`` lives as a tensor on the parameters' device, step counts too
    (``capturable``), and the step takes a GradScaler's scale and ``found_inf`` without a host sync.
    Unlike apex, the step count is kept per parameter, a group may mix dtypes, and every backend runs
    it (apex: CUDA only).

    Parameters
    ----------
    params : iterable of Tensors or of dicts
        The parameters to optimize, or param groups: dicts with ``"params"`` and any of the keys marked
        per group below or listed under Param group keys. apex: ``params``.
    lr : float or Tensor, default 1e-3
        The learning rate, kept in each group as a one-element float32 tensor on the device of the
        group's first parameter, so a scheduler may change it in place. Per group. apex: ``lr``.
    step : int, default 0
        The step count every parameter starts from (its first step is ``step + 1``). apex: ``step``.
    bias_correction : bool, default True
        As in FusedLAMB. Per group. apex: ``bias_correction``.
    betas : tuple of float, default (0.9, 0.999)
        As in FusedLAMB. Per group. apex: ``betas``.
    eps : float, default 1e-6
        As in FusedLAMB. Per group. apex: ``eps``.
    weight_decay : float, default 0.01
        As in FusedLAMB. Per group. apex: ``weight_decay``.
    amsgrad : bool, default False
        Accepted for apex's signature; True raises ValueError, as in apex. apex: ``amsgrad``.
    adam_w_mode : bool, default True
        As in FusedLAMB. Per group. apex: ``adam_w_mode``.
    grad_averaging : bool, default True
        As in FusedLAMB. Per group. apex: ``grad_averaging``.
    max_grad_norm : float or None, default 1.0
        As in FusedLAMB. Per group. apex: ``max_grad_norm``.
    use_nvlamb : bool, default False
        As in FusedLAMB. Per group. apex: ``use_nvlamb``.
    reduced_precision_dtype : torch.dtype or None, default None
        torch.bfloat16 or torch.float16: parameters of that dtype get fp32 master weights
        (``master_param`` in their state); None: none do. apex: ``reduced_precision_dtype``.
    backend : str, default "auto"
        As in FusedLAMB. For the whole optimizer. lamb_kernels only.

    Param group keys
    ----------------
    Every argument marked per group above is also a key that a param group may set. These keys
    exist only in param groups, each as FusedLAMB's argument or key of the same name:

    trust_ratio_bounds : tuple of float or None, default None
        (lo, hi): clamp the trust ratio when both norms are > 0; None leaves it unbounded.
    capturable : bool, default True
        Step counts and bias corrections on the parameters' device, as apex keeps them.
    state_dtype : torch.dtype or str, default torch.float32
        torch.float32, torch.bfloat16 or "int8" for m and v (docs/states.md).
    seed : int, default 0
        The seed of the stochastic rounding of bf16 and int8 states.
    layer_adaptation : bool or None, default None
        Force the trust ratio on (True) or off (False); None: on when ``use_nvlamb`` or
        ``weight_decay != 0``.

    Attributes
    ----------
    backend : str
        The backend asked for: "auto" unless a name was given.
    backends : dict
        Read-only: the backend that ran the last step for each (device, parameter dtype); empty
        before the first step.
    reduced_precision_dtype : torch.dtype or None
        As passed.
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
        check_number("step", step, "", integral_tensor=True)
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
        # (apex's rule: master weights for the parameters of reduced_precision_dtype only)
        return self.reduced_precision_dtype is not None and p.dtype == self.reduced_precision_dtype

    def __getstate__(self):
        state = super().__getstate__()
        state["reduced_precision_dtype"] = self.reduced_precision_dtype
        state["initial_step"] = self.initial_step
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("reduced_precision_dtype", None)
        self.__dict__.setdefault("initial_step", 0.0)
