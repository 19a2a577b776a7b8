"""The choice among backends: which can run where, "auto", $LAMB_KERNELS_BACKEND, and a fresh backend
object for a bucket. What a backend computes is in contract.py.

Backends: "triton" (lamb_kernels/triton, CUDA, or CPU tensors under the interpreter), "cuda" (the
hand-written CUDA kernels of csrc/cuda; lamb_kernels/cuda.py), "cpp" (the C++ operators of csrc/, CPU;
lamb_kernels/cpp.py) and "torch" (lamb_kernels/torch_backend.py, any device).
Each is imported only when it is asked for, so a missing or broken one never breaks the others.
"""
from __future__ import annotations

import os

import torch

BACKEND_NAMES = ("triton", "cuda", "cpp", "torch")
ENV_VAR = "LAMB_KERNELS_BACKEND"


def _triton_unavailable_reason(device_type: str) -> str | None:
    try:
        from . import triton as triton_backend
    except Exception as exc:  # triton missing or broken in any way: the torch backend still works
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    if device_type == "cuda":
        if triton_backend.INTERPRETED:
            return "TRITON_INTERPRET=1 is set, and the interpreter runs on CPU tensors only"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None
    if device_type == "cpu":
        if not triton_backend.INTERPRETED:
            return "on CPU tensors triton runs only under its interpreter (set TRITON_INTERPRET=1 before import)"
        return None
    return f"no triton support for device type {device_type!r}"


def _cpp_unavailable_reason(device_type: str) -> str | None:
    if device_type != "cpu":
        return "the C++ operators run on CPU tensors only"
    from . import extension  # builds the operators on first use, or loads them from the cache

    return extension.unavailable_reason()


def _cuda_unavailable_reason(device_type: str) -> str | None:
    if device_type != "cuda":
        return "the CUDA kernels run on CUDA tensors only"
    if not torch.version.cuda:
        return "this torch is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device"
    from . import extension  # builds the kernels on first use, or loads them from the cache

    return extension.cuda_unavailable_reason()


def _unavailable_reason(name: str, device_type: str) -> str | None:
    if name == "torch":
        return None
    if name == "cuda":
        return _cuda_unavailable_reason(device_type)
    if name == "triton":
        return _triton_unavailable_reason(device_type)
    if name == "cpp":
        return _cpp_unavailable_reason(device_type)
    raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(BACKEND_NAMES)}")


def _preference(device_type: str) -> tuple:
    # Under the interpreter triton is far slower than eager torch, so "auto" never picks it on CPU.
    # On CUDA triton comes before the CUDA C++ kernels until a GPU run has measured both.
    return ("triton", "cuda", "torch") if device_type == "cuda" else ("cpp", "torch", "triton")


def available_backends(device="cpu") -> list:
    """Backends that can run on `device`, fastest first (the order "auto" tries them in).

    Parameters
    ----------
    device : str or torch.device, default "cpu"
        The device whose type is asked about ("cpu", "cuda", ``torch.device("cuda:1")``).

    Returns
    -------
    list of str
        Names from "triton", "cuda", "cpp" and "torch"; "torch" runs everywhere. The first call for
        "cpu" builds the C++ operators, or loads them from the cache (docs/cpp-build.md); "triton"
        is listed for "cpu" only under ``TRITON_INTERPRET=1``.

    Examples
    --------
    ::

        available_backends("cpu")   # ["cpp", "torch"] once the C++ operators have built
        available_backends("cuda")  # ["triton", "cuda", "torch"] on a machine with a GPU
    """
    device_type = torch.device(device).type
    return [name for name in _preference(device_type) if _unavailable_reason(name, device_type) is None]


def check_backend_name(backend: str) -> str:
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(
            f"backend={backend!r} is not a backend; choose 'auto' or one of: {', '.join(BACKEND_NAMES)}"
        )
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend name to use on `device`; raises ValueError naming the available ones."""
    requested = backend
    source = "backend"
    if backend == "auto" and os.environ.get(ENV_VAR):
        requested, source = os.environ[ENV_VAR], ENV_VAR
    device_type = torch.device(device).type
    if requested == "auto":  # the first that can run: the later ones are not built or imported
        return next(name for name in _preference(device_type) if _unavailable_reason(name, device_type) is None)
    if requested not in BACKEND_NAMES:
        raise ValueError(
            f"{source}={requested!r} is not a backend; choose 'auto' or one of: {', '.join(BACKEND_NAMES)}"
        )
    reason = _unavailable_reason(requested, device_type)
    if reason is not None:
        raise ValueError(
            f"{source}={requested!r} is not available on {device_type}: {reason}. "
            f"Available on {device_type}: {', '.join(available_backends(device_type))}"
        )
    return requested


def create_backend(name: str):
    """A fresh backend object; backends with per-bucket caches (triton) get one object per bucket."""
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend()
    if name == "cpp":
        from .cpp import CppBackend

        return CppBackend()
    if name == "cuda":
        from .cuda import CudaBackend

        return CudaBackend()
    from .triton import TritonBackend

    return TritonBackend()
