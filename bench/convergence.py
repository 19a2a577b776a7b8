"""python -m bench.convergence: the large-batch claim of LAMB and LARS in miniature.

    python -m bench.convergence --quick                  # one seed, no LR grid: under 3 minutes on 2 cores
    python -m bench.convergence                          # the full study: 3 seeds, a 5-point LR grid
    python -m bench.convergence --optimizers FusedLAMB,AdamW --batch-sizes 32,256,2048 --seeds 2
    python -m bench.convergence --task mlm               # a small BERT, masked-LM loss (convergence_mlm.py)
    python -m bench.convergence --task mlm --quick       # its smoke test: under 3 minutes on 2 cores

A compact CNN (bench/convergence_data.py) learns to name ten shapes in noisy 16x16 images generated from fixed
seeds. For every optimizer and batch size it trains for the same number of epochs, so a batch 64
times larger takes 64 times fewer steps. The learning rate follows the scaling rule the literature
uses for each optimizer, from a base LR chosen at batch 64: the square root of the batch ratio for
FusedLAMB and AdamW (You et al. 2019; Malladi et al. 2022), linear for SGD with momentum and
FusedLARS (Goyal et al. 2017; You et al. 2017); with linear warmup over the first 10% of steps, then
polynomial decay to zero. Where asked (--lr-grid), each point also tries multiples of its scaled LR,
and the multiple with the best mean validation accuracy over the seeds is the one reported; the test
set is never used to choose.

Writes into --out: runs.csv (every training run: settings, seed, validation and test accuracy and
loss, final training loss, seconds), summary.csv (per optimizer and batch size: the chosen LR and the
spread of test accuracy over seeds), settings.json (the study's settings, recipes, data seeds and
command line) and convergence.png. Runs are independent, one CPU thread each,
spread over --workers processes; a run's numbers do not depend on how many workers there are.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import functools
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import lamb_kernels
from lamb_kernels.backends import BACKEND_NAMES, resolve_backend

from .harness import device_name
from .report import Progress, pyplot, write_csv
from .convergence_data import PatchCNN, make_shapes
from . import convergence_mlm
from .training import Recipe, lr_factor, run_row, train_epochs, warmup_then_decay  # noqa: F401 (lr_factor: the tests')

BASE_BATCH = 64  # the batch size at which the base learning rates below were chosen
DATA_SEEDS = {"train": 1, "validation": 2, "test": 3}  # fixed: every run sees the same images
VALIDATION_SIZE, TEST_SIZE = 2048, 4096


RECIPES = {
    "FusedLAMB": Recipe("sqrt", 0.02, 0.01),
    "AdamW": Recipe("sqrt", 0.02, 0.01),
    "FusedLARS": Recipe("linear", 8.0, 5e-4),
    "SGD": Recipe("linear", 0.2, 5e-4),
}
DEFAULT_OPTIMIZERS = tuple(RECIPES)
# FusedLAMB and FusedLARS with their states in bf16 or 8-bit codes (docs/states.md), on their own
# recipes: `--state-dtypes float32,bfloat16,int8` studies them side by side.
STATE_SUFFIXES = {"bfloat16": "-bf16", "int8": "-int8"}
STATE_DTYPE_OF = {"": torch.float32, "-bf16": torch.bfloat16, "-int8": "int8"}
for _suffix in STATE_SUFFIXES.values():
    RECIPES["FusedLAMB" + _suffix] = RECIPES["FusedLAMB"]
    RECIPES["FusedLARS" + _suffix] = RECIPES["FusedLARS"]
MOMENTUM = 0.9  # SGD and FusedLARS


def build_optimizer(name: str, model: torch.nn.Module, lr: float, backend: str):
    """Every optimizer gets all of model.parameters() in one group, as a drop-in user would write it:
    weight decay on biases too, and for FusedLAMB and FusedLARS a trust ratio on every tensor. Keeping
    biases out of both (lamb_kernels.param_groups, the recipe for large normalised networks) made
    FusedLARS much worse on this network and FusedLAMB no better: see docs/convergence.md."""
    params, weight_decay = model.parameters(), RECIPES[name].weight_decay
    fused, _, suffix = name.partition("-")
    state_dtype = STATE_DTYPE_OF["-" + suffix if suffix else ""]
    if fused == "FusedLAMB":  # apex's defaults otherwise: betas (0.9, 0.999), eps 1e-6, clipping at 1
        return lamb_kernels.FusedLAMB(params, lr=lr, weight_decay=weight_decay, backend=backend, state_dtype=state_dtype)
    if fused == "FusedLARS":  # timm's defaults otherwise: trust_coeff 1e-3, no trust clipping
        return lamb_kernels.FusedLARS(params, lr=lr, momentum=MOMENTUM, weight_decay=weight_decay, backend=backend,
                                      state_dtype=state_dtype)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=weight_decay)


def scaled_lr(name: str, batch_size: int) -> float:
    """The recipe's base LR scaled from BASE_BATCH to batch_size by its rule."""
    return RECIPES[name].lr(batch_size, BASE_BATCH)


@dataclass(frozen=True)
class Study:
    optimizers: tuple
    batch_sizes: tuple
    seeds: tuple
    lr_grid: tuple  # multiples of each point's scaled LR
    epochs: int
    train_size: int
    noise: float
    warmup_fraction: float
    decay_power: float
    backend: str
    workers: int


BATCH_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FULL = dict(seeds=(0, 1, 2), lr_grid=(0.25, 0.5, 1.0, 2.0, 4.0))
QUICK = dict(seeds=(0,), lr_grid=(1.0,))


@dataclass(frozen=True)
class Run:
    optimizer: str
    batch_size: int
    lr_multiplier: float
    seed: int


@functools.lru_cache(maxsize=2)
def _data(train_size: int, noise: float) -> dict:
    sizes = {"train": train_size, "validation": VALIDATION_SIZE, "test": TEST_SIZE}
    return {split: make_shapes(sizes[split], DATA_SEEDS[split], noise) for split in sizes}


@torch.no_grad()
def _evaluate(model, images, labels) -> tuple[float, float]:
    correct, loss = 0, 0.0
    for start in range(0, len(labels), 1024):
        logits = model(images[start:start + 1024])
        target = labels[start:start + 1024]
        correct += int((logits.argmax(1) == target).sum())
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
    return correct / len(labels), loss / len(labels)


def train(study: Study, run: Run) -> dict:
    """One training run, on one CPU thread: its row of runs.csv."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same bits however many workers share the machine
    try:
        if isinstance(study, convergence_mlm.MlmStudy):
            return convergence_mlm.train(study, run)
        return _train(study, run)
    finally:
        torch.set_num_threads(threads)


def _train(study: Study, run: Run) -> dict:
    started = time.perf_counter()
    data = _data(study.train_size, study.noise)
    images, labels = data["train"]
    torch.manual_seed(run.seed)
    model = PatchCNN()
    lr = scaled_lr(run.optimizer, run.batch_size) * run.lr_multiplier
    optimizer = build_optimizer(run.optimizer, model, lr, study.backend)
    steps_per_epoch = study.train_size // run.batch_size  # the last partial batch is dropped
    total_steps = study.epochs * steps_per_epoch
    schedule, warmup_steps = warmup_then_decay(optimizer, total_steps, study.warmup_fraction, study.decay_power)
    shuffle = torch.Generator().manual_seed(run.seed)
    outcome = train_epochs(optimizer, schedule, study.epochs, study.train_size, run.batch_size,
                           lambda batch: F.cross_entropy(model(images[batch]), labels[batch]), shuffle)
    fused = run.optimizer in ("FusedLAMB", "FusedLARS")
    return run_row(run, RECIPES[run.optimizer], lr=lr, steps=total_steps, warmup_steps=warmup_steps, outcome=outcome,
                   validation=_evaluate(model, *data["validation"]), test=_evaluate(model, *data["test"]),
                   backend=resolve_backend(study.backend, torch.device("cpu")) if fused else "torch.optim",
                   momentum=MOMENTUM if run.optimizer in ("FusedLARS", "SGD") else None, started=started)


def summarise(rows) -> list:
    """Per optimizer and batch size: the LR multiple with the best mean validation accuracy over the
    seeds, and its test accuracy (mean, standard deviation, min, max over the seeds) and losses."""
    points = {}
    for row in rows:
        points.setdefault((row["optimizer"], row["batch_size"]), {}).setdefault(row["lr_multiplier"], []).append(row)
    summary = []
    for (optimizer, batch_size), by_multiplier in points.items():
        multiplier, chosen = max(by_multiplier.items(),
                                 key=lambda item: (statistics.fmean(r["val_acc"] for r in item[1]), -item[0]))
        accuracies = [r["test_acc"] for r in chosen]
        as_scaled = by_multiplier.get(1.0)  # the scaling rule's LR itself, when the grid has it
        summary.append(dict(
            optimizer=optimizer, batch_size=batch_size, rule=chosen[0]["rule"], lr_multiplier=multiplier,
            test_loss_min=min(r["test_loss"] for r in chosen), test_loss_max=max(r["test_loss"] for r in chosen),
            lr=chosen[0]["lr"], steps=chosen[0]["steps"], lr_grid=" ".join(f"{m:g}" for m in sorted(by_multiplier)),
            backend=chosen[0]["backend"], seeds=" ".join(str(r["seed"]) for r in chosen),
            diverged=sum(r["status"] == "diverged" for r in chosen),
            val_acc_mean=statistics.fmean(r["val_acc"] for r in chosen),
            test_acc_mean=statistics.fmean(accuracies),
            test_acc_std=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            test_acc_min=min(accuracies), test_acc_max=max(accuracies),
            test_acc_at_x1_mean=statistics.fmean(r["test_acc"] for r in as_scaled) if as_scaled else None,
            final_train_loss_mean=statistics.fmean(r["final_train_loss"] for r in chosen),
            test_loss_mean=statistics.fmean(r["test_loss"] for r in chosen)))
    order = list(dict.fromkeys([*RECIPES, *convergence_mlm.RECIPES]))
    return sorted(summary, key=lambda s: (order.index(s["optimizer"]), s["batch_size"]))


RUN_COLUMNS = (
    "date", "optimizer", "rule", "base_lr", "batch_size", "lr_multiplier", "lr", "weight_decay", "momentum", "seed",
    "epochs", "steps", "warmup_fraction", "warmup_steps", "decay_power", "train_size", "noise", "backend", "status",
    "final_train_loss", "val_acc", "val_loss", "test_acc", "test_loss", "seconds",
    "lamb_kernels", "torch", "python", "machine",
)
SUMMARY_COLUMNS = (
    "date", "optimizer", "rule", "batch_size", "steps", "lr_grid", "lr_multiplier", "lr", "seeds", "diverged",
    "val_acc_mean", "test_acc_mean", "test_acc_std", "test_acc_min", "test_acc_max", "test_acc_at_x1_mean", "final_train_loss_mean",
    "test_loss_mean", "test_loss_min", "test_loss_max", "epochs", "warmup_fraction", "decay_power", "train_size", "noise", "backend", "lamb_kernels",
    "torch", "python", "machine",
)
COLOURS = {"FusedLAMB": "#dd8452", "AdamW": "#4c72b0", "FusedLARS": "#c44e52", "SGD": "#55a868",
           "FusedLAMB-bf16": "#8172b3", "FusedLARS-bf16": "#937860", "FusedLAMB-int8": "#da8bc3",
           "FusedLARS-int8": "#8c8c8c"}


def write_png(summary, path, title, held_out_loss: bool = False) -> str | None:
    """Test accuracy and final training loss (`held_out_loss`: the test loss, with its band) against
    batch size, a line per optimizer at its chosen LR multiple with a band spanning the seeds, and
    dashed, the accuracy at the scaling rule's LR itself when the grid has more than that. Returns why
    not, when matplotlib is missing."""
    plt, why_not = pyplot()
    if plt is None:
        return why_not
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.6))
    for optimizer in dict.fromkeys(s["optimizer"] for s in summary):
        points = [s for s in summary if s["optimizer"] == optimizer]
        batches = [s["batch_size"] for s in points]
        label = f"{optimizer} ({points[0]['rule']} LR scaling)"
        colour = COLOURS.get(optimizer)
        acc_ax.plot(batches, [100 * s["test_acc_mean"] for s in points], "o-", color=colour, label=label)
        acc_ax.fill_between(batches, [100 * s["test_acc_min"] for s in points],
                            [100 * s["test_acc_max"] for s in points], color=colour, alpha=0.2)
        if held_out_loss:
            loss_ax.plot(batches, [s["test_loss_mean"] for s in points], "o-", color=colour, label=label)
            loss_ax.fill_between(batches, [s["test_loss_min"] for s in points], [s["test_loss_max"] for s in points],
                                 color=colour, alpha=0.2)
        else:
            loss_ax.plot(batches, [s["final_train_loss_mean"] for s in points], "o-", color=colour, label=label)
        if any(s["lr_grid"] != "1" for s in points) and all(s["test_acc_at_x1_mean"] is not None for s in points):
            acc_ax.plot(batches, [100 * s["test_acc_at_x1_mean"] for s in points], "--", color=colour, alpha=0.7,
                        label=f"{optimizer} at the rule's LR (x1)")
    for ax in (acc_ax, loss_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (same epochs for every size)")
        ax.grid(True, alpha=0.3)
    acc_ax.set_ylabel(("masked-token accuracy on the test split" if held_out_loss else "test accuracy")
                      + ", % (mean; band: min to max over seeds)")
    loss_ax.set_ylabel("test split MLM loss (mean; band: min to max)" if held_out_loss
                       else "training loss, last epoch (mean over seeds)")
    loss_ax.set_yscale("log")
    acc_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _worker_init() -> None:
    torch.set_num_threads(1)


def run_study(study: Study, progress: Progress | None = None) -> list:
    """Every run of the study, in a fixed order whatever order they finish in."""
    ends = (min(study.batch_sizes), max(study.batch_sizes))

    def wanted(batch_size, multiplier, seed):  # (the MLM study: its grid at the ends, with the first seed)
        return (not getattr(study, "grid_at_ends", False) or multiplier == 1.0
                or (batch_size in ends and seed == study.seeds[0]))

    runs = [Run(o, b, m, s) for o in study.optimizers for b in study.batch_sizes for m in study.lr_grid
            for s in study.seeds if wanted(b, m, s)]
    weight = {run: study.train_size // run.batch_size * study.epochs for run in runs}  # steps
    progress = progress or Progress(sum(weight.values()))
    results = {}

    def record(run, row):
        results[run] = row
        progress.start(f"done: {run.optimizer} batch {run.batch_size} lr x{run.lr_multiplier:g} seed {run.seed}")
        progress.advance(weight[run])

    longest_first = sorted(runs, key=lambda run: -weight[run])
    if study.workers == 1:
        for run in longest_first:
            record(run, train(study, run))
    else:
        # spawn, not fork: a forked child would inherit the parent's OpenMP thread pool state
        with concurrent.futures.ProcessPoolExecutor(study.workers, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_worker_init) as pool:
            futures = {pool.submit(train, study, run): run for run in longest_first}
            try:
                for future in concurrent.futures.as_completed(futures):
                    record(futures[future], future.result())
            except BaseException:  # a failed run (or ^C) ends the study now, not after the queued runs
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    return [results[run] for run in runs]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (Linux)
    except AttributeError:
        return os.cpu_count() or 1


def _floats(value: str) -> tuple:
    return tuple(float(item) for item in value.split(",") if item.strip())


def _ints(value: str) -> tuple:
    return tuple(int(item) for item in value.split(",") if item.strip())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.convergence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="shapes", choices=("shapes", "mlm"),
                        help="shapes: the CNN on noisy shapes (default); mlm: a small BERT's masked-LM loss on the "
                             "standard library's docstrings (bench/convergence_mlm.py), its own defaults below")
    parser.add_argument("--quick", action="store_true", help="one seed and no LR grid (the scaling rule's LR only)")
    parser.add_argument("--out", default=os.path.join("out", "convergence"),
                        help="folder for runs.csv, summary.csv, settings.json and convergence.png (default: out/convergence)")
    parser.add_argument("--optimizers", default=None,
                        help=f"comma-separated: {', '.join(RECIPES)} (default: {','.join(DEFAULT_OPTIMIZERS)}); "
                             f"--task mlm: {', '.join(convergence_mlm.RECIPES)} (default: all)")
    parser.add_argument("--state-dtypes", default="float32",
                        help="comma-separated state dtypes of FusedLAMB and FusedLARS to study side by side: "
                             "float32, bfloat16, int8 (bfloat16 adds FusedLAMB-bf16 and FusedLARS-bf16, int8 "
                             "FusedLAMB-int8 and FusedLARS-int8; default: float32)")
    parser.add_argument("--batch-sizes", type=_ints, default=None,
                        help=f"comma-separated (default: {','.join(map(str, BATCH_SIZES))})")
    parser.add_argument("--seeds", type=int, default=None, help="training seeds 0..N-1 (default: 3; --quick: 1)")
    parser.add_argument("--lr-grid", type=_floats, default=None,
                        help="comma-separated multiples of each point's scaled LR (default: 0.25,0.5,1,2,4; --quick: 1)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs at every batch size (default: 10; --task mlm: {MLM['epochs']}, --quick {MLM_QUICK['epochs']})")
    parser.add_argument("--train-size", type=int, default=None,
                        help="training images (default: 16384); --task mlm: training sequences of 32 tokens "
                             f"(default: all of the training split, --quick {MLM_QUICK['train_size']})")
    parser.add_argument("--noise", type=float, default=0.25, help="pixel noise standard deviation (default: 0.25)")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of steps in warmup (default: 0.1)")
    parser.add_argument("--decay-power", type=float, default=1.0,
                        help="power of the polynomial decay after warmup (default: 1, linear)")
    parser.add_argument("--backend", default="auto",
                        help=f"lamb_kernels backend for FusedLAMB and FusedLARS: auto or {', '.join(BACKEND_NAMES)}")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes training at once, one thread each (default: the CPU cores available)")
    args = parser.parse_args(argv)
    if args.task == "mlm":
        return _mlm_study(parser, args)
    args.epochs = 10 if args.epochs is None else args.epochs
    args.train_size = 16384 if args.train_size is None else args.train_size
    preset = QUICK if args.quick else FULL
    optimizers = tuple(name.strip() for name in (args.optimizers or ",".join(DEFAULT_OPTIMIZERS)).split(",") if name.strip())
    state_dtypes = [name.strip() for name in args.state_dtypes.split(",") if name.strip()]
    if not state_dtypes or any(name not in ("float32", *STATE_SUFFIXES) for name in state_dtypes):
        parser.error(f"--state-dtypes: choose from float32, bfloat16, int8, got {args.state_dtypes!r}")
    for fused in ("FusedLAMB", "FusedLARS"):
        if fused not in optimizers:
            continue
        for state_dtype, suffix in STATE_SUFFIXES.items():
            if state_dtype in state_dtypes and fused + suffix not in optimizers:
                optimizers += (fused + suffix,)
        if "float32" not in state_dtypes:
            optimizers = tuple(name for name in optimizers if name != fused)
    unknown = [name for name in optimizers if name not in RECIPES]
    if unknown or not optimizers:
        parser.error(f"--optimizers: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(RECIPES)}")
    batch_sizes = args.batch_sizes if args.batch_sizes is not None else BATCH_SIZES
    seeds = args.seeds if args.seeds is not None else len(preset["seeds"])
    lr_grid = args.lr_grid if args.lr_grid is not None else preset["lr_grid"]
    workers = args.workers if args.workers is not None else _cores()
    _refuse(parser, (
        ("--train-size", args.train_size >= 1, "must be at least 1"),
        *_common_checks(args, batch_sizes, args.train_size, lr_grid, seeds, args.epochs, workers),
        ("--noise", args.noise >= 0 and math.isfinite(args.noise), "must be non-negative"),
        ("--decay-power", args.decay_power > 0 and math.isfinite(args.decay_power), "must be positive"),
    ))
    study = Study(optimizers=optimizers, batch_sizes=tuple(sorted(set(batch_sizes))), seeds=tuple(range(seeds)),
                  lr_grid=tuple(sorted(set(lr_grid))), epochs=args.epochs, train_size=args.train_size,
                  noise=args.noise, warmup_fraction=args.warmup, decay_power=args.decay_power,
                  backend=args.backend, workers=workers)
    return study, args.out


def _common_checks(args, batch_sizes, train_size, lr_grid, seeds, epochs, workers) -> tuple:
    """(option, whether it is right, why not) for what both studies check alike."""
    return (
        ("--batch-sizes", len(batch_sizes) > 0, "give at least one"),
        ("--lr-grid", len(lr_grid) > 0, "give at least one multiple"),
        ("--batch-sizes", all(1 <= b <= train_size for b in batch_sizes),
         f"each must be between 1 and --train-size ({train_size})"),
        ("--seeds", seeds >= 1, "must be at least 1"),
        ("--lr-grid", all(m > 0 and math.isfinite(m) for m in lr_grid), "multiples must be positive"),
        ("--epochs", epochs >= 1, "must be at least 1"),
        ("--warmup", 0 <= args.warmup <= 1, "must be a fraction between 0 and 1"),
        ("--workers", workers >= 1, "must be at least 1"),
        ("--backend", args.backend == "auto" or args.backend in BACKEND_NAMES,
         f"choose auto or one of {', '.join(BACKEND_NAMES)}"),
    )


def _refuse(parser, checks) -> None:
    """parser.error for the first check that fails, naming its option."""
    for option, ok, why in checks:
        if not ok:
            parser.error(f"{option}: {why}")


# The MLM study's defaults (bench/convergence_mlm.py): sequences of 32 tokens, the whole training
# split (None), batch 8 to 512 sequences (64x), 2 seeds, an LR grid at the smallest and largest batch
# (its other multiples with the first seed only); --quick: one seed, the rules' LRs, 512 sequences.
MLM = dict(batch_sizes=(8, 32, 128, 512), seeds=2, lr_grid=(0.5, 1.0, 2.0), epochs=3, train_size=None)
MLM_QUICK = dict(batch_sizes=(8, 32, 128), seeds=1, lr_grid=(1.0,), epochs=2, train_size=512)


def _mlm_study(parser, args):
    preset = MLM_QUICK if args.quick else MLM
    names = tuple(n.strip() for n in (args.optimizers or ",".join(convergence_mlm.RECIPES)).split(",") if n.strip())
    unknown = [n for n in names if n not in convergence_mlm.RECIPES]
    if unknown or not names:
        parser.error(f"--optimizers: unknown {', '.join(unknown) or '(none given)'} for --task mlm; choose from "
                     f"{', '.join(convergence_mlm.RECIPES)}")
    batch_sizes = args.batch_sizes if args.batch_sizes is not None else preset["batch_sizes"]
    lr_grid = tuple(sorted({1.0, *(args.lr_grid if args.lr_grid is not None else preset["lr_grid"])}))
    from . import mlm_data

    available = mlm_data.sequences("train").shape[0]
    train_size = args.train_size if args.train_size is not None else preset["train_size"] or available
    epochs = args.epochs if args.epochs is not None else preset["epochs"]
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    workers = args.workers if args.workers is not None else _cores()
    _refuse(parser, (
        ("--train-size", 1 <= train_size <= available, f"must be between 1 and {available} (the training split)"),
        *_common_checks(args, batch_sizes, train_size, lr_grid, seeds, epochs, workers),
    ))
    return convergence_mlm.MlmStudy(
        optimizers=names, batch_sizes=tuple(sorted(set(batch_sizes))), seeds=tuple(range(seeds)), lr_grid=lr_grid,
        epochs=epochs, train_size=train_size, warmup_fraction=args.warmup, backend=args.backend,
        workers=workers), args.out


def settings(study: Study, argv) -> dict:
    """Everything a run depends on, for settings.json."""
    if isinstance(study, convergence_mlm.MlmStudy):
        from . import mlm_data

        return dict(asdict(study), task="mlm", command=["python", "-m", "bench.convergence", *argv],
                    base_batch=convergence_mlm.BASE_BATCH, corpus=mlm_data.fingerprint(),
                    recipes={name: asdict(recipe) for name, recipe in convergence_mlm.RECIPES.items()},
                    model=convergence_mlm.model(0).config.to_dict(), threads_per_run=1)
    return dict(asdict(study), command=["python", "-m", "bench.convergence", *argv], base_batch=BASE_BATCH,
                recipes={name: asdict(recipe) for name, recipe in RECIPES.items()}, momentum=MOMENTUM,
                data=dict(seeds=DATA_SEEDS, sizes=dict(train=study.train_size, validation=VALIDATION_SIZE,
                                                       test=TEST_SIZE)),
                threads_per_run=1)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    study, out = parse_args(argv)
    if any(name.startswith("Fused") for name in study.optimizers):
        try:
            # Fails before any run when the backend cannot run here; and builds the C++ operators
            # once, in this process, rather than in every worker at the same time.
            resolve_backend(study.backend, torch.device("cpu"))
        except ValueError as exc:
            print(f"python -m bench.convergence: error: --backend: {exc}", file=sys.stderr)
            return 2
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    rows = run_study(study)
    mlm = isinstance(study, convergence_mlm.MlmStudy)
    context = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   epochs=study.epochs, train_size=study.train_size, noise=None if mlm else study.noise,
                   warmup_fraction=study.warmup_fraction, decay_power=1.0 if mlm else study.decay_power,
                   lamb_kernels=lamb_kernels.__version__, torch=torch.__version__, python=platform.python_version(),
                   machine=device_name("cpu"))
    rows = [dict(context, **row) for row in rows]
    summary = [dict(context, **point) for point in summarise(rows)]
    write_csv(rows, os.path.join(out, "runs.csv"), RUN_COLUMNS)
    write_csv(summary, os.path.join(out, "summary.csv"), SUMMARY_COLUMNS)
    with open(os.path.join(out, "settings.json"), "w", encoding="utf-8") as f:
        json.dump(dict(settings(study, argv), **context), f, indent=2)
    task = (f"BERT (2 layers, hidden 128) masked LM on the standard library's docstrings: {study.train_size} training "
            f"sequences of 32 tokens" if mlm else f"PatchCNN on 10 noisy shapes: {study.train_size} training images")
    title = (f"{task}, {study.epochs} epochs at every batch size, {len(study.seeds)} seed(s), LR grid "
             f"x{'/'.join(f'{m:g}' for m in study.lr_grid)}{' at the ends' if mlm else ''} chosen on validation"
             f"\n{context['machine']}, torch {context['torch']}, lamb_kernels {context['lamb_kernels']},"
             f" {context['date'][:10]}")
    why_not = write_png(summary, os.path.join(out, "convergence.png"), title, held_out_loss=mlm)
    print(_table(summary))
    print(f"{len(rows)} runs in {time.perf_counter() - started:.0f} s; wrote {out}/runs.csv, summary.csv, settings.json"
          + (f", convergence.png" if why_not is None else f" (no chart: {why_not})"))
    return 0


def _table(summary) -> str:
    batches = sorted({s["batch_size"] for s in summary})
    lines = ["test accuracy, % (mean over seeds, at the LR multiple chosen on validation)",
             f"{'optimizer':<11}" + "".join(f"{b:>9}" for b in batches)]
    for optimizer in dict.fromkeys(s["optimizer"] for s in summary):
        cells = {s["batch_size"]: s for s in summary if s["optimizer"] == optimizer}
        lines.append(f"{optimizer:<11}" + "".join(
            f"{100 * cells[b]['test_acc_mean']:>9.1f}" if b in cells else f"{'-':>9}" for b in batches))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
