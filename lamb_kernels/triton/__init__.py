"""The "triton" backend: multi-tensor Triton kernels, compiled on CUDA, interpreted on CPU tensors
when TRITON_INTERPRET=1 was set before import. The kernels run inside registered operators
(``torch.ops.lamb_kernels.triton_*``, the stage schemas of lamb_kernels/schemas.py), so
torch.compile sees each launch as one opaque node; the operator backend (lamb_kernels/operator_backend.py) calls
them, as its entry in lamb_kernels/backends.py says."""
from ..schemas import register_fakes
from . import lamb, lars  # noqa: F401  (registers the triton_lamb_* and triton_lars_* operators)
from .multi_tensor import CHUNK, INTERPRETED

register_fakes("triton_")

__all__ = ["CHUNK", "INTERPRETED"]
