"""Fused LAMB and LARS for PyTorch: Triton multi-tensor kernels, C++ CPU operators and a pure-torch
fallback; float32, bfloat16 and float16 parameters, GradScaler, torch.compile and CUDA graphs.

    from lamb_kernels import FusedLAMB, FusedLARS, FusedMixedPrecisionLamb, available_backends, param_groups
"""
from .groups import param_groups
from .backends import available_backends
from .optimizers import FusedLAMB, FusedLARS, FusedMixedPrecisionLamb

__version__ = "0.1.0"
__all__ = ["FusedLAMB", "FusedLARS", "FusedMixedPrecisionLamb", "available_backends", "param_groups", "__version__"]
