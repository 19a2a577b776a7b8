"""Test setup: without a GPU the triton kernels run under the Triton interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton (and so lamb_kernels.triton) is imported; with a CUDA
device and the variable unset, the kernels are compiled and tested on CUDA tensors instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Without a CUDA device the GPU tests (marked ``gpu``) are deselected, not skipped one by one:
    the run ends with one line saying how many and why (pytest_terminal_summary), instead of hundreds
    of silent skips."""
    if torch.cuda.is_available() or "gpu" in (config.option.markexpr or ""):
        return  # (asked for by marker, as bench/gpu_run.sh does: each skips, saying why)
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if item.get_closest_marker("gpu") is None]
    config.stash[_GPU_TESTS] = len(gpu)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    left_out = config.stash.get(_GPU_TESTS, 0)
    if left_out:
        terminalreporter.write_line(f"{left_out} GPU tests (marked gpu) deselected: no CUDA device here; "
                                    "bench/gpu_run.sh runs them on a GPU machine")


_GPU_TESTS = pytest.StashKey[int]()


# Property-based tests (test_properties.py): CI draws a fixed set of examples, the same on every
# run; `--hypothesis-profile=thorough` draws many more, with a new seed each time.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis comes with the test extra; without it test_properties.py is skipped
    pass
else:
    _SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("ci", max_examples=150, derandomize=True, deadline=None, suppress_health_check=_SLOW)
    settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=_SLOW)
    settings.load_profile("ci")


@pytest.fixture
def reused_steps(monkeypatch):
    """``reused_steps(opt)``: how many steps of `opt` reused the plans of an earlier one (the library
    keeps no counter: this wraps lamb_kernels.optimizers.plan_cache.reuse, which the step calls)."""
    from lamb_kernels.optimizers import plan_cache

    counts = {}
    reuse = plan_cache.reuse

    def counting_reuse(opt, *args):
        plans = reuse(opt, *args)
        if plans is not None:
            counts[id(opt)] = counts.get(id(opt), 0) + 1
        return plans

    monkeypatch.setattr(plan_cache, "reuse", counting_reuse)
    return lambda opt: counts.get(id(opt), 0)
