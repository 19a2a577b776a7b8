"""The C++ backend itself: its operators under torch.library.opcheck, the build and its cache, the
fallback when the build fails, results independent of the thread count, and one operator call per
stage. (Its math runs through the shared suites, which are parametrised over every backend.)"""
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import lamb_kernels
from lamb_kernels import FusedLAMB, FusedLARS, extension
from lamb_kernels.hyper import LambColumn, LarsColumn, lamb_table, lars_table
from lamb_kernels.ops import LambSegment, LarsSegment

ROOT = pathlib.Path(__file__).resolve().parent.parent
CPP = "cpp" in lamb_kernels.available_backends("cpu")
needs_cpp = pytest.mark.skipif(not CPP, reason="the C++ extension did not build here")
SIZES = [(17,), (0,), (3, 5, 7), (4097,), (1,)]


def lamb_inputs(clip=True, gen=None):
    gen = gen or torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SIZES]
    seg = LambSegment(params=params, grads=[torch.randn(s, generator=gen) for s in SIZES],
                      exp_avgs=[torch.randn(s, generator=gen).abs() for s in SIZES],
                      exp_avg_sqs=[torch.rand(s, generator=gen) for s in SIZES],
                      bias_correction1=[0.1] * len(SIZES), bias_correction2=[0.001] * len(SIZES),
                      lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.1, eps=1e-6, weight_decay=0.01, adam_w_mode=True,
                      layer_adaptation=True, max_grad_norm=1.0 if clip else 0.0)
    return seg, torch.from_numpy(lamb_table([seg]))


def lars_inputs(momentum=0.9, first_step=False):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen) for s in SIZES]
    buffers = [torch.randn(s, generator=gen) if momentum else None for s in SIZES]
    seg = LarsSegment(params=params, grads=[torch.randn(s, generator=gen) for s in SIZES], momentum_buffers=buffers,
                      first_step=[first_step] * len(SIZES), lr=0.1, momentum=momentum, dampening=0.0,
                      weight_decay=1e-4, nesterov=False, trust_coeff=1e-3, eps=1e-8, trust_clip=False,
                      adaptation=True)
    placeholders = [b if b is not None else torch.empty(0) for b in buffers]
    return seg, placeholders, torch.from_numpy(lars_table([seg]))


@needs_cpp
@pytest.mark.parametrize("clip", [True, False])
def test_opcheck_lamb_operators(clip):
    ops = torch.ops.lamb_kernels
    seg, hyper = lamb_inputs(clip)
    grad_sumsq = ops.sums_of_squares(seg.grads, None, 64).sum() if clip else None
    torch.library.opcheck(ops.sums_of_squares.default, (seg.grads, None, 64))
    torch.library.opcheck(ops.sums_of_squares.default, (seg.params, seg.grads, 64))
    args = (seg.params, seg.grads, seg.exp_avgs, seg.exp_avg_sqs, hyper, grad_sumsq, 64)
    torch.library.opcheck(ops.lamb_moments.default, args)
    norms = ops.lamb_moments(*args)
    torch.library.opcheck(ops.lamb_apply.default, (seg.params, seg.exp_avgs, seg.exp_avg_sqs, hyper, norms, 64))


@needs_cpp
@pytest.mark.parametrize("momentum, first_step, adaptive", [(0.9, False, True), (0.9, True, True), (0.0, False, False)])
def test_opcheck_lars_operator(momentum, first_step, adaptive):
    ops = torch.ops.lamb_kernels
    seg, buffers, hyper = lars_inputs(momentum, first_step)
    if not adaptive:
        hyper[:, LarsColumn.ADAPT] = 0.0
    norms = ops.sums_of_squares(seg.params, seg.grads, 64) if adaptive else None
    torch.library.opcheck(ops.lars_apply.default, (seg.params, seg.grads, buffers, hyper, norms, 64))


@needs_cpp
def test_operators_reject_mismatched_inputs_by_name():
    ops = torch.ops.lamb_kernels
    seg, hyper = lamb_inputs()
    before = [t.clone() for t in (*seg.params, *seg.exp_avgs, *seg.exp_avg_sqs)]
    with pytest.raises(RuntimeError, match=r"lamb_moments: exp_avgs has 4 tensors, params has 5"):
        ops.lamb_moments(seg.params, seg.grads, seg.exp_avgs[:4], seg.exp_avg_sqs, hyper, None, 64)
    with pytest.raises(RuntimeError, match=r"lamb_moments: grads\[3\] has dtype Double"):
        ops.lamb_moments(seg.params, [g.double() if i == 3 else g for i, g in enumerate(seg.grads)],
                         seg.exp_avgs, seg.exp_avg_sqs, hyper, None, 64)
    with pytest.raises(RuntimeError, match=r"lamb_apply: hyper must be .* of shape \[5, 16\]"):
        ops.lamb_apply(seg.params, seg.exp_avgs, seg.exp_avg_sqs, hyper[:4], torch.zeros(5, 2), 64)
    with pytest.raises(RuntimeError, match=r"chunk_size must be a positive multiple of 16"):
        ops.sums_of_squares(seg.params, None, 100)
    lars, buffers, lars_hyper = lars_inputs()
    with pytest.raises(RuntimeError, match=r"lars_apply: params\[0\] adapts, but no norms were given"):
        ops.lars_apply(lars.params, lars.grads, buffers, lars_hyper, None, 64)
    after = (*seg.params, *seg.exp_avgs, *seg.exp_avg_sqs)
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # checked before anything changed


@needs_cpp
@pytest.mark.parametrize("optimizer, kwargs", [(FusedLAMB, dict(lr=1e-2)),
                                                (FusedLARS, dict(lr=0.1, momentum=0.9, weight_decay=1e-4))])
def test_same_bits_whatever_the_thread_count(optimizer, kwargs):
    """Chunks are fixed and their sums are added in chunk order: 1 thread and 2 agree bit for bit."""
    import lamb_kernels.cpp

    results = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 2):
            torch.set_num_threads(n_threads)
            gen = torch.Generator().manual_seed(3)
            params = [torch.nn.Parameter(torch.randn(s, generator=gen))
                      for s in [(5 * lamb_kernels.cpp.CHUNK + 3,), (1000,), (7,)]]
            opt = optimizer(params, backend="cpp", **kwargs)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
            results.append(torch.cat([p.detach().flatten() for p in params]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[1], results[2])


@needs_cpp
@pytest.mark.parametrize("optimizer, kwargs, expected", [
    (FusedLAMB, dict(max_grad_norm=1.0), ["sums_of_squares", "lamb_moments", "lamb_apply"]),
    (FusedLAMB, dict(max_grad_norm=None), ["lamb_moments", "lamb_apply"]),
    (FusedLARS, dict(momentum=0.9, weight_decay=1e-4), ["sums_of_squares", "lars_apply"]),
    (FusedLARS, dict(momentum=0.9), ["lars_apply"]),  # no group adapts: no norm pass
], ids=["lamb", "lamb-no-clipping", "lars", "lars-no-adaptation"])
def test_one_operator_call_per_stage_whatever_the_tensor_count(optimizer, kwargs, expected):
    calls = []

    class Counting:
        def __getattr__(self, name):
            op = getattr(torch.ops.lamb_kernels, name)
            return lambda *args: calls.append(name) or op(*args)

    params = [torch.nn.Parameter(torch.randn(i % 7 + 1)) for i in range(40)]
    opt = optimizer([{"params": params[:20]}, {"params": params[20:], "lr": 5e-3}], backend="cpp", **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    opt._backend((torch.device("cpu"), torch.float32, "cpp"))._ops = Counting()
    opt.step()
    assert calls == expected


def run_python(code: str, env_extra: dict, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    env.pop("LAMB_KERNELS_BACKEND", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_failed_build_warns_once_and_auto_falls_back_to_torch(tmp_path):
    """No working compiler: import works, one warning, "auto" steps with torch, "cpp" raises with the
    build's error."""
    code = """
        import warnings
        import torch
        import lamb_kernels
        from lamb_kernels import FusedLAMB, extension
        extension._prebuilt_library = lambda: None  # as if no ahead-of-time build were installed
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert lamb_kernels.available_backends("cpu")[0] == "torch", lamb_kernels.available_backends("cpu")
            p = torch.nn.Parameter(torch.ones(3))
            p.grad = torch.ones(3)
            opt = FusedLAMB([p])
            opt.step()
            assert {key[2] for key in opt._backends} == {"torch"}
        ours = [w for w in caught if "C++ backend is unavailable" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        try:
            FusedLAMB([p], backend="cpp")
        except ValueError as exc:
            assert "backend='cpp' is not available on cpu" in str(exc), exc
            assert "could not be built" in str(exc), exc
        else:
            raise AssertionError("backend='cpp' should raise")
        print("ok")
    """
    result = run_python(code, {"CXX": str(tmp_path / "no-such-compiler"), "LAMB_KERNELS_CACHE": str(tmp_path)})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@needs_cpp
def test_second_process_loads_the_cached_build_without_compiling():
    code = """
        import time
        from lamb_kernels import extension
        extension._prebuilt_library = lambda: None
        start = time.perf_counter()
        print(extension.load())
        print(time.perf_counter() - start)
    """
    result = run_python(code, {})
    assert result.returncode == 0, result.stderr[-3000:]
    path, seconds = result.stdout.split()
    assert "building" not in result.stderr, result.stderr
    assert path == extension.load() or extension._prebuilt_library() is not None
    assert float(seconds) < 10


def test_import_builds_nothing():
    result = run_python("import lamb_kernels, sys; print('lamb_kernels.cpp' in sys.modules, "
                        "'torch.utils.cpp_extension' in sys.modules)", {})
    assert result.returncode == 0 and result.stdout.split() == ["False", "False"], result.stderr[-2000:]
