"""Fused LAMB and LARS for PyTorch: Triton multi-tensor kernels with a pure-torch fallback.

    from lamb_kernels import FusedLAMB, FusedLARS, available_backends, param_groups
"""
from .groups import param_groups
from .ops import available_backends
from .optimizers import FusedLAMB, FusedLARS

__version__ = "0.1.0"
__all__ = ["FusedLAMB", "FusedLARS", "available_backends", "param_groups", "__version__"]
