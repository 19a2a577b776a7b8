"""Builds or loads the C++ operators in csrc/ (the "cpp" backend) and their CUDA implementations
(csrc/cuda/, the "cuda" backend), and describes them to torch.

Nothing is built at ``import lamb_kernels``. The first time the "cpp" backend is considered
(``available_backends("cpu")``, or an optimizer stepping CPU parameters with ``backend="auto"``):

1. a library built ahead of time (``LAMB_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .``),
   ``lamb_kernels/_C*.so``, is loaded if present and stamped as built from these sources for this
   torch (``_C.build.json`` beside it);
2. else a library from an earlier just-in-time build is loaded from the cache, found by a hash of
   the sources, the compiler flags, torch's and Python's versions and the CPU's features;
3. else the sources are compiled with ``torch.utils.cpp_extension`` (one log line, a minute or so)
   into that cache (build_cache.py: where it lives, the build lock, and how a library is published
   whole, with a record of its size and sha256 beside it).

Every library is checked before it is loaded (``build_cache.library_damage``): one cut short by a
crash or a full disk would otherwise kill the process with SIGBUS, whatever backend it asked for. A
cached one that fails the check is rebuilt, with one warning; a prebuilt one is passed over for step 2.

A build that fails logs one warning; "auto" then falls back to the "torch" backend, and asking for
"cpp" by name raises an error that carries the build's message.

The CUDA library (``load_cuda``) follows the same three steps: ``lamb_kernels/_C_cuda*.so`` from
the ahead-of-time build (when torch and nvcc have CUDA there), else a cached or fresh just-in-time
build for the current device's compute capability (a minute or two), keyed also by torch's CUDA
version, the architecture and nvcc. It holds only the CUDA kernels of the operators: the CPU library,
which declares them, is loaded first. A failure warns once; "auto" then takes the next backend.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import torch

from . import build_cache
from .build_cache import ExtensionUnavailable
from .schemas import register_fakes

logger = logging.getLogger("lamb_kernels")


def _find_csrc() -> Path:
    here = Path(__file__).resolve().parent
    # An installed package carries the sources as lamb_kernels/csrc; a checkout has them beside it.
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "ops.cpp").exists():
            return candidate
    return here / "csrc"


CSRC = _find_csrc()
SOURCES = ("ops.cpp", "multi_tensor_cpu.cpp", "lamb_cpu.cpp", "lars_cpu.cpp", "host.cpp")
HEADERS = ("multi_tensor.h", "multi_tensor_cpu.h", "hyper_columns.h", "optimizer_math.h")
# No fast-math: IEEE division and square root, as in the Triton kernels. -fno-math-errno only lets
# the compiler use the vector square-root instruction (errno is never read); FMA contraction is on
# as on the GPU. The just-in-time build is tuned to the machine that will run it.
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=fast"]
JIT_ARCH_FLAGS = ["-march=native"]
LIBRARY_NAME = "lamb_kernels_cpp"
STAMP_NAME = "_C.build.json"  # beside an ahead-of-time library: what it was built from

CUDA_SOURCES = ("cuda/register.cpp", "cuda/multi_tensor.cpp", "cuda/sums_of_squares.cu", "cuda/lamb.cu",
                "cuda/lars.cu")
CUDA_HEADERS = ("cuda/multi_tensor.h", "cuda/kernels.cuh", "optimizer_math.h", "hyper_columns.h", "multi_tensor.h")
# nvcc's defaults keep IEEE division and square root (-prec-div, -prec-sqrt; never --use_fast_math);
# the kernels also use the _rn intrinsics, and the build check reads the PTX for approximations.
CUDA_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
CUDA_LIBRARY_NAME = "lamb_kernels_cuda"
CUDA_STAMP_NAME = "_C_cuda.build.json"
AHEAD_OF_TIME_ARCHES = ("80", "90")  # sm_80 and sm_90 machine code, and compute_90 PTX for later GPUs


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _source_hash(names=None) -> str:
    digest = hashlib.sha256()
    for name in names or (*SOURCES, *HEADERS):
        digest.update(name.encode())
        digest.update((CSRC / name).read_bytes())
    return digest.hexdigest()


def _build_key() -> str:
    digest = hashlib.sha256(_source_hash().encode())
    for part in (CFLAGS, JIT_ARCH_FLAGS, torch.__version__, sys.version, platform.machine(), _cpu_features(),
                 os.environ.get("CXX", "")):
        digest.update(repr(part).encode())
    return digest.hexdigest()[:16]


def prebuilt_stamp() -> dict:
    """What an ahead-of-time build records beside the library (setup.py writes it), and what a library
    must have been built from to be used: these sources, this torch."""
    return {"sources": _source_hash(), "torch": torch.__version__}


def cuda_prebuilt_stamp() -> dict:
    """What an ahead-of-time CUDA library must have been built from: these sources, this torch."""
    return {"sources": _source_hash((*CUDA_SOURCES, *CUDA_HEADERS)), "torch": torch.__version__}


def _prebuilt_library(module: str = "lamb_kernels._C", stamp_name: str = STAMP_NAME, expected=None) -> str | None:
    """The ahead-of-time library, if one is installed and was built from these sources for this
    torch; a stale one (sources edited since, torch upgraded) is passed over with one log line."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return None
    try:
        stamp = json.loads(Path(spec.origin).with_name(stamp_name).read_text())
    except (OSError, ValueError):
        stamp = None
    if stamp != (expected or prebuilt_stamp()):
        logger.warning("lamb_kernels: ignoring %s, built from other sources or for another torch", spec.origin)
        return None
    return spec.origin


def _require_sources() -> None:
    """Raises ExtensionUnavailable when the sources a just-in-time build needs are not installed."""
    if not (CSRC / SOURCES[0]).exists():
        raise ExtensionUnavailable(f"the C++ sources are not installed (looked in {CSRC})")


def _load_cached_or_build() -> str:
    """Loads the just-in-time built CPU library from the cache, building it first when it is missing."""
    _require_sources()
    return build_cache.cached_or_built(LIBRARY_NAME, _build_key(), "the C++ CPU kernels (first use; about a minute)",
                                       lambda work: _build_cpu(work))


def _build_cpu(work: Path) -> None:
    from torch.utils import cpp_extension

    cpp_extension.load(  # builds, and loads the library from the work folder
        name=LIBRARY_NAME,
        sources=[str(CSRC / name) for name in SOURCES],
        extra_cflags=CFLAGS + JIT_ARCH_FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(work),
        is_python_module=False,
        verbose=False,
    )


def cuda_arch_flags(arches) -> list:
    """nvcc flags for machine code of each compute capability in `arches` ("90", say)."""
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in arches]


def build_cuda(work: Path, arches, extra_cuda_flags=(), verbose: bool = False, extra_cflags=()) -> None:
    """Compiles csrc/cuda into `work`/lamb_kernels_cuda.so (and loads it) for the compute
    capabilities `arches`; the build check (tests/test_cuda_build.py) adds its own flags."""
    from torch.utils import cpp_extension

    cpp_extension.load(
        name=CUDA_LIBRARY_NAME,
        sources=[str(CSRC / name) for name in CUDA_SOURCES],
        extra_cflags=["-O3", *extra_cflags],
        extra_cuda_cflags=[*CUDA_FLAGS, *cuda_arch_flags(arches), *extra_cuda_flags],
        build_directory=str(work),
        is_python_module=False,
        verbose=verbose,
    )


def _nvcc_version() -> str:
    from torch.utils import cpp_extension

    nvcc = Path(cpp_extension.CUDA_HOME or "") / "bin" / "nvcc"
    try:
        return subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ExtensionUnavailable(f"nvcc not found or not working ({nvcc}: {exc})") from None


def _device_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def _cuda_build_key(arch: str) -> str:
    digest = hashlib.sha256(_source_hash((*CUDA_SOURCES, *CUDA_HEADERS)).encode())
    for part in (CUDA_FLAGS, arch, torch.__version__, torch.version.cuda, sys.version, platform.machine(),
                 _nvcc_version(), os.environ.get("CXX", "")):
        digest.update(repr(part).encode())
    return digest.hexdigest()[:16]


_outcome = None  # the library's path, or the ExtensionUnavailable that explains its absence
_lock = threading.Lock()


def load() -> str:
    """Loads the operators (the ahead-of-time library, else the cached or freshly built one) and
    returns the library's path; raises ExtensionUnavailable with the reason when that is impossible.
    Tried once per process: a failure warns once and is remembered."""
    global _outcome
    with _lock:
        if _outcome is None:
            _outcome = _load()
    if isinstance(_outcome, ExtensionUnavailable):
        raise _outcome
    return _outcome


_host = None  # csrc/host.cpp's module once imported


def host_module():
    """The CPU library as a Python module (csrc/host.cpp: the optimizers' host-path helpers) when the
    library is loaded, or loads without a build (ahead of time, or cached); else None, and the caller
    does the same work in Python. Never starts a build: a step must not wait a minute for a helper."""
    global _host
    if _host is None:
        if _outcome is None and not _loads_without_build():
            return None
        try:
            path = load()
        except ExtensionUnavailable:
            _host = False
            return None
        spec = importlib.util.spec_from_file_location("lamb_kernels._C", path)  # (by path: PyInit__C)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _host = module if hasattr(module, "layouts") else False
    return _host or None


def _loads_without_build() -> bool:
    prebuilt = _prebuilt_library()
    candidates = [Path(prebuilt)] if prebuilt is not None else []
    candidates.append(build_cache.cache_directory() / f"{LIBRARY_NAME}_{_build_key()}" / f"{LIBRARY_NAME}.so")
    return any(build_cache.library_damage(candidate) is None for candidate in candidates)


def _load_prebuilt() -> str | None:
    prebuilt = _prebuilt_library()
    return None if prebuilt is None else build_cache.load_library(Path(prebuilt))


def _load():
    """The library's path, or the ExtensionUnavailable that says why there is none (after one warning).
    A prebuilt library that fails to load leaves the just-in-time build to try."""
    failures = []
    for loader in (_load_prebuilt, _load_cached_or_build):
        try:
            path = loader()
        except Exception as exc:  # a compiler error, no compiler, no ninja, a library that will not load...
            failures.append(str(exc) if isinstance(exc, ExtensionUnavailable) else f"{type(exc).__name__}: {exc}")
            continue
        if path is None:  # no usable prebuilt library
            continue
        _register_fake_kernels()
        return path
    message = "; ".join(failures).strip()
    warnings.warn(f"lamb_kernels: the C++ backend is unavailable, falling back to 'torch' ({message[:2000]})",
                  RuntimeWarning, stacklevel=4)
    return ExtensionUnavailable(message)


def unavailable_reason() -> str | None:
    try:
        load()
    except ExtensionUnavailable as exc:
        return f"the C++ extension could not be built or loaded: {exc}"
    return None


_cuda_outcome = None


def load_cuda() -> str:
    """Loads the CUDA kernels of the operators (after the CPU library, which declares them) and
    returns the library's path; raises ExtensionUnavailable with the reason. Tried once per process."""
    global _cuda_outcome
    load()
    with _lock:
        if _cuda_outcome is None:
            _cuda_outcome = _load_cuda()
    if isinstance(_cuda_outcome, ExtensionUnavailable):
        raise _cuda_outcome
    return _cuda_outcome


def _load_cuda():
    failures = []
    prebuilt = _prebuilt_library("lamb_kernels._C_cuda", CUDA_STAMP_NAME, cuda_prebuilt_stamp())
    # The ahead-of-time build has machine code for sm_80 (which runs on every 8.x) and sm_90, and
    # compute_90 PTX for later GPUs: an older GPU needs its own build.
    if prebuilt is not None and torch.cuda.get_device_capability()[0] >= 8:
        try:
            return build_cache.load_library(Path(prebuilt))
        except Exception as exc:  # damaged, or it will not load
            failures.append(str(exc) if isinstance(exc, ExtensionUnavailable) else f"{type(exc).__name__}: {exc}")
    try:
        _require_sources()
        arch = _device_arch()
        return build_cache.cached_or_built(CUDA_LIBRARY_NAME, _cuda_build_key(arch),
                                           f"the CUDA kernels for sm_{arch} (first use; a minute or two)",
                                           lambda work: build_cuda(work, [arch]))
    except Exception as exc:  # no nvcc, a compiler error, no device...
        failures.append(str(exc) if isinstance(exc, ExtensionUnavailable) else f"{type(exc).__name__}: {exc}")
    message = "; ".join(failures).strip()
    warnings.warn(f"lamb_kernels: the CUDA C++ backend is unavailable ({message[:2000]})", RuntimeWarning,
                  stacklevel=4)
    return ExtensionUnavailable(message)


def cuda_unavailable_reason() -> str | None:
    try:
        load_cuda()
    except ExtensionUnavailable as exc:
        return f"the CUDA extension could not be built or loaded: {exc}"
    return None


def _register_fake_kernels() -> None:
    """Shapes and dtypes of the operators' results without running them (torch.compile, opcheck)."""
    register_fakes("")
