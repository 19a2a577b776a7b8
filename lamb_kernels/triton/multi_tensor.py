"""Multi-tensor machinery shared by the Triton optimizers.

Every tensor of a bucket is cut into chunks of ``CHUNK`` elements; one program handles one chunk,
so a launch covers any number of tensors and one huge tensor still spreads over many programs.
The tables that make this possible are plain device tensors:

- pointer table ``int64 [n_tensors, n_columns]``: the address of each tensor of each column
  (p, g, m, v for LAMB), cast back to typed pointers inside the kernels;
- chunk map ``chunk_tensor int32 [n_chunks]``, ``chunk_offset int64 [n_chunks]`` (element offset of
  the chunk inside its tensor, int64 so tensors past 2^31 elements work), ``numels int64 [n_tensors]``;
- ``tensor_chunks int32 [n_tensors + 1]``: the chunks of tensor t are
  ``tensor_chunks[t] : tensor_chunks[t + 1]``, used to reduce per-chunk partial sums per tensor.

Reductions never use atomics: a chunk writes its partial sum, then `_segment_sum_kernel` adds the
partials of each segment in ascending order, so the same inputs give the same bits on every run.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Under the interpreter each program costs about a millisecond whatever its size, so blocks are
# large; compiled, a chunk is looped over in register-sized blocks.
if INTERPRETED:
    CHUNK, BLOCK, NUM_WARPS = 8192, 4096, 1
else:
    CHUNK, BLOCK, NUM_WARPS = 32768, 2048, 8
SEGMENT_BLOCK = 1024
# Fused multiply-add stays on (one rounding instead of two; the same bits on every run). Said
# explicitly because triton 3.9 warns that its default will change.
LAUNCH_OPTIONS = dict(num_warps=NUM_WARPS, enable_fp_fusion=True)


@triton.jit
def chunk_extent(numels, chunk_tensor, chunk_offset, CHUNK: tl.constexpr):
    """(tensor index, offset of the chunk's first element, elements in the chunk) of this program."""
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_offset + c)
    return t, start, tl.minimum(tl.load(numels + t) - start, CHUNK).to(tl.int32)


@triton.jit
def column_pointer(ptrs, t, start, N_COLS: tl.constexpr, COL: tl.constexpr):
    """fp32 pointer to element `start` (int64) of tensor t of column COL of the pointer table."""
    return tl.load(ptrs + t * N_COLS + COL).to(tl.pointer_type(tl.float32)) + start


@triton.jit
def _chunk_sumsq_kernel(
    ptrs,  # int64 [n_tensors, N_COLS]: tensor addresses
    numels,  # int64 [n_tensors]
    chunk_tensor,  # int32 [n_chunks]
    chunk_offset,  # int64 [n_chunks]
    partials,  # fp32 [n_chunks, 1 or 2]: out, per chunk the sum of x^2 of column COL0 (and COL1)
    N_COLS: tl.constexpr,
    COL0: tl.constexpr,
    COL1: tl.constexpr,  # -1: reduce COL0 only
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """partials[c, k] = sum(x[i]^2) over chunk c of column COL_k, in fp32; one pass reads both."""
    t, start, n = chunk_extent(numels, chunk_tensor, chunk_offset, CHUNK)
    a_ptr = column_pointer(ptrs, t, start, N_COLS, COL0)
    acc0 = tl.zeros([BLOCK], tl.float32)
    if COL1 >= 0:
        b_ptr = column_pointer(ptrs, t, start, N_COLS, COL1)
        acc1 = tl.zeros([BLOCK], tl.float32)
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        a = tl.load(a_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        acc0 += a * a
        if COL1 >= 0:
            b = tl.load(b_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
            acc1 += b * b
    c = tl.program_id(0)
    if COL1 >= 0:
        tl.store(partials + c * 2, tl.sum(acc0, axis=0))
        tl.store(partials + c * 2 + 1, tl.sum(acc1, axis=0))
    else:
        tl.store(partials + c, tl.sum(acc0, axis=0))


@triton.jit
def _segment_sum_kernel(
    partials,  # fp32 [n_rows, WIDTH]
    bounds,  # int32 [n_segments + 1]: segment s is rows bounds[s] : bounds[s + 1]
    out,  # fp32 [n_segments, WIDTH]
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[s, :] = sum of partials[bounds[s]:bounds[s+1], :], rows added in a fixed order."""
    s = tl.program_id(0)
    lo = tl.load(bounds + s)
    hi = tl.load(bounds + s + 1)
    rows = tl.arange(0, BLOCK)[:, None]
    cols = tl.arange(0, WIDTH)[None, :]
    acc = tl.zeros([BLOCK, WIDTH], tl.float32)
    for r0 in range(lo, hi, BLOCK):
        r = r0 + rows
        acc += tl.load(partials + r * WIDTH + cols, mask=r < hi, other=0.0)
    tl.store(out + s * WIDTH + tl.arange(0, WIDTH), tl.sum(acc, axis=0))


class MultiTensorTable:
    """Pointer table and chunk map for columns of same-sized tensors on one device.

    `update` is called every step; it rebuilds the chunk map only when the tensor sizes change and
    the pointer table only when an address changes (a new grad tensor, a reloaded state), so in a
    steady training loop both are built once. `builds` counts the rebuilds, for tests.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.builds = {"chunks": 0, "pointers": 0}
        self._numels = None
        self._addresses = None

    def update(self, columns) -> None:
        numels = tuple(t.numel() for t in columns[0])
        if numels != self._numels:
            self._build_chunk_map(numels)
        addresses = tuple(t.data_ptr() for column in columns for t in column)
        if addresses != self._addresses:
            # Column-major tuple -> row-major [n_tensors, n_columns] table.
            table = np.array(addresses, dtype=np.int64).reshape(len(columns), -1).T.copy()
            self.pointers = _to_device(table, self.device)
            self.n_columns = len(columns)
            self._addresses = addresses
            self.builds["pointers"] += 1

    def _build_chunk_map(self, numels) -> None:
        sizes = np.array(numels, dtype=np.int64)
        counts = -(-sizes // CHUNK)  # ceil; zero-size tensors get no chunk
        tensor_chunks = np.zeros(len(sizes) + 1, dtype=np.int32)
        np.cumsum(counts, out=tensor_chunks[1:])
        self.n_tensors = len(sizes)
        self.n_chunks = int(tensor_chunks[-1])
        chunk_tensor = np.repeat(np.arange(len(sizes), dtype=np.int32), counts)
        chunk_index = np.arange(self.n_chunks, dtype=np.int64) - tensor_chunks[:-1][chunk_tensor]
        self.numels = _to_device(sizes, self.device)
        self.chunk_tensor = _to_device(chunk_tensor, self.device)
        self.chunk_offset = _to_device(chunk_index * CHUNK, self.device)
        self.tensor_chunks = _to_device(tensor_chunks, self.device)
        self.all_chunks = _to_device(np.array([0, self.n_chunks], dtype=np.int32), self.device)
        self._numels = numels
        self.builds["chunks"] += 1

    def _chunk_sumsq(self, columns) -> torch.Tensor:
        partials = torch.empty((self.n_chunks, len(columns)), dtype=torch.float32, device=self.device)
        if self.n_chunks:
            _chunk_sumsq_kernel[(self.n_chunks,)](
                self.pointers, self.numels, self.chunk_tensor, self.chunk_offset, partials,
                N_COLS=self.n_columns, COL0=columns[0], COL1=columns[1] if len(columns) > 1 else -1,
                CHUNK=CHUNK, BLOCK=BLOCK, **LAUNCH_OPTIONS,
            )
        return partials

    def column_sumsq(self, column: int) -> torch.Tensor:
        """Sum of squares of every element of one column, as a 0-d fp32 tensor (two launches)."""
        return segment_sum(self._chunk_sumsq([column]), self.all_chunks, 1).reshape(())

    def per_tensor_sumsq(self, column0: int, column1: int) -> torch.Tensor:
        """Per tensor, the sums of squares of two columns, [n_tensors, 2] (two launches)."""
        return self.per_tensor_sum(self._chunk_sumsq([column0, column1]))

    def per_tensor_sum(self, partials: torch.Tensor) -> torch.Tensor:
        """Per-chunk partials [n_chunks, w] -> per-tensor sums [n_tensors, w]."""
        return segment_sum(partials, self.tensor_chunks, self.n_tensors)


class Plan:
    """One step's launch inputs for a bucket: its (cached) tables, its per-tensor hyperparameters, and
    per stage the tensors the stage writes (whose autograd versions the backend then bumps)."""

    def __init__(self, table: MultiTensorTable, hyper: torch.Tensor, modified: tuple):
        self.table = table
        self.hyper = hyper
        self.modified = modified


def segment_sum(partials: torch.Tensor, bounds: torch.Tensor, n_segments: int) -> torch.Tensor:
    width = partials.shape[1] if partials.dim() == 2 else 1
    out = torch.empty((n_segments, width), dtype=torch.float32, device=partials.device)
    if n_segments:
        _segment_sum_kernel[(n_segments,)](partials, bounds, out, WIDTH=width, BLOCK=SEGMENT_BLOCK,
                                           enable_fp_fusion=True)
    return out


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    host = torch.from_numpy(array)
    if device.type == "cpu":
        return host
    # Through pinned memory: a copy from pageable memory may wait for the stream. torch's pinned
    # allocator keeps the staging buffer alive until the asynchronous copy has finished.
    return host.pin_memory().to(device, non_blocking=True)
