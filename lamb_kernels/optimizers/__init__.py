"""The torch.optim.Optimizer subclasses and the core they share. No arithmetic on parameters
happens here; the backends (lamb_kernels/backend_api.py) do it. A step, in the order it runs:

- lamb.py / lars.py: FusedLAMB, FusedMixedPrecisionLamb / FusedLARS, and each one's declaration;
- declaration.py: what a declaration states (hyperparameters, state entries, segments, stages);
- optimizer.py: the class they share, and the outline of a step;
- plan_cache.py: the last step's plans, reused while every check would pass on them;
- validation.py: the checks before anything changes (checks.py: the single checks);
- state.py: state entries created, checked and converted (state_dict.py: loading);
- step_counts.py: step counts advanced, and what derives from them;
- buckets.py: the parameters as segments in buckets;
- stages.py: the order of each algorithm's stages (``lamb_step``, ``lars_step``).
"""
from .lamb import FusedLAMB, FusedMixedPrecisionLamb
from .lars import FusedLARS
from .stages import lamb_step, lars_step

__all__ = ["FusedLAMB", "FusedLARS", "FusedMixedPrecisionLamb", "lamb_step", "lars_step"]
