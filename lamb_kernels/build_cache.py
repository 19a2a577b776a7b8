"""The cache of just-in-time built libraries (extension.py says what is built, and when): where a
library is kept, how it is checked before it is loaded, and how a build publishes it so that no
process ever loads a library cut short.

The cache is ``$LAMB_KERNELS_CACHE``, else ``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``;
a library lives in a folder named by its build's key. Only a complete library, flushed to disk, ever
appears at the path that is loaded, with a record of its size and sha256 beside it. One process
builds at a time, under a lock that the kernel drops when its holder dies (a build killed by the OOM
killer blocks nothing), and another waits for it at most STALE_LOCK_SECONDS, then gives up.

Every library is checked before it is loaded (`library_damage`): one cut short by a crash or a full
disk would otherwise kill the process with SIGBUS, whatever backend it asked for. A cached one that
fails the check is rebuilt, with one warning.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import sys
import time
import warnings
from pathlib import Path

import torch

logger = logging.getLogger("lamb_kernels")

# A build takes one to three minutes: a process still building after this long is taken to be stuck,
# and one waiting for it gives up and falls back.
STALE_LOCK_SECONDS = 900
LOCK_POLL_SECONDS = 0.5


class ExtensionUnavailable(RuntimeError):
    """The C++ operators could neither be loaded nor built; the message says why."""


class DamagedLibrary(ExtensionUnavailable):
    """A library file that must not be loaded: shorter than its own headers say, or not the bytes
    recorded when it was cached (library_damage); the message names the file."""


def cache_directory() -> Path:
    """The folder that holds the cache: one folder in it per library and build key."""
    root = os.environ.get("LAMB_KERNELS_CACHE") or os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root or Path.home() / ".cache" / "torch_extensions")


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


def library_damage(library: Path) -> str | None:
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


def load_library(library: Path) -> str:
    """Loads the operators of `library` after checking that it is whole (library_damage), and returns
    its path; raises DamagedLibrary otherwise. Every library the package loads comes through
    here (extension.py's prebuilt ones too)."""
    damage = library_damage(library)
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
    if built.exists() and library_damage(built) is not None:
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


def cached_or_built(library_name: str, key: str, what: str, build) -> str:
    """Loads a just-in-time built library from the cache, calling `build(work_folder)` first when it
    is missing or damaged.

    One process builds at a time (_build_lock), in a work folder; the library is then published to the
    path other processes load (_publish). A cached library that fails the check of load_library is
    rebuilt, with one warning; if the rebuild fails, the error says both."""
    build_dir = cache_directory() / f"{library_name}_{key}"
    library = build_dir / f"{library_name}.so"
    if library.exists():
        with contextlib.suppress(DamagedLibrary):  # (checked again, and reported, under the build lock)
            return load_library(library)
    build_dir.mkdir(parents=True, exist_ok=True)
    damage = None
    with _build_lock(build_dir):
        if library.exists():  # published while this process waited, or damaged
            try:
                return load_library(library)
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


