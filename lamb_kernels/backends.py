"""The backends, declared: one entry each (its name, the devices it runs on, whether it takes
parameters with gaps in memory, how it loads, the operators it calls), and the choice among them:
which can run where, "auto", $LAMB_KERNELS_BACKEND, and a fresh backend object for a bucket. What a
backend computes is in backend_api.py.

- "triton": the Triton kernels of lamb_kernels/triton, compiled on CUDA, or on CPU tensors under the
  interpreter; operators ``torch.ops.lamb_kernels.triton_<stage>``;
- "cuda": the hand-written CUDA kernels of csrc/cuda (built or loaded by extension.py); operators
  ``torch.ops.lamb_kernels.<stage>`` on CUDA tensors;
- "cpp": the C++ operators of csrc/ (built or loaded by extension.py), the same operators on CPU
  tensors; they share each bucket's chunks among torch's threads (``torch.set_num_threads``);
- "torch": pure torch (torch_backend.py), any device and any memory layout.

Each is imported or built only when it is asked for, so a missing or broken one never breaks the others.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

ENV_VAR = "LAMB_KERNELS_BACKEND"

# Elements per chunk of the C++ and CUDA operators. C++: large enough that scheduling costs nothing,
# small enough that a thread's four arrays of a chunk (p, g, m, v) stay in its L2 cache and a big
# tensor spreads over every core. CUDA: one thread block of 256 threads, 64 elements per thread,
# in packs of 8 when the launch is 16-byte aligned; enough blocks to fill the GPU on a BERT-sized
# bucket, few enough that the per-chunk partial sums stay small.
CPP_CHUNK = CUDA_CHUNK = 16384

# The update stages' cache groups on CPU (docs/benchmark.md, "The schedule"): the bytes a group of
# tensors may hold, $LAMB_KERNELS_CACHE_BYTES when set, else this share of the last-level cache.
CACHE_ENV_VAR = "LAMB_KERNELS_CACHE_BYTES"
CACHE_SHARE = 1.0
CACHE_FALLBACK = 32 << 20  # when the machine does not say


@functools.lru_cache(maxsize=None)
def last_level_cache_bytes() -> int:
    """The size of the CPU's largest cache, from Linux's sysfs (the last level: an L3 shared by the
    cores), else from sysconf, else CACHE_FALLBACK."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    if not sizes:
        try:
            sizes.append(os.sysconf("SC_LEVEL3_CACHE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    return max((size for size in sizes if size > 0), default=CACHE_FALLBACK)


def cache_group_bytes() -> int:
    """The `cache_bytes` of the update operators: $LAMB_KERNELS_CACHE_BYTES (a byte count; 0 puts each
    tensor in a group of its own), else CACHE_SHARE of the last-level cache."""
    value = os.environ.get(CACHE_ENV_VAR)
    if value is not None:
        try:
            return max(0, int(value))
        except ValueError:
            raise ValueError(f"${CACHE_ENV_VAR} must be a number of bytes, got {value!r}") from None
    return int(last_level_cache_bytes() * CACHE_SHARE)


@dataclass(frozen=True)
class BackendEntry:
    """One backend. `devices`: the device types it runs on (None: any), and `elsewhere` why it does
    not run on another (``{device_type}`` names it); `unavailable(device_type)`: why it cannot run
    on one of its devices here (None: it can), loading or importing it if needed. `operators`: the
    operator family it calls (``torch.ops.lamb_kernels.<operators><stage>``), None for pure torch;
    `load()` builds or imports those operators and returns their chunk size (elements per chunk)."""

    name: str
    devices: Optional[tuple]
    elsewhere: str
    any_layout: bool  # steps parameters with gaps in memory (the others need dense ones)
    unavailable: Callable[[str], Optional[str]]
    operators: Optional[str] = None
    load: Optional[Callable[[], int]] = None


def _triton_unavailable(device_type: str) -> str | None:
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
    if not triton_backend.INTERPRETED:
        return "on CPU tensors triton runs only under its interpreter (set TRITON_INTERPRET=1 before import)"
    return None


def _cpp_unavailable(device_type: str) -> str | None:
    from . import extension  # builds the operators on first use, or loads them from the cache

    return extension.unavailable_reason()


def _cuda_unavailable(device_type: str) -> str | None:
    if not torch.version.cuda:
        return "this torch is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device"
    from . import extension  # builds the kernels on first use, or loads them from the cache

    return extension.cuda_unavailable_reason()


def _load_triton() -> int:
    from .triton import CHUNK  # (importing it registers the triton_* operators)

    return CHUNK


def _load_cpp() -> int:
    from . import extension

    extension.load()
    return CPP_CHUNK


def _load_cuda() -> int:
    from . import extension

    extension.load_cuda()
    return CUDA_CHUNK


BACKENDS = {
    "triton": BackendEntry("triton", ("cuda", "cpu"), "no triton support for device type {device_type!r}", False,
                           _triton_unavailable, "triton_", _load_triton),
    "cuda": BackendEntry("cuda", ("cuda",), "the CUDA kernels run on CUDA tensors only", False, _cuda_unavailable,
                         "", _load_cuda),
    "cpp": BackendEntry("cpp", ("cpu",), "the C++ operators run on CPU tensors only", False, _cpp_unavailable,
                        "", _load_cpp),
    "torch": BackendEntry("torch", None, "", True, lambda device_type: None),
}
BACKEND_NAMES = tuple(BACKENDS)

# The order "auto" tries them in, per device type. Under the interpreter triton is far slower than
# eager torch, so "auto" never picks it on CPU. On CUDA triton comes before the CUDA C++ kernels
# until a GPU run has measured both.
PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch", "triton")}


def _unavailable_reason(name: str, device_type: str) -> str | None:
    entry = BACKENDS.get(name)
    if entry is None:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(BACKEND_NAMES)}")
    if entry.devices is not None and device_type not in entry.devices:
        return entry.elsewhere.format(device_type=device_type)
    return entry.unavailable(device_type)


def _preference(device_type: str) -> tuple:
    return PREFERENCE.get(device_type, PREFERENCE["cpu"])


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


def backend_for_layout(name: str, dense: bool, chosen_automatically: bool) -> str | None:
    """The backend that steps a parameter: `name` (resolved for its device) when it takes the
    parameter's layout; else, for an automatic choice, the first backend that takes any layout;
    else None (the caller raises, naming the parameter)."""
    if dense or BACKENDS[name].any_layout:
        return name
    if chosen_automatically:
        return next(entry.name for entry in BACKENDS.values() if entry.any_layout)
    return None


def create_backend(name: str):
    """A fresh backend object; one per bucket of an optimizer (it keeps that bucket's tables)."""
    entry = BACKENDS[name]
    if entry.operators is None:
        from .torch_backend import TorchBackend

        return TorchBackend()
    from .operator_backend import OperatorBackend

    return OperatorBackend(name, entry.operators, entry.load(), cache_group_bytes())
