"""Compiles every Triton kernel variant for sm_90 (H100/H200) without a GPU, and prints each
kernel's PTX math: run by test_triton_compiles.py in a process without TRITON_INTERPRET."""
import json
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lamb_kernels.triton import lamb, lars, multi_tensor

POINTER_TYPES = {"ptrs": "*i64", "numels": "*i64", "chunk_tensor": "*i32", "chunk_offset": "*i64",
                 "bounds": "*i32", "partials": "*fp32", "hyper": "*fp32", "grad_sumsq": "*fp32",
                 "grad_scale": "*fp32", "found_inf": "*fp32", "norms": "*fp32", "out": "*fp32"}
CHUNKING = dict(CHUNK=multi_tensor.CHUNK, BLOCK=multi_tensor.BLOCK)
F32, BF16, F16 = tl.float32, tl.bfloat16, tl.float16
VARIANTS = [
    (multi_tensor._chunk_sumsq_kernel, dict(N_COLS=1, COL0=0, COL1=-1, DTYPE0=F32, DTYPE1=F32, **CHUNKING)),
    (multi_tensor._chunk_sumsq_kernel, dict(N_COLS=2, COL0=0, COL1=1, DTYPE0=F32, DTYPE1=BF16, **CHUNKING)),
    (multi_tensor._segment_sum_kernel, dict(WIDTH=1, BLOCK=multi_tensor.SEGMENT_BLOCK)),
    (multi_tensor._segment_sum_kernel, dict(WIDTH=2, BLOCK=multi_tensor.SEGMENT_BLOCK)),
]
for clip, scaled, dtypes in ((True, False, (F32, F32)), (False, False, (F32, F32)), (True, True, (F32, BF16)),
                             (True, True, (F16, F16))):
    VARIANTS.append((lamb._lamb_moments_kernel, dict(N_HYPER=lamb.N_HYPER, CLIP=clip, HAS_SCALE=scaled,
                                                     HAS_FOUND_INF=scaled, P_DTYPE=dtypes[0], G_DTYPE=dtypes[1],
                                                     **CHUNKING)))
for p_dtype, copy_dtype in ((F32, None), (BF16, None), (F32, BF16), (F32, F16)):
    VARIANTS.append((lamb._lamb_apply_kernel, dict(N_HYPER=lamb.N_HYPER, N_COLS=3 if copy_dtype is None else 4,
                                                   HAS_FOUND_INF=True, P_DTYPE=p_dtype, COPY_DTYPE=copy_dtype,
                                                   **CHUNKING)))
for adaptive, p_dtype, g_dtype, copy_dtype in ((True, F32, F32, None), (False, F32, F32, None),
                                               (True, F32, BF16, BF16), (True, F16, F16, None)):
    VARIANTS.append((lars._lars_apply_kernel, dict(N_HYPER=lars.N_HYPER, N_COLS=3 if copy_dtype is None else 4,
                                                   ADAPTIVE=adaptive, HAS_SCALE=True, HAS_FOUND_INF=True,
                                                   P_DTYPE=p_dtype, G_DTYPE=g_dtype, COPY_DTYPE=copy_dtype,
                                                   **CHUNKING)))


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
