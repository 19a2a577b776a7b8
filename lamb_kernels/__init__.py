"""Fused LAMB for PyTorch: Triton multi-tensor kernels with a pure-torch fallback.

    from lamb_kernels import FusedLAMB, available_backends
"""
from .ops import available_backends
from .optimizers import FusedLAMB

__version__ = "0.1.0"
__all__ = ["FusedLAMB", "available_backends", "__version__"]
