"""An independent float64 LAMB, written from docs/design.md section 2 with plain per-tensor torch ops.

It shares no code with lamb_kernels: tests compare every backend against it.
"""
import math

import torch

APEX_DEFAULTS = dict(lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                     adam_w_mode=True, grad_averaging=True, max_grad_norm=1.0, use_nvlamb=False)


class Float64LAMB:
    """groups: list of dicts with "params" (tensors, copied to float64) and hyperparameter overrides."""

    def __init__(self, groups, **defaults):
        self.groups = []
        for group in groups:
            settings = {**APEX_DEFAULTS, **defaults, **{k: v for k, v in group.items() if k != "params"}}
            settings["params"] = [p.detach().to(torch.float64).clone() for p in group["params"]]
            self.groups.append(settings)
        self.state = {}

    def step(self, grads):
        """grads: per group, per param, a tensor or None (no grad: skipped)."""
        grads = [[None if g is None else g.to(torch.float64) for g in group] for group in grads]
        present = [g for group in grads for g in group if g is not None]
        global_norm = math.sqrt(sum(float((g * g).sum()) for g in present))
        for gi, (group, group_grads) in enumerate(zip(self.groups, grads)):
            beta1, beta2 = group["betas"]
            wd, eps, lr = group["weight_decay"], group["eps"], group["lr"]
            max_norm = group["max_grad_norm"]
            clips = max_norm is not None and 0 < max_norm < math.inf and global_norm > max_norm
            adapt = group.get("layer_adaptation")
            if adapt is None:
                adapt = group["use_nvlamb"] or wd != 0
            for pi, (p, g) in enumerate(zip(group["params"], group_grads)):
                if g is None:
                    continue
                st = self.state.setdefault((gi, pi), {"step": 0, "exp_avg": torch.zeros_like(p),
                                                      "exp_avg_sq": torch.zeros_like(p)})
                st["step"] += 1
                t = st["step"]
                if clips:
                    g = g / (global_norm / max_norm)
                if not group["adam_w_mode"]:
                    g = g + wd * p
                beta3 = 1 - beta1 if group["grad_averaging"] else 1.0
                st["exp_avg"] = beta1 * st["exp_avg"] + beta3 * g
                st["exp_avg_sq"] = beta2 * st["exp_avg_sq"] + (1 - beta2) * g * g
                bc1, bc2 = (1 - beta1**t, 1 - beta2**t) if group["bias_correction"] else (1.0, 1.0)
                u = (st["exp_avg"] / bc1) / ((st["exp_avg_sq"] / bc2).sqrt() + eps)
                if group["adam_w_mode"]:
                    u = u + wd * p
                ratio = 1.0
                p_norm, u_norm = float(p.norm()), float(u.norm())
                if adapt and p_norm > 0 and u_norm > 0:
                    ratio = p_norm / u_norm
                    bounds = group.get("trust_ratio_bounds")
                    if bounds is not None:
                        ratio = min(max(ratio, bounds[0]), bounds[1])
                group["params"][pi] = p - lr * ratio * u
