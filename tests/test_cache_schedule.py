"""The update stages (lamb_update, lars_update): a whole step of a bucket with no sharded tensor in one
operator call, which the C++ operators run by cache groups (docs/benchmark.md, "The schedule"). They
must give the bits of the two streaming passes (lamb_moments then lamb_apply; the norms then
lars_apply) whatever the groups: every tensor alone, a few per group, or all in one."""
import pytest
import torch

import lamb_kernels
from lamb_kernels import FusedLAMB, FusedLARS, backends
from lamb_kernels.operator_backend import OperatorBackend
from lamb_kernels.torch_backend import TorchBackend

CPP = "cpp" in lamb_kernels.available_backends("cpu")
needs_cpp = pytest.mark.skipif(not CPP, reason="the C++ extension did not build here")
CHUNK = backends.CPP_CHUNK
# Tensors across chunk boundaries, tiny ones, an empty one; 2 chunks + 5 elements is 131 KB of fp32 p, g,
# m and v: groups of 40 KB hold one or two tensors, groups of 1 MB several.
SHAPES = [(2 * CHUNK + 5,), (30, 7), (0,), (1,), (300, 40), (5,), (CHUNK,), (999,)]
CACHES = {"each-tensor-alone": 0, "small-groups": 40_000, "one-megabyte": 1 << 20, "one-group": 1 << 40}


def staged(monkeypatch):
    """The operator backend's update stages replaced by its two streaming stages in turn."""
    monkeypatch.setattr(OperatorBackend, "lamb_update_", TorchBackend.lamb_update_)
    monkeypatch.setattr(OperatorBackend, "lars_update_", TorchBackend.lars_update_)


def run(algorithm, state_dtype, steps=3, dtype=torch.float32, master_weights=False, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    groups = [{"params": params[:4]}, {"params": params[4:], "lr": 5e-3, "weight_decay": 0.0}]
    if algorithm == "lamb":
        opt = FusedLAMB(groups, lr=1e-2, weight_decay=0.01, backend="cpp", state_dtype=state_dtype,
                        master_weights=master_weights, **kwargs)
    else:
        groups[1]["layer_adaptation"] = False  # its tensors are left out of the norms pass
        opt = FusedLARS(groups, lr=0.1, momentum=0.9, weight_decay=1e-4, backend="cpp", state_dtype=state_dtype,
                        master_weights=master_weights, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    states = [t.clone() for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
    return [p.detach().clone() for p in params] + states


def same_bits(a, b):
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x.view(-1).view(torch.uint8),
                                                                       y.view(-1).view(torch.uint8))
                                    for x, y in zip(a, b))


@needs_cpp
@pytest.mark.parametrize("cache", CACHES.values(), ids=CACHES.keys())
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, "int8"], ids=["fp32", "bf16", "int8"])
@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
def test_update_stage_has_the_bits_of_the_two_passes(monkeypatch, algorithm, state_dtype, cache):
    monkeypatch.setenv(backends.CACHE_ENV_VAR, str(cache))
    fused = run(algorithm, state_dtype)
    staged(monkeypatch)
    assert same_bits(fused, run(algorithm, state_dtype))


@needs_cpp
@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
def test_update_stage_with_master_weights_and_a_grad_scale(monkeypatch, algorithm):
    """bf16 params with fp32 master weights (the copies written in the second pass), and a GradScaler's
    scale and found_inf reaching the update operator."""

    def scaled_run():
        gen = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in SHAPES]
        opt = (FusedLAMB(params, lr=1e-2, backend="cpp", master_weights=True) if algorithm == "lamb" else
               FusedLARS(params, lr=0.1, momentum=0.9, weight_decay=1e-4, backend="cpp", master_weights=True))
        for step in range(3):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * 1024).bfloat16()
            opt.grad_scale = torch.tensor([1024.0])  # (as a GradScaler sets them, optimizer.py)
            opt.found_inf = torch.tensor([1.0 if step == 1 else 0.0])  # the second step overflowed: nothing written
            opt.step()
        return [p.detach().clone() for p in params] + [t.clone() for s in opt.state.values() for t in s.values()
                                                       if torch.is_tensor(t)]

    monkeypatch.setenv(backends.CACHE_ENV_VAR, "40000")
    fused = scaled_run()
    staged(monkeypatch)
    assert same_bits(fused, scaled_run())


@needs_cpp
@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
def test_update_stage_same_bits_whatever_the_thread_count(monkeypatch, algorithm):
    monkeypatch.setenv(backends.CACHE_ENV_VAR, "40000")
    threads = torch.get_num_threads()
    try:
        results = []
        for n_threads in (1, 2, 3):
            torch.set_num_threads(n_threads)
            results.append(run(algorithm, torch.bfloat16))
    finally:
        torch.set_num_threads(threads)
    assert same_bits(results[0], results[1]) and same_bits(results[1], results[2])


@needs_cpp
def test_opcheck_update_operators():
    ops = torch.ops.lamb_kernels
    from test_cpp_backend import lamb_inputs, lars_inputs

    seg, hyper = lamb_inputs()
    grad_sumsq = ops.sums_of_squares(seg.grads, None, 64).sum()
    for cache in (0, 1 << 30):
        torch.library.opcheck(ops.lamb_update.default, (seg.params, seg.grads, seg.exp_avgs, seg.exp_avg_sqs, [], [],
                                                        hyper, grad_sumsq, None, None, [], 64, cache))
        lars, buffers, lars_hyper = lars_inputs()
        torch.library.opcheck(ops.lars_update.default, (lars.params, lars.grads, buffers, [], lars_hyper, None, None,
                                                        [], True, 64, cache))


@needs_cpp
def test_update_operators_reject_bad_input_by_name_and_write_nothing():
    ops = torch.ops.lamb_kernels
    from test_cpp_backend import lamb_inputs, lars_inputs

    seg, hyper = lamb_inputs()
    before = [t.clone() for t in (*seg.params, *seg.exp_avgs, *seg.exp_avg_sqs)]
    with pytest.raises(RuntimeError, match=r"lamb_update: exp_avgs has 4 tensors, params has 5"):
        ops.lamb_update(seg.params, seg.grads, seg.exp_avgs[:4], seg.exp_avg_sqs, [], [], hyper, None, None, None, [],
                        64, 0)
    with pytest.raises(RuntimeError, match=r"lamb_update: copies has 1 tensors, params has 5"):
        ops.lamb_update(seg.params, seg.grads, seg.exp_avgs, seg.exp_avg_sqs, [], [], hyper, None, None, None,
                        [seg.params[0].bfloat16()], 64, 0)
    lars, buffers, lars_hyper = lars_inputs()
    lars_before = [t.clone() for t in lars.params]
    with pytest.raises(RuntimeError, match=r"lars_update: params\[0\] adapts, but adaptive is false"):
        ops.lars_update(lars.params, lars.grads, buffers, [], lars_hyper, None, None, [], False, 64, 0)
    assert same_bits(before, [*seg.params, *seg.exp_avgs, *seg.exp_avg_sqs])
    assert same_bits(lars_before, lars.params)


def test_cache_bytes_from_the_machine_or_the_environment(monkeypatch):
    monkeypatch.delenv(backends.CACHE_ENV_VAR, raising=False)
    assert backends.last_level_cache_bytes() >= 1 << 20  # every x86 or ARM server of the last decade
    assert backends.cache_group_bytes() == int(backends.last_level_cache_bytes() * backends.CACHE_SHARE)
    monkeypatch.setenv(backends.CACHE_ENV_VAR, "12345")
    assert backends.cache_group_bytes() == 12345
    monkeypatch.setenv(backends.CACHE_ENV_VAR, "lots")
    with pytest.raises(ValueError, match=r"\$LAMB_KERNELS_CACHE_BYTES must be a number of bytes, got 'lots'"):
        backends.cache_group_bytes()
