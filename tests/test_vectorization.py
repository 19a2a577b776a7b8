"""The C++ element loops that must vectorize do: each loop tagged ``// vectorized:
tests/test_vectorization.py`` in csrc/ is reported vectorized by GCC's -fopt-info-vec, compiled with
the extension's own flags. A loop left scalar keeps the same bits and runs several times slower
(the 8-bit encoding loop did, twice, after changes that looked harmless: docs/states.md), so only a
compiler report sees it. And the sums kept in lanes stay vector adds in the machine code: GCC once
"vectorized" the int8 LAMB moments pass's lane sums as in-order reductions, scalar adds that the
report does not show (objdump does)."""
import pathlib
import platform
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


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Both sources compiled with the extension's flags and -fopt-info-vec-optimized: {name: (report,
    object file)}."""
    if _gcc() is None:
        pytest.skip("the vectorization report is GCC's (-fopt-info-vec)")
    from torch.utils.cpp_extension import include_paths

    out = tmp_path_factory.mktemp("vectorization")
    includes = [flag for path in include_paths() for flag in ("-isystem", path)]
    flags = [*includes, "-isystem", sysconfig.get_paths()["include"], "-fPIC", "-std=c++20", *extension.CFLAGS,
             *extension.JIT_ARCH_FLAGS, "-fopt-info-vec-optimized"]
    # both sources at once: a minute together on 2 cores
    runs = {name: subprocess.Popen([_gcc(), *flags, "-c", str(ROOT / "csrc" / name), "-o", str(out / f"{name}.o")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for name in SOURCES}
    results = {}
    for name, run in runs.items():
        _, report = run.communicate(timeout=600)
        assert run.returncode == 0, report[-2000:]
        results[name] = (report, out / f"{name}.o")
    return results


def test_tagged_loops_vectorize(compiled):
    scalar = {}
    for name, (report, _) in compiled.items():
        lines = tagged_lines(ROOT / "csrc" / name)
        assert lines, f"no loop of {name} is tagged"
        vectorized = {int(m.group(1)) for m in re.finditer(rf"{re.escape(name)}:(\d+):\d+: optimized: loop vectorized",
                                                            report)}
        scalar[name] = [n for n in lines if n not in vectorized]
    assert scalar == {name: [] for name in SOURCES}


# Scalar float additions a function may make: the lane totals (15 each, two sums) and a partial
# chunk's tail. GCC once vectorized the int8 LAMB moments pass's lane sums as in-order reductions
# across the lanes, 783 scalar adds per element type, a third of the pass's time (docs/states.md),
# while its report still said "loop vectorized".
SCALAR_ADDS = 64


@pytest.mark.skipif(shutil.which("objdump") is None or platform.machine() not in ("x86_64", "AMD64"),
                    reason="reads x86-64 machine code with binutils' objdump")
def test_lane_sums_stay_lane_parallel(compiled):
    """No function adds floats one at a time beyond its lane totals: the sums kept in kLanes lanes
    (for_each_lane) are vector adds, not in-order reductions."""
    heavy = {}
    for name, (_, obj) in compiled.items():
        listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", str(obj)], capture_output=True,
                                 text=True, check=True).stdout
        function = None
        for line in listing.splitlines():
            header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
            if header:
                function = header.group(1)
            elif function is not None and re.search(r"\sv?addss\s", line):
                heavy[function] = heavy.get(function, 0) + 1
    over = {function[:120]: count for function, count in heavy.items() if count > SCALAR_ADDS}
    assert heavy, "objdump listed no scalar float add at all: the pattern no longer matches its output"
    assert over == {}
