"""``python -m bench --stages``: each stage of a step on its own, per lamb_kernels backend, so a run
shows at once which stage falls short of the memory bandwidth.

LAMB: "grad norm" (the per-tensor sums of squares of the grads), "moments" (steps 1-5 and the
per-tensor norms), "apply" (steps 6-7); LARS: "norms", "apply" (docs/design.md sections 2-4). Then
"update": the one operator call that replaces the passes after the grad norm in a bucket with no
sharded tensor (lamb_update, lars_update), on CPU by cache groups (docs/benchmark.md, "The
schedule"), charged the bytes of the passes it replaces: its GB/s beside theirs shows what the
schedule saves (before: moments then apply, or norms then apply; after: update). Each
stage is charged its bytes from docs/design.md section 4; its median time gives GB/s and the
percentage of a copy of as many elements timed in the same run; on CUDA the kernels each stage
launches are counted. The stages run interleaved with the copy and with each other, as the step
providers do (bench/harness.py), on one optimizer per backend whose state exists (one step taken):
what a stage reads and writes is that of a real step. Writes stages.csv and stages.png.
"""
from __future__ import annotations

import os

import torch

import lamb_kernels
from lamb_kernels import FusedLAMB, FusedLARS
from lamb_kernels.backends import resolve_backend

from .harness import STATE_BYTES, STATE_DTYPES, make_params, quantile, run_group, stage_bytes
from .providers import LAMB_WEIGHT_DECAY, LARS_WEIGHT_DECAY, LR, MOMENTUM, Provider
from .report import pyplot, write_csv

COLUMNS = (
    "date", "preset", "algorithm", "backend", "stage", "status", "reason", "device", "device_name", "dtype",
    "master_weights", "state_dtype", "threads", "tensors", "params", "bytes_per_param", "warmup", "repeats", "median_ms",
    "p20_ms", "p80_ms", "gb_per_s", "copy_gb_per_s", "pct_of_copy", "launches", "lamb_kernels", "torch",
    "triton", "python",
)


UPDATE = "update"


def stages_of(algorithm, clipping) -> list:
    """The stages timed, in order: a step's streaming passes (harness.stage_bytes), then the update."""
    return [*stage_bytes(algorithm, clipping), UPDATE]


def bytes_of_stages(algorithm, clipping, *args) -> dict:
    """Bytes per parameter of each timed stage; the update is charged those of the passes it replaces."""
    bytes_of = stage_bytes(algorithm, clipping, *args)
    return {**bytes_of, UPDATE: sum(b for stage, b in bytes_of.items() if stage != "grad norm")}


class _Stages:
    """One optimizer on the preset's parameters with its state created, and its buckets' plans: each
    stage is then a call of the backends' stage methods on those plans."""

    def __init__(self, algorithm, backend, params, clipping, master_weights, state_dtype=torch.float32):
        if algorithm == "lamb":
            self.opt = FusedLAMB(params, lr=LR, weight_decay=LAMB_WEIGHT_DECAY, backend=backend,
                                 max_grad_norm=1.0 if clipping else None, master_weights=master_weights,
                                 state_dtype=state_dtype)
        else:
            self.opt = FusedLARS(params, lr=LR, momentum=MOMENTUM, weight_decay=LARS_WEIGHT_DECAY, backend=backend,
                                 master_weights=master_weights, state_dtype=state_dtype)
        self.opt.step()  # state, tables and (triton) compiled kernels
        with torch.no_grad():
            self.plans = self.opt._plan_step(None, None)
            if algorithm == "lamb":
                self.grad_sumsq = sum(sums.sum().to(self.plans[0][2].device) for sums in self._grad_norm()) \
                    if clipping else None
                self.norms = self._moments()
            else:
                self.norms = self._norms()

    def _grad_norm(self):
        return [backend.grad_sums_of_squares(plan) for backend, _, plan in self.plans]

    def _moments(self):
        grad_sumsq = self.grad_sumsq
        return [backend.lamb_moments_(plan, None if grad_sumsq is None else grad_sumsq.to(plan.device))
                for backend, _, plan in self.plans]

    def _lamb_apply(self):
        for (backend, _, plan), norms in zip(self.plans, self.norms):
            backend.lamb_apply_(plan, norms)

    def _norms(self):
        return [backend.lars_sums_of_squares(plan) for backend, _, plan in self.plans]

    def _lars_apply(self):
        for (backend, _, plan), norms in zip(self.plans, self.norms):
            backend.lars_apply_(plan, norms)

    def _update(self):
        for backend, _, plan in self.plans:
            if isinstance(self.opt, FusedLAMB):
                grad_sumsq = self.grad_sumsq
                backend.lamb_update_(plan, None if grad_sumsq is None else grad_sumsq.to(plan.device))
            else:
                backend.lars_update_(plan)

    def step_of(self, stage: str):
        """The stage as a call, under no_grad as in a step (the params are leaves that require grad)."""
        if stage == UPDATE:
            call = self._update
        elif stage == "grad norm":
            call = self._grad_norm
        elif stage == "moments":
            call = self._moments
        elif stage == "norms":
            call = self._norms
        else:
            call = self._lamb_apply if isinstance(self.opt, FusedLAMB) else self._lars_apply
        return torch.no_grad()(call)


def stage_providers(algorithm, device, backends, clipping, master_weights, state_dtype=torch.float32) -> list:
    """A copy of as many elements first, then one provider per (backend, stage)."""
    providers = [Provider("copy", algorithm, "copy", version=torch.__version__)]
    stages = stages_of(algorithm, clipping)
    for backend in backends:
        try:
            resolve_backend(backend, torch.device(device))
        except ValueError as exc:
            providers += [Provider(f"{backend}: {stage}", algorithm, "ours", unavailable=str(exc)) for stage in stages]
            continue
        made = {}  # one optimizer per backend, shared by its stages

        def build(params, backend=backend, stage=None):
            if backend not in made:
                made[backend] = _Stages(algorithm, backend, params, clipping, master_weights, state_dtype)
            return made[backend].step_of(stage)

        providers += [Provider(f"{backend}: {stage}", algorithm, "ours", version=lamb_kernels.__version__,
                               build=lambda params, stage=stage, build=build: build(params, stage=stage))
                      for stage in stages]
    return providers


def stage_rows(outcomes, *, preset, algorithm, params, clipping, master_weights, context, state_bytes=4) -> list:
    numel = sum(p.numel() for p in params)
    itemsize = params[0].element_size()
    bytes_of = bytes_of_stages(algorithm, clipping, itemsize, master_weights, state_bytes)
    copy = next(o for o in outcomes if o.provider.role == "copy")
    copy_gbps = 2 * itemsize * numel / quantile(copy.times, 0.5) / 1e9 if copy.status == "ok" else None
    rows = []
    for outcome in outcomes:
        if outcome.provider.role == "copy":
            continue
        backend, stage = outcome.provider.name.split(": ", 1)
        row = dict(context, preset=preset, algorithm=algorithm, backend=backend, stage=stage, status=outcome.status,
                   reason=outcome.reason, tensors=len(params), params=numel, bytes_per_param=bytes_of[stage])
        if outcome.status == "ok" and outcome.times:
            median = quantile(outcome.times, 0.5)
            row.update(median_ms=median * 1e3, p20_ms=quantile(outcome.times, 0.2) * 1e3,
                       p80_ms=quantile(outcome.times, 0.8) * 1e3, gb_per_s=bytes_of[stage] * numel / median / 1e9,
                       launches=outcome.launches)
            if copy_gbps is not None:
                row.update(copy_gb_per_s=copy_gbps, pct_of_copy=100.0 * row["gb_per_s"] / copy_gbps)
        rows.append(row)
    return rows


def stage_table(rows) -> str:
    lines = [f"{'preset':<11} {'algo':<5} {'backend':<8} {'stage':<10} {'B/param':>7} {'median ms':>10} "
             f"{'GB/s':>7} {'% copy':>7} {'launches':>8}"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"{row['preset']:<11} {row['algorithm']:<5} {row['backend']:<8} {row['stage']:<10} "
                         f"{row['status']}: {row['reason'][:60]}")
            continue
        pct = f"{row['pct_of_copy']:.0f}" if row.get("pct_of_copy") is not None else ""
        launches = "" if row.get("launches") is None else str(row["launches"])
        lines.append(f"{row['preset']:<11} {row['algorithm']:<5} {row['backend']:<8} {row['stage']:<10} "
                     f"{row['bytes_per_param']:>7g} {row['median_ms']:>10.3f} {row['gb_per_s']:>7.1f} {pct:>7} "
                     f"{launches:>8}")
    return "\n".join(lines)


def write_stages_png(rows, path, title) -> str | None:
    """GB/s per stage and backend, one panel per (preset, algorithm), the copy's GB/s as a line."""
    plt, why_not = pyplot()
    if plt is None:
        return why_not
    groups = list(dict.fromkeys((row["preset"], row["algorithm"]) for row in rows))
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 2.2 * len(groups) + 0.6), squeeze=False)
    for ax, (preset, algorithm) in zip(axes[:, 0], groups):
        ran = [row for row in rows if (row["preset"], row["algorithm"]) == (preset, algorithm) and row["status"] == "ok"]
        labels = [f"{row['backend']}: {row['stage']}" for row in ran]
        ax.barh(range(len(ran)), [row["gb_per_s"] for row in ran], color="#dd8452")
        ax.set_yticks(list(range(len(ran))), labels, fontsize=8)
        ax.invert_yaxis()
        copy = next((row["copy_gb_per_s"] for row in ran if row.get("copy_gb_per_s")), None)
        if copy:
            ax.axvline(copy, color="#9e9e9e", linestyle="--", label=f"copy {copy:.1f} GB/s")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_title(f"{preset} {algorithm.upper()}", loc="left", fontsize=9)
        ax.set_xlabel("GB/s (docs/design.md section 4 bytes of the stage / median time)", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def run_stages(args, context, dtype, presets, progress_factory) -> list:
    """Times every stage for every preset and algorithm of `args`; writes stages.csv (after every
    group) and stages.png into args.out; returns the rows."""
    from .presets import preset_shapes

    csv_path, png_path = os.path.join(args.out, "stages.csv"), os.path.join(args.out, "stages.png")
    clipping = args.max_grad_norm > 0
    state_dtype = getattr(args, "state_dtype", "float32")
    plan = [(preset, algorithm, stage_providers(algorithm, args.device, args.backends, clipping,
                                                context["master_weights"], STATE_DTYPES[state_dtype]))
            for preset in presets for algorithm in args.algorithms]
    progress = progress_factory(sum(sum(p.unavailable is None for p in providers) for *_, providers in plan)
                                * (args.warmup + args.repeats))
    rows = []
    for index in range(len(plan)):
        preset, algorithm, providers = plan[index]
        plan[index] = None  # a group's optimizers (held by its providers) go with it
        progress.start(f"{preset} {algorithm} stages")
        params = make_params(preset_shapes(preset), args.device, dtype)
        outcomes = run_group(providers, params, args.device, warmup=args.warmup, repeats=args.repeats,
                             progress=progress)
        rows += stage_rows(outcomes, preset=preset, algorithm=algorithm, params=params, clipping=clipping,
                           master_weights=context["master_weights"],
                           context={**context, "state_dtype": state_dtype}, state_bytes=STATE_BYTES[state_dtype])
        del params, outcomes, providers
        if args.device == "cuda":
            torch.cuda.empty_cache()
        write_csv(rows, csv_path, COLUMNS)
    title = f"stages on {context['device_name']}, {context['dtype']}, torch {context['torch']}, {context['date'][:10]}"
    why_no_png = write_stages_png(rows, png_path, title)
    print(f"\n{title}; {args.warmup} warm-up + {args.repeats} timed calls per stage")
    print(stage_table(rows))
    print(f"\nwrote {csv_path}" + (f" and {png_path}" if why_no_png is None else f"; no chart: {why_no_png}"))
    return rows
