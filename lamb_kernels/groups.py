"""Param groups that keep weight decay and the trust ratio off biases and normalisation weights, the
usual recipe for LAMB (BERT) and LARS (SimCLR, BYOL, ResNet at large batch)."""
from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay=(), *, exclude_1d: bool = True,
                 with_names: bool = False, **options) -> list:
    """Split ``model``'s trainable parameters into two param groups for FusedLAMB or FusedLARS.

    - excluded: every parameter with at most one dimension (biases, LayerNorm / BatchNorm weights)
      when ``exclude_1d``, every parameter whose name contains one of the ``no_decay`` substrings,
      and the names a timm-style ``model.no_weight_decay()`` returns (position embeddings, class
      tokens); this group gets ``weight_decay=0.0`` and ``layer_adaptation=False`` (no trust
      ratio either);
    - decayed: the rest, with ``weight_decay``.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose ``named_parameters()`` are split; those with ``requires_grad=False`` are
        left out.
    weight_decay : float
        The decayed group's ``weight_decay``.
    no_decay : collection of str, default ()
        Name substrings: a parameter whose name contains one of them goes to the excluded group. A
        plain string raises TypeError (it would be read as its characters).
    exclude_1d : bool, default True
        Exclude every parameter with at most one dimension.
    with_names : bool, default False
        Add each group's ``param_names`` (torch then wants every later group named too).
    **options
        Other group keys (``lr=...``, say), put into both groups.

    Returns
    -------
    list of dict
        The decayed group, then the excluded one; an empty group is dropped.

    Examples
    --------
    BERT with NVIDIA's recipe::

        FusedLAMB(param_groups(model, 0.01, no_decay=("bias", "gamma", "beta", "LayerNorm")), lr=...)
    """
    if isinstance(no_decay, str):
        raise TypeError(f"no_decay must be a collection of name substrings, got the string {no_decay!r}")
    exact = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    decayed = {"params": [], "param_names": [], "weight_decay": weight_decay, **options}
    excluded = {"params": [], "param_names": [], "weight_decay": 0.0, "layer_adaptation": False, **options}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = (exclude_1d and p.ndim <= 1) or name in exact or any(part in name for part in no_decay)
        group = excluded if skip else decayed
        group["params"].append(p)
        group["param_names"].append(name)
    groups = [group for group in (decayed, excluded) if group["params"]]
    if not with_names:
        for group in groups:
            del group["param_names"]
    return groups
