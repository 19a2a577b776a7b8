"""Multi-tensor machinery shared by the Triton optimizers.

Every tensor of a bucket is cut into chunks of ``CHUNK`` elements; one program handles one chunk,
so a launch covers any number of tensors and one huge tensor still spreads over many programs.
The tables that make this possible are plain device tensors:

- a base pointer per column (p, g, m, v for LAMB), passed to the kernel as a typed argument, and the
  offset table ``int64 [n_tensors, n_columns]``: each tensor's first element as an element offset
  from its column's base. Where every tensor of a launch starts on a 16-byte boundary (the caching
  allocator's blocks do; views may not), the kernel is told the offsets are multiples of 16 bytes
  (``ALIGN``): with the base pointers' own alignment, which Triton sees, the loads and stores of
  whole blocks become 128-bit (``ld.global.v4``). Otherwise a scalar variant runs, and
  ``LAMB_KERNELS_TRITON_VECTORIZE=0`` forces it (to measure both);
- chunk map ``chunk_tensor int32 [n_chunks]``, ``chunk_offset int64 [n_chunks]`` (element offset of
  the chunk inside its tensor, int64 so tensors past 2^31 elements work), ``numels int64 [n_tensors]``;
- ``tensor_chunks int32 [n_tensors + 1]``: the chunks of tensor t are
  ``tensor_chunks[t] : tensor_chunks[t + 1]``, used to reduce per-chunk partial sums per tensor.

Reductions never use atomics: a chunk writes its partial sum, then `_segment_sum_kernel` adds the
partials of each segment in ascending order, so the same inputs give the same bits on every run.

Each column has its own element type (a constexpr of the kernels): params and grads may be fp32,
bf16 or fp16, states fp32 (or bf16 and 8-bit codes: low_precision_states.py rounds and codes those).
Arithmetic is fp32; a value stored into a bf16 param column is rounded to nearest even by
`store_rounded` (the interpreter would otherwise truncate).

The kernels are launched from registered operators (lamb.py, lars.py: ``torch.ops.lamb_kernels.
triton_*``), which find their tables with `table_for`: one table per (operator, device, tensor
sizes and first address), cached, so a steady loop builds each once and a CUDA graph capture after
warm-up copies nothing from the host.
"""
import collections
import os
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

from ..backend_api import to_device
from ..schemas import SCHEMAS

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
VECTORIZE_VAR = "LAMB_KERNELS_TRITON_VECTORIZE"  # "0": the scalar variant for every launch

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
def chunk_opening(numels, chunk_tensor, chunk_offset, hyper, found_inf, N_HYPER: tl.constexpr,
                  HAS_FOUND_INF: tl.constexpr, CHUNK: tl.constexpr):
    """What every optimizer kernel starts with: (tensor index, offset of the chunk's first element,
    elements to do, the tensor's row of the hyperparameter table). No element when a GradScaler
    found a non-finite grad: nothing is written, and no host ever looks at found_inf."""
    t, start, n = chunk_extent(numels, chunk_tensor, chunk_offset, CHUNK)
    if HAS_FOUND_INF:
        n = tl.where(tl.load(found_inf) != 0, 0, n)
    return t, start, n, hyper + t * N_HYPER


def launch(kernel, table, *args, **constexprs) -> None:
    """Runs `kernel` once per chunk of `table`: the columns' base pointers, its offset table, sizes
    and chunk map come first, then `args`, with the chunking constants, each column's ALIGN and the
    launch options; a bucket without a chunk (only empty tensors) launches nothing. A new
    optimizer's launcher passes only its own arguments."""
    bases, table.bases = table.bases, None  # the call's tensors: not kept past the launch
    if table.n_chunks:
        kernel[(table.n_chunks,)](*bases, table.pointers, table.numels, table.chunk_tensor, table.chunk_offset, *args,
                                  CHUNK=table.chunk, BLOCK=BLOCK, ALIGN=table.align, **constexprs,
                                  **LAUNCH_OPTIONS)


def scalar_or(t, stand_in: torch.Tensor) -> torch.Tensor:
    """An absent optional input: any tensor stands in, the kernel never reads it (a constexpr flag
    says so)."""
    return stand_in if t is None else t


@triton.jit
def column_pointer(base, ptrs, t, start, N_COLS: tl.constexpr, COL: tl.constexpr, ALIGN: tl.constexpr):
    """Pointer to element `start` (int64) of tensor t of column COL: the column's base pointer plus
    the tensor's element offset from it. ALIGN: the offset is a multiple of 16 bytes, and whole
    blocks move 128 bits at a time."""
    offset = tl.load(ptrs + t * N_COLS + COL) + start
    if ALIGN:
        offset = tl.multiple_of(offset, 128 // base.dtype.element_ty.primitive_bitwidth)
    return base + offset


@triton.jit
def load_f32(ptr, mask, MASKED: tl.constexpr):
    """Elements as fp32; masked (0 outside) only in a chunk's last, partial block: a whole block has
    no mask, which is what lets the compiler vectorize it."""
    if MASKED:
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    return tl.load(ptr).to(tl.float32)


@triton.jit
def store_rounded(ptr, x, mask, MASKED: tl.constexpr):
    """Stores fp32 `x` in the pointer's element type, rounded to nearest even (masked as in
    `load_f32`). For bf16 the rounding is done on the bits (as torch's own conversion does), so
    compiled and interpreted kernels agree with torch."""
    DTYPE: tl.constexpr = ptr.dtype.element_ty
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        value = tl.where(is_nan, (bits >> 16) | 0x40, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        value = x.to(DTYPE)
    if MASKED:
        tl.store(ptr, value, mask=mask)
    else:
        tl.store(ptr, value)


@triton.jit
def _squares(a_ptr, b_ptr, offs, mask, acc0, acc1, TWO: tl.constexpr, MASKED: tl.constexpr):
    a = load_f32(a_ptr + offs, mask, MASKED)
    acc0 += a * a
    if TWO:
        b = load_f32(b_ptr + offs, mask, MASKED)
        acc1 += b * b
    return acc0, acc1


@triton.jit
def _chunk_sumsq_kernel(
    a_base,  # column COL0's base pointer
    b_base,  # column COL1's (column COL0's when there is none)
    ptrs,  # int64 [n_tensors, N_COLS]: element offsets from the bases
    numels,  # int64 [n_tensors]
    chunk_tensor,  # int32 [n_chunks]
    chunk_offset,  # int64 [n_chunks]
    partials,  # fp32 [n_chunks, 1 or 2]: out, per chunk the sum of x^2 of column COL0 (and COL1)
    N_COLS: tl.constexpr,
    COL0: tl.constexpr,
    COL1: tl.constexpr,  # -1: reduce COL0 only
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """partials[c, k] = sum(x[i]^2) over chunk c of column COL_k, in fp32; one pass reads both."""
    t, start, n = chunk_extent(numels, chunk_tensor, chunk_offset, CHUNK)
    a_ptr = column_pointer(a_base, ptrs, t, start, N_COLS, COL0, ALIGN)
    b_ptr = a_ptr
    if COL1 >= 0:
        b_ptr = column_pointer(b_base, ptrs, t, start, N_COLS, COL1, ALIGN)
    acc0 = tl.zeros([BLOCK], tl.float32)
    acc1 = tl.zeros([BLOCK], tl.float32)
    whole = n // BLOCK * BLOCK
    for i in range(0, whole, BLOCK):
        acc0, acc1 = _squares(a_ptr, b_ptr, i + tl.arange(0, BLOCK), None, acc0, acc1, COL1 >= 0, False)
    offs = whole + tl.arange(0, BLOCK)
    acc0, acc1 = _squares(a_ptr, b_ptr, offs, offs < n, acc0, acc1, COL1 >= 0, True)
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
    steady training loop both are built once.
    """

    def __init__(self, device: torch.device, chunk: int = CHUNK):
        self.device = device
        self.chunk = chunk  # elements per chunk: one program each
        self.bases = None  # per column, the tensor whose address the offsets start from (this call's)
        self.pinned = False  # used while a CUDA graph was captured: its tensors must outlive the graph
        self._kept = []  # a pinned table's replaced tensors, which a captured graph may still read
        self._numels = None
        self._addresses = None

    def update(self, columns, stand_in: torch.Tensor | None = None) -> None:
        """`columns`: lists of tensors, one per column; the first column gives the sizes. A column's
        base is its first tensor with elements; an empty tensor's offset is never dereferenced, and a
        column with no element at all (LARS's placeholder buffers) takes `stand_in` as its base (an
        empty list of tensors has no chunk and launches nothing)."""
        numels = tuple(t.numel() for t in columns[0])
        if numels != self._numels:
            self._build_chunk_map(numels)
        fallback = [stand_in] if stand_in is not None else []
        self.bases = [next((t for t in column if t.numel()), (fallback or column or [None])[0]) for column in columns]
        # (A base is a tensor of its column, or a stand-in for a column whose offsets are never read:
        # the columns' addresses decide the offsets.)
        addresses = tuple(t.data_ptr() for column in columns for t in column)
        if addresses != self._addresses:
            self._build_pointers(columns, addresses)

    def _build_pointers(self, columns, addresses) -> None:
        offsets = np.zeros((len(columns), len(columns[0])), dtype=np.int64)
        # (Chunks start at multiples of `chunk` elements: those must keep 16-byte alignment too.)
        aligned = os.environ.get(VECTORIZE_VAR, "1") != "0" and self.chunk % 8 == 0
        for k, (column, base) in enumerate(zip(columns, self.bases)):
            for j, t in enumerate(column):
                if t.numel():
                    offsets[k, j] = (t.data_ptr() - base.data_ptr()) // t.element_size()
                    aligned = aligned and t.data_ptr() % 16 == 0
        self._retire("pointers")
        self.pointers = to_device(offsets.T.copy(), self.device)  # row-major [n_tensors, n_columns]
        self.n_columns = len(columns)
        self.align = aligned
        self._addresses = addresses

    def _build_chunk_map(self, numels) -> None:
        sizes = np.array(numels, dtype=np.int64)
        counts = -(-sizes // self.chunk)  # ceil; zero-size tensors get no chunk
        tensor_chunks = np.zeros(len(sizes) + 1, dtype=np.int32)
        np.cumsum(counts, out=tensor_chunks[1:])
        self.n_tensors = len(sizes)
        self.n_chunks = int(tensor_chunks[-1])
        chunk_tensor = np.repeat(np.arange(len(sizes), dtype=np.int32), counts)
        chunk_index = np.arange(self.n_chunks, dtype=np.int64) - tensor_chunks[:-1][chunk_tensor]
        self._retire("numels", "chunk_tensor", "chunk_offset", "tensor_chunks")
        self.numels = to_device(sizes, self.device)
        self.chunk_tensor = to_device(chunk_tensor, self.device)
        self.chunk_offset = to_device(chunk_index * self.chunk, self.device)
        self.tensor_chunks = to_device(tensor_chunks, self.device)
        self._numels = numels

    def _retire(self, *names) -> None:
        if self.pinned:
            self._kept += [getattr(self, name) for name in names if hasattr(self, name)]

    def per_tensor_sumsq(self, width: int) -> torch.Tensor:
        """Per tensor, the sums of squares of the first `width` columns ([n_tensors, 1 or 2]; two
        launches)."""
        partials = torch.empty((self.n_chunks, width), dtype=torch.float32, device=self.device)
        if width == 1:
            self.bases.append(self.bases[0])  # the kernel's second base, never read
        launch(_chunk_sumsq_kernel, self, partials, N_COLS=self.n_columns, COL0=0, COL1=1 if width > 1 else -1)
        return self.per_tensor_sum(partials)

    def per_tensor_sum(self, partials: torch.Tensor) -> torch.Tensor:
        """Per-chunk partials [n_chunks, w] -> per-tensor sums [n_tensors, w]."""
        return segment_sum(partials, self.tensor_chunks, self.n_tensors)


_TABLES = collections.OrderedDict()
_TABLES_KEPT = 64  # enough for several optimizers with several buckets each


def table_for(operator: str, columns, chunk: int = CHUNK, stand_in=None) -> MultiTensorTable:
    """The cached table of `operator` for these tensors: one per (device, chunk size, sizes, address
    of the first tensor), which tells optimizers apart; a new grad tensor (``zero_grad(set_to_none=
    True)``) rebuilds only the pointer table, as in `MultiTensorTable.update`. A table used while a
    CUDA graph is captured is never evicted, and keeps the device tensors it replaces."""
    first = columns[0][0] if columns[0] else None
    device = first.device if first is not None else torch.device("cpu")
    key = (operator, device, chunk, len(columns), tuple(t.numel() for t in columns[0]),
           first.data_ptr() if first is not None else 0)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = MultiTensorTable(device, chunk)
        while len(_TABLES) > _TABLES_KEPT:  # the least recently used table that no graph holds goes
            oldest = next((k for k, kept in _TABLES.items() if not kept.pinned), None)
            if oldest is None:
                break
            del _TABLES[oldest]
    _TABLES.move_to_end(key)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        table.pinned = True  # a captured graph reads its tensors at every replay
    table.update(columns, stand_in)
    return table


@torch.library.custom_op("lamb_kernels::triton_sums_of_squares", mutates_args=(),
                         schema=SCHEMAS["sums_of_squares"])
def sums_of_squares(tensors: list[torch.Tensor], paired: Optional[list[torch.Tensor]], chunk_size: int) -> torch.Tensor:
    """The `sums_of_squares` stage (lamb_kernels/schemas.py): per tensor, sum of x^2 in fp32,
    [n_tensors], or [n_tensors, 2] with `paired` (read in the same pass)."""
    columns = [list(tensors), list(paired)] if paired is not None else [list(tensors)]
    table = table_for("sums_of_squares", columns, chunk_size)
    sums = table.per_tensor_sumsq(len(columns))
    return sums if paired is not None else sums.reshape(-1)


def segment_sum(partials: torch.Tensor, bounds: torch.Tensor, n_segments: int) -> torch.Tensor:
    width = partials.shape[1] if partials.dim() == 2 else 1
    out = torch.empty((n_segments, width), dtype=torch.float32, device=partials.device)
    if n_segments:
        _segment_sum_kernel[(n_segments,)](partials, bounds, out, WIDTH=width, BLOCK=SEGMENT_BLOCK,
                                           enable_fp_fusion=True)
    return out
