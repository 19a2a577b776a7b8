"""The "cpp" backend: the C++ operators of csrc/ on CPU tensors (built or loaded by extension.py),
through the one native backend (native.py). The operators chunk every tensor and share the chunks
among torch's threads (``torch.set_num_threads``).
"""
from __future__ import annotations

from . import extension
from .native import NativeBackend

# Elements per chunk: large enough that scheduling costs nothing, small enough that a thread's four
# arrays of a chunk (p, g, m, v) stay in its L2 cache and a big tensor spreads over every core.
CHUNK = 16384


class CppBackend(NativeBackend):
    def __init__(self):
        extension.load()  # builds the operators on first use, or loads them from the cache
        super().__init__("cpp", "", CHUNK)
