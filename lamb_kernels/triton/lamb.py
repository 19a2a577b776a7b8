"""LAMB as Triton multi-tensor kernels: docs/design.md section 2 in three passes over memory.

1. global grad norm: `sums_of_squares` over the grads (reads g: 4 bytes/param);
2. `_lamb_moments_kernel`: steps 1-5, writes m and v and per-chunk partial sums of ||p||^2 and
   ||u||^2 (reads p g m v, writes m v: 24 bytes/param);
3. `_lamb_apply_kernel`: steps 6-7 with u recomputed from m and v (reads p m v, writes p: 16
   bytes/param).

44 bytes per fp32 parameter, 40 when no group clips (pass 1 is skipped). All arithmetic in fp32.
Hyperparameters come per tensor from a small table, so one launch serves every param group of a
(device, dtype) bucket. Mixed precision: p and g may be bf16/fp16 (m, v fp32); with master weights
p is the fp32 master and the apply pass also writes the model's low-precision copy. Under a
GradScaler the grads are multiplied by 1 / scale as they are read, and a nonzero ``found_inf``
turns every loop into zero iterations, decided on the device.

The kernels are launched by the registered operators ``lamb_kernels::triton_lamb_moments`` and
``lamb_kernels::triton_lamb_apply`` (opaque to torch.compile, with fake kernels).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ..hyper_table import WIDTH, LambColumn
from ..schemas import SCHEMAS
from .low_precision_states import (block_absmax, check_code_scales, decode_codes, element_random, encode_codes,
                                   load_code_scales, load_codes, per_element, round_bf16_stochastic, rounding_key,
                                   scales_pointer, store_block_scales, store_codes)
from .multi_tensor import chunk_opening, column_pointer, launch, load_f32, scalar_or, store_rounded, table_for

# Columns of the per-tensor hyperparameter table (lamb_kernels/hyper_table.py).
_LR = tl.constexpr(LambColumn.LR.value)
_BETA1 = tl.constexpr(LambColumn.BETA1.value)
_BETA2 = tl.constexpr(LambColumn.BETA2.value)
_BETA3 = tl.constexpr(LambColumn.BETA3.value)
_ONE_MINUS_BETA2 = tl.constexpr(LambColumn.ONE_MINUS_BETA2.value)
_EPS = tl.constexpr(LambColumn.EPS.value)
_WD_L2 = tl.constexpr(LambColumn.WD_L2.value)
_WD_DECOUPLED = tl.constexpr(LambColumn.WD_DECOUPLED.value)
_BC1 = tl.constexpr(LambColumn.BC1.value)
_BC2 = tl.constexpr(LambColumn.BC2.value)
_MAX_GRAD_NORM = tl.constexpr(LambColumn.MAX_GRAD_NORM.value)
_ADAPT = tl.constexpr(LambColumn.ADAPT.value)
_RATIO_LO = tl.constexpr(LambColumn.RATIO_LO.value)
_RATIO_HI = tl.constexpr(LambColumn.RATIO_HI.value)
_KEY_LO = tl.constexpr(LambColumn.KEY_LO.value)
N_HYPER = WIDTH

# Columns of the pointer tables: p g m v, and 8-bit states' block scales of m and v (moments); p m v,
# the low-precision copies, and the scales (apply: the kernels are told the copies' and scales' columns).
_P = tl.constexpr(0)
_G = tl.constexpr(1)
_M = tl.constexpr(2)
_V = tl.constexpr(3)
_M_SCALES = tl.constexpr(4)
_V_SCALES = tl.constexpr(5)
_APPLY_M = tl.constexpr(1)
_APPLY_V = tl.constexpr(2)


@triton.jit
def _lamb_update(p, m, v, h):
    """Steps 4-5: u = (m / bc1) / (sqrt(v / bc2) + eps) + wd_decoupled * p.

    IEEE-rounded division and square root (div_rn, sqrt_rn): compiled, plain `/` and tl.sqrt
    become approximate, flush-to-zero instructions, which an optimizer step should not use."""
    m_hat = tl.div_rn(m, tl.load(h + _BC1))
    v_hat = tl.div_rn(v, tl.load(h + _BC2))
    u = tl.div_rn(m_hat, tl.sqrt_rn(v_hat) + tl.load(h + _EPS))
    # A weight decay of 0 adds nothing, not 0 * p: an infinite p stays infinite (torch backend).
    wd = tl.load(h + _WD_DECOUPLED)
    return tl.where(wd != 0, u + wd * p, u)


@triton.jit
def _load_moments(m_ptr, v_ptr, ms_ptr, vs_ptr, offs, mask, MASKED: tl.constexpr):
    """m and v as fp32: 8-bit codes (int8 m) decoded with their blocks' scales."""
    if m_ptr.dtype.element_ty == tl.int8:
        m = decode_codes(load_codes(m_ptr + offs, mask, MASKED), load_code_scales(ms_ptr, offs, mask, MASKED), True)
        v = decode_codes(load_codes(v_ptr + offs, mask, MASKED), load_code_scales(vs_ptr, offs, mask, MASKED), False)
        return m, v
    return load_f32(m_ptr + offs, mask, MASKED), load_f32(v_ptr + offs, mask, MASKED)


@triton.jit
def _moments_block(p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, first, n, mask, h, acc_p, acc_u, inv_scale, clip,
                   beta1, beta2, beta3, one_minus_beta2, wd_l2, key, start, HAS_SCALE: tl.constexpr,
                   CLIP: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    offs = first + tl.arange(0, BLOCK)
    p = load_f32(p_ptr + offs, mask, MASKED)
    g = load_f32(g_ptr + offs, mask, MASKED)
    m, v = _load_moments(m_ptr, v_ptr, ms_ptr, vs_ptr, offs, mask, MASKED)
    if HAS_SCALE:
        g = g * inv_scale
    if CLIP:
        g = tl.div_rn(g, clip)
    g = tl.where(wd_l2 != 0, g + wd_l2 * p, g)  # 2. L2 mode (wd_l2 is 0 in AdamW mode)
    m = beta1 * m + beta3 * g  # 3.
    v = beta2 * v + one_minus_beta2 * g * g
    if m_ptr.dtype.element_ty == tl.int8:  # 8-bit states: new block scales, codes, u from the decoded codes
        m_rows = block_absmax(m, BLOCK)
        v_rows = block_absmax(v, BLOCK)
        store_block_scales(ms_ptr, m_rows, first, n, BLOCK)
        store_block_scales(vs_ptr, v_rows, first, n, BLOCK)
        m_scale = per_element(m_rows, BLOCK)
        v_scale = per_element(v_rows, BLOCK)
        random = element_random(key, start + offs)
        m_codes = encode_codes(m, m_scale, random & 0xFFFF, True)
        v_codes = encode_codes(v, v_scale, random >> 16, False)
        store_codes(m_ptr + offs, m_codes, mask, MASKED)
        store_codes(v_ptr + offs, v_codes, mask, MASKED)
        m = decode_codes(m_codes, m_scale, True)
        v = decode_codes(v_codes, v_scale, False)
    else:
        if m_ptr.dtype.element_ty == tl.bfloat16:  # bf16 states: stochastic rounding, u from the stored values
            random = element_random(key, start + offs)
            m = round_bf16_stochastic(m, random & 0xFFFF)
            v = round_bf16_stochastic(v, random >> 16)
        store_rounded(m_ptr + offs, m, mask, MASKED)
        store_rounded(v_ptr + offs, v, mask, MASKED)
    u = _lamb_update(p, m, v, h)
    acc_p += p * p
    if MASKED:
        acc_u += tl.where(mask, u * u, 0.0)  # masked lanes give 0/0 when eps is 0
    else:
        acc_u += u * u
    return acc_p, acc_u


@triton.jit
def _lamb_moments_kernel(
    p_base, g_base, m_base, v_base, ms_base, vs_base,  # the columns' base pointers (multi_tensor.py; the
    # scales' are p_base for float states)
    ptrs,  # int64 [n_tensors, N_COLS]: element offsets of p, g, m, v (and the scales) from the bases
    numels,  # int64 [n_tensors]
    chunk_tensor,  # int32 [n_chunks]
    chunk_offset,  # int64 [n_chunks]
    hyper,  # fp32 [n_tensors, N_HYPER]
    grad_sumsq,  # fp32 [1]: sum of squares of all (scaled) grads (read only when CLIP)
    grad_scale,  # fp32 [1]: the loss scale (read only when HAS_SCALE)
    found_inf,  # fp32 [1]: nonzero skips the step (read only when HAS_FOUND_INF)
    partials,  # fp32 [n_chunks, 2]: out, sums over the chunk of p^2 and u^2
    N_HYPER: tl.constexpr,
    N_COLS: tl.constexpr,  # 6 with 8-bit states' scales
    CLIP: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """Steps 1-5 of docs/design.md section 2 on one chunk: moments in place, partial sums of p^2 and u^2."""
    t, start, n, h = chunk_opening(numels, chunk_tensor, chunk_offset, hyper, found_inf, N_HYPER, HAS_FOUND_INF, CHUNK)
    p_ptr = column_pointer(p_base, ptrs, t, start, N_COLS, _P, ALIGN)
    g_ptr = column_pointer(g_base, ptrs, t, start, N_COLS, _G, ALIGN)
    m_ptr = column_pointer(m_base, ptrs, t, start, N_COLS, _M, ALIGN)
    v_ptr = column_pointer(v_base, ptrs, t, start, N_COLS, _V, ALIGN)
    ms_ptr = ms_base
    vs_ptr = vs_base
    if N_COLS == 6:
        ms_ptr = scales_pointer(ms_base, ptrs, t, start, N_COLS, _M_SCALES)
        vs_ptr = scales_pointer(vs_base, ptrs, t, start, N_COLS, _V_SCALES)
    beta1 = tl.load(h + _BETA1)
    beta2 = tl.load(h + _BETA2)
    beta3 = tl.load(h + _BETA3)
    one_minus_beta2 = tl.load(h + _ONE_MINUS_BETA2)
    wd_l2 = tl.load(h + _WD_L2)
    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = tl.div_rn(1.0, tl.load(grad_scale))
    clip = 1.0
    if CLIP:
        # 1. c = G / max_grad_norm when G (of the unscaled grads) exceeds it; division, as apex.
        grad_norm = tl.sqrt_rn(tl.load(grad_sumsq)) * inv_scale
        max_norm = tl.load(h + _MAX_GRAD_NORM)
        clips = (max_norm > 0) & (grad_norm > max_norm)
        clip = tl.where(clips, tl.div_rn(grad_norm, tl.where(clips, max_norm, 1.0)), 1.0)
    key = rounding_key(h, _KEY_LO)
    acc_p = tl.zeros([BLOCK], tl.float32)
    acc_u = tl.zeros([BLOCK], tl.float32)
    whole = n // BLOCK * BLOCK  # whole blocks unmasked, then the rest masked
    for i in range(0, whole, BLOCK):
        acc_p, acc_u = _moments_block(p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, i, n, None, h, acc_p, acc_u,
                                      inv_scale, clip, beta1, beta2, beta3, one_minus_beta2, wd_l2, key, start,
                                      HAS_SCALE, CLIP, False, BLOCK)
    offs = whole + tl.arange(0, BLOCK)
    acc_p, acc_u = _moments_block(p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, whole, n, offs < n, h, acc_p, acc_u,
                                  inv_scale, clip, beta1, beta2, beta3, one_minus_beta2, wd_l2, key, start, HAS_SCALE,
                                  CLIP, True, BLOCK)
    c = tl.program_id(0)
    tl.store(partials + c * 2 + 0, tl.sum(acc_p, axis=0))
    tl.store(partials + c * 2 + 1, tl.sum(acc_u, axis=0))


@triton.jit
def _apply_block(p_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, copy_ptr, offs, mask, h, step_size, HAS_COPY: tl.constexpr,
                 MASKED: tl.constexpr):
    p = load_f32(p_ptr + offs, mask, MASKED)
    m, v = _load_moments(m_ptr, v_ptr, ms_ptr, vs_ptr, offs, mask, MASKED)
    u = _lamb_update(p, m, v, h)
    p = p - step_size * u  # 7.
    store_rounded(p_ptr + offs, p, mask, MASKED)
    if HAS_COPY:
        store_rounded(copy_ptr + offs, p, mask, MASKED)


@triton.jit
def _lamb_apply_kernel(
    p_base, m_base, v_base, copy_base, ms_base, vs_base,  # the columns' base pointers (p_base for absent ones)
    ptrs,  # int64 [n_tensors, N_COLS]: element offsets of p, m, v (and the low-precision copy, the scales)
    numels,  # int64 [n_tensors]
    chunk_tensor,  # int32 [n_chunks]
    chunk_offset,  # int64 [n_chunks]
    hyper,  # fp32 [n_tensors, N_HYPER]
    norms,  # fp32 [n_tensors, 2]: ||p||^2 (before the update) and ||u||^2 per tensor
    found_inf,  # fp32 [1]: nonzero skips the step (read only when HAS_FOUND_INF)
    N_HYPER: tl.constexpr,
    N_COLS: tl.constexpr,
    COPY_COL: tl.constexpr,  # the copies' column, -1 without copies
    SCALES_COL: tl.constexpr,  # m's scales' column (v's next), -1 for float states
    HAS_FOUND_INF: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """Steps 6-7 of docs/design.md section 2 on one chunk: p <- p - lr * r * u, u recomputed from m and v."""
    t, start, n, h = chunk_opening(numels, chunk_tensor, chunk_offset, hyper, found_inf, N_HYPER, HAS_FOUND_INF, CHUNK)
    p_ptr = column_pointer(p_base, ptrs, t, start, N_COLS, _P, ALIGN)
    m_ptr = column_pointer(m_base, ptrs, t, start, N_COLS, _APPLY_M, ALIGN)
    v_ptr = column_pointer(v_base, ptrs, t, start, N_COLS, _APPLY_V, ALIGN)
    copy_ptr = p_ptr
    if COPY_COL >= 0:
        copy_ptr = column_pointer(copy_base, ptrs, t, start, N_COLS, COPY_COL, ALIGN)
    ms_ptr = ms_base
    vs_ptr = vs_base
    if SCALES_COL >= 0:
        ms_ptr = scales_pointer(ms_base, ptrs, t, start, N_COLS, SCALES_COL)
        vs_ptr = scales_pointer(vs_base, ptrs, t, start, N_COLS, SCALES_COL + 1)
    # 6. Trust ratio, on the device: no host round trip for the norms.
    param_norm = tl.sqrt_rn(tl.load(norms + t * 2 + 0))
    update_norm = tl.sqrt_rn(tl.load(norms + t * 2 + 1))
    adapt = (tl.load(h + _ADAPT) != 0) & (param_norm > 0) & (update_norm > 0)
    ratio = tl.div_rn(param_norm, tl.where(adapt, update_norm, 1.0))
    # The bounds clamp an infinite ratio; a NaN one (both norms overflowed fp32) stays NaN and
    # reaches the params, as on the other backends (tl.minimum / tl.maximum would drop it).
    ratio = tl.minimum(tl.maximum(ratio, tl.load(h + _RATIO_LO), propagate_nan=tl.PropagateNan.ALL),
                       tl.load(h + _RATIO_HI), propagate_nan=tl.PropagateNan.ALL)
    ratio = tl.where(adapt, ratio, 1.0)
    step_size = tl.load(h + _LR) * ratio
    whole = n // BLOCK * BLOCK
    for i in range(0, whole, BLOCK):
        _apply_block(p_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, copy_ptr, i + tl.arange(0, BLOCK), None, h, step_size,
                     COPY_COL >= 0, False)
    offs = whole + tl.arange(0, BLOCK)
    _apply_block(p_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, copy_ptr, offs, offs < n, h, step_size, COPY_COL >= 0, True)


@torch.library.custom_op("lamb_kernels::triton_lamb_moments",
                         mutates_args=("exp_avgs", "exp_avg_sqs", "exp_avg_scales", "exp_avg_sq_scales"),
                         schema=SCHEMAS["lamb_moments"])
def lamb_moments(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                 exp_avg_sqs: list[torch.Tensor], exp_avg_scales: list[torch.Tensor],
                 exp_avg_sq_scales: list[torch.Tensor], hyper: torch.Tensor, grad_sumsq: Optional[torch.Tensor],
                 grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor], chunk_size: int) -> torch.Tensor:
    """The `lamb_moments` stage (lamb_kernels/schemas.py), steps 1-5: moments in place; per tensor
    ||p||^2 (before the update) and ||u||^2, [n, 2]."""
    scales = check_code_scales("triton_lamb_moments", exp_avgs, exp_avg_scales, exp_avg_sq_scales,
                               chunk_size=chunk_size, unsigned=exp_avg_sqs)
    table = table_for("lamb_moments", [params, grads, exp_avgs, exp_avg_sqs, *scales], chunk_size)
    if not scales:
        table.bases += table.bases[:1] * 2  # the kernel's scale bases, never read
    partials = torch.empty((table.n_chunks, 2), dtype=torch.float32, device=hyper.device)
    launch(_lamb_moments_kernel, table, hyper, scalar_or(grad_sumsq, hyper), scalar_or(grad_scale, hyper),
           scalar_or(found_inf, hyper), partials, N_HYPER=N_HYPER, N_COLS=4 + len(scales),
           CLIP=grad_sumsq is not None, HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None)
    return table.per_tensor_sum(partials)


@torch.library.custom_op("lamb_kernels::triton_lamb_apply", mutates_args=("params", "copies"),
                         schema=SCHEMAS["lamb_apply"])
def lamb_apply(params: list[torch.Tensor], exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
               exp_avg_scales: list[torch.Tensor], exp_avg_sq_scales: list[torch.Tensor], hyper: torch.Tensor,
               norms: torch.Tensor, found_inf: Optional[torch.Tensor], copies: list[torch.Tensor],
               chunk_size: int) -> None:
    """The `lamb_apply` stage (lamb_kernels/schemas.py), steps 6-7: p <- p - lr * r * u; with
    `copies` (the model's low-precision params, when `params` are fp32 masters) each copy gets the
    new value too, rounded to its dtype."""
    scales = check_code_scales("triton_lamb_apply", exp_avgs, exp_avg_scales, exp_avg_sq_scales,
                               chunk_size=chunk_size, unsigned=exp_avg_sqs)
    columns = [params, exp_avgs, exp_avg_sqs] + ([copies] if copies else []) + scales
    table = table_for("lamb_apply", columns, chunk_size)
    bases = table.bases
    # (the kernel's copy_base and scale bases: p's where absent, never read or written)
    table.bases = bases[:3] + [bases[3] if copies else bases[0]] + (bases[-2:] if scales else bases[:1] * 2)
    launch(_lamb_apply_kernel, table, hyper, norms.contiguous(), scalar_or(found_inf, hyper), N_HYPER=N_HYPER,
           N_COLS=len(columns), COPY_COL=3 if copies else -1, SCALES_COL=len(columns) - 2 if scales else -1,
           HAS_FOUND_INF=found_inf is not None)


@torch.library.custom_op("lamb_kernels::triton_lamb_update",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "exp_avg_scales", "exp_avg_sq_scales",
                                       "copies"),
                         schema=SCHEMAS["lamb_update"])
def lamb_update(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], exp_avg_scales: list[torch.Tensor],
                exp_avg_sq_scales: list[torch.Tensor], hyper: torch.Tensor, grad_sumsq: Optional[torch.Tensor],
                grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor], copies: list[torch.Tensor],
                chunk_size: int, cache_bytes: int) -> None:
    """The `lamb_update` stage (lamb_kernels/schemas.py): the moments kernel, then the apply kernel
    (`cache_bytes` orders the C++ operators' passes on CPU; here the passes run in turn)."""
    norms = lamb_moments(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, hyper, grad_sumsq,
                         grad_scale, found_inf, chunk_size)
    lamb_apply(params, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, hyper, norms, found_inf, copies,
               chunk_size)

