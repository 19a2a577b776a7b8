"""Builds or loads the C++ operators in csrc/ (the "cpp" backend), and describes them to torch.

Nothing is built at ``import lamb_kernels``. The first time the "cpp" backend is considered
(``available_backends("cpu")``, or an optimizer stepping CPU parameters with ``backend="auto"``):

1. a library built ahead of time (``LAMB_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .``),
   ``lamb_kernels/_C*.so``, is loaded if present;
2. else a library from an earlier just-in-time build is loaded from the cache, found by a hash of
   the sources, the compiler flags, torch's and Python's versions and the CPU's features;
3. else the sources are compiled with ``torch.utils.cpp_extension`` (one log line, a minute or so)
   into that cache: ``$LAMB_KERNELS_CACHE``, else ``$TORCH_EXTENSIONS_DIR``, else
   ``~/.cache/torch_extensions``.

A build that fails logs one warning; "auto" then falls back to the "torch" backend, and asking for
"cpp" by name raises an error that carries the build's message.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

logger = logging.getLogger("lamb_kernels")


def _find_csrc() -> Path:
    here = Path(__file__).resolve().parent
    # An installed package carries the sources as lamb_kernels/csrc; a checkout has them beside it.
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "ops.cpp").exists():
            return candidate
    return here / "csrc"


CSRC = _find_csrc()
SOURCES = ("ops.cpp", "multi_tensor_cpu.cpp", "lamb_cpu.cpp", "lars_cpu.cpp")
HEADERS = ("multi_tensor_cpu.h", "hyper_columns.h")
# No fast-math: IEEE division and square root, as in the Triton kernels. -fno-math-errno only lets
# the compiler use the vector square-root instruction (errno is never read); FMA contraction is on
# as on the GPU. The just-in-time build is tuned to the machine that will run it.
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=fast"]
JIT_ARCH_FLAGS = ["-march=native"]
LIBRARY_NAME = "lamb_kernels_cpp"


class ExtensionUnavailable(RuntimeError):
    """The C++ operators could neither be loaded nor built; the message says why."""


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build_key() -> str:
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode())
        digest.update((CSRC / name).read_bytes())
    for part in (CFLAGS, JIT_ARCH_FLAGS, torch.__version__, sys.version, platform.machine(), _cpu_features(),
                 os.environ.get("CXX", "")):
        digest.update(repr(part).encode())
    return digest.hexdigest()[:16]


def cache_directory() -> Path:
    root = os.environ.get("LAMB_KERNELS_CACHE") or os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root or Path.home() / ".cache" / "torch_extensions")


def _prebuilt_library() -> str | None:
    spec = importlib.util.find_spec("lamb_kernels._C")
    return spec.origin if spec is not None and spec.origin else None


def _jit_build() -> str:
    """The path of the just-in-time built library, building it first when the cache lacks it."""
    if not (CSRC / SOURCES[0]).exists():
        raise ExtensionUnavailable(f"the C++ sources are not installed (looked in {CSRC})")
    build_dir = cache_directory() / f"{LIBRARY_NAME}_{_build_key()}"
    library = build_dir / f"{LIBRARY_NAME}.so"
    if library.exists():
        return str(library)
    from torch.utils import cpp_extension

    logger.warning("lamb_kernels: building the C++ CPU kernels (first use; about a minute) in %s", build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=LIBRARY_NAME,
        sources=[str(CSRC / name) for name in SOURCES],
        extra_cflags=CFLAGS + JIT_ARCH_FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return str(library)


_outcome = None  # the library's path, or the ExtensionUnavailable that explains its absence


def load() -> str:
    """Loads the operators (building them on first use) and returns the library's path; raises
    ExtensionUnavailable with the reason when that is impossible. Tried once per process: a failure
    warns once and is remembered."""
    global _outcome
    if _outcome is None:
        try:
            path = _prebuilt_library() or _jit_build()
            torch.ops.load_library(path)
            _register_fake_kernels()
            _outcome = path
        except Exception as exc:  # a compiler error, no compiler, no ninja, a bad cache entry...
            message = str(exc) if isinstance(exc, ExtensionUnavailable) else f"{type(exc).__name__}: {exc}".strip()
            warnings.warn(f"lamb_kernels: the C++ backend is unavailable, falling back to 'torch' ({message[:2000]})",
                          RuntimeWarning, stacklevel=2)
            _outcome = ExtensionUnavailable(message)
    if isinstance(_outcome, ExtensionUnavailable):
        raise _outcome
    return _outcome


def unavailable_reason() -> str | None:
    try:
        load()
    except ExtensionUnavailable as exc:
        return f"the C++ extension could not be built or loaded: {exc}"
    return None


def _register_fake_kernels() -> None:
    """Shapes and dtypes of the operators' results without running them (torch.compile, opcheck)."""

    @torch.library.register_fake("lamb_kernels::sums_of_squares")
    def _(tensors, paired, chunk_size):
        shape = (len(tensors),) if paired is None else (len(tensors), 2)
        return torch.empty(shape, dtype=torch.float32, device=tensors[0].device if tensors else "cpu")

    @torch.library.register_fake("lamb_kernels::lamb_moments")
    def _(params, grads, exp_avgs, exp_avg_sqs, hyper, grad_sumsq, chunk_size):
        return hyper.new_empty((len(params), 2))

    @torch.library.register_fake("lamb_kernels::lamb_apply")
    def _(params, exp_avgs, exp_avg_sqs, hyper, norms, chunk_size):
        return None

    @torch.library.register_fake("lamb_kernels::lars_apply")
    def _(params, grads, momentum_buffers, hyper, norms, chunk_size):
        return None
