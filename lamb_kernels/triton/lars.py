"""LARS as Triton multi-tensor kernels: docs/design.md section 3 in two passes over memory.

1. per-tensor ||p||^2 and ||g||^2: ``MultiTensorTable.per_tensor_sumsq`` (reads p g: 8 bytes/param),
   skipped when no param group of the bucket adapts;
2. `_lars_apply_kernel`: trust ratio, weight decay, momentum and the update (reads p g b, writes
   p b: 20 bytes/param).

28 bytes per fp32 parameter with momentum: torch's fused SGD with momentum plus the norm pass. All
arithmetic in fp32; per-tensor hyperparameters from a table, so one launch serves every param group
of a (device, dtype) bucket, with or without momentum. Mixed precision, master weights and the
GradScaler's scale and found_inf as in lamb.py; the apply kernel is launched by the registered
operator ``lamb_kernels::triton_lars_apply``.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ..hyper_table import WIDTH, LarsColumn
from ..schemas import SCHEMAS
from .low_precision_states import (block_absmax, check_code_scales, decode_codes, element_random, encode_codes,
                                   load_code_scales, load_codes, per_element, round_bf16_stochastic, rounding_key,
                                   scales_pointer, store_block_scales, store_codes)
from .multi_tensor import sums_of_squares, chunk_opening, column_pointer, launch, load_f32, scalar_or, store_rounded, table_for

# Columns of the per-tensor hyperparameter table (lamb_kernels/hyper_table.py).
_LR = tl.constexpr(LarsColumn.LR.value)
_MOMENTUM = tl.constexpr(LarsColumn.MOMENTUM.value)
_ONE_MINUS_DAMPENING = tl.constexpr(LarsColumn.ONE_MINUS_DAMPENING.value)
_WEIGHT_DECAY = tl.constexpr(LarsColumn.WEIGHT_DECAY.value)
_TRUST_COEFF = tl.constexpr(LarsColumn.TRUST_COEFF.value)
_EPS = tl.constexpr(LarsColumn.EPS.value)
_TRUST_CLIP = tl.constexpr(LarsColumn.TRUST_CLIP.value)
_ADAPT = tl.constexpr(LarsColumn.ADAPT.value)
_NESTEROV = tl.constexpr(LarsColumn.NESTEROV.value)
_HAS_MOMENTUM = tl.constexpr(LarsColumn.HAS_MOMENTUM.value)
_FIRST_STEP = tl.constexpr(LarsColumn.FIRST_STEP.value)
_KEY_LO = tl.constexpr(LarsColumn.KEY_LO.value)
N_HYPER = WIDTH

# Columns of the pointer table.
_P = tl.constexpr(0)
_G = tl.constexpr(1)
_BUF = tl.constexpr(2)


@triton.jit
def _lars_block(p_ptr, g_ptr, b_ptr, bs_ptr, copy_ptr, first, n, mask, lr, ratio, weight_decay, momentum,
                one_minus_dampening, inv_scale, adapt, nesterov, read_buffer, has_momentum, first_step, key, start,
                HAS_SCALE: tl.constexpr, HAS_COPY: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    offs = first + tl.arange(0, BLOCK)
    p = load_f32(p_ptr + offs, mask, MASKED)
    g = load_f32(g_ptr + offs, mask, MASKED)
    if HAS_SCALE:
        g = g * inv_scale
    # A weight decay of 0 adds nothing, not 0 * p (an infinite p stays infinite).
    d = tl.where(adapt, tl.where(weight_decay != 0, g + weight_decay * p, g) * ratio, g)
    # 2. Momentum; a new buffer is not read: it becomes d. (Whether a tensor has a buffer, and
    # whether it is new, is the same for the whole program: a branch, not a mask.)
    CODES: tl.constexpr = b_ptr.dtype.element_ty == tl.int8
    buf = tl.zeros_like(d)
    if read_buffer:
        if CODES:
            buf = decode_codes(load_codes(b_ptr + offs, mask, MASKED), load_code_scales(bs_ptr, offs, mask, MASKED),
                               True)
        else:
            buf = load_f32(b_ptr + offs, mask, MASKED)
    buf = tl.where(first_step, d, momentum * buf + one_minus_dampening * d)
    if b_ptr.dtype.element_ty == tl.bfloat16:  # bf16 buffers: stochastic rounding, the step from the stored value
        buf = round_bf16_stochastic(buf, element_random(key, start + offs) & 0xFFFF)
    if has_momentum:
        if CODES:  # 8-bit buffers: new block scales and codes, the step from the decoded codes
            rows = block_absmax(buf, BLOCK)
            store_block_scales(bs_ptr, rows, first, n, BLOCK)
            scale = per_element(rows, BLOCK)
            codes = encode_codes(buf, scale, element_random(key, start + offs) & 0xFFFF, True)
            store_codes(b_ptr + offs, codes, mask, MASKED)
            buf = decode_codes(codes, scale, True)
        else:
            store_rounded(b_ptr + offs, buf, mask, MASKED)
    step = tl.where(nesterov, d + momentum * buf, buf)
    step = tl.where(has_momentum, step, d)
    p = p - lr * step  # 3.
    store_rounded(p_ptr + offs, p, mask, MASKED)
    if HAS_COPY:
        store_rounded(copy_ptr + offs, p, mask, MASKED)


@triton.jit
def _lars_apply_kernel(
    p_base, g_base, b_base, copy_base, bs_base,  # the columns' base pointers (p_base for absent ones)
    ptrs,  # int64 [n_tensors, N_COLS]: element offsets of p, g, momentum buffer (and low-precision copy,
    # the buffer's block scales)
    numels,  # int64 [n_tensors]
    chunk_tensor,  # int32 [n_chunks]
    chunk_offset,  # int64 [n_chunks]
    hyper,  # fp32 [n_tensors, N_HYPER]
    norms,  # fp32 [n_tensors, 2]: ||p||^2 and ||g||^2 per tensor (read only when ADAPTIVE)
    grad_scale,  # fp32 [1]: the loss scale (read only when HAS_SCALE)
    found_inf,  # fp32 [1]: nonzero skips the step (read only when HAS_FOUND_INF)
    N_HYPER: tl.constexpr,
    N_COLS: tl.constexpr,
    COPY_COL: tl.constexpr,  # the copies' column, -1 without copies
    SCALES_COL: tl.constexpr,  # the 8-bit buffers' scales' column, -1 for float buffers
    ADAPTIVE: tl.constexpr,  # False: no tensor of this launch adapts, and the norm pass was skipped
    HAS_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """docs/design.md section 3 on one chunk: p <- p - lr * d, d through trust ratio and momentum."""
    t, start, n, h = chunk_opening(numels, chunk_tensor, chunk_offset, hyper, found_inf, N_HYPER, HAS_FOUND_INF, CHUNK)
    p_ptr = column_pointer(p_base, ptrs, t, start, N_COLS, _P, ALIGN)
    g_ptr = column_pointer(g_base, ptrs, t, start, N_COLS, _G, ALIGN)
    b_ptr = column_pointer(b_base, ptrs, t, start, N_COLS, _BUF, ALIGN)
    copy_ptr = p_ptr
    if COPY_COL >= 0:
        copy_ptr = column_pointer(copy_base, ptrs, t, start, N_COLS, COPY_COL, ALIGN)
    bs_ptr = bs_base
    if SCALES_COL >= 0:
        bs_ptr = scales_pointer(bs_base, ptrs, t, start, N_COLS, SCALES_COL)
    lr = tl.load(h + _LR)
    momentum = tl.load(h + _MOMENTUM)
    one_minus_dampening = tl.load(h + _ONE_MINUS_DAMPENING)
    adapt = tl.load(h + _ADAPT) != 0
    nesterov = tl.load(h + _NESTEROV) != 0
    has_momentum = tl.load(h + _HAS_MOMENTUM) != 0
    first_step = tl.load(h + _FIRST_STEP) != 0
    read_buffer = has_momentum & (tl.load(h + _FIRST_STEP) == 0)
    weight_decay = tl.load(h + _WEIGHT_DECAY)
    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = tl.div_rn(1.0, tl.load(grad_scale))
    if ADAPTIVE:
        # 1. Trust ratio, on the device. IEEE-rounded sqrt and division, as in the LAMB kernels;
        # the grad norm is of the unscaled grads.
        param_norm = tl.sqrt_rn(tl.load(norms + t * 2 + 0))
        grad_norm = tl.sqrt_rn(tl.load(norms + t * 2 + 1)) * inv_scale
        both = (param_norm > 0) & (grad_norm > 0)
        denominator = tl.where(both, grad_norm + weight_decay * param_norm + tl.load(h + _EPS), 1.0)
        ratio = tl.where(both, tl.div_rn(tl.load(h + _TRUST_COEFF) * param_norm, denominator), 1.0)
        # LARC; NaN propagates as in torch.minimum (lr = 0 with a ratio of 0 gives 0 / 0).
        clipped = tl.minimum(tl.div_rn(ratio, lr), 1.0, propagate_nan=tl.PropagateNan.ALL)
        ratio = tl.where(tl.load(h + _TRUST_CLIP) != 0, clipped, ratio)
    else:
        ratio = 1.0
    key = rounding_key(h, _KEY_LO)
    whole = n // BLOCK * BLOCK  # whole blocks unmasked, then the rest masked
    for i in range(0, whole, BLOCK):
        _lars_block(p_ptr, g_ptr, b_ptr, bs_ptr, copy_ptr, i, n, None, lr, ratio, weight_decay, momentum,
                    one_minus_dampening, inv_scale, adapt, nesterov, read_buffer, has_momentum, first_step, key,
                    start, HAS_SCALE, COPY_COL >= 0, False, BLOCK)
    offs = whole + tl.arange(0, BLOCK)
    _lars_block(p_ptr, g_ptr, b_ptr, bs_ptr, copy_ptr, whole, n, offs < n, lr, ratio, weight_decay, momentum,
                one_minus_dampening, inv_scale, adapt, nesterov, read_buffer, has_momentum, first_step, key, start,
                HAS_SCALE, COPY_COL >= 0, True, BLOCK)


@torch.library.custom_op("lamb_kernels::triton_lars_apply",
                         mutates_args=("params", "momentum_buffers", "buffer_scales", "copies"),
                         schema=SCHEMAS["lars_apply"])
def lars_apply(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
               buffer_scales: list[torch.Tensor], hyper: torch.Tensor, norms: Optional[torch.Tensor],
               grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor], copies: list[torch.Tensor],
               chunk_size: int) -> None:
    """docs/design.md section 3. A tensor without momentum has an empty placeholder in momentum_buffers (never
    read or written: the table's HAS_MOMENTUM column is 0). `norms` is None when no tensor
    adapts; `copies` as in triton_lamb_apply."""
    scales = check_code_scales("triton_lars_apply", momentum_buffers, buffer_scales, chunk_size=chunk_size)
    columns = [params, grads, momentum_buffers] + ([copies] if copies else []) + scales
    table = table_for("lars_apply", columns, chunk_size, stand_in=hyper)  # (a column of placeholders only)
    bases = table.bases
    # (the kernel's copy_base and scale base: p's where absent, never read or written)
    table.bases = bases[:3] + [bases[3] if copies else bases[0]] + [bases[-1] if scales else bases[0]]
    launch(_lars_apply_kernel, table, hyper, hyper if norms is None else norms.contiguous(),
           scalar_or(grad_scale, hyper), scalar_or(found_inf, hyper), N_HYPER=N_HYPER, N_COLS=len(columns),
           COPY_COL=3 if copies else -1, SCALES_COL=len(columns) - 1 if scales else -1,
           ADAPTIVE=norms is not None, HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None)


@torch.library.custom_op("lamb_kernels::triton_lars_update",
                         mutates_args=("params", "momentum_buffers", "buffer_scales", "copies"),
                         schema=SCHEMAS["lars_update"])
def lars_update(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
                buffer_scales: list[torch.Tensor], hyper: torch.Tensor, grad_scale: Optional[torch.Tensor],
                found_inf: Optional[torch.Tensor], copies: list[torch.Tensor], adaptive: bool, chunk_size: int,
                cache_bytes: int) -> None:
    """The `lars_update` stage (lamb_kernels/schemas.py): the norms of params and grads when `adaptive`,
    then the apply kernel (`cache_bytes` as in triton_lamb_update)."""
    norms = sums_of_squares(params, grads, chunk_size) if adaptive else None
    lars_apply(params, grads, momentum_buffers, buffer_scales, hyper, norms, grad_scale, found_inf, copies, chunk_size)

