"""The C++ element loops that must vectorize do: each loop tagged ``// vectorized:
tests/test_vectorization.py`` in csrc/ is reported vectorized by GCC's -fopt-info-vec, compiled with
the extension's own flags. A loop left scalar keeps the same bits and runs several times slower
(the 8-bit encoding loop did, twice, after changes that looked harmless: docs/states.md), so only a
compiler report sees it."""
import pathlib
import re
import shutil
import subprocess
import sysconfig

import pytest

from lamb_kernels import extension

ROOT = pathlib.Path(__file__).resolve().parent.parent
TAG = "// vectorized: tests/test_vectorization.py"
SOURCES = ["lamb_cpu.cpp", "lars_cpu.cpp"]


def _gcc() -> str | None:
    compiler = shutil.which("c++")
    if compiler is None:
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    return compiler if "Free Software Foundation" in version else None


def tagged_lines(source: pathlib.Path) -> list:
    return [n for n, line in enumerate(source.read_text().splitlines(), 1) if TAG in line]


@pytest.mark.skipif(_gcc() is None, reason="the vectorization report is GCC's (-fopt-info-vec)")
def test_tagged_loops_vectorize(tmp_path):
    from torch.utils.cpp_extension import include_paths

    includes = [flag for path in include_paths() for flag in ("-isystem", path)]
    flags = [*includes, "-isystem", sysconfig.get_paths()["include"], "-fPIC", "-std=c++20", *extension.CFLAGS,
             *extension.JIT_ARCH_FLAGS, "-fopt-info-vec-optimized"]
    # both sources at once: a minute together on 2 cores
    runs = {name: subprocess.Popen([_gcc(), *flags, "-c", str(ROOT / "csrc" / name), "-o", str(tmp_path / f"{name}.o")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for name in SOURCES}
    scalar = {}
    for name, run in runs.items():
        _, report = run.communicate(timeout=600)
        assert run.returncode == 0, report[-2000:]
        lines = tagged_lines(ROOT / "csrc" / name)
        assert lines, f"no loop of {name} is tagged"
        vectorized = {int(m.group(1)) for m in re.finditer(rf"{re.escape(name)}:(\d+):\d+: optimized: loop vectorized",
                                                            report)}
        scalar[name] = [n for n in lines if n not in vectorized]
    assert scalar == {name: [] for name in SOURCES}
