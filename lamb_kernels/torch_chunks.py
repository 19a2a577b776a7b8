"""The torch backend's bfloat16 and 8-bit states on the CPU, a chunk at a time: the bits of
rounding.round_bf16_stochastic, quantization.quantize_stochastic and quantization.dequantize (the
format's reference, which every backend is tested against), computed in fewer and cheaper passes.

The reference takes a tensor at a time, a few dozen passes over it, each allocating a tensor-sized
temporary (on the CPU a fresh allocation costs several times the arithmetic: page faults). Here a
segment's elements go through buffers of CHUNK elements, allocated once per backend and small enough
to stay in the CPU's cache from one pass to the next, in int32 and float32 arithmetic only
(torch.where, comparisons into bool tensors and strided views run several times slower); each
element's hash is computed once for both of LAMB's moments. Small tensors share a chunk, so that a
pass costs one operator call per chunk, not one per tensor.

Elements are taken in memory order (as the hash indexes them), which pairs the elements of two
tensors only when they have the same strides: `usable` says whether a segment's tensors do (the
backend takes the reference path where they do not, off the CPU and under torch.compile).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .backend_api import is_dense
from .quantization import BLOCK, INT8, SMALLEST_NORMAL, _format, _memory_order
from .rounding import _GOLDEN, _M1, _M2, MASK32, _signed, _to_int32

# Elements per chunk, a multiple of BLOCK: 2 MiB per float32 or int32 buffer, the dozen a chunk
# touches within a 32 MiB L3 cache. (2^18 to 2^20 measured within noise of each other on a 2-core
# EPYC; fewer, longer operator calls wait less on a core another process holds.)
CHUNK = 1 << 19
_HIGH_HALF = _signed(0xFFFF0000)
_SIGN_BIT = _signed(0x80000000)
_BF16_MAX = float.fromhex("0x1.fep127")  # bfloat16's largest finite value (fp32 bits 0x7F7F0000)
_FP32_MAX = torch.finfo(torch.float32).max


class Piece(NamedTuple):
    """Elements start:stop (memory order) of a segment's tensor `index`, at `offset` in the buffers."""

    index: int
    start: int
    stop: int
    offset: int


class Chunk(NamedTuple):
    pieces: tuple
    size: int  # elements in the buffers, whole blocks (the gaps after partial blocks included)
    span: int  # the end of the last piece


def _whole_blocks(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


@functools.lru_cache(maxsize=256)
def chunks(numels: tuple) -> tuple:
    """The chunks of tensors with these element counts. Pieces start at multiples of BLOCK, in their
    tensor and in the buffers, so that 8-bit blocks are whole in both; a tensor that does not fit in
    the room left starts a new chunk, and one longer than CHUNK is cut into chunks of its own, but for
    its tail."""
    found, pieces, used = [], [], 0
    for index, n in enumerate(numels):
        if n > CHUNK - used and pieces:
            found.append(pieces)
            pieces, used = [], 0
        start = 0
        while n - start > CHUNK:
            found.append([Piece(index, start, start + CHUNK, 0)])
            start += CHUNK
        if n > start:
            pieces.append(Piece(index, start, n, used))
            used += _whole_blocks(n - start)
    if pieces:
        found.append(pieces)
    return tuple(Chunk(tuple(p), p[-1].offset + _whole_blocks(p[-1].stop - p[-1].start),
                       p[-1].offset + p[-1].stop - p[-1].start) for p in found)


def largest_chunk(tensors) -> int:
    """The size of the largest of these tensors' chunks (a Workspace's buffers take it)."""
    return max((chunk.size for chunk in chunks(tuple(t.numel() for t in tensors))), default=BLOCK)


def usable(*tensor_lists) -> bool:
    """Whether the tensors of these lists (per tensor, one of each list) can be taken a chunk at a
    time: on the CPU, dense, of one shape and strides (so memory order pairs their elements), and not
    under torch.compile (which fuses the reference itself)."""
    if torch.compiler.is_compiling():
        return False
    for tensors in zip(*tensor_lists):
        first = tensors[0]
        if first.device.type != "cpu" or not is_dense(first):
            return False
        if any(t.shape != first.shape or t.stride() != first.stride() or t.device != first.device
               for t in tensors[1:]):
            return False
    return True


class Workspace:
    """The buffers of one device, reused by every chunk of every step: `size` elements each, the
    largest chunk's (at most CHUNK; less for small models)."""

    def __init__(self, device, size: int):
        self.size = size

        def buffer(dtype=torch.float32, size=size):
            return torch.empty(size, dtype=dtype, device=device)

        self.values = (buffer(), buffer())  # m and v (LAMB); the buffer and d (LARS)
        self.y, self.below = buffer(), buffer()  # encode_'s scratch; the grads (LAMB)
        self.old_codes = (buffer(torch.int32), buffer(torch.int32))  # of m and v, or of the buffer
        self.x, self.random, self.codes, self.t = (buffer(torch.int32) for _ in range(4))
        self.scales = (buffer(size=size // BLOCK), buffer(size=size // BLOCK))  # the old ones, of m and v
        # index * 0x9E3779B9 (mod 2^32) of indices 0 to size - 1: the hash's input but for the key
        self.golden = torch.arange(size, dtype=torch.int32, device=device).mul_(_signed(_GOLDEN))


def flat(tensors) -> list:
    """1-D views of dense tensors, their elements in memory order (writes reach the tensors)."""
    return [_memory_order(t) for t in tensors]


def int32_keys(keys) -> list:
    """Rounding keys (a list of ints, or an int64 tensor) as int32 bit patterns, per tensor."""
    if torch.is_tensor(keys):
        return list(_to_int32(keys).unbind())
    return [_signed(k & MASK32) for k in keys]


def _units(piece: Piece, blocks: bool) -> tuple:
    """A piece's (index, start, stop, offset), in elements or, with `blocks`, in blocks (8-bit scales)."""
    index, start, stop, offset = piece
    if blocks:
        return index, start // BLOCK, -(-stop // BLOCK), offset // BLOCK
    return piece


def gather(chunk: Chunk, tensors: list, buffer: torch.Tensor, blocks: bool = False) -> torch.Tensor:
    """The chunk's elements of 1-D `tensors` (or, with `blocks`, their block scales), [span]: a view
    of the tensor when the chunk is one piece of a tensor of the buffer's dtype (then read only), else
    copied into `buffer` (converted to its dtype)."""
    if len(chunk.pieces) == 1 and tensors[chunk.pieces[0].index].dtype == buffer.dtype:
        index, start, stop, _ = _units(chunk.pieces[0], blocks)
        return tensors[index][start:stop]
    for piece in chunk.pieces:
        index, start, stop, offset = _units(piece, blocks)
        buffer[offset : offset + stop - start].copy_(tensors[index][start:stop])
    return buffer[: chunk.size // BLOCK if blocks else chunk.span]


def scatter(chunk: Chunk, tensors: list, buffer: torch.Tensor, blocks: bool = False) -> None:
    """The chunk's elements of `buffer` written into 1-D `tensors` (converted to their dtype), or with
    `blocks`, its block scales."""
    for piece in chunk.pieces:
        index, start, stop, offset = _units(piece, blocks)
        tensors[index][start:stop].copy_(buffer[offset : offset + stop - start])


def zero_gaps(chunk: Chunk, values: torch.Tensor) -> None:
    """Zeros after each piece's partial last block (the reference pads a tensor's blocks with zeros)."""
    for _, start, stop, offset in chunk.pieces:
        end = offset + stop - start
        if end % BLOCK:
            values[end : offset + _whole_blocks(stop - start)].zero_()


def hash_(chunk: Chunk, keys: list, ws: Workspace) -> None:
    """ws.x <- each element's 32 random bits (rounding.py), but the last step, x ^= x >> 16, left to
    `random_`. As rounding.mix32 on int32: each arithmetic right shift masked to the bits it brings
    down, products wrapping."""
    x, t = ws.x, ws.t
    for index, start, stop, offset in chunk.pieces:
        golden, out = ws.golden[: stop - start], x[offset : offset + stop - start]
        if start:  # ((start + i) * golden) = start * golden + i * golden (mod 2^32)
            torch.add(golden, _signed(start * _GOLDEN & MASK32), out=out)
            out.bitwise_xor_(keys[index])
        else:
            torch.bitwise_xor(golden, keys[index], out=out)
    x, t = x[: chunk.size], t[: chunk.size]
    torch.bitwise_right_shift(x, 16, out=t)
    x.bitwise_xor_(t.bitwise_and_(0xFFFF)).mul_(_M1)
    torch.bitwise_right_shift(x, 15, out=t)
    x.bitwise_xor_(t.bitwise_and_(0x1FFFF)).mul_(_M2)


def random_(x: torch.Tensor, out: torch.Tensor, state: int, shift: int = 0) -> torch.Tensor:
    """out <- the 16 random bits of `state` (0: the low half of x ^ (x >> 16), for m or a momentum
    buffer; 1: the high half, for v), shifted left by `shift`, from `hash_`'s x."""
    if state == 0:
        torch.bitwise_right_shift(x, 16, out=out).bitwise_xor_(x)
        if shift:
            out.bitwise_left_shift_(shift)
    else:
        torch.bitwise_right_shift(x, 16 - shift, out=out)
    return out.bitwise_and_(0xFFFF << shift)


def round_bf16_(values: torch.Tensor, random: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """values rounded stochastically to bfloat16 values (kept in fp32, in place) with 16 random bits
    per element (`random`, overwritten); the result rounds to the same bfloat16 as
    rounding.round_bf16_stochastic's (a NaN to a NaN).

    The reference's two selects are arithmetic here: a value clamped to bf16's largest finite
    magnitude first cannot round to infinity (which the reference replaces by that magnitude), and
    clamp(x, fp32's finite range) - x is +0 for a finite x, which leaves the rounded value's bits as
    they are (a -0 too), and -inf, +inf or NaN for +inf, -inf or NaN, which makes it x."""
    torch.clamp(values, -_BF16_MAX, _BF16_MAX, out=scratch)
    rounded = random.add_(scratch.view(torch.int32)).bitwise_and_(_HIGH_HALF).view(torch.float32)
    torch.clamp(values, -_FP32_MAX, _FP32_MAX, out=scratch).sub_(values)
    return torch.sub(rounded, scratch, out=values)


def decode_(codes: torch.Tensor, scales: torch.Tensor, signed: bool, out: torch.Tensor, t: torch.Tensor,
            u: torch.Tensor) -> torch.Tensor:
    """out <- the values of int32 `codes` [size] (quantization.dequantize): value(|c|) * scale, negated
    (its sign bit flipped) for c < 0, value(c) the float of bits (c + offset) << 20, or 0 for c = 0;
    t and u are int32 scratch."""
    offset = _format(signed)[0]
    magnitude = torch.abs(codes, out=t) if signed else codes
    nonzero = torch.clamp(magnitude, max=1, out=u)  # (codes are at least 0)
    bits = torch.add(magnitude, offset, out=t).bitwise_left_shift_(20).mul_(nonzero)
    torch.mul(bits.view(torch.float32).view(-1, BLOCK), scales[:, None], out=out.view(-1, BLOCK))
    if signed:
        out.view(torch.int32).bitwise_xor_(torch.bitwise_and(codes, _SIGN_BIT, out=u))
    return out


def encode_(values: torch.Tensor, random4: torch.Tensor, signed: bool, y: torch.Tensor, below: torch.Tensor,
            codes: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """codes <- int32 8-bit codes of fp32 `values` [size, whole blocks] (quantization.quantize, with
    random bits r << 4 in `random4`); returns the block scales. y, below and t are scratch.

    The reference's selects are arithmetic here: the code's t is the larger of its two candidates
    (the linear one, capped at 2^20, and the bit pattern's, which is below it exactly where y is
    below the smallest code), a NaN y (an infinity in its block) becomes 2 (the largest code, as
    above 1), the codes of blocks of scale 0 or NaN are masked to 0, and a sign bit negates one."""
    offset, largest, smallest = _format(signed)
    blocks = torch.abs(values, out=y).view(-1, BLOCK)
    scales = blocks.amax(dim=1)
    scales = torch.where(scales < SMALLEST_NORMAL, 0.0, scales)  # (subnormal: the block is stored as zeros)
    scaled = scales > 0
    inverse = 1.0 / torch.where(scaled, scales, 1.0)
    blocks.mul_(inverse[:, None])
    y.nan_to_num_(nan=2.0)
    y_bits = y.view(torch.int32)
    if signed:  # floor(y * 2^35) below the smallest code
        torch.clamp(y, max=2.0**-smallest, out=below).mul_(2.0 ** (smallest + 20))
        t.copy_(below)
    else:  # 2^20 for a nonzero v below the smallest code (y >= 0: its bits are 0 only for 0)
        torch.clamp(y_bits, max=1, out=t).bitwise_left_shift_(20)
    torch.sub(y_bits, offset << 20, out=codes)
    torch.maximum(codes, t, out=codes).add_(random4).bitwise_right_shift_(20).clamp_(max=largest)
    codes.view(-1, BLOCK).bitwise_and_(scaled.to(torch.int32).neg_()[:, None])
    if signed:  # -c where x's sign bit is set (a -0 or a NaN has c = 0)
        sign = torch.bitwise_right_shift(values.view(torch.int32), 31, out=t)
        codes.bitwise_xor_(sign).sub_(sign)
    return scales


def keep_where_skipped_(new: torch.Tensor, old: torch.Tensor, keep, scratch: torch.Tensor) -> torch.Tensor:
    """new <- old where `keep` (a 0-d int32 tensor: 1 on a step a GradScaler skips, else 0)."""
    return new.add_(torch.sub(old, new, out=scratch).mul_(keep))


def load_(chunk: Chunk, stored: list, scales, out: torch.Tensor, codes: torch.Tensor, scale_buffer: torch.Tensor,
          ws: Workspace):
    """out <- the fp32 values of the chunk's stored states: bf16 (`scales` None), or 8-bit codes (left
    in `codes` as int32) and their block `scales`, which it returns (ws.random and ws.t scratch)."""
    if scales is None:
        gather(chunk, stored, out)
        return None
    gather(chunk, stored, codes)
    chunk_scales = gather(chunk, scales, scale_buffer, blocks=True)
    size = chunk.size
    decode_(codes[:size], chunk_scales, stored[0].dtype == torch.int8, out[:size], ws.t[:size], ws.random[:size])
    return chunk_scales


def store_(chunk: Chunk, values: torch.Tensor, state: int, stored: list, scales, old: tuple, keep,
           ws: Workspace):
    """The chunk's fp32 `values` (overwritten) rounded stochastically with the random bits of `state`
    (from ws.x, `hash_`'s) into the stored states: bf16, or 8-bit codes (left in ws.codes as int32)
    and their block `scales`, the old codes and scales (`old`) kept where `keep` (8-bit states on a
    step a GradScaler skips: re-encoding decoded values may move a code by one). Returns the chunk's
    block scales (None for bf16)."""
    size = chunk.size
    x, random, codes, t, y = ws.x[:size], ws.random[:size], ws.codes[:size], ws.t[:size], ws.y[:size]
    if scales is None:
        scatter(chunk, stored, round_bf16_(values[:size], random_(x, random, state), y))
        return None
    zero_gaps(chunk, values)
    chunk_scales = encode_(values[:size], random_(x, random, state, 4), state == 0, y, ws.below[:size], codes, t)
    if keep is not None:
        old_codes, old_scales = old
        keep_where_skipped_(codes, old_codes[:size], keep, t)
        chunk_scales = torch.where(keep != 0, old_scales, chunk_scales)
    scatter(chunk, stored, codes)
    scatter(chunk, scales, chunk_scales, blocks=True)
    return chunk_scales


def _skip_flag(found_inf, int8: bool):
    """1 (int32, 0-d) on a step a GradScaler skips, else 0; None without a GradScaler or for bf16."""
    return None if found_inf is None or not int8 else (found_inf.reshape(()) != 0).to(torch.int32)


def lamb_moments_(seg, grads: list, beta1, beta2, found_inf, ws: Workspace) -> None:
    """Step 3 of LAMB (torch_backend.TorchBackend.lamb_moments_) for bf16 or 8-bit states: m and v
    updated from `grads` in fp32, then rounded into their stored dtype; the hash of each element is
    computed once for both."""
    int8 = seg.state_dtype == INT8
    keys, keep = int32_keys(seg.rounding_keys), _skip_flag(found_inf, int8)
    m_scales, v_scales = (seg.exp_avg_scales, seg.exp_avg_sq_scales) if int8 else (None, None)
    ms, vs, gs = flat(seg.exp_avgs), flat(seg.exp_avg_sqs), flat(grads)
    (m, v), (m_codes, v_codes) = ws.values, ws.old_codes
    for chunk in chunks(tuple(t.numel() for t in ms)):
        n = chunk.span
        old_m_scales = load_(chunk, ms, m_scales, m, m_codes, ws.scales[0], ws)
        old_v_scales = load_(chunk, vs, v_scales, v, v_codes, ws.scales[1], ws)
        g = gather(chunk, gs, ws.y)
        m[:n].mul_(beta1).add_(g, alpha=seg.beta3)
        v[:n].mul_(beta2).addcmul_(g, g, value=1 - seg.beta2)
        hash_(chunk, keys, ws)
        store_(chunk, v, 1, vs, v_scales, (v_codes, old_v_scales), keep, ws)
        store_(chunk, m, 0, ms, m_scales, (m_codes, old_m_scales), keep, ws)


def decoded_into_(outs: list, codes: list, scales: list, multiply: bool, ws: Workspace) -> None:
    """outs <- the fp32 values of 8-bit states (quantization.dequantize), or with `multiply`, outs
    times them."""
    targets, stored = flat(outs), flat(codes)
    values = ws.values[0]
    for chunk in chunks(tuple(t.numel() for t in stored)):
        load_(chunk, stored, scales, values, ws.old_codes[0], ws.scales[0], ws)
        for index, start, stop, offset in chunk.pieces:
            target, source = targets[index][start:stop], values[offset : offset + stop - start]
            target.mul_(source) if multiply else target.copy_(source)


def lars_momentum_(seg, d: list, momentum, step_size, found_inf, ws: Workspace) -> None:
    """Steps 2-3 of LARS (torch_backend.TorchBackend.lars_apply_) for bf16 or 8-bit momentum buffers:
    the buffers updated from `d` in fp32 (a new buffer is d), rounded into their stored dtype, and the
    params stepped by `step_size` times the stored values (plus d, with Nesterov)."""
    int8 = seg.state_dtype == INT8
    keys, keep = int32_keys(seg.rounding_keys), _skip_flag(found_inf, int8)
    scales = seg.momentum_buffer_scales if int8 else None
    buffers, ds, ps = flat(seg.momentum_buffers), flat(d), flat(seg.params)
    values, d_buffer = ws.values
    for chunk in chunks(tuple(t.numel() for t in buffers)):
        n, size = chunk.span, chunk.size
        old_scales = load_(chunk, buffers, scales, values, ws.old_codes[0], ws.scales[0], ws)
        g = gather(chunk, ds, d_buffer)
        values[:n].mul_(momentum).add_(g, alpha=1 - seg.dampening)
        for index, start, stop, offset in chunk.pieces:
            if seg.first_step[index]:
                values[offset : offset + stop - start].copy_(g[offset : offset + stop - start])
        hash_(chunk, keys, ws)
        new_scales = store_(chunk, values, 0, buffers, scales, (ws.old_codes[0], old_scales), keep, ws)
        if int8:  # the step from the stored values
            decode_(ws.codes[:size], new_scales, True, values[:size], ws.t[:size], ws.random[:size])
        else:
            gather(chunk, buffers, values)
        step = values[:n]
        if seg.nesterov:
            torch.add(g, step, alpha=seg.momentum, out=step)
        step.mul_(step_size)
        for index, start, stop, offset in chunk.pieces:
            ps[index][start:stop].add_(step[offset : offset + stop - start])
