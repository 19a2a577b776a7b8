"""The "torch" backend: LAMB and LARS written for reading, in the step numbering of SPEC sections 2
and 3.

Pure PyTorch (``torch._foreach_*`` over each param group), runs on every device, never calls
``.item()`` and never branches on a tensor's value, so it queues work without waiting on the device.
Grads are read, never written: where a step changes the gradient (clipping, L2 decay) it works on
a copy.
"""
from __future__ import annotations

import torch

from .ops import LambSegment, flat


def _sums_of_squares(tensors) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(tensors)).float().square()


def _lamb_updates_(seg: LambSegment, out: list) -> list:
    """Steps 4-5 into `out`: u = (m / bc1) / (sqrt(v / bc2) + eps), plus wd * p in AdamW mode.

    Every op is in place on `out`: on CPU a freshly allocated param-sized temporary costs about ten
    times the arithmetic (page faults), so the quotient is formed as m * (1 / denominator).
    """
    torch._foreach_copy_(out, seg.exp_avg_sqs)
    torch._foreach_div_(out, seg.bias_correction2)
    torch._foreach_sqrt_(out)
    torch._foreach_add_(out, seg.eps)
    torch._foreach_reciprocal_(out)
    torch._foreach_mul_(out, seg.exp_avgs)
    torch._foreach_div_(out, seg.bias_correction1)
    if seg.adam_w_mode and seg.weight_decay != 0:
        torch._foreach_add_(out, seg.params, alpha=seg.weight_decay)
    return out


class TorchBackend:
    """One object per (device, dtype) bucket; it keeps one param-shaped fp32 scratch tensor per
    parameter (4 bytes/param), allocated once, for the scaled grads and then the updates."""

    name = "torch"

    def __init__(self):
        self._scratch = {}

    def _scratch_for(self, params) -> list:
        scratch = [self._scratch.get(id(p)) for p in params]
        for i, (p, buffer) in enumerate(zip(params, scratch)):
            if buffer is None or buffer.shape != p.shape or buffer.device != p.device:
                scratch[i] = self._scratch[id(p)] = torch.empty_like(p, dtype=torch.float32)
        return scratch

    def prepare_lamb(self, segments):
        self._drop_scratch_of_absent(segments)
        return segments

    def prepare_lars(self, segments):
        self._drop_scratch_of_absent(segments)
        return segments

    def _drop_scratch_of_absent(self, segments):
        live = {id(p) for p in flat(segments, "params")}
        for key in [key for key in self._scratch if key not in live]:
            del self._scratch[key]

    def grad_sumsq(self, segments) -> torch.Tensor:
        return _sums_of_squares(flat(segments, "grads")).sum()

    def lamb_update_norms_(self, segments, grad_sumsq) -> torch.Tensor:
        norms = []
        for seg in segments:
            scratch = self._scratch_for(seg.params)
            grads = seg.grads
            clips = grad_sumsq is not None and seg.max_grad_norm > 0
            l2 = not seg.adam_w_mode and seg.weight_decay != 0
            if clips or l2:  # the grad changes: work on a copy, never on p.grad
                torch._foreach_copy_(scratch, grads)
                grads = scratch
            # 1. Global grad-norm clipping.
            if clips:
                grad_norm = grad_sumsq.sqrt()
                torch._foreach_div_(grads, torch.where(grad_norm > seg.max_grad_norm,
                                                       grad_norm / seg.max_grad_norm, 1.0))
            # 2. L2 mode: decay enters the gradient, and so the moments.
            if l2:
                torch._foreach_add_(grads, seg.params, alpha=seg.weight_decay)
            # 3. Moments.
            torch._foreach_mul_(seg.exp_avgs, seg.beta1)
            torch._foreach_add_(seg.exp_avgs, grads, alpha=seg.beta3)
            torch._foreach_mul_(seg.exp_avg_sqs, seg.beta2)
            torch._foreach_addcmul_(seg.exp_avg_sqs, grads, grads, value=1 - seg.beta2)
            # 4-5. The update, only to measure it here; the apply stage recomputes it.
            updates = _lamb_updates_(seg, scratch)
            norms.append(torch.stack([_sums_of_squares(seg.params), _sums_of_squares(updates)], dim=1))
        return torch.cat(norms)

    def lamb_apply_(self, segments, norms: torch.Tensor) -> None:
        first = 0
        for seg in segments:
            count = len(seg.params)
            seg_norms = norms[first : first + count].sqrt()
            first += count
            updates = _lamb_updates_(seg, self._scratch_for(seg.params))
            if not seg.layer_adaptation:
                torch._foreach_add_(seg.params, updates, alpha=-seg.lr)  # 7. with r = 1
                continue
            # 6. Trust ratio ||p|| / ||u||, from norms of p taken before this step's update.
            param_norm, update_norm = seg_norms[:, 0], seg_norms[:, 1]
            lo, hi = seg.trust_ratio_bounds
            ratio = torch.where(
                (param_norm > 0) & (update_norm > 0), (param_norm / update_norm).clamp(lo, hi), 1.0
            )
            # 7. p <- p - lr * r * u
            torch._foreach_mul_(updates, list((ratio * -seg.lr).unbind()))
            torch._foreach_add_(seg.params, updates)

    # -- LARS, SPEC section 3 ------------------------------------------------------------------

    def lars_norms(self, segments) -> torch.Tensor:
        return torch.stack([_sums_of_squares(flat(segments, "params")), _sums_of_squares(flat(segments, "grads"))],
                           dim=1)

    def lars_apply_(self, segments, norms: torch.Tensor) -> None:
        first = 0
        for seg in segments:
            count = len(seg.params)
            first += count
            d = seg.grads  # read only: anything that changes d works on the scratch copy
            # 1. Trust ratio r = trust_coeff ||p|| / (||g|| + wd ||p|| + eps); d = (g + wd p) r.
            # (norms is None when no group of the bucket adapts.)
            if seg.adaptation:
                seg_norms = norms[first - count : first].sqrt()
                param_norm, grad_norm = seg_norms[:, 0], seg_norms[:, 1]
                ratio = seg.trust_coeff * param_norm / (grad_norm + seg.weight_decay * param_norm + seg.eps)
                ratio = torch.where((param_norm > 0) & (grad_norm > 0), ratio, 1.0)
                if seg.trust_clip:  # LARC: the effective rate lr * r never exceeds lr
                    ratio = torch.minimum(ratio / seg.lr, torch.ones_like(ratio))
                d = self._scratch_for(seg.params)
                torch._foreach_copy_(d, seg.grads)
                if seg.weight_decay != 0:
                    torch._foreach_add_(d, seg.params, alpha=seg.weight_decay)
                torch._foreach_mul_(d, list(ratio.unbind()))
            # 2. Momentum: a new buffer is d itself; later buf <- momentum buf + (1 - dampening) d.
            if seg.momentum != 0:
                new = [i for i, first_step in enumerate(seg.first_step) if first_step]
                old = [i for i, first_step in enumerate(seg.first_step) if not first_step]
                if new:
                    torch._foreach_copy_([seg.momentum_buffers[i] for i in new], [d[i] for i in new])
                if old:
                    old_buffers = [seg.momentum_buffers[i] for i in old]
                    torch._foreach_mul_(old_buffers, seg.momentum)
                    torch._foreach_add_(old_buffers, [d[i] for i in old], alpha=1 - seg.dampening)
                if seg.nesterov:
                    if d is seg.grads:
                        d = self._scratch_for(seg.params)
                        torch._foreach_copy_(d, seg.grads)
                    torch._foreach_add_(d, seg.momentum_buffers, alpha=seg.momentum)
                else:
                    d = seg.momentum_buffers
            # 3. p <- p - lr d
            torch._foreach_add_(seg.params, d, alpha=-seg.lr)
