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
   into that cache: ``$LAMB_KERNELS_CACHE``, else ``$TORCH_EXTENSIONS_DIR``, else
   ``~/.cache/torch_extensions``. Only a complete library, flushed to disk, ever appears at the
   path that step 2 loads, with a record of its size and sha256 beside it. One process builds at a
   time, under a lock that the kernel drops when its holder dies (a build killed by the OOM killer
   blocks nothing), and another waits for it at most 15 minutes, then falls back.

Every library is checked before it is loaded (``_library_damage``): one cut short by a crash or a
full disk would otherwise kill the process with SIGBUS, whatever backend it asked for. A cached one
that fails the check is rebuilt, with one warning; a prebuilt one is passed over for step 2.

A build that fails logs one warning; "auto" then falls back to the "torch" backend, and asking for
"cpp" by name raises an error that carries the build's message.

The CUDA library (``load_cuda``) follows the same three steps: ``lamb_kernels/_C_cuda*.so`` from
the ahead-of-time build (when torch and nvcc have CUDA there), else a cached or fresh just-in-time
build for the current device's compute capability (a minute or two), keyed also by torch's CUDA
version, the architecture and nvcc. It holds only the CUDA kernels of the operators: the CPU library,
which declares them, is loaded first. A failure warns once; "auto" then takes the next backend.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import struct
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

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
# A build takes one to three minutes: a process still building after this long is taken to be stuck,
# and one waiting for it gives up and falls back.
STALE_LOCK_SECONDS = 900
LOCK_POLL_SECONDS = 0.5


class ExtensionUnavailable(RuntimeError):
    """The C++ operators could neither be loaded nor built; the message says why."""


class DamagedLibrary(ExtensionUnavailable):
    """A library file that must not be loaded: shorter than its own headers say, or not the bytes
    recorded when it was cached (_library_damage); the message names the file."""


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


def cache_directory() -> Path:
    root = os.environ.get("LAMB_KERNELS_CACHE") or os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root or Path.home() / ".cache" / "torch_extensions")


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


@contextlib.contextmanager
def _ninja_on_path():
    # torch looks for ninja on PATH; the one pip installed with this package may not be there (a
    # virtual environment used without activating it).
    try:
        import ninja
    except ImportError:
        yield
        return
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, saved])
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def _record_of(library: Path) -> Path:
    """Where the cache records a library's size and sha256: beside it, as <library>.json."""
    return library.with_name(library.name + ".json")


def _sha256(library: Path) -> str:
    digest = hashlib.sha256()
    with open(library, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _elf_extent(library: Path) -> int | None:
    """How many bytes the ELF file `library` says it holds: the end of the furthest of its header,
    its program headers, its segments and its section header table (which a linker writes last); None
    when the file does not begin with a well-formed ELF header."""
    with open(library, "rb") as file:
        ident = file.read(16)
        if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
            return None
        wide, order = ident[4] == 2, "<" if ident[5] == 1 else ">"
        header = struct.Struct(order + ("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH"))
        segment = struct.Struct(order + ("IIQQQQQQ" if wide else "IIIIIIII"))
        fields = file.read(header.size)
        if len(fields) < header.size:
            return len(ident) + header.size
        _, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _ = header.unpack(fields)
        if phnum and phentsize < segment.size:
            return None
        extent = max(len(ident) + header.size, phoff + phnum * phentsize, shoff + shnum * shentsize)
        file.seek(phoff)
        table = file.read(phnum * phentsize)
        if len(table) < phnum * phentsize:
            return extent
        for index in range(phnum):
            entry = segment.unpack_from(table, index * phentsize)
            offset, length = (entry[2], entry[5]) if wide else (entry[1], entry[4])
            extent = max(extent, offset + length)
        return extent


def _library_damage(library: Path) -> str | None:
    """Why `library` must not be loaded, or None when it may be.

    Loading maps the file into memory, and touching a mapped page past the end of a short file kills
    the process with SIGBUS, whatever backend it asked for; a crash after an unflushed write, or a
    full disk, leaves such files. So a library is loaded only when its ELF headers fit in its length
    (the segments the loader maps, and the section header table at the end of the file), and, where a
    record of its size and sha256 lies beside it (the cache writes one), when its bytes match the
    record, which also catches blocks a crash left zeroed. A library without a record (an installed
    one, or one cached by an earlier version) is judged by its ELF headers alone."""
    try:
        size = library.stat().st_size
    except FileNotFoundError:
        return f"the library {library} does not exist"
    record = _record_of(library)
    try:
        recorded = json.loads(record.read_text())
    except FileNotFoundError:
        recorded = None
    except (OSError, ValueError) as exc:
        return f"the record {record} of the library's size and sha256 cannot be read ({exc})"
    if recorded is not None and recorded != {"size": size, "sha256": _sha256(library)}:
        return (f"the library {library} ({size} bytes) does not match the size and sha256 recorded in "
                f"{record} when it was cached")
    if not sys.platform.startswith("linux"):
        return None  # the libraries are not ELF files there: the record is the whole check
    extent = _elf_extent(library)
    if extent is None:
        return f"the library {library} does not begin with a well-formed ELF header"
    if extent > size:
        return f"the library {library} is cut short: {size} bytes, where its ELF headers need {extent}"
    return None


def _load_library(library: Path) -> str:
    """Loads the operators of `library` after checking that it is whole (_library_damage), and returns
    its path; raises DamagedLibrary otherwise. Every library this module loads comes through here."""
    damage = _library_damage(library)
    if damage is not None:
        raise DamagedLibrary(damage)
    torch.ops.load_library(str(library))
    return str(library)


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Holds the right to build in `build_dir`, waiting at most STALE_LOCK_SECONDS for a process that
    holds it, then raising ExtensionUnavailable.

    The lock is an flock on build_dir/build.lock: the kernel drops it when its holder exits, however it
    exits, so a build killed by the OOM killer leaves nothing to wait for, and a live build is never
    taken over. (torch's own lock file in the work folder outlives a killed build: _clear_killed_build.)"""
    import fcntl  # POSIX only; elsewhere the build fails here and the backend falls back

    path = build_dir / "build.lock"
    with open(path, "a") as handle:  # closing it releases the lock
        deadline = time.monotonic() + STALE_LOCK_SECONDS
        waiting = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            if time.monotonic() > deadline:
                raise ExtensionUnavailable(
                    f"another process has held the build lock {path} for more than {STALE_LOCK_SECONDS} seconds; "
                    f"its build is taken to be stuck, and this process stopped waiting for it")
            if not waiting:
                logger.warning("lamb_kernels: waiting for another process's build in %s", build_dir)
                waiting = True
            time.sleep(LOCK_POLL_SECONDS)
        yield


def _clear_killed_build(work: Path, library_name: str) -> None:
    """Removes what a killed build may have left in the work folder that would stall or break the next
    one, once the build lock is held (so no build is running there): torch's lock file, on which
    torch would wait for ever, and a linked library cut short, which ninja would take as up to date
    and torch would load."""
    lock = work / "lock"
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
        logger.warning("lamb_kernels: removed the build lock %s, left by a build that was killed", lock)
    built = work / f"{library_name}.so"
    if built.exists() and _library_damage(built) is not None:
        built.unlink()


def _write_durably(path: Path, data: bytes) -> None:
    # A rename is atomic, but without the flush a crash can leave the new name on a short or empty file.
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        with open(staging, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def _publish(built: Path, library: Path) -> None:
    """Copies the freshly built `built` to the cache's `library`, with the record of its size and sha256
    beside it: each file is flushed to disk under a temporary name and then renamed into place, the
    record first (so no library appears without one), and the folder is flushed last so the renames
    survive a crash too. Another process finds no library or a whole one."""
    data = built.read_bytes()
    record = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _write_durably(_record_of(library), json.dumps(record).encode())
    _write_durably(library, data)
    folder = os.open(library.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _load_cached_or_build() -> str:
    """Loads the just-in-time built CPU library from the cache, building it first when it is missing."""
    return _cached_or_built(LIBRARY_NAME, _build_key(), "the C++ CPU kernels (first use; about a minute)",
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


def _cached_or_built(library_name: str, key: str, what: str, build) -> str:
    """Loads a just-in-time built library from the cache, calling `build(work_folder)` first when it
    is missing or damaged.

    One process builds at a time (_build_lock), in a work folder; the library is then published to the
    path other processes load (_publish). A cached library that fails the check of _load_library is
    rebuilt, with one warning; if the rebuild fails, the error says both."""
    if not (CSRC / SOURCES[0]).exists():
        raise ExtensionUnavailable(f"the C++ sources are not installed (looked in {CSRC})")
    build_dir = cache_directory() / f"{library_name}_{key}"
    library = build_dir / f"{library_name}.so"
    if library.exists():
        with contextlib.suppress(DamagedLibrary):  # (checked again, and reported, under the build lock)
            return _load_library(library)
    build_dir.mkdir(parents=True, exist_ok=True)
    damage = None
    with _build_lock(build_dir):
        if library.exists():  # published while this process waited, or damaged
            try:
                return _load_library(library)
            except DamagedLibrary as exc:
                damage = str(exc)
                library.unlink(missing_ok=True)
        logger.warning("lamb_kernels: building %s in %s", what, build_dir)
        work = build_dir / "build"
        work.mkdir(exist_ok=True)
        _clear_killed_build(work, library_name)
        try:
            with _ninja_on_path():
                build(work)
        except Exception as exc:
            if damage is None:
                raise
            raise ExtensionUnavailable(f"{damage}; it was not loaded, and rebuilding it failed: "
                                       f"{type(exc).__name__}: {exc}") from exc
        built = work / f"{library_name}.so"
        try:
            _publish(built, library)
        except OSError as exc:  # a full disk, say: this process has its library, the next one builds again
            logger.warning("lamb_kernels: could not store %s in the cache (%s)", library, exc)
    if damage is not None:
        warnings.warn(f"lamb_kernels: {damage}; it was not loaded, and has been rebuilt.", RuntimeWarning,
                      stacklevel=2)
    # The library this process loaded (the build loads it from the work folder): loading the copy
    # too would register the operators twice.
    return str(built)


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
    candidates.append(cache_directory() / f"{LIBRARY_NAME}_{_build_key()}" / f"{LIBRARY_NAME}.so")
    return any(_library_damage(candidate) is None for candidate in candidates)


def _load_prebuilt() -> str | None:
    prebuilt = _prebuilt_library()
    return None if prebuilt is None else _load_library(Path(prebuilt))


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
            return _load_library(Path(prebuilt))
        except Exception as exc:  # damaged, or it will not load
            failures.append(str(exc) if isinstance(exc, ExtensionUnavailable) else f"{type(exc).__name__}: {exc}")
    try:
        arch = _device_arch()
        return _cached_or_built(CUDA_LIBRARY_NAME, _cuda_build_key(arch),
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
