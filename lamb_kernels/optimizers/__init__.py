"""The torch.optim.Optimizer subclasses: hyperparameters, state, validation, and the order of the
stages. No arithmetic on parameters happens here; the backends (lamb_kernels/backend_api.py) do it.

- base.py: what every optimizer shares, and the outline of a step;
- lamb.py: FusedLAMB, FusedMixedPrecisionLamb and ``lamb_step``;
- lars.py: FusedLARS and ``lars_step``;
- checks.py: the checks made before anything changes.
"""
from .lamb import FusedLAMB, FusedMixedPrecisionLamb, lamb_step
from .lars import FusedLARS, lars_step

__all__ = ["FusedLAMB", "FusedLARS", "FusedMixedPrecisionLamb", "lamb_step", "lars_step"]
