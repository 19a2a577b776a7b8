"""Compiles every Triton kernel variant for sm_90 (H100/H200) without a GPU, and prints each
kernel's PTX math: run by test_triton_compiles.py in a process without TRITON_INTERPRET."""
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lamb_kernels.triton import lamb, lars, multi_tensor

POINTER_TYPES = {"ptrs": "*i64", "numels": "*i64", "chunk_tensor": "*i32", "chunk_offset": "*i64",
                 "bounds": "*i32", "partials": "*fp32", "hyper": "*fp32", "grad_sumsq": "*fp32",
                 "norms": "*fp32", "out": "*fp32"}
CHUNKING = dict(CHUNK=multi_tensor.CHUNK, BLOCK=multi_tensor.BLOCK)
VARIANTS = [
    (multi_tensor._chunk_sumsq_kernel, dict(N_COLS=4, COL0=1, COL1=-1, **CHUNKING)),
    (multi_tensor._chunk_sumsq_kernel, dict(N_COLS=3, COL0=0, COL1=1, **CHUNKING)),
    (multi_tensor._segment_sum_kernel, dict(WIDTH=1, BLOCK=multi_tensor.SEGMENT_BLOCK)),
    (multi_tensor._segment_sum_kernel, dict(WIDTH=2, BLOCK=multi_tensor.SEGMENT_BLOCK)),
    (lamb._lamb_moments_kernel, dict(N_HYPER=lamb.N_HYPER, CLIP=True, **CHUNKING)),
    (lamb._lamb_moments_kernel, dict(N_HYPER=lamb.N_HYPER, CLIP=False, **CHUNKING)),
    (lamb._lamb_apply_kernel, dict(N_HYPER=lamb.N_HYPER, **CHUNKING)),
    (lars._lars_apply_kernel, dict(N_HYPER=lars.N_HYPER, ADAPTIVE=True, **CHUNKING)),
    (lars._lars_apply_kernel, dict(N_HYPER=lars.N_HYPER, ADAPTIVE=False, **CHUNKING)),
]


def compile_variant(kernel, constants):
    signature = {name: "constexpr" if name in constants else POINTER_TYPES[name] for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=multi_tensor.NUM_WARPS, enable_fp_fusion=True))
    ptx = compiled.asm["ptx"]
    return {"kernel": kernel.__name__, "constants": {k: str(v) for k, v in constants.items()},
            "approximate_math": sorted({op for op in ("sqrt.approx", "div.approx", "div.full", "rsqrt.approx")
                                        if op in ptx})}


if __name__ == "__main__":
    json.dump([compile_variant(kernel, constants) for kernel, constants in VARIANTS], sys.stdout)
