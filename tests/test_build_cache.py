"""The just-in-time build cache survives what a crash or a killed build leaves behind: a library cut
short or with zeroed blocks is never loaded (loading a short one kills the process with SIGBUS, even
one that asked for the torch backend), and a build lock left by a killed build, or held by a stuck
one, never makes a later process wait for ever.

Whatever could kill or hang the process runs in a subprocess, with the cache in a temporary folder.
No test compiles the sources: the damaged libraries are copies of the one the cpp suites build."""
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from lamb_kernels import build_cache, extension

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAME = extension.LIBRARY_NAME


# The start of each subprocess: it prints every warning as one line "warning: ...", when it happens.
PRELUDE = """
    import warnings
    import torch
    import lamb_kernels
    from lamb_kernels import FusedLAMB, build_cache, extension
    extension._prebuilt_library = lambda: None  # as if no ahead-of-time build were installed
    warnings.simplefilter("always")
    warnings.showwarning = lambda message, *_: print("warning:", str(message).replace(chr(10), " "))

    def step(backend):
        p = torch.nn.Parameter(torch.ones(5))
        opt = FusedLAMB([p], backend=backend)
        for _ in range(3):  # the second step reuses its plans, and looks for the library's helpers
            p.grad = torch.ones(5)
            opt.step()
        return sorted({key[2] for key in opt._backends})
"""


def run_python(code: str, cache: pathlib.Path, timeout=60):
    """Runs PRELUDE then `code` in a new process whose cache is the folder `cache`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LAMB_KERNELS_CACHE": str(cache)}
    env.pop("LAMB_KERNELS_BACKEND", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(PRELUDE) + textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def cache_folder(cache: pathlib.Path) -> pathlib.Path:
    """Where the cache under `cache` keeps the CPU library for this environment (CXX included)."""
    return cache / f"{NAME}_{extension._build_key()}"


@pytest.fixture(scope="module")
def built_library() -> pathlib.Path:
    """The real cache's CPU library (built now if need be, as the cpp suites do), to copy and damage."""
    try:
        extension.load()
    except extension.ExtensionUnavailable as exc:
        pytest.skip(f"the C++ extension did not build here: {exc}")
    library = cache_folder(build_cache.cache_directory()) / f"{NAME}.so"
    if not library.exists():
        pytest.skip("no just-in-time library in the cache here (an ahead-of-time one was loaded)")
    return library


def cut_short(source: pathlib.Path, target: pathlib.Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes()[: source.stat().st_size // 2])


def warning_lines(stdout: str) -> list:
    return [line for line in stdout.splitlines() if line.startswith("warning: ")]


def test_a_library_cut_short_in_the_cache_is_rebuilt_with_one_warning(tmp_path, built_library):
    """The crash that cut the cached library short cut the work folder's copy too: the rebuild does not
    take that copy as up to date (as ninja would, and then load it: SIGBUS), and leaves the cache whole
    again. The build here
    does what ninja does with a library it finds, and otherwise copies the real one: a compile from
    another checkout's folder takes minutes, and is not what this test is about."""
    folder = cache_folder(tmp_path)
    cut_short(built_library, folder / f"{NAME}.so")
    cut_short(built_library, folder / "build" / f"{NAME}.so")
    result = run_python(f"""
        import shutil

        def build_as_ninja_would(work):  # (and then loads it, as torch's build does)
            if not (work / "{NAME}.so").exists():  # (a library it finds, ninja takes as up to date)
                shutil.copyfile({str(built_library)!r}, work / "{NAME}.so")
            torch.ops.load_library(str(work / "{NAME}.so"))

        extension._build_cpu = build_as_ninja_would
        print(step("cpp"))
    """, tmp_path)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    ours = warning_lines(result.stdout)
    assert len(ours) == 1 and str(folder / f"{NAME}.so") in ours[0] and "cut short" in ours[0], result.stdout
    assert "has been rebuilt" in ours[0] and result.stdout.splitlines()[-1] == "['cpp']", result.stdout
    assert build_cache.library_damage(folder / f"{NAME}.so") is None


@pytest.mark.parametrize("damage", ["cut short", "zeroed block"])
def test_a_damaged_cached_library_breaks_neither_import_nor_the_torch_backend(tmp_path, monkeypatch, built_library,
                                                                              damage):
    """With no compiler to rebuild it: import works, the torch backend steps without a warning (its
    host path would load the library's helpers), and "auto" falls back to torch with one warning that
    names the library."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    library = cache_folder(tmp_path) / f"{NAME}.so"
    if damage == "cut short":  # without a record beside it: its ELF headers give it away
        cut_short(built_library, library)
    else:  # its full length, with a block zeroed as a crash can leave it: the record of its sha256 gives it away
        whole = built_library.read_bytes()
        library.parent.mkdir(parents=True)
        library.with_name(f"{NAME}.so.json").write_text(
            json.dumps({"size": len(whole), "sha256": hashlib.sha256(whole).hexdigest()}))
        middle = len(whole) // 2
        library.write_bytes(whole[:middle] + bytes(4096) + whole[middle + 4096:])
    result = run_python("""
        print(step("torch"))
        print("cpp" in lamb_kernels.available_backends("cpu"), step("auto"))
    """, tmp_path)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    lines = result.stdout.splitlines()
    assert lines[0] == "['torch']" and lines[-1] == "False ['torch']", result.stdout
    ours = warning_lines(result.stdout)
    assert len(ours) == 1 and str(library) in ours[0] and "rebuilding it failed" in ours[0], result.stdout


def test_a_prebuilt_library_cut_short_is_passed_over_for_the_cache(tmp_path, built_library):
    """The same check guards the ahead-of-time library. The cached one here has no record (as if an
    earlier version had cached it): its ELF headers vouch for it."""
    prebuilt = tmp_path / "installed" / "_C.so"
    cut_short(built_library, prebuilt)
    cached = cache_folder(tmp_path) / f"{NAME}.so"
    cached.parent.mkdir(parents=True)
    shutil.copyfile(built_library, cached)
    result = run_python(f"""
        extension._prebuilt_library = lambda: {str(prebuilt)!r}
        print(extension.load())
        print(step("cpp"))
    """, tmp_path)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert result.stdout.splitlines() == [str(cached), "['cpp']"], result.stdout
    assert "building" not in result.stderr, result.stderr[-3000:]


def test_a_cached_library_is_on_disk_before_its_name_appears(tmp_path, monkeypatch, built_library):
    """A rename is atomic, but after a crash the new name may lead to a short file unless the file was
    flushed first: the library and its record are flushed before they are renamed into place, and
    their folder after. (The "build" here copies the real library instead of compiling.)"""
    monkeypatch.setenv("LAMB_KERNELS_CACHE", str(tmp_path))
    events = []
    flush, rename = os.fsync, os.replace

    def recorded_flush(fd):
        events.append(("flush", os.readlink(f"/proc/self/fd/{fd}")))
        flush(fd)

    def recorded_rename(source, target):
        events.append(("rename", str(source), str(target)))
        rename(source, target)

    monkeypatch.setattr(os, "fsync", recorded_flush)
    monkeypatch.setattr(os, "replace", recorded_rename)
    path = build_cache.cached_or_built(NAME, "test", "a copy of the library",
                                       lambda work: shutil.copyfile(built_library, work / f"{NAME}.so"))
    folder = tmp_path / f"{NAME}_test"
    assert path == str(folder / "build" / f"{NAME}.so")
    renames = [(index, event) for index, event in enumerate(events) if event[0] == "rename"]
    assert {event[2] for _, event in renames} == {str(folder / f"{NAME}.so"), str(folder / f"{NAME}.so.json")}
    for index, (_, source, _) in renames:
        assert ("flush", source) in events[:index], events
    assert events[-1] == ("flush", str(folder)), events
    assert build_cache.library_damage(folder / f"{NAME}.so") is None


def test_a_lock_left_by_a_killed_build_is_not_waited_on(tmp_path, monkeypatch):
    """A build killed by the OOM killer leaves torch's lock file in the work folder, however young
    (far younger here than the limit): the next process removes it, with one log line, and builds at
    once (here with no compiler, so it falls back with one warning)."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    lock = cache_folder(tmp_path) / "build" / "lock"
    lock.parent.mkdir(parents=True)
    result = run_python(f"""
        open({str(lock)!r}, "w").close()
        print(step("auto"))
    """, tmp_path)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert result.stdout.splitlines()[-1] == "['torch']", result.stdout
    ours = warning_lines(result.stdout)
    assert len(ours) == 1 and "no-such-compiler" in ours[0], result.stdout
    assert result.stderr.count(f"removed the build lock {lock}") == 1, result.stderr[-3000:]
    assert not lock.exists()


def test_a_build_stuck_past_the_limit_is_not_waited_for(tmp_path, monkeypatch):
    """A live process (this test) holds the build lock, and torch's lock file, created just now, past
    the limit, cut to 3 seconds: the next process stops waiting and falls back, with one warning
    naming the lock, and leaves the live build's files alone."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    folder = cache_folder(tmp_path)
    torch_lock = folder / "build" / "lock"
    torch_lock.parent.mkdir(parents=True)
    with open(folder / "build.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = run_python(f"""
            build_cache.STALE_LOCK_SECONDS = 3
            open({str(torch_lock)!r}, "w").close()
            print(step("auto"))
        """, tmp_path)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert result.stdout.splitlines()[-1] == "['torch']", result.stdout
    ours = warning_lines(result.stdout)
    assert len(ours) == 1 and str(folder / "build.lock") in ours[0] and "stopped waiting" in ours[0], result.stdout
    assert torch_lock.exists()
