"""Timing: one algorithm group of providers on one preset, interleaved, on shared parameters.

On CPU each repetition times one step of every provider in turn, with the order rotated from one
repetition to the next, so a slow spell of the machine (a shared VM's bandwidth drifts by tens of
percent within a minute) lands on every provider alike. Ratios to the yardstick are taken within a
repetition (the two steps ran moments apart) and their median reported. On CUDA the same loop
times each step with CUDA events between two synchronisations: the step's cost in a training loop,
host launch overhead included when it exceeds the device time.
"""
from __future__ import annotations

import math
import os
import platform
import time
import traceback
from dataclasses import dataclass, field

import torch

# `--state-dtype`: our optimizers' state_dtype, and the bytes per parameter of each state (int8: the
# code and its share of its block's float32 scale).
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": "int8"}
STATE_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1 + 4 / 256}


# Bytes per parameter per step: docs/design.md section 4's model, for parameters (and grads) of `param_bytes`
# each, 4 for fp32 states. Every provider of a group is charged its algorithm's bytes (what our
# passes must move), so GB/s is an effective bandwidth, comparable across providers; apex's
# FusedLAMB, for one, moves 52 fp32 bytes. torch's AdamW and SGD keep states in the parameters'
# dtype, so their bytes scale with it; ours keep fp32 states. With master weights, the passes read
# and write the fp32 master where they would read and write p, and the apply pass also writes p.
def stage_bytes(algorithm: str, clipping: bool, param_bytes: int = 4, master_weights: bool = False,
                state_bytes: float = 4) -> dict:
    """Bytes per parameter of each stage of a step, in the order a step runs them (a stage a step
    skips is left out): LAMB "grad norm", "moments", "apply"; LARS "norms", "apply". `state_bytes`:
    of each of LAMB's m and v, or of LARS's buffer (2 with ``state_dtype=torch.bfloat16``, 1 + 4 / 256 with
    "int8": the code and its share of its block's scale, read and written with it)."""
    s, state = param_bytes, state_bytes
    w = 4 if master_weights else s  # the weights the passes read: master or p
    copy = s if master_weights else 0
    if algorithm == "lamb":
        stages = {"grad norm": s} if clipping else {}  # read g
        stages["moments"] = w + s + 4 * state  # read p g m v, write m v
        stages["apply"] = w + 2 * state + w + copy  # read p m v, write p (and the model's copy)
        return stages
    return {"norms": w + s,  # read p g
            "apply": w + s + state + w + state + copy}  # read p g b, write p b (and the copy)


def bytes_moved(algorithm: str, role: str, clipping: bool, param_bytes: int = 4, master_weights: bool = False,
                state_bytes: float = 4) -> float:
    s = param_bytes
    if role == "copy":
        return 2 * s  # read, write
    if role == "yardstick":
        return (7 if algorithm == "lamb" else 5) * s  # AdamW: read p g m v, write p m v; SGD: p g b, p b
    return sum(stage_bytes(algorithm, clipping, param_bytes, master_weights, state_bytes).values())


@dataclass
class Outcome:
    """One provider's result in one group: times in seconds, or why there are none."""

    provider: object
    status: str = "ok"  # ok, skipped (could not run here), failed (raised)
    reason: str = ""
    times: list = field(default_factory=list)
    first_step: float | None = None  # seconds; includes any JIT build or torch.compile
    launches: int | None = None


def make_params(shapes, device, dtype, seed: int = 0) -> list:
    """Parameters ~ N(0, 0.02) with grads ~ N(0, 1e-3): drawn on CPU from a seeded generator, so
    every device and run steps the same values."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


def quantile(values, q: float) -> float:
    """The q-quantile by linear interpolation (numpy's default method)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _error_text(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return f"{type(exc).__name__}: {first}"[:300]


class _Clock:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def time(self, step) -> float:
        if not self.cuda:
            start = time.perf_counter()
            step()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def count_launches(step) -> int | None:
    """Kernels one step launches on the GPU (memory copies and sets not counted), from the profiler;
    None when the profiler cannot see kernels (no CUPTI: it then records none, with a warning)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = [event for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    except Exception:  # a profiler that cannot run costs the column, not the run
        return None
    if not kernels:  # every provider launches something: nothing recorded means nothing seen
        return None
    return sum(1 for event in kernels if not event.name.startswith(("Memcpy", "Memset", "[memory]")))


def run_group(providers, params, device, *, warmup: int, repeats: int, progress=None) -> list:
    """Times every runnable provider of one group on `params`; returns one Outcome per provider
    (the copy yardstick, a flat copy of as many elements as `params`, comes first)."""
    numel = sum(p.numel() for p in params)
    outcomes = [Outcome(provider) for provider in providers]
    steps = {}
    for outcome in outcomes:
        provider = outcome.provider
        if provider.unavailable is not None:
            outcome.status, outcome.reason = "skipped", provider.unavailable
            continue
        try:
            steps[id(outcome)] = provider.build(params) if provider.role != "copy" else _copy_step(numel, params)
        except Exception as exc:
            outcome.status, outcome.reason = "failed", f"construction raised {_error_text(exc)}"
    clock = _Clock(device)
    live = [outcome for outcome in outcomes if id(outcome) in steps]
    if progress is not None:  # the steps that providers failing construction will not take
        progress.advance((warmup + repeats) * sum(outcome.status == "failed" for outcome in outcomes))
    for repeat in range(warmup + repeats):
        shift = repeat % max(len(live), 1)
        for outcome in live[shift:] + live[:shift]:
            if outcome.status != "ok":
                continue
            if progress is not None:  # (what runs now: a first step may compile for minutes)
                phase = "warm-up" if repeat < warmup else "timed"
                progress.advance(0, detail=f"{outcome.provider.name}, {phase} step {repeat + 1}/{warmup + repeats}")
            try:
                elapsed = clock.time(steps[id(outcome)])
            except Exception as exc:
                outcome.status = "failed"
                outcome.reason = f"step {repeat + 1} raised {_error_text(exc)}"
                traceback.clear_frames(exc.__traceback__)
                continue
            if repeat == 0:
                outcome.first_step = elapsed
            if repeat >= warmup:
                outcome.times.append(elapsed)
            if progress is not None:
                progress.advance()
        if progress is not None:
            progress.advance(sum(1 for outcome in live if outcome.status != "ok"))
    if clock.cuda:
        for outcome in live:
            if outcome.status == "ok":
                outcome.launches = count_launches(steps[id(outcome)])
    bad = [p for p in params if not bool(torch.isfinite(p).all())]
    if bad:
        raise RuntimeError(f"{len(bad)} parameters went non-finite while timing; the figures would be meaningless")
    return outcomes


def _copy_step(numel, params):
    source = torch.empty(numel, device=params[0].device, dtype=params[0].dtype).normal_()
    target = torch.empty_like(source)
    return lambda: target.copy_(source)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()
