"""python -m bench.distributed: the optimizer step on parameters sharded with FSDP2, on CPU with gloo.

    python -m bench.distributed                         # bert-base shapes, 2 and 4 ranks
    python -m bench.distributed --world-sizes 2 --preset tiny --steps 3
    python -m bench.distributed --state-dtype int8       # FusedLAMB / FusedLARS with 8-bit states

For each world size, that many processes (one gloo process group) shard one module holding the
preset's parameters with ``fully_shard`` (FSDP2: each tensor split on its first dimension), give
every parameter a sharded grad, and time ``optimizer.step()`` alone: FusedLAMB and FusedLARS on each
lamb_kernels backend, beside timm's ``Lamb`` / ``Lars`` when timm can be imported (correct under
sharding, every norm a DTensor collective) and torch's ``AdamW`` / ``SGD`` with momentum (no norms,
no collective) on the same sharded parameters. A step's time is the slowest rank's, between two
barriers; the all-reduces a step makes are counted as they are dispatched (``dist.all_reduce``'s
``c10d::allreduce_`` and DTensor's ``_c10d_functional::all_reduce``), and so are the bytes of the
optimizer's state tensors on the largest rank (step counts left out). ``--state-dtype`` sets our
optimizers' ``state_dtype`` (bf16, or 8-bit codes with a float32 scale per 256 elements: a sharded
parameter whose shards cannot hold whole blocks keeps float32 states, docs/states.md). Prints a
table last; writes distributed.csv and distributed.png into --out.

On one machine the ranks share its cores and memory bandwidth: the times say what the step costs on
this machine at that world size (and how many collectives it makes), not how it scales on a cluster.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import tempfile
import time

import torch

from .harness import device_name, quantile
from .presets import PRESETS, preset_shapes
from .report import pyplot, write_csv

COLUMNS = ("date", "preset", "world_size", "algorithm", "provider", "status", "reason", "tensors", "params",
           "steps", "state_dtype", "median_ms", "p20_ms", "p80_ms", "ratio_to_yardstick", "all_reduces_per_step",
           "state_bytes_per_rank", "coded_share",
           "device_name", "threads_per_rank", "lamb_kernels", "torch", "python")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bert-base", help=f"one of: {', '.join(PRESETS)} (default: bert-base)")
    parser.add_argument("--world-sizes", default="2,4", help="comma-separated ranks per run (default: 2,4)")
    parser.add_argument("--backends", default="cpp,torch",
                        help="comma-separated lamb_kernels backends (default: cpp,torch)")
    parser.add_argument("--algorithms", default="lamb,lars", help="comma-separated: lamb, lars")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per provider (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per provider first (default: 2)")
    parser.add_argument("--state-dtype", default="float32", choices=("float32", "bfloat16", "int8"),
                        help="state_dtype of FusedLAMB (m and v) and FusedLARS (the momentum buffer)")
    parser.add_argument("--out", default="out/distributed", help="folder for the CSV and PNG (default: out/distributed)")
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        parser.error(f"--preset {args.preset!r} is not a preset; choose from: {', '.join(PRESETS)}")
    try:
        args.world_sizes = [int(w) for w in args.world_sizes.split(",") if w.strip()]
    except ValueError:
        parser.error(f"--world-sizes must be whole numbers, got {args.world_sizes!r}")
    if not args.world_sizes or min(args.world_sizes) < 1:
        parser.error(f"--world-sizes must be at least 1, got {args.world_sizes}")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    for name in args.algorithms:
        if name not in ("lamb", "lars"):
            parser.error(f"--algorithms {name!r}: choose from lamb, lars")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    return args


def providers(algorithm: str, backends, state_dtype: str = "float32") -> list:
    """(name, role, make(params) -> optimizer or a reason it cannot run)."""
    import lamb_kernels

    dtype = state_dtype if state_dtype == "int8" else getattr(torch, state_dtype)
    out = []
    for backend in backends:
        if algorithm == "lamb":
            out.append((f"lamb_kernels FusedLAMB ({backend})", "ours",
                        lambda ps, b=backend: lamb_kernels.FusedLAMB(ps, lr=1e-3, weight_decay=0.01, backend=b,
                                                                     state_dtype=dtype)))
        else:
            out.append((f"lamb_kernels FusedLARS ({backend})", "ours",
                        lambda ps, b=backend: lamb_kernels.FusedLARS(ps, lr=0.1, momentum=0.9, weight_decay=1e-4,
                                                                     backend=b, state_dtype=dtype)))
    try:
        from timm.optim import Lamb, Lars
    except Exception as exc:  # not installed, or broken: a row that says why
        reason = f"timm cannot be imported ({type(exc).__name__})"
        out.append((f"timm {'Lamb' if algorithm == 'lamb' else 'Lars'}", "external", lambda ps, r=reason: r))
    else:
        if algorithm == "lamb":
            out.append(("timm Lamb", "external", lambda ps: Lamb(ps, lr=1e-3, weight_decay=0.01)))
        else:
            out.append(("timm Lars", "external", lambda ps: Lars(ps, lr=0.1, momentum=0.9, weight_decay=1e-4)))
    if algorithm == "lamb":
        out.append(("torch AdamW", "yardstick", lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01)))
    else:
        out.append(("torch SGD momentum", "yardstick", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)))
    return out


class Shapes(torch.nn.Module):
    """A module holding one parameter per preset shape, ~N(0, 0.02), from a seeded generator."""

    def __init__(self, shapes):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.tensors = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes)


def _count_all_reduces(step) -> int:
    """All-reduces one step makes: ``dist.all_reduce``'s op (``c10d.allreduce_``) and DTensor's
    (``_c10d_functional.all_reduce``), counted as they are dispatched. (The profiler would count them
    too, but kineto prints lines of its own, ``USDT: ...``, into the run's output.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.name() in ALL_REDUCE_OPS:
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.calls


ALL_REDUCE_OPS = ("c10d::allreduce_", "_c10d_functional::all_reduce")


def state_footprint(opt) -> tuple:
    """(bytes of the optimizer's state tensors on this rank, a DTensor's local shard, step counts left
    out; elements of this rank's parameters whose states are 8-bit codes; elements with any state)."""
    held = coded = total = 0
    for p, state in opt.state.items():
        tensors = [getattr(t, "_local_tensor", t) for key, t in state.items() if torch.is_tensor(t) and key != "step"]
        held += sum(t.numel() * t.element_size() for t in tensors)
        if tensors:
            n = getattr(p, "_local_tensor", p).numel()
            total += n
            coded += n if any(t.dtype in (torch.int8, torch.uint8) for t in tensors) else 0
    return held, coded, total


def _rank(rank, world, port, args, result_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model = Shapes(preset_shapes(args.preset))
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    for p in params:  # every rank draws the whole grad, keeps its shard
        p.grad = distribute_tensor(torch.randn(p.shape, generator=gen) * 1e-3, mesh, p.placements, src_data_rank=None)
    rows = []
    for algorithm in args.algorithms:
        results = []
        for name, role, make in providers(algorithm, args.backends, args.state_dtype):
            row = dict(algorithm=algorithm, provider=name, role=role, status="ok", reason="")
            opt = make(params)
            if isinstance(opt, str):
                row.update(status="skipped", reason=opt)
                results.append(row)
                continue
            try:
                for _ in range(args.warmup):
                    opt.step()
                row["all_reduces_per_step"] = _count_all_reduces(opt.step)
                footprint = state_footprint(opt)
                held = torch.tensor([footprint[0]], dtype=torch.float64)
                dist.all_reduce(held, op=dist.ReduceOp.MAX)
                row["state_bytes_per_rank"] = int(held)
                counts = torch.tensor(footprint[1:], dtype=torch.float64)
                dist.all_reduce(counts)  # (every rank's elements)
                row["coded_share"] = float(counts[0] / counts[1]) if counts[1] else 0.0
                times = []
                for _ in range(args.steps):
                    dist.barrier()
                    start = time.perf_counter()
                    opt.step()
                    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's step
                    times.append(float(elapsed))
                row["times"] = times
            except Exception as exc:  # a provider that fails is reported, the others still run
                row.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:300])
            del opt
            results.append(row)
        rows += results
    if rank == 0:
        torch.save(rows, result_path)
    dist.barrier()
    dist.destroy_process_group()


def _spawned(rank, world, port, args, result_path):
    _rank(rank, world, port, args, result_path)
    os._exit(0)  # (gloo's threads may abort in C++ destructors at exit; the results are written)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, args) -> list:
    """Every provider's row at one world size (times in seconds, from the slowest rank)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        result_path = os.path.join(folder, "rows.pt")
        mp.spawn(_spawned, args=(world, free_port(), args, result_path), nprocs=world, join=True)
        return torch.load(result_path)


def summarise(rows, *, world, args, context) -> list:
    """CSV rows: medians and spread in ms, and each step's ratio to the yardstick's median."""
    out = []
    for algorithm in args.algorithms:
        group = [row for row in rows if row["algorithm"] == algorithm]
        yardstick = next((row for row in group if row["role"] == "yardstick" and row["status"] == "ok"), None)
        for row in group:
            line = dict(context, preset=args.preset, world_size=world, algorithm=algorithm, provider=row["provider"],
                        status=row["status"], reason=row["reason"], steps=args.steps,
                        state_dtype=args.state_dtype if row["role"] == "ours" else "float32")
            if row["status"] == "ok":
                times = row["times"]
                line.update(median_ms=quantile(times, 0.5) * 1e3, p20_ms=quantile(times, 0.2) * 1e3,
                            p80_ms=quantile(times, 0.8) * 1e3, all_reduces_per_step=row["all_reduces_per_step"],
                            state_bytes_per_rank=row["state_bytes_per_rank"], coded_share=row["coded_share"])
                if yardstick is not None:
                    line["ratio_to_yardstick"] = quantile(times, 0.5) / quantile(yardstick["times"], 0.5)
            out.append(line)
    return out


def table(rows) -> str:
    lines = [f"{'ranks':>5}  {'algorithm':<9} {'provider':<34} {'median ms':>10} {'x yardstick':>11} {'all-reduces':>11}"
             f" {'state MB/rank':>13}"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"{row['world_size']:>5}  {row['algorithm']:<9} {row['provider']:<34} {row['status']}: "
                         f"{row['reason']}")
            continue
        ratio = row.get("ratio_to_yardstick")
        lines.append(f"{row['world_size']:>5}  {row['algorithm']:<9} {row['provider']:<34} {row['median_ms']:>10.2f} "
                     f"{'' if ratio is None else f'{ratio:.2f}':>11} {row['all_reduces_per_step']:>11}"
                     f" {row['state_bytes_per_rank'] / 1e6:>13.1f}")
    return "\n".join(lines)


def write_png(rows, path) -> str | None:
    """Median step time per provider, one panel per algorithm, a bar per world size."""
    plt, why_not = pyplot()
    if plt is None:
        return why_not
    algorithms = list(dict.fromkeys(row["algorithm"] for row in rows))
    worlds = sorted({row["world_size"] for row in rows})
    fig, axes = plt.subplots(1, len(algorithms), figsize=(6.5 * len(algorithms), 4.2), squeeze=False)
    for ax, algorithm in zip(axes[0], algorithms):
        ran = [row for row in rows if row["algorithm"] == algorithm and row["status"] == "ok"]
        names = list(dict.fromkeys(row["provider"] for row in ran))
        width = 0.8 / max(len(worlds), 1)
        for i, world in enumerate(worlds):
            by_name = {row["provider"]: row for row in ran if row["world_size"] == world}
            ys = [j + i * width for j, name in enumerate(names) if name in by_name]
            values = [by_name[name]["median_ms"] for name in names if name in by_name]
            ax.barh(ys, values, height=width, label=f"{world} ranks")
            for y, name in zip(ys, [n for n in names if n in by_name]):
                ax.annotate(f" {by_name[name]['all_reduces_per_step']} all-reduces", (by_name[name]["median_ms"], y),
                            va="center", fontsize=7)
        ax.set_yticks([j + width * (len(worlds) - 1) / 2 for j in range(len(names))], names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("optimizer step, ms (median, slowest rank)")
        ax.set_title(f"{algorithm.upper()}, {rows[0]['preset']} sharded with FSDP2", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"{rows[0]['device_name']}, gloo, torch {rows[0]['torch']}, {rows[0]['date'][:10]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv=None) -> list:
    args = parse_args(argv)
    import lamb_kernels

    context = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "device_name": device_name("cpu"), "lamb_kernels": lamb_kernels.__version__,
               "torch": torch.__version__, "python": platform.python_version(),
               "tensors": len(preset_shapes(args.preset)),
               "params": sum(int(torch.Size(s).numel()) for s in preset_shapes(args.preset))}
    os.makedirs(args.out, exist_ok=True)
    csv_path, png_path = os.path.join(args.out, "distributed.csv"), os.path.join(args.out, "distributed.png")
    rows = []
    for world in args.world_sizes:
        print(f"{args.preset}: {world} ranks ...", flush=True)
        context["threads_per_rank"] = max(1, (os.cpu_count() or 1) // world)
        rows += summarise(run_world(world, args), world=world, args=args, context=context)
        write_csv(rows, csv_path, COLUMNS)  # after each world size: a later failure keeps these
    why_no_png = write_png(rows, png_path)
    print(table(rows))
    print(f"wrote {csv_path}" + (f" and {png_path}" if why_no_png is None else f" ({why_no_png})"))
    return rows


if __name__ == "__main__":
    main()
