"""The Triton kernels compile for a real GPU target (sm_90), even on a machine without one: their
arithmetic is IEEE-rounded (no approximate sqrt or division in the PTX), and the aligned (ALIGN)
variants of the main kernels move whole blocks with 128-bit loads and stores (those of 8-bit states
too; the codes the LAMB moments kernel writes, 64 bits at a time)."""
import inspect
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.compiler import ASTSource  # noqa: E402

if torch.cuda.is_available():
    pytest.skip("with a GPU the suite compiles and runs the kernels for real", allow_module_level=True)
if "constexprs" not in inspect.signature(ASTSource).parameters:
    pytest.skip(f"triton {triton.__version__}: ASTSource has another signature", allow_module_level=True)


def test_every_kernel_compiles_for_sm90_with_ieee_math():
    here = pathlib.Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(here / "compile_for_hopper.py")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    variants = json.loads(result.stdout)
    assert len(variants) == 36
    for variant in variants:
        assert variant["approximate_math"] == [], variant
        if variant["constants"].get("ALIGN") == "True":
            assert variant["loads_128"], variant
            if variant["kernel"] == "_lamb_moments_kernel" and variant["bases"]["m_base"] == "*i8":
                assert variant["stores_64"], variant  # (it stores 8-bit codes and fp32 scales only)
            elif variant["kernel"] != "_chunk_sumsq_kernel":  # (it stores one sum per chunk)
                assert variant["stores_128"], variant
