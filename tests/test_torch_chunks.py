"""The torch backend's bf16 and 8-bit states a chunk at a time (lamb_kernels/torch_chunks.py): the
random bits, roundings, codes and decoded values of the format's reference (rounding.py,
quantization.py), and whole steps of the backend's reference path, bit for bit (a NaN where the
reference has one). The other tests compare backends within a rounding's threshold; a change of one
random bit moves few elements, and only these tests see it."""
import math

import pytest
import torch

from lamb_kernels import FusedLAMB, FusedLARS, torch_chunks
from lamb_kernels.quantization import BLOCK, dequantize, quantize, quantize_stochastic
from lamb_kernels.rounding import element_random16, round_bf16_stochastic
from lamb_kernels.torch_chunks import CHUNK, Workspace, chunks, hash_, int32_keys, random_, scatter

INT8 = "int8"
KEYS = [0, 0x12345678, 0xFEDCBA98, 0xFFFFFFFF]
BF16_MAX = float.fromhex("0x1.fep127")
# A finite value beside every edge: infinities, NaN, signed zeros, bf16's largest and the values that
# round to infinity (the reference keeps bf16's largest), fp32's largest, subnormals.
SPECIALS = [math.inf, -math.inf, math.nan, -math.nan, 0.0, -0.0, BF16_MAX, -BF16_MAX, 3.3895e38, -3.3895e38,
            3.4e38, -3.4e38, float.fromhex("0x1.fffffep127"), 1e-40, -1e-40, 1e-45]


def same_bits(a, b):
    """Bit for bit, but any NaN for a NaN (bf16 conversions canonicalize NaNs)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return bool(((a.view(ints) == b.view(ints)) | (a.isnan() & b.isnan())).all())


def wide_range(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) * 10.0 ** (-10 * torch.rand(n, generator=gen))


def random_bits(sizes, keys, state, shift=0):
    """Per tensor, the random bits of `state` that torch_chunks gives (shifted left by `shift`)."""
    ws, out = Workspace("cpu", CHUNK), [torch.empty(n, dtype=torch.int32) for n in sizes]
    for chunk in chunks(tuple(sizes)):
        hash_(chunk, int32_keys(keys), ws)
        scatter(chunk, out, random_(ws.x[: chunk.size], ws.random[: chunk.size], state, shift))
    return out


@pytest.mark.parametrize("state", [0, 1])
def test_random_bits_are_the_references_across_chunks_and_shared_chunks(state):
    sizes = [300, 7, 2 * CHUNK + 1000, 256, 1]  # a tensor cut into chunks, small ones sharing one
    keys = KEYS + [5]
    for n, key, got in zip(sizes, keys, random_bits(sizes, keys, state)):
        assert torch.equal(got, element_random16(key, n, state, "cpu")), (n, key)
    keys = torch.tensor(keys, dtype=torch.int64)  # (keys as a tensor, as capturable step counts give them)
    for n, key, got in zip(sizes, keys.tolist(), random_bits(sizes, keys, state, shift=4)):
        assert torch.equal(got, element_random16(key, n, state, "cpu") << 4), (n, key)


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("state", [0, 1])
def test_bf16_rounding_is_the_references(key, state):
    low_payload_nans = torch.tensor([0x7F800001, 0x7FFFFFFF, -1], dtype=torch.int32).view(torch.float32)
    x = torch.cat([wide_range(1000), torch.tensor(SPECIALS), low_payload_nans])
    ws, n = Workspace("cpu", CHUNK), x.numel()
    chunk = chunks((n,))[0]
    hash_(chunk, int32_keys([key]), ws)
    values = ws.values[0][: chunk.size]
    values[:n].copy_(x)
    random = random_(ws.x[: chunk.size], ws.random[: chunk.size], state)
    rounded = torch_chunks.round_bf16_(values, random, ws.y[: chunk.size])[:n].to(torch.bfloat16)
    assert same_bits(rounded, round_bf16_stochastic(x, key, state))


def blocks_of_every_kind(signed):
    """Blocks with an infinity, a NaN, zeros (and a -0), subnormals only, all negative, a NaN of either
    sign, values far below the block's largest, values near fp32's largest, and a partial last block."""
    x = wide_range(11 * BLOCK + 77, seed=1)
    x[BLOCK + 5], x[2 * BLOCK + 1], x[2 * BLOCK + 3], x[3 * BLOCK + 7] = math.inf, math.nan, math.inf, -math.inf
    x[4 * BLOCK : 5 * BLOCK] = 0.0
    x[4 * BLOCK + 3] = -0.0
    x[5 * BLOCK : 6 * BLOCK] *= 1e-40
    x[6 * BLOCK : 7 * BLOCK] = -x[6 * BLOCK : 7 * BLOCK].abs()
    x[7 * BLOCK + 9] = -math.nan
    x[8 * BLOCK : 9 * BLOCK] = 1e-30
    x[8 * BLOCK] = 1.0
    x[9 * BLOCK : 10 * BLOCK] *= 3e38
    x[10 * BLOCK + 1] = 1e-45
    return x if signed else x.abs()


@pytest.mark.parametrize("key", [None] + KEYS)  # None: round to the nearest code
@pytest.mark.parametrize("signed", [True, False])
def test_codes_and_scales_are_the_references(signed, key):
    x = blocks_of_every_kind(signed)
    ws, n, state = Workspace("cpu", CHUNK), x.numel(), 0 if signed else 1
    chunk = chunks((n,))[0]
    values = ws.values[0][: chunk.size]
    values[:n].copy_(x)
    torch_chunks.zero_gaps(chunk, values)
    if key is None:
        random4 = ws.random[: chunk.size].fill_(1 << 19)
        expected_codes, expected_scales = quantize(x, signed)
    else:
        hash_(chunk, int32_keys([key]), ws)
        random4 = random_(ws.x[: chunk.size], ws.random[: chunk.size], state, shift=4)
        expected_codes, expected_scales = quantize_stochastic(x, key, state, signed)
    codes = ws.codes[: chunk.size]
    scales = torch_chunks.encode_(values, random4, signed, ws.y[: chunk.size], ws.below[: chunk.size], codes,
                                  ws.t[: chunk.size])
    assert torch.equal(codes[:n].to(expected_codes.dtype), expected_codes)
    assert torch.equal(scales.view(torch.int32), expected_scales.view(torch.int32))


@pytest.mark.parametrize("signed", [True, False])
def test_every_code_decodes_as_the_reference(signed):
    """All 256 bit patterns (those no encoder writes too), with scales finite, infinite, NaN and 0:
    the same bits, a NaN's sign included."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.int8 if signed else torch.uint8).repeat(4)
    scales = torch.tensor([1.5, math.inf, -math.nan, 0.0])
    n = codes.numel()
    t, u = torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int32)
    decoded = torch_chunks.decode_(codes.to(torch.int32), scales, signed, torch.empty(n), t, u)
    assert torch.equal(decoded.view(torch.int32), dequantize(codes, scales).view(torch.int32))


SHAPES = [(300,), (10, 100), (7,), (CHUNK // 512 + 7, 512), (768,), (3, 5, 7), (1,), (50, 40)]  # one over CHUNK
VARIANTS = {
    "lamb": {"plain": {}, "options": dict(weight_decay=0.01, adam_w_mode=False, max_grad_norm=1.0),
             "no-averaging": dict(weight_decay=0.01, grad_averaging=False, bias_correction=False)},
    "lars": {"plain": {}, "options": dict(weight_decay=1e-4, nesterov=True, trust_clip=True),
             "dampening": dict(weight_decay=1e-4, dampening=0.1)},
}


def run(algorithm, state_dtype, variant, scaled, master, steps=3):
    """Steps over tensors sharing chunks and cut into chunks, one of them transposed (dense, not
    contiguous), a grad of about 1e30 at one step (v overflows to inf), and under `scaled` the
    attributes a GradScaler sets, the middle step skipped."""
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if master else torch.float32
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(dtype)) for s in SHAPES]
    params[-1] = torch.nn.Parameter(params[-1].detach().t().contiguous().t())
    if algorithm == "lamb":
        opt = FusedLAMB(params, lr=0.05, backend="torch", state_dtype=state_dtype, master_weights=master,
                        **VARIANTS["lamb"][variant])
    else:
        opt = FusedLARS(params, lr=0.5, momentum=0.9, backend="torch", state_dtype=state_dtype,
                        master_weights=master, **VARIANTS["lars"][variant])
    for step in range(steps):
        scale = 2.0**8 if scaled else 1.0
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-3 * scale).to(dtype).as_strided(p.shape, p.stride())
        if step == 1 and not master:
            params[0].grad[3] = 1e30
        if scaled:
            opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(float(step == 1))
        opt.step()
    return params, opt


@pytest.mark.parametrize("master", [False, True], ids=["fp32", "master"])
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("variant", ["plain", "options", "other"])
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, INT8], ids=str)
@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
def test_a_chunked_step_is_the_reference_paths(monkeypatch, algorithm, state_dtype, variant, scaled, master):
    variant = variant if variant != "other" else list(VARIANTS[algorithm])[2]
    chunked = run(algorithm, state_dtype, variant, scaled, master)
    monkeypatch.setattr(torch_chunks, "usable", lambda *tensor_lists: False)
    reference = run(algorithm, state_dtype, variant, scaled, master)
    (params, opt), (ref_params, ref_opt) = chunked, reference
    for p, q in zip(params, ref_params):
        assert same_bits(p.detach(), q.detach()), p.shape
        state, expected = opt.state[p], ref_opt.state[q]
        assert state.keys() == expected.keys()
        for key in state:
            if torch.is_tensor(state[key]):
                assert same_bits(state[key], expected[key]), (key, p.shape)
