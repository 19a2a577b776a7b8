"""Param groups that keep weight decay and the trust ratio off biases and normalisation weights, the
usual recipe for LAMB (BERT) and LARS (SimCLR, BYOL, ResNet at large batch)."""
from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay=(), *, exclude_1d: bool = True,
                 **options) -> list:
    """Split ``model``'s trainable parameters into two param groups for FusedLAMB or FusedLARS.

    - excluded: every parameter with at most one dimension (biases, LayerNorm / BatchNorm weights)
      when ``exclude_1d``, and every parameter whose name contains one of the ``no_decay``
      substrings; this group gets ``weight_decay=0.0`` and ``layer_adaptation=False`` (no trust
      ratio either);
    - decayed: the rest, with ``weight_decay``.

    ``options`` (``lr=...``, say) go into both groups. Each group lists its ``param_names``;
    parameters with ``requires_grad=False`` are left out, and an empty group is dropped.

    BERT with NVIDIA's recipe::

        FusedLAMB(param_groups(model, 0.01, no_decay=("bias", "gamma", "beta", "LayerNorm")), lr=...)
    """
    if isinstance(no_decay, str):
        raise TypeError(f"no_decay must be a collection of name substrings, got the string {no_decay!r}")
    decayed = {"params": [], "param_names": [], "weight_decay": weight_decay, **options}
    excluded = {"params": [], "param_names": [], "weight_decay": 0.0, "layer_adaptation": False, **options}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = excluded if (exclude_1d and p.ndim <= 1) or any(part in name for part in no_decay) else decayed
        group["params"].append(p)
        group["param_names"].append(name)
    return [group for group in (decayed, excluded) if group["params"]]
