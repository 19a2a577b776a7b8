"""Stochastic rounding of fp32 values to bfloat16, for optimizer states kept in bf16 (docs/states.md).

Rounding a state to the nearest bf16 at every step loses small updates: with beta2 = 0.999 the
change of v per step is about 0.1% of v, under half of bf16's spacing (2^-8 to 2^-7 of a value), so nearest
rounding would leave v stuck. Stochastic rounding rounds up with probability equal to the distance
to the lower neighbour, so the stored value is unbiased: its expectation is the fp32 value.

The random bits come from a counter-based hash, not a random generator's state, so a step's bits
depend only on (seed, step count, parameter position, element index, which state): reruns and
every backend give the same bits for the same fp32 values. Every implementation follows this
module: csrc/optimizer_math.h (C++ and CUDA), lamb_kernels/triton/low_precision_states.py (Triton) and
`round_bf16_stochastic` below (the torch backend, and the tests' reference).

- ``mix32(x)``: a 32-bit integer hash (x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15;
  x *= 0x846ca68b; x ^= x >> 16, modulo 2^32);
- a tensor's key per step: ``mix32(seed ^ mix32(step ^ mix32(position)))``, `position` the
  parameter's index over all param groups in order, `step` its step count after this step's
  advance; kept in two hyperparameter-table columns as 16-bit halves (exact in fp32);
- an element's 32 random bits: ``mix32(key ^ (index * 0x9e3779b9))`` (mod 2^32), `index` the
  element's index in the tensor in memory order (mod 2^32); the low 16 bits round m (or a momentum
  buffer), the high 16 bits round v: one hash per element serves both;
- rounding: add the 16 random bits to the fp32 bit pattern and clear its low 16 bits; an infinity
  or NaN is kept; a finite value that would become infinite keeps bf16's largest finite magnitude.
"""
from __future__ import annotations

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
# mix32's multipliers. The second is written as the signed value with its low 32 bits (0x846CA68B - 2^32)
# so that int32 tensors take it as it is; only a product's low 32 bits are ever used.
_M1, _M2 = 0x7FEB352D, 0x846CA68B - (1 << 32)
_GOLDEN = 0x9E3779B9


def mix32(x):
    """mix32 of a Python int, elementwise of a numpy array, or of a torch integer tensor.

    An int, a numpy array or an int64 tensor gives values in [0, 2^32) (an int, an int64 array, an
    int64 tensor); an int32 tensor holds uint32 bit patterns and gives them (the element hash of
    `element_random16` stays in int32, which runs several times faster than int64).

    One sequence serves every type because only the low 32 bits of each step matter: a product's low
    32 bits do not depend on the bits above them, whether those are kept (Python ints), wrap away
    (int32 and int64 tensors, int64 arrays) or are signs (a negative multiplier, two's complement);
    each right shift is masked to the bits below 32 that it brings down (which also makes an int32
    tensor's arithmetic shift a logical one); and the result is masked to 32 bits at the end."""
    if isinstance(x, np.ndarray):
        x = x.astype(np.int64)  # (signed, for the signed multiplier; products wrap silently in arrays)
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _M1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _M2
    x = x ^ ((x >> 16) & 0xFFFF)
    return x if torch.is_tensor(x) and x.dtype == torch.int32 else x & MASK32


def _signed(c: int) -> int:
    """A uint32 constant as the int32 with its bits."""
    return c - (1 << 32) if c >= 1 << 31 else c


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) as int32 bit patterns."""
    x = x & MASK32
    return (x - ((x >> 31) << 32)).to(torch.int32)


def mixed_positions(positions) -> np.ndarray:
    """mix32 of each parameter position (uint32): computed once, when a segment is made."""
    return mix32(np.asarray(positions, dtype=np.int64)).astype(np.uint32)


def tensor_keys(seed: int, steps, mixed: np.ndarray):
    """Per tensor, its key for this step: from its step count (`steps`: a list of floats, giving a
    list of ints; or a tensor, giving int64 values in [0, 2^32) on its device, computed there) and
    its mixed position."""
    if torch.is_tensor(steps):  # (`mixed` may be given as an int64 tensor on the counts' device already)
        counts = steps.to(torch.int64) & MASK32
        if not torch.is_tensor(mixed):
            mixed = torch.from_numpy(mixed.astype(np.int64)).to(steps.device)
        return mix32((seed & MASK32) ^ mix32(counts ^ mixed))
    counts = np.asarray(steps, dtype=np.float64).astype(np.int64).astype(np.uint32)
    return mix32(np.uint32(seed & MASK32) ^ mix32(counts ^ mixed)).tolist()


def key_halves(keys):
    """(low 16 bits, high 16 bits) of keys, as float values (exact in fp32): the table's two columns.
    None (float32 states, no rounding) gives 0.0 for both."""
    if keys is None:
        return 0.0, 0.0
    if torch.is_tensor(keys):
        return (keys & 0xFFFF).to(torch.float32), (keys >> 16).to(torch.float32)
    return [float(k & 0xFFFF) for k in keys], [float(k >> 16) for k in keys]


def element_random16(key: int | torch.Tensor, n: int, state: int, device) -> torch.Tensor:
    """The 16 random bits (int32 values in [0, 2^16)) of elements 0 to n - 1 of a tensor with `key`
    (a Python int or a 0-d int64 tensor), for `state` 0 (m or a momentum buffer: the low half of
    each element's 32 bits) or 1 (v: the high half)."""
    index = _to_int32(torch.arange(n, device=device, dtype=torch.int64))
    key = _to_int32(key if torch.is_tensor(key) else torch.tensor(key, dtype=torch.int64, device=device))
    random = mix32(key ^ (index * _signed(_GOLDEN)))
    return random & 0xFFFF if state == 0 else (random >> 16) & 0xFFFF


def round_bf16_stochastic(x: torch.Tensor, key: int | torch.Tensor, state: int) -> torch.Tensor:
    """x (float32, dense: elements are indexed in memory order, as the kernels walk them) rounded
    stochastically to bfloat16 with a tensor's `key` (a Python int or a 0-d int64 tensor) and `state`
    (0: m or a momentum buffer, the random bits' low half; 1: v, the high half); the result has x's
    memory layout. In int32 arithmetic (bit patterns), so that it runs at the speed of a few passes."""
    n = x.numel()
    flat = x.as_strided((n,), (1,))  # (dense: memory order, whatever the strides)
    random16 = element_random16(key, n, state, x.device)
    pattern = flat.view(torch.int32)
    rounded = (pattern + random16) & _signed(0xFFFF0000)
    exponent = 0x7F800000
    rounded = torch.where((rounded & exponent) == exponent, (pattern & _signed(0x80000000)) | 0x7F7F0000, rounded)
    rounded = torch.where((pattern & exponent) == exponent, pattern, rounded)  # inf, NaN kept
    out = torch.empty_like(x, dtype=torch.bfloat16)
    out.as_strided((n,), (1,)).copy_(rounded.view(torch.float32))  # (exact: the low bits are 0)
    return out
