"""Compiles every Triton kernel variant for sm_90 (H100/H200) without a GPU, and prints what each
kernel's PTX does with memory and math: run by test_triton_compiles.py in a process without
TRITON_INTERPRET.

The base pointers are declared 16-byte aligned, as Triton's launcher specializes them when the
tensors are (the caching allocator's blocks always are): the ALIGN variants must then move whole
blocks with 128-bit loads and stores (8-bit codes: at least 64 bits at a time)."""
import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lamb_kernels.triton import lamb, lars, multi_tensor

TABLES = {"ptrs": "*i64", "numels": "*i64", "chunk_tensor": "*i32", "chunk_offset": "*i64", "bounds": "*i32",
          "partials": "*fp32", "hyper": "*fp32", "grad_sumsq": "*fp32", "grad_scale": "*fp32", "found_inf": "*fp32",
          "norms": "*fp32", "out": "*fp32"}
CHUNKING = dict(CHUNK=multi_tensor.CHUNK, BLOCK=multi_tensor.BLOCK)
F32, BF16, F16, I8, U8 = "*fp32", "*bf16", "*fp16", "*i8", "*u8"
VARIANTS = []  # (kernel, base pointer types, constexprs)
for align in (True, False):
    VARIANTS += [
        (multi_tensor._chunk_sumsq_kernel, dict(a_base=F32, b_base=F32),
         dict(N_COLS=1, COL0=0, COL1=-1, ALIGN=align, **CHUNKING)),
        (multi_tensor._chunk_sumsq_kernel, dict(a_base=F32, b_base=BF16),
         dict(N_COLS=2, COL0=0, COL1=1, ALIGN=align, **CHUNKING)),
    ]
    for clip, scaled, (p, g) in ((True, False, (F32, F32)), (False, False, (F32, F32)), (True, True, (F32, BF16)),
                                 (True, True, (F16, F16))):
        VARIANTS.append((lamb._lamb_moments_kernel, dict(p_base=p, g_base=g, m_base=F32, v_base=F32, ms_base=p,
                                                         vs_base=p),
                         dict(N_HYPER=lamb.N_HYPER, N_COLS=4, CLIP=clip, HAS_SCALE=scaled, HAS_FOUND_INF=scaled,
                              ALIGN=align, **CHUNKING)))
    # 8-bit states: int8 m, uint8 v, their float32 block scales
    VARIANTS.append((lamb._lamb_moments_kernel, dict(p_base=F32, g_base=F32, m_base=I8, v_base=U8, ms_base=F32,
                                                     vs_base=F32),
                     dict(N_HYPER=lamb.N_HYPER, N_COLS=6, CLIP=True, HAS_SCALE=True, HAS_FOUND_INF=True, ALIGN=align,
                          **CHUNKING)))
    for p, copy in ((F32, None), (BF16, None), (F32, BF16), (F32, F16)):
        VARIANTS.append((lamb._lamb_apply_kernel, dict(p_base=p, m_base=F32, v_base=F32, copy_base=copy or p,
                                                       ms_base=p, vs_base=p),
                         dict(N_HYPER=lamb.N_HYPER, N_COLS=3 if copy is None else 4, COPY_COL=-1 if copy is None else 3,
                              SCALES_COL=-1, HAS_FOUND_INF=True, ALIGN=align, **CHUNKING)))
    VARIANTS.append((lamb._lamb_apply_kernel, dict(p_base=F32, m_base=I8, v_base=U8, copy_base=BF16, ms_base=F32,
                                                   vs_base=F32),
                     dict(N_HYPER=lamb.N_HYPER, N_COLS=6, COPY_COL=3, SCALES_COL=4, HAS_FOUND_INF=True, ALIGN=align,
                          **CHUNKING)))
    for adaptive, p, g, copy in ((True, F32, F32, None), (False, F32, F32, None), (True, F32, BF16, BF16),
                                 (True, F16, F16, None)):
        VARIANTS.append((lars._lars_apply_kernel, dict(p_base=p, g_base=g, b_base=F32, copy_base=copy or p, bs_base=p),
                         dict(N_HYPER=lars.N_HYPER, N_COLS=3 if copy is None else 4,
                              COPY_COL=-1 if copy is None else 3, SCALES_COL=-1, ADAPTIVE=adaptive,
                              HAS_SCALE=True, HAS_FOUND_INF=True, ALIGN=align, **CHUNKING)))
    VARIANTS.append((lars._lars_apply_kernel, dict(p_base=F32, g_base=F32, b_base=I8, copy_base=F32, bs_base=F32),
                     dict(N_HYPER=lars.N_HYPER, N_COLS=4, COPY_COL=-1, SCALES_COL=3, ADAPTIVE=True, HAS_SCALE=True,
                          HAS_FOUND_INF=True, ALIGN=align, **CHUNKING)))
VARIANTS += [
    (multi_tensor._segment_sum_kernel, {}, dict(WIDTH=1, BLOCK=multi_tensor.SEGMENT_BLOCK)),
    (multi_tensor._segment_sum_kernel, {}, dict(WIDTH=2, BLOCK=multi_tensor.SEGMENT_BLOCK)),
]


def compile_variant(kernel, bases, constants):
    names = kernel.arg_names
    signature = {name: "constexpr" if name in constants else bases.get(name) or TABLES[name] for name in names}
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name in bases}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=multi_tensor.NUM_WARPS, enable_fp_fusion=True))
    ptx = compiled.asm["ptx"]
    return {"kernel": kernel.__name__, "constants": {k: str(v) for k, v in constants.items()},
            "bases": bases,
            "approximate_math": sorted({op for op in ("sqrt.approx", "div.approx", "div.full", "rsqrt.approx")
                                        if op in ptx}),
            "loads_128": bool(re.search(r"ld\.global[\w.]*\.v4\.", ptx)),
            "stores_64": bool(re.search(r"st\.global[\w.]*\.v[24]\.b32", ptx)),
            "stores_128": bool(re.search(r"st\.global[\w.]*\.v4\.", ptx))}


if __name__ == "__main__":
    json.dump([compile_variant(kernel, bases, constants) for kernel, bases, constants in VARIANTS], sys.stdout)
