"""The "torch" backend: LAMB written for reading, in SPEC section 2's step numbering.

Pure PyTorch (``torch._foreach_*`` over each param group), runs on every device, never calls
``.item()`` and never branches on a tensor's value, so it queues work without waiting on the device.
Grads are read, never written: where a step changes the gradient (clipping, L2 decay) it works on
a copy.
"""
from __future__ import annotations

import torch

from .ops import LambSegment


def _sums_of_squares(tensors) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(tensors)).float().square()


def _lamb_updates(seg: LambSegment) -> list:
    """Steps 4-5: u = (m / bc1) / (sqrt(v / bc2) + eps), plus wd * p in AdamW mode."""
    m_hat = torch._foreach_div(seg.exp_avgs, seg.bias_correction1)
    v_hat = torch._foreach_div(seg.exp_avg_sqs, seg.bias_correction2)
    denom = torch._foreach_sqrt(v_hat)
    torch._foreach_add_(denom, seg.eps)
    updates = torch._foreach_div(m_hat, denom)
    if seg.adam_w_mode and seg.weight_decay != 0:
        torch._foreach_add_(updates, seg.params, alpha=seg.weight_decay)
    return updates


class TorchBackend:
    name = "torch"

    def prepare(self, segments):
        return segments

    def grad_sumsq(self, segments) -> torch.Tensor:
        return _sums_of_squares([g for seg in segments for g in seg.grads]).sum()

    def lamb_update_norms_(self, segments, grad_sumsq) -> torch.Tensor:
        norms = []
        for seg in segments:
            grads = seg.grads
            # 1. Global grad-norm clipping (grad_sumsq is None when no group clips).
            if grad_sumsq is not None and seg.max_grad_norm > 0:
                grad_norm = grad_sumsq.sqrt()
                clip = torch.where(grad_norm > seg.max_grad_norm, grad_norm / seg.max_grad_norm, 1.0)
                grads = torch._foreach_div(grads, clip)
            # 2. L2 mode: decay enters the gradient, and so the moments.
            if not seg.adam_w_mode and seg.weight_decay != 0:
                grads = torch._foreach_add(grads, seg.params, alpha=seg.weight_decay)
            # 3. Moments.
            torch._foreach_mul_(seg.exp_avgs, seg.beta1)
            torch._foreach_add_(seg.exp_avgs, grads, alpha=seg.beta3)
            torch._foreach_mul_(seg.exp_avg_sqs, seg.beta2)
            torch._foreach_addcmul_(seg.exp_avg_sqs, grads, grads, value=1 - seg.beta2)
            # 4-5. The update, only to measure it here; the apply stage recomputes it.
            updates = _lamb_updates(seg)
            norms.append(torch.stack([_sums_of_squares(seg.params), _sums_of_squares(updates)], dim=1))
        return torch.cat(norms)

    def lamb_apply_(self, segments, norms: torch.Tensor) -> None:
        first = 0
        for seg in segments:
            count = len(seg.params)
            seg_norms = norms[first : first + count].sqrt()
            first += count
            updates = _lamb_updates(seg)
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
