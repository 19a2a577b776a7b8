"""How an optimizer state tensor is stored, per its group's ``state_dtype`` (docs/states.md):
float32, bfloat16, or "int8", 8-bit codes with one float32 scale per block (quantization.py), kept
under the state key and the key + ``"_scales"``. Created, checked, and converted from one storage to
another (a checkpoint of another ``state_dtype``, a group's ``state_dtype`` changed between steps, a
parameter's memory layout changed): through float32 values, rounded to the nearest (bfloat16, or
the nearest code)."""
from __future__ import annotations

import torch

from ..quantization import CODE_DTYPES, INT8, dequantize, n_blocks, quantize

STATE_DTYPE = torch.float32  # moments, momentum buffers and master weights, whatever the parameter dtype
STATE_DTYPES = (torch.float32, torch.bfloat16, INT8)  # what `state_dtype` may be
FLOAT_STORAGE = (torch.float32, torch.bfloat16)
CODES = tuple(CODE_DTYPES.values())


def scales_key(key: str) -> str:
    return key + "_scales"


def storage_dtype(state_dtype, signed: bool) -> torch.dtype:
    """The dtype a state of a group with `state_dtype` is kept in (int8: its codes')."""
    return CODE_DTYPES[signed] if state_dtype == INT8 else state_dtype


def new_state(p: torch.Tensor, dtype: torch.dtype, scales_of: str, state: dict, key: str) -> None:
    """A zero state entry for p in `dtype` (p's memory layout), and its zero scales for codes."""
    state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    if dtype in CODES:
        state[scales_of] = torch.zeros(n_blocks(p.numel()), dtype=torch.float32, device=p.device)


def scales_fit(codes: torch.Tensor, scales, placed: bool = True) -> bool:
    """Whether `scales` are the block scales codes need: float32 [n_blocks]; with `placed` (not for a
    saved state, which loading places), contiguous on the codes' device."""
    shaped = (torch.is_tensor(scales) and scales.dtype == torch.float32 and scales.dim() == 1
              and scales.numel() == n_blocks(codes.numel()))
    return shaped and (not placed or (scales.device == codes.device and scales.is_contiguous()))


def float_value(state: dict, key: str) -> torch.Tensor:
    """A state entry's values as a float tensor (codes decoded to float32) in its own layout."""
    t = state[key]
    return dequantize(t, state[scales_key(key)]) if t.dtype in CODES else t


def convert(p: torch.Tensor, state: dict, key: str, dtype: torch.dtype | None) -> None:
    """state[key] in p's memory layout and in `dtype` (None: its own), its scales alongside for
    codes (a float state drops any it had). Codes whose layout changes are encoded afresh: a block
    is a run of elements in memory order."""
    t = state[key]
    dtype = t.dtype if dtype is None else dtype
    if dtype not in CODES:
        state[key] = torch.empty_like(p, dtype=dtype).copy_(float_value(state, key))
        state.pop(scales_key(key), None)
        return
    values = torch.empty_like(p, dtype=torch.float32).copy_(float_value(state, key))
    state[key], state[scales_key(key)] = quantize(values, dtype == torch.int8)
