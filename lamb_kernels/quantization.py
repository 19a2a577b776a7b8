"""8-bit blockwise optimizer states (``state_dtype="int8"``, docs/states.md): the format, and its
reference encoder and decoder in torch (the torch backend's, and the tests' reference).

A state tensor of n elements is cut into blocks of ``BLOCK`` = 256 consecutive elements in memory
order (the last block may be shorter). Each block keeps one float32 scale, the largest magnitude of
its values (its "absmax"), and each element an 8-bit code of its value divided by that scale, a number
y in [0, 1]. The codes are a small floating-point format, so that values far below the block's largest
keep their relative precision (linear 8-bit codes would round them to 0):

- signed states (m, LARS momentum buffers): an int8 code q in [-121, 121], its sign the value's and
  its magnitude c in [0, 121]: 0 for 0, else 2^(e - 15) (1 + f / 8) with 4 bits of exponent e and 3 of
  fraction f, c = 8 e + f + 1: 16 binades, from 2^-15 to 1;
- unsigned states (v): a uint8 code c in [0, 249]: 0, else 2^(e - 31) (1 + f / 8), c = 8 e + f + 1:
  32 binades, from 2^-31 to 1. v is about the square of m, and needs twice its range: an element
  whose v rounded to 0 while its m did not would get an update m / eps.

Code c > 0 is the float32 with bit pattern ``(c + OFFSET) << 20`` (OFFSET 895 signed, 767
unsigned): encoding and decoding are integer operations on bit patterns, the same on every backend.

A block whose largest magnitude is below the smallest normal float32 (2^-126, about 1.2e-38) gets
the scale 0 and is stored as zeros (the reciprocal of a subnormal scale overflows).

Encoding y (``y = |x| * (1 / s)``, the reciprocal one IEEE division per block, 0 when the scale s is 0
or NaN; y may exceed 1 by a rounding, and its code is then the largest): with t = the bit pattern
of y minus ``OFFSET << 20`` when y is at least the smallest nonzero code, else, for a signed state,
``floor(y * 2^35)`` (0 to 2^20 below the smallest code, linearly), and for v, 2^20 when y > 0 (a
nonzero v never rounds to 0, which would make an element's update m / eps: v below 2^-31 of its
block's largest is stored as 2^-31 of it, biased up, towards a smaller update), the code is
``(t + r) >> 20`` with r in [0, 2^20): y's position between its two neighbouring codes is linear in t,
so a uniform random r rounds up with probability equal to that position (stochastic rounding:
unbiased, as bf16 states are rounded, rounding.py), and r = 2^19 rounds to the nearest (conversions,
which have no step to key the randomness on). A y that is not in [0, 1] (above 1 by a rounding, or
NaN: the block holds an infinity) takes the largest code. The random r of an element is its 16 random bits (rounding.py:
the low half for m or a buffer, the high half for v) shifted left by 4.

Decoding: ``sign * value(c) * s``, one fp32 product, exact up to its one rounding. A block's largest
value round-trips exactly (y = 1 is the largest code). A NaN or infinite value makes its block's scale
NaN or infinite, and every value of the block decodes non-finite: non-finite grads propagate, as in
torch.optim, at the granularity of a block.
"""
from __future__ import annotations

import math

import torch

from .rounding import element_random16

INT8 = "int8"  # the ``state_dtype`` of 8-bit blockwise states
BLOCK = 256  # elements per block scale

SIGNED_OFFSET, SIGNED_MAX, SIGNED_SMALLEST = 895, 121, 15  # (smallest nonzero code: 2^-15)
UNSIGNED_OFFSET, UNSIGNED_MAX, UNSIGNED_SMALLEST = 767, 249, 31  # (2^-31)
NEAREST = 1 << 19  # the r of round-to-nearest
SMALLEST_NORMAL = 2.0**-126  # a block scale below it (its reciprocal would overflow) is stored as 0

CODE_DTYPES = {True: torch.int8, False: torch.uint8}  # signed -> dtype of the codes


def n_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def _format(signed: bool) -> tuple:
    if signed:
        return SIGNED_OFFSET, SIGNED_MAX, SIGNED_SMALLEST
    return UNSIGNED_OFFSET, UNSIGNED_MAX, UNSIGNED_SMALLEST


def code_values(signed: bool) -> torch.Tensor:
    """The value (relative to the scale) of every magnitude code, float32 [max code + 1]."""
    offset, largest, _ = _format(signed)
    codes = torch.arange(largest + 1, dtype=torch.int32)
    values = ((codes + offset) << 20).view(torch.float32)
    return torch.where(codes == 0, 0.0, values)


def _blocks(flat: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor padded with zeros to whole blocks, [n_blocks, BLOCK]."""
    pad = n_blocks(flat.numel()) * BLOCK - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)


def quantize(x: torch.Tensor, signed: bool, random16: torch.Tensor | None = None) -> tuple:
    """float32 `x` (dense: its elements taken in memory order) as (codes, scales): codes like x
    (int8 when `signed`, else uint8), scales float32 [n_blocks]. `random16`: per element in memory
    order, 16 random bits (int32) for stochastic rounding; None rounds to the nearest code."""
    offset, largest, smallest = _format(signed)
    n = x.numel()
    blocks = _blocks(_memory_order(x.float()))
    scales = blocks.abs().amax(dim=1) if n else blocks.new_zeros(0)
    scales = torch.where(scales < SMALLEST_NORMAL, 0.0, scales)  # (subnormal: the block is stored as zeros)
    scaled = scales[:, None] > 0
    inverse = 1.0 / torch.where(scaled, scales[:, None], 1.0)
    y = torch.where(scaled, blocks.abs() * inverse, 0.0)
    small = y < 2.0 ** -smallest
    if signed:
        below = (torch.where(small, y, 0.0) * 2.0 ** (smallest + 20)).to(torch.int32)
    else:  # v: a nonzero value never rounds to 0 (m / sqrt(v) would become m / eps)
        below = torch.where(y > 0, 1 << 20, 0).to(torch.int32)
    t = torch.where(small, below, y.view(torch.int32) - (offset << 20))
    r = NEAREST if random16 is None else _blocks(random16.to(torch.int32) << 4)
    c = torch.clamp((t + r) >> 20, 0, largest)
    c = torch.where(y <= 1.0, c, largest)  # NaN: an infinity in the block
    if signed:
        c = torch.where(blocks < 0, -c, c)
    return _unblocked(c, torch.empty_like(x, dtype=CODE_DTYPES[signed])), scales


def _unblocked(blocks: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` (dense) holding the first out.numel() elements of `blocks` [n_blocks, BLOCK], in memory
    order.

    The whole blocks go in as one [whole blocks, BLOCK] view and a partial last block on its own,
    not as the padded blocks flattened and cut to n elements: compiled, that copy is one loop over n
    elements reading each one's block scale at i // BLOCK, which inductor's C++ backend (torch 2.13,
    try_loop_split) splits into (n // BLOCK, BLOCK) loops without checking that BLOCK divides n, so
    a partial last block was never written (left as torch.empty's garbage)."""
    flat = _memory_order(out)
    whole = flat.numel() // BLOCK
    flat[: whole * BLOCK].view(whole, BLOCK).copy_(blocks[:whole])
    if flat.numel() > whole * BLOCK:
        flat[whole * BLOCK :].copy_(blocks[whole, : flat.numel() - whole * BLOCK])
    return out


def _memory_order(x: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements in memory order, as a 1-D view (writes reach `x`)."""
    if x.is_contiguous():
        return x.view(-1)
    # Dense: ordered by decreasing stride the dims are contiguous (a size-1 dim's stride is free).
    return x.permute(sorted(range(x.dim()), key=x.stride, reverse=True)).view(-1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 values of codes (int8: signed, uint8: unsigned) with their block scales; the
    result has the codes' memory layout."""
    signed = codes.dtype == torch.int8
    offset = _format(signed)[0]
    c = _blocks(_memory_order(codes).to(torch.int32))
    magnitude = c.abs()
    values = torch.where(magnitude == 0, 0.0, ((magnitude + offset) << 20).view(torch.float32))
    values = values * scales.float()[:, None]
    if signed:
        values = torch.where(c < 0, -values, values)
    return _unblocked(values, torch.empty_like(codes, dtype=torch.float32))


def quantize_stochastic(x: torch.Tensor, key, state: int, signed: bool) -> tuple:
    """`quantize` with stochastic rounding from a tensor's rounding `key` (rounding.py) and `state`
    (0: m or a momentum buffer, 1: v)."""
    return quantize(x, signed, element_random16(key, x.numel(), state, x.device))


def max_relative_spacing() -> float:
    """The largest gap between neighbouring nonzero codes over the lower one (1/8: at the bottom of a
    binade), the bound of one rounding's error relative to the value (nearest: half of it)."""
    return 1.0 / 8.0


def smallest_code(signed: bool) -> float:
    """The smallest nonzero code's value, relative to the block scale."""
    return math.ldexp(1.0, -_format(signed)[2])
