"""Who steps the parameters: lamb_kernels' backends, torch's fused yardsticks, and other libraries.

Every provider belongs to one algorithm group, "lamb" or "lars"; a group's providers are timed
together, interleaved, on the same parameters and grads. A provider's ``build(params)`` returns the
step to time. A provider that cannot run here says why instead: ``unavailable`` (a library that is
not installed, a backend not built for this device) is known before the run; a ``build`` or a
warm-up step that raises is reported with its error.

Hyperparameters are the usual ones for each algorithm, the same for every provider of a group where
the libraries share them; `lr` is tiny so that hundreds of steps leave the values where they started
(timing does not depend on values, but overflow or denormals would).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

import lamb_kernels
from lamb_kernels import FusedLAMB, FusedLARS
from lamb_kernels.backends import BACKEND_NAMES, resolve_backend

LR = 1e-9
LAMB_WEIGHT_DECAY = 0.01
LARS_WEIGHT_DECAY = 1e-4
MOMENTUM = 0.9

# Roles, in the order the table and chart list them.
ROLES = ("copy", "yardstick", "ours", "reference", "external")
COMPILED = " + torch.compile"  # the suffix of the compiled providers' names


@dataclass
class Provider:
    name: str
    algorithm: str  # "lamb" or "lars": the group it is timed in, and its bytes model
    role: str  # one of ROLES
    build: Callable | None = None  # build(params) -> step(); None when unavailable
    unavailable: str | None = None  # why it cannot run here
    version: str = ""


def _import(module: str):
    """(module, None), or (None, why not) when it cannot be imported."""
    try:
        return importlib.import_module(module), None
    except Exception as exc:  # a broken install is as absent as a missing one
        return None, f"{module} cannot be imported ({type(exc).__name__}: {exc})"


def _external(name, algorithm, module, make, device_types=("cpu", "cuda"), device="cpu"):
    mod, why = _import(module)
    if mod is not None and torch.device(device).type not in device_types:
        why = f"{name} runs on {' and '.join(device_types)} only"
    if why is not None:
        return Provider(name, algorithm, "external", unavailable=why)
    version = getattr(importlib.import_module(module.split(".")[0]), "__version__", "")
    return Provider(name, algorithm, "external", build=lambda params: make(mod, params).step, version=version)


def _drop_profiler_notice(record) -> bool:
    # torch.optim.Optimizer.step's profiling wrapper (a record_function) is left out of the graph, and
    # dynamo says so once per compile, as a warning line in the benchmark's output; the compiled step
    # is the same without it.
    return not str(record.msg).startswith("Profiler record function")


def _compiled(make_optimizer):
    import logging

    logging.getLogger("torch._dynamo.variables.ctx_manager").addFilter(_drop_profiler_notice)

    def build(params):
        # Each preset's optimizer is a new object for the same code: without a reset, dynamo's
        # recompile limit (8) is soon reached and it falls back to eager without a word.
        torch._dynamo.reset()
        return torch.compile(make_optimizer(params).step)

    return build


def lamb_providers(device, backends, max_grad_norm, master_weights=False, state_dtype=torch.float32) -> list:
    """The "lamb" group: AdamW(fused=True) as the yardstick, FusedLAMB on each backend, the pure-torch
    backend under torch.compile, and the LAMBs of other libraries."""
    clip = max_grad_norm if max_grad_norm > 0 else None
    ours = {"lr": LR, "weight_decay": LAMB_WEIGHT_DECAY, "max_grad_norm": clip, "master_weights": master_weights,
            "state_dtype": state_dtype}
    providers = [Provider(
        "torch AdamW(fused=True)", "lamb", "yardstick",
        build=lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=LAMB_WEIGHT_DECAY, eps=1e-6,
                                               fused=True).step,
        version=torch.__version__,
    )]
    providers += _backend_providers("FusedLAMB", FusedLAMB, "lamb", ours, device, backends)
    providers += [
        _external("apex FusedLAMB", "lamb", "apex.optimizers",
                  # apex divides by max_grad_norm once the norm is above it: inf is its "off".
                  lambda mod, params: mod.FusedLAMB(params, lr=LR, weight_decay=LAMB_WEIGHT_DECAY,
                                                    max_grad_norm=clip or float("inf")),
                  device_types=("cuda",), device=device),
        _external("timm Lamb", "lamb", "timm.optim",
                  lambda mod, params: mod.Lamb(params, lr=LR, weight_decay=LAMB_WEIGHT_DECAY,
                                               max_grad_norm=clip),
                  device=device),
        _external("pytorch_optimizer Lamb", "lamb", "pytorch_optimizer",
                  lambda mod, params: mod.Lamb(params, lr=LR, weight_decay=LAMB_WEIGHT_DECAY, eps=1e-6,
                                               pre_norm=clip is not None, max_grad_norm=clip or 1.0),
                  device=device),
        _external("bitsandbytes LAMB (32-bit)", "lamb", "bitsandbytes",
                  lambda mod, params: mod.optim.LAMB(params, lr=LR, weight_decay=LAMB_WEIGHT_DECAY, eps=1e-6),
                  device=device),
    ]
    return providers


def lars_providers(device, backends, master_weights=False, state_dtype=torch.float32) -> list:
    """The "lars" group: SGD(momentum, fused=True) as the yardstick, FusedLARS on each backend, the
    pure-torch backend under torch.compile, and the LARSes of other libraries."""
    ours = {"lr": LR, "momentum": MOMENTUM, "weight_decay": LARS_WEIGHT_DECAY, "master_weights": master_weights,
            "state_dtype": state_dtype}
    providers = [Provider(
        f"torch SGD(momentum={MOMENTUM}, fused=True)", "lars", "yardstick",
        build=lambda params: torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=LARS_WEIGHT_DECAY,
                                             fused=True).step,
        version=torch.__version__,
    )]
    providers += _backend_providers("FusedLARS", FusedLARS, "lars", ours, device, backends)
    # (The other libraries take the shared hyperparameters only: master_weights and state_dtype are ours.)
    shared = {"lr": LR, "momentum": MOMENTUM, "weight_decay": LARS_WEIGHT_DECAY}
    providers += [
        _external("timm Lars", "lars", "timm.optim",
                  lambda mod, params: mod.Lars(params, **shared), device=device),
        _external("pytorch_optimizer LARS", "lars", "pytorch_optimizer",
                  lambda mod, params: mod.LARS(params, **shared), device=device),
        _external("bitsandbytes LARS (32-bit)", "lars", "bitsandbytes",
                  lambda mod, params: mod.optim.LARS(params, **shared), device=device),
    ]
    return providers


def _backend_providers(class_name, cls, algorithm, options, device, backends) -> list:
    providers = []
    for backend in backends:
        name = f"lamb_kernels {class_name} {backend}"
        role = "reference" if backend == "torch" else "ours"
        try:
            resolve_backend(backend, torch.device(device))
        except ValueError as exc:
            providers.append(Provider(name, algorithm, role, unavailable=str(exc)))
            continue
        providers.append(Provider(name, algorithm, role, version=lamb_kernels.__version__,
                                  build=lambda params, backend=backend: cls(params, backend=backend,
                                                                            **options).step))
    providers.append(Provider(
        f"lamb_kernels {class_name} torch{COMPILED}", algorithm, "reference",
        build=_compiled(lambda params: cls(params, backend="torch", **options)),
        version=lamb_kernels.__version__,
    ))
    return providers


def default_backends(device) -> list:
    """lamb_kernels' backends worth timing on `device`: on CPU not triton, whose interpreter is a
    correctness tool (about a millisecond per program instance; name it in --backends to time it),
    nor cuda, which runs on CUDA tensors only."""
    return [name for name in BACKEND_NAMES if not (torch.device(device).type == "cpu" and name in ("triton", "cuda"))]
