"""An independent float64 LARS, written from docs/design.md section 3 (timm's Lars, LARC clipping) with plain
per-tensor torch ops. It shares no code with lamb_kernels: tests compare every backend against it."""
import torch

TIMM_DEFAULTS = dict(lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                     trust_coeff=0.001, eps=1e-8, trust_clip=False, always_adapt=False)


class Float64LARS:
    """groups: list of dicts with "params" (tensors, copied to float64) and hyperparameter overrides."""

    def __init__(self, groups, **defaults):
        self.groups = []
        for group in groups:
            settings = {**TIMM_DEFAULTS, **defaults, **{k: v for k, v in group.items() if k != "params"}}
            settings["params"] = [p.detach().to(torch.float64).clone() for p in group["params"]]
            self.groups.append(settings)
        self.state = {}  # (group, param) -> momentum buffer

    def step(self, grads):
        """grads: per group, per param, a tensor or None (no grad: skipped)."""
        for gi, (group, group_grads) in enumerate(zip(self.groups, grads)):
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            adapt = group.get("layer_adaptation")
            if adapt is None:
                adapt = wd != 0 or group["always_adapt"]
            for pi, (p, g) in enumerate(zip(group["params"], group_grads)):
                if g is None:
                    continue
                g = g.to(torch.float64)
                d = g
                if adapt:
                    p_norm, g_norm = float(p.norm()), float(g.norm())
                    ratio = 1.0
                    if p_norm > 0 and g_norm > 0:
                        ratio = group["trust_coeff"] * p_norm / (g_norm + wd * p_norm + group["eps"])
                    if group["trust_clip"]:  # float64 tensors: lr = 0 gives inf (or NaN), as in timm
                        ratio = float(torch.minimum(torch.tensor(ratio, dtype=torch.float64) / lr,
                                                    torch.tensor(1.0, dtype=torch.float64)))
                    d = (g + wd * p) * ratio
                if momentum != 0:
                    buf = self.state.get((gi, pi))
                    buf = d.clone() if buf is None else momentum * buf + (1 - group["dampening"]) * d
                    self.state[(gi, pi)] = buf
                    d = d + momentum * buf if group["nesterov"] else buf
                group["params"][pi] = p - lr * d
