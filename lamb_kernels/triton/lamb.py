"""LAMB as Triton multi-tensor kernels: SPEC section 2 in three passes over memory.

1. global grad norm: ``MultiTensorTable.column_sumsq`` over the grads (reads g: 4 bytes/param);
2. `_lamb_moments_kernel`: steps 1-5, writes m and v and per-chunk partial sums of ||p||^2 and
   ||u||^2 (reads p g m v, writes m v: 24 bytes/param);
3. `_lamb_apply_kernel`: steps 6-7 with u recomputed from m and v (reads p m v, writes p: 16
   bytes/param).

44 bytes per fp32 parameter, 40 when no group clips (pass 1 is skipped). All arithmetic in fp32.
Hyperparameters come per tensor from a small table, so one launch serves every param group of a
(device, dtype) bucket.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..hyper import WIDTH, LambColumn, lamb_table
from ..ops import flat
from .multi_tensor import BLOCK, CHUNK, LAUNCH_OPTIONS, MultiTensorTable, Plan, _to_device, chunk_extent, column_pointer

# Columns of the per-tensor hyperparameter table (lamb_kernels/hyper.py).
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
N_HYPER = WIDTH

# Columns of the pointer table.
_N_COLS = tl.constexpr(4)
_P = tl.constexpr(0)
_G = tl.constexpr(1)
_M = tl.constexpr(2)
_V = tl.constexpr(3)


@triton.jit
def _lamb_update(p, m, v, h):
    """Steps 4-5: u = (m / bc1) / (sqrt(v / bc2) + eps) + wd_decoupled * p.

    IEEE-rounded division and square root (div_rn, sqrt_rn): compiled, plain `/` and tl.sqrt
    become approximate, flush-to-zero instructions, which an optimizer step should not use."""
    m_hat = tl.div_rn(m, tl.load(h + _BC1))
    v_hat = tl.div_rn(v, tl.load(h + _BC2))
    return tl.div_rn(m_hat, tl.sqrt_rn(v_hat) + tl.load(h + _EPS)) + tl.load(h + _WD_DECOUPLED) * p


@triton.jit
def _lamb_moments_kernel(
    ptrs,  # int64 [n_tensors, 4]: addresses of p, g, m, v
    numels,  # int64 [n_tensors]
    chunk_tensor,  # int32 [n_chunks]
    chunk_offset,  # int64 [n_chunks]
    hyper,  # fp32 [n_tensors, N_HYPER]
    grad_sumsq,  # fp32 [1]: sum of squares of all grads (read only when CLIP)
    partials,  # fp32 [n_chunks, 2]: out, sums over the chunk of p^2 and u^2
    N_HYPER: tl.constexpr,
    CLIP: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Steps 1-5 of SPEC section 2 on one chunk: moments in place, partial sums of p^2 and u^2."""
    t, start, n = chunk_extent(numels, chunk_tensor, chunk_offset, CHUNK)
    p_ptr = column_pointer(ptrs, t, start, _N_COLS, _P)
    g_ptr = column_pointer(ptrs, t, start, _N_COLS, _G)
    m_ptr = column_pointer(ptrs, t, start, _N_COLS, _M)
    v_ptr = column_pointer(ptrs, t, start, _N_COLS, _V)
    h = hyper + t * N_HYPER
    beta1 = tl.load(h + _BETA1)
    beta2 = tl.load(h + _BETA2)
    beta3 = tl.load(h + _BETA3)
    one_minus_beta2 = tl.load(h + _ONE_MINUS_BETA2)
    wd_l2 = tl.load(h + _WD_L2)
    if CLIP:
        # 1. c = G / max_grad_norm when G exceeds it; division, not a reciprocal multiply, as apex.
        grad_norm = tl.sqrt_rn(tl.load(grad_sumsq))
        max_norm = tl.load(h + _MAX_GRAD_NORM)
        clips = (max_norm > 0) & (grad_norm > max_norm)
        clip = tl.where(clips, tl.div_rn(grad_norm, tl.where(clips, max_norm, 1.0)), 1.0)
    acc_p = tl.zeros([BLOCK], tl.float32)
    acc_u = tl.zeros([BLOCK], tl.float32)
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        if CLIP:
            g = tl.div_rn(g, clip)
        g = g + wd_l2 * p  # 2. L2 mode (wd_l2 is 0 in AdamW mode)
        m = beta1 * m + beta3 * g  # 3.
        v = beta2 * v + one_minus_beta2 * g * g
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        u = _lamb_update(p, m, v, h)
        acc_p += p * p
        acc_u += tl.where(mask, u * u, 0.0)  # masked lanes give 0/0 when eps is 0
    c = tl.program_id(0)
    tl.store(partials + c * 2 + 0, tl.sum(acc_p, axis=0))
    tl.store(partials + c * 2 + 1, tl.sum(acc_u, axis=0))


@triton.jit
def _lamb_apply_kernel(
    ptrs,  # int64 [n_tensors, 4]: addresses of p, g, m, v (g unused)
    numels,  # int64 [n_tensors]
    chunk_tensor,  # int32 [n_chunks]
    chunk_offset,  # int64 [n_chunks]
    hyper,  # fp32 [n_tensors, N_HYPER]
    norms,  # fp32 [n_tensors, 2]: ||p||^2 (before the update) and ||u||^2 per tensor
    N_HYPER: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Steps 6-7 of SPEC section 2 on one chunk: p <- p - lr * r * u, u recomputed from m and v."""
    t, start, n = chunk_extent(numels, chunk_tensor, chunk_offset, CHUNK)
    p_ptr = column_pointer(ptrs, t, start, _N_COLS, _P)
    m_ptr = column_pointer(ptrs, t, start, _N_COLS, _M)
    v_ptr = column_pointer(ptrs, t, start, _N_COLS, _V)
    h = hyper + t * N_HYPER
    # 6. Trust ratio, on the device: no host round trip for the norms.
    param_norm = tl.sqrt_rn(tl.load(norms + t * 2 + 0))
    update_norm = tl.sqrt_rn(tl.load(norms + t * 2 + 1))
    adapt = (tl.load(h + _ADAPT) != 0) & (param_norm > 0) & (update_norm > 0)
    ratio = tl.div_rn(param_norm, tl.where(adapt, update_norm, 1.0))
    ratio = tl.minimum(tl.maximum(ratio, tl.load(h + _RATIO_LO)), tl.load(h + _RATIO_HI))
    ratio = tl.where(adapt, ratio, 1.0)
    step_size = tl.load(h + _LR) * ratio
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        u = _lamb_update(p, m, v, h)
        tl.store(p_ptr + offs, p - step_size * u, mask=mask)  # 7.


def prepare(table: MultiTensorTable, segments) -> Plan:
    columns = [flat(segments, name) for name in ("params", "grads", "exp_avgs", "exp_avg_sqs")]
    table.update(columns)
    params, _, exp_avgs, exp_avg_sqs = columns
    # Written by the apply stage, and by the moments stage.
    return Plan(table, _to_device(lamb_table(segments), table.device), (params, exp_avgs + exp_avg_sqs))


def grad_sumsq(plan: Plan) -> torch.Tensor:
    return plan.table.column_sumsq(_G.value)


def lamb_update_norms_(plan: Plan, grad_sumsq) -> torch.Tensor:
    table = plan.table
    partials = torch.empty((table.n_chunks, 2), dtype=torch.float32, device=table.device)
    if table.n_chunks:
        clip = grad_sumsq is not None
        _lamb_moments_kernel[(table.n_chunks,)](
            table.pointers, table.numels, table.chunk_tensor, table.chunk_offset, plan.hyper,
            grad_sumsq if clip else plan.hyper, partials,
            N_HYPER=N_HYPER, CLIP=clip, CHUNK=CHUNK, BLOCK=BLOCK, **LAUNCH_OPTIONS,
        )
    return table.per_tensor_sum(partials)


def lamb_apply_(plan: Plan, norms: torch.Tensor) -> None:
    table = plan.table
    if table.n_chunks:
        _lamb_apply_kernel[(table.n_chunks,)](
            table.pointers, table.numels, table.chunk_tensor, table.chunk_offset, plan.hyper,
            norms.contiguous(),
            N_HYPER=N_HYPER, CHUNK=CHUNK, BLOCK=BLOCK, **LAUNCH_OPTIONS,
        )

