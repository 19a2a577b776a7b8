"""The CUDA kernels (csrc/cuda) compile for sm_80 and sm_90 with no warning, and what they compile to
keeps the project's promises: IEEE division and square root (no approximation in the PTX), 128-bit
global loads and stores in the vectorized variants of the main kernels, no register spills; and the
library loads beside the CPU one, with a CUDA kernel for every operator.

This needs a CUDA build of torch and nvcc, not a GPU: CI runs it in such a virtual environment
(.ci/cuda_build_check, where it fails instead of skipping). Elsewhere it skips."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lamb_kernels import extension

ROOT = Path(__file__).resolve().parent.parent
ARCHES = extension.AHEAD_OF_TIME_ARCHES
OPERATORS = ("sums_of_squares", "lamb_moments", "lamb_apply", "lars_apply")
# Kernels whose vectorized variant (kAligned, the last template argument) must move 128 bits at a
# time, and whether they store.
MAIN_KERNELS = {"lamb_moments_kernel": True, "lamb_apply_kernel": True, "lars_apply_kernel": True,
                "chunk_sums_kernel": False, "lamb_moments_codes_kernel": False, "lamb_apply_codes_kernel": True}
# Kernels of 8-bit states, whose vectorized variant moves each lane's 8 codes 64 bits at a time, and
# whether they store codes.
CODES_KERNELS = {"lamb_moments_codes_kernel": True, "lamb_apply_codes_kernel": False, "lars_apply_kernel": True}


def _nvcc_missing() -> str | None:
    if not torch.version.cuda:
        return "this torch is built without CUDA"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None or not (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
        return "no nvcc (set CUDA_HOME)"
    return None


if os.environ.get("LAMB_KERNELS_REQUIRE_CUDA_BUILD") == "1" and _nvcc_missing() is not None:
    raise RuntimeError(f"the CUDA build check cannot run here: {_nvcc_missing()}")
pytestmark = pytest.mark.skipif(_nvcc_missing() is not None, reason=str(_nvcc_missing()))


def _python(code: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Builds the library once for every test here, keeping nvcc's intermediate files and ptxas'
    report; returns (work folder, log)."""
    work = tmp_path_factory.mktemp("cuda_build")
    keep = work / "keep"
    keep.mkdir()
    flags = ["-Xptxas=-v", "--keep", f"--keep-dir={keep}", "-Werror=all-warnings", "-Xcompiler=-Wall,-Wextra",
             f"-gencode=arch=compute_{ARCHES[-1]},code=compute_{ARCHES[-1]}"]
    result = _python(f"""
        from pathlib import Path
        from lamb_kernels import extension
        extension.build_cuda(Path({str(work)!r}), {list(ARCHES)!r}, {flags!r}, verbose=True,
                             extra_cflags=["-Wall", "-Wextra", "-Werror"])
    """, timeout=1200)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    return work, log


def _ptx_entries(keep: Path) -> dict:
    """Every kernel of the PTX files: mangled name -> its PTX body."""
    entries = {}
    for ptx in keep.glob("*.ptx"):
        text = ptx.read_text()
        for match in re.finditer(r"\.entry (\w+)\((.*?)\n}\n", text, re.S):
            entries[f"{ptx.name}:{match.group(1)}"] = match.group(2)
    return entries


def test_builds_for_every_architecture_without_warnings(build):
    work, log = build
    assert (work / f"{extension.CUDA_LIBRARY_NAME}.so").exists()
    # A diagnostic, not a command line (which names -Werror=all-warnings and the sources).
    diagnostics = [line for line in log.splitlines() if re.search(r"\bwarning\b", line, re.I)
                   and not line.lstrip().startswith(("[", "/usr", "c++", "nvcc"))]
    assert not diagnostics, diagnostics
    for arch in ARCHES:
        assert f"for 'sm_{arch}'" in log, f"no machine code for sm_{arch}"


def test_no_register_spills(build):
    _, log = build
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills, "ptxas reported nothing: was -Xptxas=-v passed?"
    assert all(stores == "0" and loads == "0" for stores, loads in spills), [s for s in spills if s != ("0", "0")]


def test_ieee_division_and_square_root(build):
    work, _ = build
    entries = _ptx_entries(work / "keep")
    assert entries, "no PTX kept"
    approximate = sorted({op for body in entries.values()
                          for op in re.findall(r"\b(?:div|sqrt|rcp|rsqrt)\.(?:approx|full)[\w.]*", body)})
    assert not approximate, approximate
    assert any("div.rn.f32" in body for body in entries.values())
    assert any("sqrt.rn.f32" in body for body in entries.values())


def test_vectorized_variants_move_128_bits(build):
    work, _ = build
    entries = _ptx_entries(work / "keep")
    for kernel, stores in MAIN_KERNELS.items():
        aligned = {name: body for name, body in entries.items() if kernel in name and "Lb1EEEv" in name}
        scalar = {name: body for name, body in entries.items() if kernel in name and "Lb0EEEv" in name}
        assert aligned and scalar, f"{kernel}: variants missing ({len(aligned)} aligned, {len(scalar)} scalar)"
        for name, body in aligned.items():
            assert re.search(r"ld\.global[\w.]*\.v4\.", body), f"{name}: no 128-bit global load"
            if stores:
                assert re.search(r"st\.global[\w.]*\.v4\.", body), f"{name}: no 128-bit global store"


def test_vectorized_variants_move_8_bit_codes_64_bits_at_a_time(build):
    work, _ = build
    entries = _ptx_entries(work / "keep")
    for kernel, stores in CODES_KERNELS.items():
        # (lars_apply_kernel: its variants for int8 buffers, "a" the mangled int8_t)
        variant = "aLb1EEEv" if kernel == "lars_apply_kernel" else "Lb1EEEv"
        aligned = {name: body for name, body in entries.items() if kernel in name and variant in name}
        assert aligned, f"{kernel}: no aligned variant"
        for name, body in aligned.items():
            assert re.search(r"ld\.global[\w.]*\.v2\.u32", body), f"{name}: no 64-bit load of codes"
            if stores:
                assert re.search(r"st\.global[\w.]*\.v2\.u32", body), f"{name}: no 64-bit store of codes"


def test_the_library_loads_beside_the_cpu_one_with_a_cuda_kernel_per_operator(build):
    work, _ = build
    result = _python(f"""
        import torch
        from lamb_kernels import extension
        extension.load()
        torch.ops.load_library({str(work / (extension.CUDA_LIBRARY_NAME + ".so"))!r})
        for op in {OPERATORS!r}:
            name = "lamb_kernels::" + op
            for key in ("CPU", "CUDA"):
                assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (name, key)
        print("ok")
    """, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, (result.stdout + result.stderr)[-4000:]
