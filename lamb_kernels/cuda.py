"""The "cuda" backend: the hand-written CUDA kernels of csrc/cuda, the CUDA implementations of the
same operators as the C++ CPU ones (``torch.ops.lamb_kernels.<stage>``, dispatched by device; built
or loaded by extension.py), through the one native backend (native.py).
"""
from __future__ import annotations

from . import extension
from .native import NativeBackend

# Elements per chunk, one thread block each: 256 threads, 64 elements per thread, in packs of 8
# when the launch is 16-byte aligned. Enough blocks to fill the GPU on a BERT-sized bucket, and few
# enough that the per-chunk partial sums stay small.
CHUNK = 16384


class CudaBackend(NativeBackend):
    def __init__(self):
        extension.load_cuda()  # builds the kernels on first use, or loads them from the cache
        super().__init__("cuda", "", CHUNK)
