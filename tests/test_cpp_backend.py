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
import lamb_kernels.backends
from lamb_kernels import FusedLAMB, FusedLARS, extension
from lamb_kernels.hyper_table import LarsColumn, lamb_table, lars_table
from lamb_kernels.backend_api import LambSegment, LarsSegment

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
    args = (seg.params, seg.grads, seg.exp_avgs, seg.exp_avg_sqs, [], [], hyper, grad_sumsq, None, None, 64)
    torch.library.opcheck(ops.lamb_moments.default, args)
    norms = ops.lamb_moments(*args)
    torch.library.opcheck(ops.lamb_apply.default, (seg.params, seg.exp_avgs, seg.exp_avg_sqs, [], [], hyper, norms, None, [], 64))


@needs_cpp
@pytest.mark.parametrize("momentum, first_step, adaptive", [(0.9, False, True), (0.9, True, True), (0.0, False, False)])
def test_opcheck_lars_operator(momentum, first_step, adaptive):
    ops = torch.ops.lamb_kernels
    seg, buffers, hyper = lars_inputs(momentum, first_step)
    if not adaptive:
        hyper[:, LarsColumn.ADAPT] = 0.0
    norms = ops.sums_of_squares(seg.params, seg.grads, 64) if adaptive else None
    torch.library.opcheck(ops.lars_apply.default, (seg.params, seg.grads, buffers, [], hyper, norms, None, None, [], 64))


@needs_cpp
def test_operators_reject_mismatched_inputs_by_name():
    ops = torch.ops.lamb_kernels
    seg, hyper = lamb_inputs()
    before = [t.clone() for t in (*seg.params, *seg.exp_avgs, *seg.exp_avg_sqs)]
    with pytest.raises(RuntimeError, match=r"lamb_moments: exp_avgs has 4 tensors, params has 5"):
        ops.lamb_moments(seg.params, seg.grads, seg.exp_avgs[:4], seg.exp_avg_sqs, [], [], hyper, None, None, None, 64)
    with pytest.raises(RuntimeError, match=r"lamb_moments: grads\[3\] has dtype Double"):
        ops.lamb_moments(seg.params, [g.double() if i == 3 else g for i, g in enumerate(seg.grads)],
                         seg.exp_avgs, seg.exp_avg_sqs, [], [], hyper, None, None, None, 64)
    with pytest.raises(RuntimeError, match=r"lamb_apply: hyper must be .* of shape \[5, 16\]"):
        ops.lamb_apply(seg.params, seg.exp_avgs, seg.exp_avg_sqs, [], [], hyper[:4], torch.zeros(5, 2), None, [], 64)
    with pytest.raises(RuntimeError, match=r"chunk_size must be a positive multiple of 16"):
        ops.sums_of_squares(seg.params, None, 100)
    lars, buffers, lars_hyper = lars_inputs()
    with pytest.raises(RuntimeError, match=r"lars_apply: params\[0\] adapts, but no norms were given"):
        ops.lars_apply(lars.params, lars.grads, buffers, [], lars_hyper, None, None, None, [], 64)
    after = (*seg.params, *seg.exp_avgs, *seg.exp_avg_sqs)
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # checked before anything changed


@needs_cpp
@pytest.mark.parametrize("optimizer, kwargs", [(FusedLAMB, dict(lr=1e-2)),
                                                (FusedLARS, dict(lr=0.1, momentum=0.9, weight_decay=1e-4))])
def test_same_bits_whatever_the_thread_count(optimizer, kwargs):
    """Chunks are fixed and their sums are added in chunk order: 1 thread and 2 agree bit for bit."""
    results = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 2):
            torch.set_num_threads(n_threads)
            gen = torch.Generator().manual_seed(3)
            params = [torch.nn.Parameter(torch.randn(s, generator=gen))
                      for s in [(5 * lamb_kernels.backends.CPP_CHUNK + 3,), (1000,), (7,)]]
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
    (FusedLAMB, dict(max_grad_norm=1.0), ["sums_of_squares", "lamb_update"]),
    (FusedLAMB, dict(max_grad_norm=None), ["lamb_update"]),
    (FusedLARS, dict(momentum=0.9, weight_decay=1e-4), ["lars_update"]),
    (FusedLARS, dict(momentum=0.9), ["lars_update"]),  # no group adapts: no norm pass inside
], ids=["lamb", "lamb-no-clipping", "lars", "lars-no-adaptation"])
def test_one_operator_call_per_stage_whatever_the_tensor_count(optimizer, kwargs, expected):
    params = [torch.nn.Parameter(torch.randn(i % 7 + 1)) for i in range(40)]
    opt = optimizer([{"params": params[:20]}, {"params": params[20:], "lr": 5e-3}], backend="cpp", **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        opt.step()
    calls = [event.name.removeprefix("lamb_kernels::") for event in profile.events()
             if event.name.startswith("lamb_kernels::")]
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
    result = run_python(code.replace("could not be built", "no-such-compiler"),  # the build's own error
                        {"CXX": str(tmp_path / "no-such-compiler"), "LAMB_KERNELS_CACHE": str(tmp_path)})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_a_stale_build_lock_is_removed_not_waited_on(tmp_path):
    """A build killed mid-way leaves torch's lock file; a later process must not wait on it forever.
    (With no compiler the build then fails fast, and the step falls back to torch.)"""
    code = """
        import os, time, warnings
        from lamb_kernels import build_cache, extension
        extension._prebuilt_library = lambda: None
        work = build_cache.cache_directory() / f"{extension.LIBRARY_NAME}_{extension._build_key()}" / "build"
        work.mkdir(parents=True)
        (work / "lock").touch()
        old = time.time() - build_cache.STALE_LOCK_SECONDS - 60
        os.utime(work / "lock", (old, old))
        warnings.simplefilter("ignore")
        print(extension.unavailable_reason() is not None, (work / "lock").exists())
    """
    result = run_python(code, {"CXX": str(tmp_path / "no-such-compiler"), "LAMB_KERNELS_CACHE": str(tmp_path)},
                        timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["True", "False"], result.stderr[-3000:]


@needs_cpp
def test_a_prebuilt_library_that_fails_to_load_leaves_the_cached_build():
    code = """
        import warnings
        from lamb_kernels import extension
        extension._prebuilt_library = lambda: "/nonexistent/lamb_kernels/_C.so"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print(extension.load())
        assert not caught, [str(w.message) for w in caught]
    """
    result = run_python(code, {})
    assert result.returncode == 0 and "lamb_kernels_cpp" in result.stdout, result.stderr[-3000:]


def test_a_prebuilt_library_is_used_only_with_its_sources_and_torch(tmp_path, monkeypatch):
    import importlib.machinery
    import json

    library = tmp_path / "_C.so"
    library.write_bytes(b"")
    spec = importlib.machinery.ModuleSpec("lamb_kernels._C", None, origin=str(library))
    monkeypatch.setattr(extension.importlib.util, "find_spec", lambda name: spec)
    assert extension._prebuilt_library() is None  # no stamp: an in-place build of unknown sources
    stamp = tmp_path / extension.STAMP_NAME
    stamp.write_text(json.dumps({**extension.prebuilt_stamp(), "sources": "edited since"}))
    assert extension._prebuilt_library() is None
    stamp.write_text(json.dumps({**extension.prebuilt_stamp(), "torch": "1.0"}))
    assert extension._prebuilt_library() is None
    stamp.write_text(json.dumps(extension.prebuilt_stamp()))
    assert extension._prebuilt_library() == str(library)


def test_the_extension_builds_wherever_a_compiler_exists():
    """So that CI fails on a C++ build error instead of skipping every cpp case."""
    import shutil

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler}) on this machine")
    assert CPP, lamb_kernels.backends._unavailable_reason("cpp", "cpu")


@needs_cpp
def test_buffer_placeholders_ignore_the_default_device():
    """Without momentum the buffer list holds empty CPU placeholders, whatever torch's default device."""
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
    opt = FusedLARS(params, lr=0.1, weight_decay=1e-4, backend="cpp")
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    with torch.device("meta"):
        opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))


@needs_cpp
def test_copy_on_write_parameters_step_and_leave_their_source_alone():
    source = torch.randn(3 * lamb_kernels.backends.CPP_CHUNK)
    p = torch.nn.Parameter(torch._lazy_clone(source))
    p.grad = torch.randn_like(p)
    expected = torch.nn.Parameter(source.clone())
    expected.grad = p.grad.clone()
    FusedLAMB([p], lr=1e-2, backend="cpp").step()
    FusedLAMB([expected], lr=1e-2, backend="cpp").step()
    assert torch.equal(p, expected) and not torch.equal(source, expected)


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
    result = run_python("import lamb_kernels, sys, torch; print(hasattr(torch.ops.lamb_kernels, 'lamb_moments'), "
                        "'torch.utils.cpp_extension' in sys.modules)", {})
    assert result.returncode == 0 and result.stdout.split() == ["False", "False"], result.stderr[-2000:]
