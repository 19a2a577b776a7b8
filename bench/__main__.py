"""python -m bench: how fast is each implementation of a LAMB or LARS step here, and how close to
the memory bandwidth.

    python -m bench                                  # bert-base on the device present, every provider
    python -m bench --preset bert-large,many-small --device cuda --out bench/results/h100
    python -m bench --preset all --backends cpp --repeats 10

For each preset (the parameter shapes of a real model) and algorithm group, every provider steps the
same parameters: lamb_kernels' backends, its pure-torch backend under torch.compile, torch's fused
AdamW (beside LAMB) and SGD with momentum (beside LARS) as memory-bound yardsticks, a plain copy of
as many elements for the machine's bandwidth, and apex, timm, pytorch_optimizer and bitsandbytes
when they can be imported. Prints a table last; writes steps.csv (every figure, with device,
versions and date) and steps.png into --out.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import sys

import torch

import lamb_kernels

from lamb_kernels import extension
from lamb_kernels.backends import BACKEND_NAMES

from .harness import STATE_BYTES, STATE_DTYPES, device_name, make_params, run_group
from .presets import ALL, PRESETS, preset_shapes
from .providers import COMPILED, Provider, default_backends, lamb_providers, lars_providers
from .report import (Progress, busy_warning, chart_title, group_rows, heartbeat, read_csv, table, write_csv,
                     write_png)
from .stages import run_stages

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALGORITHMS = ("lamb", "lars")


def _list(value: str) -> list:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bert-base",
                        help=f"comma-separated presets, or 'all': {', '.join(PRESETS)} (default: bert-base)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when a GPU is present, else cpu")
    parser.add_argument("--backends", default=None,
                        help="comma-separated lamb_kernels backends to time (default: all; on CPU all but "
                             "triton, whose interpreter is not worth timing, and cuda)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="parameter dtype")
    parser.add_argument("--master-weights", action="store_true",
                        help="our optimizers keep fp32 master weights of bf16/fp16 params (charged their bytes)")
    parser.add_argument("--state-dtype", choices=tuple(STATE_DTYPES), default="float32",
                        help="state_dtype of FusedLAMB (m and v) and FusedLARS (the momentum buffer), charged their "
                             "bytes (int8: 8-bit codes with a float32 scale per 256)")
    parser.add_argument("--algorithms", default="lamb,lars", help="comma-separated: lamb, lars")
    parser.add_argument("--out", default="out", help="folder for steps.csv and steps.png (default: out)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per provider (default: cpu 15, cuda 50)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per provider first (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true",
                        help="also time lamb_kernels' torch backend under torch.compile (left out by default: "
                             "its first step compiles for minutes per preset and algorithm on CPU)")
    parser.add_argument("--no-compile", action="store_true",
                        help="the default now (kept so that older command lines still run)")
    parser.add_argument("--chart-from", metavar="CSV", default=None,
                        help="time nothing: draw steps.png into --out from a steps.csv written earlier (a "
                             "GPU machine without matplotlib writes the CSV; the chart is drawn elsewhere)")
    parser.add_argument("--stages", action="store_true",
                        help="time each stage of a step on its own per lamb_kernels backend (GB/s, %% of copy, "
                             "launches): stages.csv and stages.png instead of steps.csv and steps.png")
    parser.add_argument("--max-grad-norm", type=float, default=1.0,
                        help="LAMB's global grad-norm clipping; 0 turns it off (default: 1.0, apex's)")
    args = parser.parse_args(argv)

    # "all" means the real models and many-small; "tiny" exists for the harness's own tests.
    args.presets = list(ALL) if args.preset == "all" else _list(args.preset)
    for name in args.presets:
        if name not in PRESETS:
            parser.error(f"--preset {name!r} is not a preset; choose from: {', '.join(PRESETS)}, all")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch here")
    if args.backends is None:
        args.backends = default_backends(args.device)
    else:
        args.backends = _list(args.backends)
        for name in args.backends:
            if name not in BACKEND_NAMES:
                parser.error(f"--backends {name!r} is not a lamb_kernels backend; choose from: "
                             f"{', '.join(BACKEND_NAMES)}")
    if args.chart_from is not None and not os.path.isfile(args.chart_from):
        parser.error(f"--chart-from {args.chart_from!r}: no such file")
    args.algorithms = _list(args.algorithms)
    for name in args.algorithms:
        if name not in ALGORITHMS:
            parser.error(f"--algorithms {name!r}: choose from {', '.join(ALGORITHMS)}")
    if args.repeats is None:
        args.repeats = 50 if args.device == "cuda" else 15
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.warmup < 1:
        parser.error(f"--warmup must be at least 1 (the first step allocates state), got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.max_grad_norm < 0:
        parser.error(f"--max-grad-norm must be 0 (off) or positive, got {args.max_grad_norm}")
    return args


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _state_bytes(state_dtype: str, algorithm: str) -> float:
    """Bytes of each of LAMB's m and v, or of LARS's momentum buffer, per parameter (int8: the code and
    its share of its block's float32 scale)."""
    return STATE_BYTES[state_dtype]


def _providers(algorithm: str, args) -> list:
    copy = Provider("copy (torch.Tensor.copy_, as many elements)", algorithm, "copy", version=torch.__version__)
    if algorithm == "lamb":
        providers = lamb_providers(args.device, args.backends, args.max_grad_norm, args.master_weights,
                                   STATE_DTYPES[args.state_dtype])
    else:
        providers = lars_providers(args.device, args.backends, args.master_weights, STATE_DTYPES[args.state_dtype])
    if not args.compile:
        providers = [Provider(p.name, p.algorithm, p.role, unavailable=LEFT_OUT, version=p.version)
                     if p.name.endswith(COMPILED) else p for p in providers]
    return [copy, *providers]


LEFT_OUT = "left out by default (its first step compiles for minutes); --compile adds it"


def _build_native(args) -> None:
    """Builds (or loads) the C++ operators before anything is timed, saying so while it takes: the
    first build on a machine is a minute or more of silence otherwise."""
    if args.device == "cpu" and "cpp" in args.backends:
        load, what = extension.load, "lamb_kernels: loading or building the C++ CPU operators"
    elif args.device == "cuda" and "cuda" in args.backends:
        load, what = extension.load_cuda, "lamb_kernels: loading or building the CUDA operators"
    else:
        return
    try:
        heartbeat(what, load)
    except extension.ExtensionUnavailable:
        pass  # (the provider reports why it is unavailable, in the table)


def main(argv=None) -> list:
    args = parse_args(argv)
    if args.chart_from is not None:
        rows = read_csv(args.chart_from)
        os.makedirs(args.out, exist_ok=True)
        png_path = os.path.join(args.out, "steps.png")
        why_no_png = write_png(rows, png_path, chart_title(rows[0]))
        if why_no_png is not None:
            raise SystemExit(f"--chart-from: {why_no_png}")
        print(f"wrote {png_path}")
        return rows
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    context = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": args.device, "device_name": device_name(args.device), "dtype": args.dtype,
        "master_weights": args.master_weights and args.dtype != "float32", "state_dtype": args.state_dtype,
        "threads": torch.get_num_threads() if args.device == "cpu" else "",
        "warmup": args.warmup, "repeats": args.repeats, "lamb_kernels": lamb_kernels.__version__,
        "torch": torch.__version__, "triton": _version("triton"), "python": platform.python_version(),
    }
    os.makedirs(args.out, exist_ok=True)
    _build_native(args)
    if args.stages:
        return run_stages(args, context, dtype, args.presets, Progress)
    plan = [(preset, algorithm, _providers(algorithm, args)) for preset in args.presets for algorithm in args.algorithms]
    total = sum(sum(p.unavailable is None for p in providers) for _, _, providers in plan) * (args.warmup + args.repeats)
    progress = Progress(total)
    os.makedirs(args.out, exist_ok=True)
    csv_path, png_path = os.path.join(args.out, "steps.csv"), os.path.join(args.out, "steps.png")
    rows = []
    for preset, algorithm, providers in plan:
        progress.start(f"{preset} {algorithm}")
        shapes = preset_shapes(preset)
        params = make_params(shapes, args.device, dtype)
        outcomes = run_group(providers, params, args.device, warmup=args.warmup, repeats=args.repeats,
                             progress=progress)
        rows += group_rows(outcomes, preset=preset, algorithm=algorithm, numel=sum(p.numel() for p in params),
                           tensors=len(params), itemsize=params[0].element_size(),
                           clipping=args.max_grad_norm > 0,
                           context={**context, "state_dtype": args.state_dtype},
                           master_weights=context["master_weights"],
                           state_bytes=_state_bytes(args.state_dtype, algorithm))
        del params, outcomes  # frees this group's states before the next group allocates its own
        if args.device == "cuda":
            torch.cuda.empty_cache()
        write_csv(rows, csv_path)  # after every group, so an interrupted long run keeps what it measured

    title = chart_title(context)
    why_no_png = write_png(rows, png_path, title)
    threads = f"{context['threads']} threads; " if context["threads"] else ""
    print(f"\n{title}; {threads}{args.warmup} warm-up + {args.repeats} timed steps per provider")
    print(table(rows))
    busy = busy_warning(rows)
    if busy is not None:
        print(f"\n{busy}")
    print(f"\nwrote {csv_path}" + (f" and {png_path}" if why_no_png is None else f"; no chart: {why_no_png}"))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
