"""The "torch" backend: LAMB and LARS written for reading, in the step numbering of docs/design.md sections 2
and 3.

Pure PyTorch (``torch._foreach_*`` over each param group), runs on every device, never calls
``.item()`` and never branches on a tensor's value, so it queues work without waiting on the device.
Grads are read, never written: where a step changes the gradient (unscaling, clipping, L2 decay) it
works on an fp32 copy. Low-precision params and grads: every op computes in fp32 (the states are
fp32) and rounds once when it writes a low-precision parameter. bf16 and 8-bit states on the CPU go
through torch_chunks.py, a chunk at a time with the same bits (the reference path below, per tensor,
takes the other devices, torch.compile, and tensors of differing memory layouts).

A GradScaler's non-finite grad (``found_inf``) skips the step with no branch: the grads become 0,
and the factors that would change the moments, buffers and params become exactly 1 (or 0 for the
step size), so every value is rewritten with its own bits.
"""
from __future__ import annotations

import torch

from . import torch_chunks
from .backend_api import LambSegment, Plan, adapts, is_dense, lamb_plan, lars_plan
from .quantization import INT8, dequantize, quantize_stochastic
from .rounding import round_bf16_stochastic


# Elements per partial sum of squares. torch's fp32 norm of one long vector on the CPU drifts with
# its length (measured: 2.4e-5 relative at 2^20 elements, 3.6e-3 at 3e7); norms of rows of this
# length, squared and summed, stay within a few fp32 roundings whatever the size (5e-8 at 3e7).
NORM_CHUNK = 16384


def _sums_of_squares(tensors) -> torch.Tensor:
    """Per tensor, the sum of squares in fp32 whatever the storage dtype (a bf16 norm would carry
    bf16's rounding into the ratio): one foreach norm over the tensors of at most NORM_CHUNK
    elements, row norms for the longer ones."""
    small = [i for i, t in enumerate(tensors) if t.numel() <= NORM_CHUNK]
    if len(small) == len(tensors):
        return torch.stack(torch._foreach_norm(tensors, dtype=torch.float32)).square()
    sums = [None] * len(tensors)
    if small:
        norms = torch._foreach_norm([tensors[i] for i in small], dtype=torch.float32)
        for i, norm in zip(small, norms):
            sums[i] = norm.square()
    for i, t in enumerate(tensors):
        if sums[i] is None:
            sums[i] = _long_sum_of_squares(t)
    return torch.stack(sums)


def _long_sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """Sum of squares of a tensor of more than NORM_CHUNK elements, in rows of NORM_CHUNK (in memory
    order for a dense tensor; any other layout is copied once); the row sums are added in a fixed
    order, so reruns give the same bits."""
    elements = t.reshape(-1) if t.is_contiguous() or not is_dense(t) else t.as_strided((t.numel(),), (1,))
    rows = elements.numel() // NORM_CHUNK
    body = torch.linalg.vector_norm(elements[: rows * NORM_CHUNK].view(rows, NORM_CHUNK), dim=1, dtype=torch.float32)
    total = body.square().sum()
    if elements.numel() > rows * NORM_CHUNK:
        total = total + torch.linalg.vector_norm(elements[rows * NORM_CHUNK :], dtype=torch.float32).square()
    return total


def _per_tensor(values) -> list:
    """Per-tensor scalars as the foreach ops take them: a list of floats, or of 0-d tensors."""
    return list(values.unbind()) if torch.is_tensor(values) else values


def _keep_or(found_inf, value, skipped):
    """`value` (a float or a tensor), or `skipped` where a non-finite grad was found; 0-d tensor."""
    return torch.where(found_inf.reshape(()) != 0, skipped, value)


def _lamb_updates_(seg: LambSegment, out: list, bias_corrections, workspace=None) -> list:
    """Steps 4-5 into `out`: u = (m / bc1) / (sqrt(v / bc2) + eps), plus wd * p in AdamW mode, from
    the stored moments (8-bit ones decoded, a chunk at a time with a `workspace`: torch_chunks.py).

    Every op is in place on `out`: on CPU a freshly allocated param-sized temporary costs about ten
    times the arithmetic (page faults), so the quotient is formed as m * (1 / denominator).
    """
    int8 = seg.state_dtype == INT8
    if int8 and workspace is not None:
        torch_chunks.decoded_into_(out, seg.exp_avg_sqs, seg.exp_avg_sq_scales, False, workspace)
    else:
        torch._foreach_copy_(out, _decoded(seg.exp_avg_sqs, seg.exp_avg_sq_scales) if int8 else seg.exp_avg_sqs)
    bias_correction1, bias_correction2 = bias_corrections
    torch._foreach_div_(out, bias_correction2)
    torch._foreach_sqrt_(out)
    torch._foreach_add_(out, seg.eps)
    torch._foreach_reciprocal_(out)
    if int8 and workspace is not None:
        torch_chunks.decoded_into_(out, seg.exp_avgs, seg.exp_avg_scales, True, workspace)
    else:
        torch._foreach_mul_(out, _decoded(seg.exp_avgs, seg.exp_avg_scales) if int8 else seg.exp_avgs)
    torch._foreach_div_(out, bias_correction1)
    if seg.adam_w_mode and seg.weight_decay != 0:
        torch._foreach_add_(out, seg.params, alpha=seg.weight_decay)
    return out


def _decoded(codes: list, scales: list) -> list:
    """8-bit states' float32 values (quantization.py)."""
    return [dequantize(c, s) for c, s in zip(codes, scales)]


def _fp32_values(stored: list, scales: list, state_dtype) -> list:
    """A list of states as fp32 tensors to update: copies of bf16 states, 8-bit ones decoded, float32
    ones themselves (updated in place)."""
    if state_dtype == torch.bfloat16:
        return [t.float() for t in stored]
    if state_dtype == INT8:
        return _decoded(stored, scales)
    return stored


def _store_codes_(codes: list, scales: list, values: list, keys, state: int, signed: bool, found_inf) -> None:
    """float32 `values` written into 8-bit `codes` and their block `scales`, rounded stochastically with
    each tensor's key; nothing changes where a GradScaler found a non-finite grad (re-encoding a
    decoded value may move it by one code)."""
    for code, scale, value, key in zip(codes, scales, values, keys):
        new_code, new_scale = quantize_stochastic(value, key, state, signed)
        if found_inf is not None:
            skipped = found_inf.reshape(()) != 0
            new_code, new_scale = torch.where(skipped, code, new_code), torch.where(skipped, scale, new_scale)
        code.copy_(new_code)
        scale.copy_(new_scale)


def _step_values(seg) -> tuple:
    """(lr, bias corrections or None) of a segment as tensors: under torch.compile a Python float
    that changes from step to step would be baked into the graph or recompile it."""
    lr = _as_tensor(seg.lr, seg)
    if not hasattr(seg, "bias_correction1"):
        return lr, None
    return lr, (_per_tensor(_as_tensor(seg.bias_correction1, seg)), _per_tensor(_as_tensor(seg.bias_correction2, seg)))


def _as_tensor(value, seg) -> torch.Tensor:
    if torch.is_tensor(value):
        return value
    return torch.tensor(value, dtype=torch.float32).to(seg.params[0].device, non_blocking=True)


class TorchBackend:
    """One object per (device, dtype) bucket; it keeps one param-shaped fp32 scratch tensor per
    parameter (4 bytes/param), allocated once, for the scaled grads and then the updates."""

    name = "torch"

    def __init__(self):
        self._scratch = {}
        self._workspaces = {}  # device -> torch_chunks.Workspace

    def _workspace(self, seg, *tensor_lists):
        """The chunk buffers (torch_chunks.py) for a segment of bf16 or 8-bit states whose tensors
        (lists of them, per param) torch_chunks can take; None for any other (the reference path)."""
        if seg.state_dtype == torch.float32 or not seg.params or not torch_chunks.usable(seg.params, *tensor_lists):
            return None
        device, size = seg.params[0].device, torch_chunks.largest_chunk(seg.params)
        if device not in self._workspaces or self._workspaces[device].size < size:
            self._workspaces[device] = torch_chunks.Workspace(device, size)
        return self._workspaces[device]

    def _scratch_for(self, plan: Plan) -> Plan:
        """The plan with its scratch tensors (those of parameters no longer stepped are let go) and
        the values this step changes."""
        live = {id(p) for p in plan.params}
        for key in [key for key in self._scratch if key not in live]:
            del self._scratch[key]
        for seg in plan.segments:
            buffers = []
            for p in seg.params:
                buffer = self._scratch.get(id(p))
                # (In p's memory layout too: the norms of the updates written there add in memory
                # order, so a buffer of another layout would round them otherwise than a new one.)
                if (buffer is None or buffer.shape != p.shape or buffer.stride() != p.stride()
                        or buffer.device != p.device):
                    buffer = self._scratch[id(p)] = torch.empty_like(p, dtype=torch.float32)
                buffers.append(buffer)
            plan.scratch.append(buffers)
            plan.step_values.append(_step_values(seg))
        return plan

    def prepare_lamb(self, segments) -> Plan:
        return self._scratch_for(lamb_plan(segments))

    def refresh(self, plan: Plan, hyper_changed: bool = False) -> None:
        """A reused plan (backend_api.Backend.refresh): its per-step values renewed from its segments."""
        plan.step_values = [_step_values(seg) for seg in plan.segments]

    def prepare_lars(self, segments) -> Plan:
        return self._scratch_for(lars_plan(segments))

    def grad_sums_of_squares(self, plan: Plan) -> torch.Tensor:
        return _sums_of_squares(plan.grads)

    @staticmethod
    def _unscaled_grads(seg, scratch, copy: bool, grad_scale):
        """The grads to use: the user's (read only), or an fp32 copy divided by the loss scale."""
        if not (copy or grad_scale is not None or seg.grads[0].dtype != torch.float32):
            return seg.grads
        torch._foreach_copy_(scratch, seg.grads)
        if grad_scale is not None:
            torch._foreach_mul_(scratch, grad_scale.reciprocal().reshape(()))
        return scratch

    def lamb_moments_(self, plan: Plan, grad_sumsq, grad_scale=None, found_inf=None) -> torch.Tensor:
        norms = []
        for seg, scratch, (_, bias_corrections) in zip(plan.segments, plan.scratch, plan.step_values):
            clips = grad_sumsq is not None and seg.max_grad_norm > 0
            l2 = not seg.adam_w_mode and seg.weight_decay != 0
            grads = self._unscaled_grads(seg, scratch, clips or l2 or found_inf is not None, grad_scale)
            # 1. Global grad-norm clipping, the norm of the unscaled grads.
            if clips:
                grad_norm = grad_sumsq.sqrt()
                if grad_scale is not None:
                    grad_norm = grad_norm * grad_scale.reciprocal().reshape(())
                torch._foreach_div_(grads, torch.where(grad_norm > seg.max_grad_norm,
                                                       grad_norm / seg.max_grad_norm, 1.0))
            beta1, beta2 = seg.beta1, seg.beta2
            if found_inf is not None:  # a skipped step: g = 0, moments times exactly 1
                for g in grads:
                    g.masked_fill_(found_inf.reshape(()) != 0, 0.0)
                beta1, beta2 = _keep_or(found_inf, beta1, 1.0), _keep_or(found_inf, beta2, 1.0)
            # 2. L2 mode: decay enters the gradient, and so the moments.
            if l2:
                if found_inf is None:
                    torch._foreach_add_(grads, seg.params, alpha=seg.weight_decay)
                else:
                    torch._foreach_add_(grads, torch._foreach_mul(seg.params, _keep_or(found_inf, seg.weight_decay, 0.0)))
            # 3. Moments (bf16 and 8-bit states: in fp32 copies, stored back with stochastic rounding;
            # the update below reads the stored values, as the apply stage will).
            bf16, int8 = seg.state_dtype == torch.bfloat16, seg.state_dtype == INT8
            workspace = self._workspace(seg, grads, seg.exp_avgs, seg.exp_avg_sqs, scratch)
            if workspace is not None:  # the same bits, a chunk at a time (torch_chunks.py)
                torch_chunks.lamb_moments_(seg, grads, beta1, beta2, found_inf, workspace)
            else:
                exp_avgs = _fp32_values(seg.exp_avgs, seg.exp_avg_scales, seg.state_dtype)
                exp_avg_sqs = _fp32_values(seg.exp_avg_sqs, seg.exp_avg_sq_scales, seg.state_dtype)
                torch._foreach_mul_(exp_avgs, beta1)
                torch._foreach_add_(exp_avgs, grads, alpha=seg.beta3)
                torch._foreach_mul_(exp_avg_sqs, beta2)
                torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - seg.beta2)
                if bf16:
                    for i, key in enumerate(seg.rounding_keys):
                        seg.exp_avgs[i].copy_(round_bf16_stochastic(exp_avgs[i], key, 0))
                        seg.exp_avg_sqs[i].copy_(round_bf16_stochastic(exp_avg_sqs[i], key, 1))
                if int8:
                    _store_codes_(seg.exp_avgs, seg.exp_avg_scales, exp_avgs, seg.rounding_keys, 0, True, found_inf)
                    _store_codes_(seg.exp_avg_sqs, seg.exp_avg_sq_scales, exp_avg_sqs, seg.rounding_keys, 1, False,
                                  found_inf)
            # 4-5. The update, only to measure it here; the apply stage recomputes it.
            updates = _lamb_updates_(seg, scratch, bias_corrections, workspace)
            norms.append(torch.stack([_sums_of_squares(seg.params), _sums_of_squares(updates)], dim=1))
        return torch.cat(norms)

    def lamb_apply_(self, plan: Plan, norms: torch.Tensor, found_inf=None) -> None:
        first = 0
        for seg, scratch, (lr, bias_corrections) in zip(plan.segments, plan.scratch, plan.step_values):
            count = len(seg.params)
            seg_norms = norms[first : first + count].sqrt()
            first += count
            workspace = self._workspace(seg, seg.exp_avgs, seg.exp_avg_sqs, scratch)
            updates = _lamb_updates_(seg, scratch, bias_corrections, workspace)
            if seg.layer_adaptation:
                # 6. Trust ratio ||p|| / ||u||, from norms of p taken before this step's update.
                param_norm, update_norm = seg_norms[:, 0], seg_norms[:, 1]
                lo, hi = seg.trust_ratio_bounds
                ratio = torch.where(
                    (param_norm > 0) & (update_norm > 0), (param_norm / update_norm).clamp(lo, hi), 1.0
                )
            else:
                ratio = torch.ones(count, dtype=torch.float32, device=norms.device)
            # 7. p <- p - lr * r * u (a step size of 0 when the step is skipped)
            step_size = ratio * -lr
            if found_inf is not None:
                step_size = torch.where(found_inf.reshape(()) != 0, 0.0, step_size)
            torch._foreach_mul_(updates, list(step_size.unbind()))
            torch._foreach_add_(seg.params, updates)
            if seg.low_precision_params:  # master weights: the model's low-precision params, from the masters
                torch._foreach_copy_(seg.low_precision_params, seg.params)

    # -- LARS, docs/design.md section 3 ------------------------------------------------------------------

    def lamb_update_(self, plan: Plan, grad_sumsq, grad_scale=None, found_inf=None) -> None:
        """Steps 1-7 of a bucket with no sharded tensor: the two stages in turn."""
        self.lamb_apply_(plan, self.lamb_moments_(plan, grad_sumsq, grad_scale, found_inf), found_inf)

    def lars_sums_of_squares(self, plan: Plan) -> torch.Tensor:
        return torch.stack([_sums_of_squares(plan.params), _sums_of_squares(plan.grads)], dim=1)

    def lars_apply_(self, plan: Plan, norms: torch.Tensor, grad_scale=None, found_inf=None) -> None:
        first = 0
        for seg, scratch, (lr, _) in zip(plan.segments, plan.scratch, plan.step_values):
            count = len(seg.params)
            first += count
            # Read only unless it is the scratch copy.
            d = self._unscaled_grads(seg, scratch, seg.adaptation or found_inf is not None, grad_scale)
            if found_inf is not None:
                for g in d:
                    g.masked_fill_(found_inf.reshape(()) != 0, 0.0)
            # 1. Trust ratio r = trust_coeff ||p|| / (||g|| + wd ||p|| + eps); d = (g + wd p) r.
            # (norms is None when no group of the bucket adapts.)
            if seg.adaptation:
                seg_norms = norms[first - count : first].sqrt()
                param_norm, grad_norm = seg_norms[:, 0], seg_norms[:, 1]
                if grad_scale is not None:
                    grad_norm = grad_norm * grad_scale.reciprocal().reshape(())
                ratio = seg.trust_coeff * param_norm / (grad_norm + seg.weight_decay * param_norm + seg.eps)
                ratio = torch.where((param_norm > 0) & (grad_norm > 0), ratio, 1.0)
                if seg.trust_clip:  # LARC: the effective rate lr * r never exceeds lr
                    ratio = torch.minimum(ratio / lr, torch.ones_like(ratio))
                if seg.weight_decay != 0:
                    torch._foreach_add_(d, seg.params, alpha=seg.weight_decay)
                torch._foreach_mul_(d, list(ratio.unbind()))
                if found_inf is not None:  # 0 * inf: the ratio of a non-finite grad norm
                    for g in d:
                        g.masked_fill_(found_inf.reshape(()) != 0, 0.0)
            # 2. Momentum: a new buffer is d itself; later buf <- momentum buf + (1 - dampening) d.
            # (bf16 buffers: in fp32 copies, stored back with stochastic rounding, the step taken
            # from the stored values.)
            step_size = -lr if found_inf is None else _keep_or(found_inf, -lr, 0.0)  # (of step 3)
            workspace = self._workspace(seg, d, seg.momentum_buffers) if seg.momentum != 0 else None
            if workspace is not None:  # steps 2-3, the same bits a chunk at a time (torch_chunks.py)
                momentum = seg.momentum if found_inf is None else _keep_or(found_inf, seg.momentum, 1.0)
                torch_chunks.lars_momentum_(seg, d, momentum, step_size, found_inf, workspace)
            elif seg.momentum != 0:
                bf16, int8 = seg.state_dtype == torch.bfloat16, seg.state_dtype == INT8
                buffers = _fp32_values(seg.momentum_buffers, seg.momentum_buffer_scales, seg.state_dtype)
                momentum = seg.momentum if found_inf is None else _keep_or(found_inf, seg.momentum, 1.0)
                new = [i for i, first_step in enumerate(seg.first_step) if first_step]
                old = [i for i, first_step in enumerate(seg.first_step) if not first_step]
                if new:
                    torch._foreach_copy_([buffers[i] for i in new], [d[i] for i in new])
                if old:
                    old_buffers = [buffers[i] for i in old]
                    torch._foreach_mul_(old_buffers, momentum)
                    torch._foreach_add_(old_buffers, [d[i] for i in old], alpha=1 - seg.dampening)
                if bf16:
                    for buffer, rounded, key in zip(seg.momentum_buffers, buffers, seg.rounding_keys):
                        buffer.copy_(round_bf16_stochastic(rounded, key, 0))
                if int8:
                    _store_codes_(seg.momentum_buffers, seg.momentum_buffer_scales, buffers, seg.rounding_keys, 0,
                                  True, found_inf)
                if bf16 or int8:  # the step from the stored values
                    buffers = _fp32_values(seg.momentum_buffers, seg.momentum_buffer_scales, seg.state_dtype)
                if seg.nesterov:
                    if d is seg.grads:
                        d = scratch
                        torch._foreach_copy_(d, seg.grads)
                    torch._foreach_add_(d, buffers, alpha=seg.momentum)
                else:
                    d = buffers
            # 3. p <- p - lr d (a step size of 0 when the step is skipped)
            if workspace is None:
                torch._foreach_add_(seg.params, torch._foreach_mul(d, step_size))
            if seg.low_precision_params:
                torch._foreach_copy_(seg.low_precision_params, seg.params)

    def lars_update_(self, plan: Plan, grad_scale=None, found_inf=None) -> None:
        """A step of a bucket with no sharded tensor: the norms (when a group adapts), then the update."""
        self.lars_apply_(plan, self.lars_sums_of_squares(plan) if adapts(plan) else None, grad_scale, found_inf)
