"""Triton helpers for optimizer states kept in low precision: bfloat16 with stochastic rounding
(lamb_kernels/rounding.py), and 8-bit blockwise codes with float32 block scales
(lamb_kernels/quantization.py). C++ and CUDA have the same functions in csrc/optimizer_math.h.

The LAMB and LARS kernels (lamb.py, lars.py) call these per block of elements; the multi-tensor
machinery they share (chunks, pointer tables, launches) is in multi_tensor.py.
"""
import torch
import triton
import triton.language as tl

from .multi_tensor import BLOCK


# -- bf16 states: stochastic rounding from a counter-based hash ------------------------------------------

@triton.jit
def _mix32(x):
    """lamb_kernels/rounding.py's mix32 on uint32 values (their products wrap modulo 2^32)."""
    x ^= x >> 16
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x ^= x >> 15
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def rounding_key(h, KEY_LO: tl.constexpr):
    """A tensor's stochastic-rounding key from its two hyperparameter columns (16-bit halves)."""
    return tl.load(h + KEY_LO).to(tl.uint32) | (tl.load(h + KEY_LO + 1).to(tl.uint32) << 16)


@triton.jit
def element_random(key, index):
    """The 32 random bits of the elements at int64 `index` of a tensor (rounding.py): the low 16
    round m or a momentum buffer, the high 16 round v."""
    lanes = (index & 0xFFFFFFFF).to(tl.uint32)
    return _mix32(key ^ (lanes * tl.full([], 0x9E3779B9, tl.uint32)))


@triton.jit
def round_bf16_stochastic(x, random16):
    """fp32 `x` rounded stochastically to a bf16 value (returned as the fp32 it is exactly), from
    16 random bits per element, as in rounding.py."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + random16) & tl.full([], 0xFFFF0000, tl.uint32)
    exponent = tl.full([], 0x7F800000, tl.uint32)
    overflowed = (rounded & exponent) == exponent
    rounded = tl.where(overflowed, (bits & tl.full([], 0x80000000, tl.uint32)) | 0x7F7F0000, rounded)
    rounded = tl.where((bits & exponent) == exponent, bits, rounded)  # inf and NaN kept
    return rounded.to(tl.float32, bitcast=True)


# -- 8-bit blockwise states ------------------------------------------------------------------------------

CODE_BLOCK = 256  # elements per block scale
_CODE_BLOCK = tl.constexpr(CODE_BLOCK)


def check_code_scales(op: str, codes: list, *scale_lists, chunk_size: int, unsigned: list | None = None) -> list:
    """The scale lists a launch takes: [] for float states (the lists must be empty), else the lists,
    checked (per code tensor one float32 tensor of its block count) with a chunk size of whole blocks;
    `unsigned`: LAMB's v, which must be uint8 codes where m's are int8 codes, and only then."""
    if unsigned is not None and codes and unsigned:
        m_codes, v_codes = codes[0].dtype == torch.int8, unsigned[0].dtype == torch.uint8
        if m_codes != v_codes or any(t.dtype != unsigned[0].dtype for t in unsigned):
            raise ValueError(f"{op}: exp_avg_sqs must be uint8 codes exactly where exp_avgs are int8 codes, got "
                             f"{unsigned[0].dtype} with {codes[0].dtype}")
    if not any(t.dtype in (torch.int8, torch.uint8) for t in codes):
        for scales in scale_lists:
            if scales:
                raise ValueError(f"{op}: block scales given ({len(scales)} tensors) for float states")
        return []
    if chunk_size % CODE_BLOCK or BLOCK % CODE_BLOCK:
        raise ValueError(f"{op}: chunk_size must be a multiple of {CODE_BLOCK} with 8-bit states, got {chunk_size}")
    for scales in scale_lists:
        if len(scales) != len(codes):
            raise ValueError(f"{op}: {len(scales)} block scale tensors for {len(codes)} code tensors")
        for i, (c, sc) in enumerate(zip(codes, scales)):
            if c.numel() and (sc.dtype != torch.float32 or sc.numel() != -(-c.numel() // CODE_BLOCK)
                              or not sc.is_contiguous() or sc.device != c.device):
                raise ValueError(f"{op}: scales[{i}] must be a contiguous float32 tensor of "
                                 f"{-(-c.numel() // CODE_BLOCK)} elements on {c.device}, got {tuple(sc.shape)} "
                                 f"{sc.dtype} on {sc.device}")
    return list(scale_lists)


@triton.jit
def scales_pointer(base, ptrs, t, start, N_COLS: tl.constexpr, COL: tl.constexpr):
    """Pointer to the scale of the block holding element `start` of tensor t, column COL."""
    return base + tl.load(ptrs + t * N_COLS + COL) + start // _CODE_BLOCK


@triton.jit
def load_codes(ptr, mask, MASKED: tl.constexpr):
    """8-bit codes as int32 (0 outside the mask)."""
    if MASKED:
        return tl.load(ptr, mask=mask, other=0).to(tl.int32)
    return tl.load(ptr).to(tl.int32)


@triton.jit
def load_code_scales(scales_ptr, offs, mask, MASKED: tl.constexpr):
    """Per element at `offs` (from the chunk's start), its block's scale."""
    if MASKED:
        return tl.load(scales_ptr + offs // _CODE_BLOCK, mask=mask, other=0.0)
    return tl.load(scales_ptr + offs // _CODE_BLOCK)


@triton.jit
def decode_codes(c, scale, SIGNED: tl.constexpr):
    """The fp32 values of int32 codes `c` with their blocks' scales: sign * value(|c|) * scale."""
    if SIGNED:
        magnitude = tl.abs(c)
        value = tl.where(magnitude == 0, 0.0, ((magnitude + 895) << 20).to(tl.float32, bitcast=True)) * scale
        return tl.where(c < 0, -value, value)
    return tl.where(c == 0, 0.0, ((c + 767) << 20).to(tl.float32, bitcast=True)) * scale


@triton.jit
def block_absmax(x, BLOCK: tl.constexpr):
    """Each block's scale ([BLOCK // CODE_BLOCK]): the largest magnitude of its CODE_BLOCK elements of
    x, NaN where it holds a NaN (as torch's amax: tl.max would pass over it), 0 where it is subnormal."""
    a = tl.reshape(tl.abs(x), (BLOCK // _CODE_BLOCK, _CODE_BLOCK))
    largest = tl.max(a, axis=1)
    has_nan = tl.max((a != a).to(tl.int32), axis=1) > 0
    largest = tl.where(largest < 1.1754943508222875e-38, 0.0, largest)  # (under 2^-126)
    return tl.where(has_nan, float("nan"), largest)


@triton.jit
def per_element(rows, BLOCK: tl.constexpr):
    """A value per block ([BLOCK // CODE_BLOCK]) repeated for each of its elements ([BLOCK])."""
    return tl.reshape(tl.broadcast_to(rows[:, None], (BLOCK // _CODE_BLOCK, _CODE_BLOCK)), (BLOCK,))


@triton.jit
def encode_codes(x, scale, random16, SIGNED: tl.constexpr):
    """fp32 x as int32 codes in blocks of `scale`, rounded up with the probability that makes them
    unbiased, from 16 random bits per element (quantization.py)."""
    inverse = tl.div_rn(1.0, tl.where(scale > 0, scale, 1.0))
    y = tl.where(scale > 0, tl.abs(x) * inverse, 0.0)
    if SIGNED:
        small = y < 3.0517578125e-05  # 2^-15
        below = (tl.where(small, y, 0.0) * 34359738368.0).to(tl.int32)  # 2^35
        t = tl.where(small, below, y.to(tl.int32, bitcast=True) - (895 << 20))
        c = (t + (random16 << 4).to(tl.int32)) >> 20
        c = tl.where(y <= 1.0, tl.minimum(c, 121), 121)  # NaN y: the largest code
        return tl.where(x < 0, -c, c)
    small = y < 4.656612873077393e-10  # 2^-31
    below = tl.where(y > 0, 1 << 20, 0)  # a nonzero v never rounds to 0
    t = tl.where(small, below, y.to(tl.int32, bitcast=True) - (767 << 20))
    c = (t + (random16 << 4).to(tl.int32)) >> 20
    return tl.where(y <= 1.0, tl.minimum(c, 249), 249)


@triton.jit
def store_codes(ptr, c, mask, MASKED: tl.constexpr):
    value = c.to(ptr.dtype.element_ty)
    if MASKED:
        tl.store(ptr, value, mask=mask)
    else:
        tl.store(ptr, value)


@triton.jit
def store_block_scales(scales_ptr, rows, first, n, BLOCK: tl.constexpr):
    """The scales `rows` of the blocks of a block of BLOCK elements starting at `first` (a multiple of
    CODE_BLOCK) of a chunk of n elements: only the blocks that have elements."""
    index = tl.arange(0, BLOCK // _CODE_BLOCK)
    tl.store(scales_ptr + first // _CODE_BLOCK + index, rows, mask=first + index * _CODE_BLOCK < n)
