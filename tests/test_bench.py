"""The benchmark harness (python -m bench): presets, the bytes model, the figures it derives from
step times, what it writes, and how it reports providers that cannot run."""
import csv
import importlib.util
import io
import math
import re
import sys
import time

import numpy as np
import pytest
import torch

from bench.__main__ import main, parse_args
from bench.harness import STATE_BYTES, STATE_DTYPES, Outcome, bytes_moved, make_params, quantile, run_group, stage_bytes
from bench.presets import PRESETS, preset_shapes
from bench.providers import Provider
from bench.report import COLUMNS, Progress, busy_warning, group_rows, heartbeat, table

# Published parameter counts: Hugging Face BertModel and GPT2Model, torchvision resnet50 and vit_b_16.
PUBLISHED = {
    "bert-base": (199, 109_482_240),
    "bert-large": (391, 335_141_888),
    "resnet50": (161, 25_557_032),
    "gpt2": (148, 124_439_808),
    "vit-b/16": (152, 86_567_656),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_matches_the_published_model(name):
    shapes = preset_shapes(name)
    assert (len(shapes), sum(math.prod(s) for s in shapes)) == PUBLISHED[name]


def test_many_small_is_thousands_of_small_tensors_the_same_every_time():
    shapes = preset_shapes("many-small")
    sizes = [math.prod(s) for s in shapes]
    assert len(shapes) >= 2000
    assert min(sizes) == 1 and max(sizes) <= 65536 and max(sizes) > 32768
    assert sum(size < 1024 for size in sizes) > len(sizes) / 4  # spread down to the launch-bound sizes
    assert shapes == preset_shapes("many-small")


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="'bert-huge'"):
        preset_shapes("bert-huge")


def test_bytes_model_is_spec_section_4():
    assert bytes_moved("lamb", "ours", clipping=True) == 44
    assert bytes_moved("lamb", "reference", clipping=False) == 40
    assert bytes_moved("lamb", "yardstick", clipping=True) == 28  # AdamW
    assert bytes_moved("lars", "external", clipping=True) == 28
    assert bytes_moved("lars", "yardstick", clipping=True) == 20  # SGD with momentum
    assert bytes_moved("lars", "copy", clipping=True) == 8
    # bf16 params, fp32 states (docs/mixed-precision.md's table): LAMB g 2 + (p g m v, m v) 20 + (p m v, p) 12.
    assert bytes_moved("lamb", "ours", clipping=True, param_bytes=2) == 34
    # With fp32 masters: g 2 + (master g m v, m v) 22 + (master m v, master, p) 18.
    assert bytes_moved("lamb", "ours", clipping=True, param_bytes=2, master_weights=True) == 42
    assert bytes_moved("lamb", "ours", clipping=False, param_bytes=2, master_weights=True) == 40
    assert bytes_moved("lars", "ours", clipping=True, param_bytes=2) == 18
    assert bytes_moved("lars", "ours", clipping=True, param_bytes=2, master_weights=True) == 26
    assert bytes_moved("lamb", "yardstick", clipping=True, param_bytes=2) == 14  # AdamW's bf16 states


def test_quantile_is_numpys_linear():
    values = [5.0, 1.0, 4.0, 2.5, 9.0, 7.25]
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        assert quantile(values, q) == pytest.approx(float(np.quantile(values, q)))


def _outcome(name, role, times):
    return Outcome(Provider(name, "lamb", role), times=list(times))


def test_figures_derived_from_step_times():
    copy = _outcome("copy", "copy", [0.010, 0.020, 0.030])
    adamw = _outcome("adamw", "yardstick", [0.100, 0.200, 0.300])
    ours = _outcome("ours", "ours", [0.150, 0.500, 0.330])  # paired ratios 1.5, 2.5, 1.1
    rows = group_rows([copy, adamw, ours], preset="p", algorithm="lamb", numel=1_000_000, tensors=3,
                      itemsize=4, clipping=True, context={"date": "d"})
    copy_row, adamw_row, ours_row = rows
    assert copy_row["gb_per_s"] == pytest.approx(8 * 1e6 / 0.020 / 1e9)
    assert adamw_row["median_ms"] == pytest.approx(200.0)
    assert ours_row["median_ms"] == pytest.approx(330.0)
    assert ours_row["gb_per_s"] == pytest.approx(44 * 1e6 / 0.330 / 1e9)
    assert ours_row["pct_of_copy"] == pytest.approx(100 * ours_row["gb_per_s"] / copy_row["gb_per_s"])
    # The median of per-repetition ratios (1.5), not the ratio of medians (1.65).
    assert ours_row["ratio_to_yardstick"] == pytest.approx(1.5)
    assert ours_row["yardstick"] == "adamw"
    assert "ratio_to_yardstick" not in adamw_row and "ratio_to_yardstick" not in copy_row


def _runs(log):
    def build(params):
        return lambda: log.append(len(params))

    return build


def test_group_reports_what_cannot_run_and_times_the_rest():
    def broken_build(params):
        raise RuntimeError("no kernel for this\nsecond line")

    calls = {"flaky": 0}

    def flaky_build(params):
        def step():
            calls["flaky"] += 1
            if calls["flaky"] == 3:
                raise ValueError("gave up on the third step")

        return step

    log = []
    providers = [
        Provider("copy", "lamb", "copy"),
        Provider("fine", "lamb", "ours", build=_runs(log)),
        Provider("absent", "lamb", "external", unavailable="absent cannot be imported"),
        Provider("broken", "lamb", "external", build=broken_build),
        Provider("flaky", "lamb", "external", build=flaky_build),
    ]
    params = make_params([(4, 3), (5,)], "cpu", torch.float32)
    progress = Progress(4 * 5, stream=io.StringIO())
    outcomes = run_group(providers, params, "cpu", warmup=1, repeats=4, progress=progress)
    status = {o.provider.name: (o.status, o.reason, len(o.times)) for o in outcomes}
    assert status["copy"] == ("ok", "", 4)
    assert status["fine"] == ("ok", "", 4) and len(log) == 5
    assert status["absent"] == ("skipped", "absent cannot be imported", 0)
    assert status["broken"] == ("failed", "construction raised RuntimeError: no kernel for this", 0)
    assert status["flaky"][:2] == ("failed", "step 3 raised ValueError: gave up on the third step")
    assert progress.done == progress.total  # a failed provider's remaining steps count as done


def test_group_refuses_figures_from_non_finite_values():
    def poison(params):
        return lambda: params[0].data.fill_(float("nan"))

    params = make_params([(8,)], "cpu", torch.float32)
    with pytest.raises(RuntimeError, match="non-finite"):
        run_group([Provider("poison", "lamb", "ours", build=poison)], params, "cpu", warmup=1, repeats=1)


class _Ticks:
    """A clock that moves `step` seconds each time it is read."""

    def __init__(self, step):
        self.now, self.step = 0.0, step

    def __call__(self):
        self.now += self.step
        return self.now


def test_progress_off_a_terminal_writes_a_line_per_tenth_with_the_time_left():
    stream = io.StringIO()
    progress = Progress(20, stream=stream, clock=_Ticks(1.0))
    progress.start("bert-base lamb")
    for _ in range(20):
        progress.advance()
    lines = stream.getvalue().splitlines()
    assert lines[0].strip() == "0.0%  bert-base lamb"
    assert lines[1].startswith(" 10.0%  bert-base lamb  (elapsed 0:0") and "left)" in lines[1]
    assert lines[-1].strip().startswith("100.0%  bert-base lamb  (elapsed") and "about 0:00 left" in lines[-1]
    assert len(lines) == 11


def test_progress_on_a_terminal_names_what_runs_and_what_is_left():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = Progress(4, stream=stream, clock=_Ticks(10.0))
    progress.start("bert-base lamb")
    progress.advance(0, detail="lamb_kernels FusedLAMB cpp, warm-up step 1/4")
    progress.advance()
    progress.advance(0, detail="torch AdamW(fused=True), timed step 2/4")
    screen = stream.getvalue().split("\r")[-1]
    assert "25.0%" in screen and "bert-base lamb: torch AdamW(fused=True), timed step 2/4" in screen
    assert re.search(r"elapsed \d+:\d\d, about \d+:\d\d left", screen)


def test_a_build_says_that_it_is_running_until_it_is_done():
    stream = io.StringIO()
    assert heartbeat("building", lambda: time.sleep(0.35) or "built", stream=stream, every=0.1) == "built"
    assert stream.getvalue().startswith("building ... 0 s")
    quiet = io.StringIO()
    heartbeat("building", lambda: None, stream=quiet, every=0.5)  # done at once: nothing said
    assert quiet.getvalue() == ""
    with pytest.raises(ValueError, match="no compiler"):
        heartbeat("building", lambda: (_ for _ in ()).throw(ValueError("no compiler")), stream=io.StringIO())


def test_the_table_names_each_rows_algorithm_and_yardstick_and_a_busy_machine_is_told():
    adamw = _outcome("torch AdamW(fused=True)", "yardstick", [0.10, 0.10, 0.10, 0.10, 0.10])
    ours = _outcome("ours", "ours", [0.15, 0.15, 0.15, 0.15, 0.15])
    rows = group_rows([adamw, ours], preset="p", algorithm="lamb", numel=10, tensors=1, itemsize=4, clipping=True,
                      context={})
    line = table(rows).splitlines()[-1]
    assert line.split()[:3] == ["p", "lamb", "ours"] and line.endswith("1.50x fused AdamW")
    assert busy_warning(rows) is None
    drifting = _outcome("ours", "ours", [0.10, 0.10, 0.17, 0.17, 0.17])  # one provider at 1.7: a quiet VM's drift
    rows = group_rows([adamw, drifting], preset="p", algorithm="lamb", numel=10, tensors=1, itemsize=4,
                      clipping=True, context={})
    assert busy_warning(rows) is None
    noisy = _outcome("ours", "ours", [0.10, 0.10, 0.30, 0.30, 0.30])
    rows = group_rows([adamw, noisy], preset="p", algorithm="lamb", numel=10, tensors=1, itemsize=4, clipping=True,
                      context={})
    assert "up to 3.0 for ours on p): the machine was busy" in busy_warning(rows)
    tiny = [_outcome("copy", "copy", [1e-5, 1e-5, 9e-5, 9e-5, 9e-5])]  # microseconds: spread, not judged
    assert busy_warning(group_rows(tiny, preset="p", algorithm="lamb", numel=10, tensors=1, itemsize=4,
                                   clipping=True, context={})) is None


@pytest.mark.parametrize("argv, named", [
    (["--preset", "bert-huge"], "--preset"),
    (["--backends", "cuda-graphs"], "--backends"),
    (["--algorithms", "adam"], "--algorithms"),
    (["--repeats", "0"], "--repeats"),
    (["--warmup", "0"], "--warmup"),
    (["--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--dtype", "float64"], "--dtype"),
    (["--chart-from", "no/such/steps.csv"], "--chart-from"),
])
def test_bad_arguments_are_named(argv, named, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert named in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda"])
    assert "--device cuda" in capsys.readouterr().err


def test_all_means_the_real_models():
    assert parse_args(["--preset", "all"]).presets == [name for name in PRESETS
                                                       if name not in ("tiny", "host-bound", "host-bound-200")]


def test_smoke_tiny_preset_writes_rows_table_csv_and_png(tmp_path, capsys):
    """The whole command on the tiny preset, every backend (triton under its interpreter here)."""
    out = tmp_path / "results"
    rows = main(["--preset", "tiny", "--backends", "triton,cpp,torch", "--out", str(out),
                 "--repeats", "2", "--warmup", "1", "--compile"])
    printed = capsys.readouterr()

    with open(out / "steps.csv", newline="", encoding="utf-8") as f:
        written = list(csv.DictReader(f))
    assert tuple(written[0].keys()) == COLUMNS
    assert len(written) == len(rows)
    names = {(row["algorithm"], row["provider"]): row for row in written}
    for algorithm, cls in (("lamb", "FusedLAMB"), ("lars", "FusedLARS")):
        for backend in ("triton", "cpp", "torch"):
            row = names[(algorithm, f"lamb_kernels {cls} {backend}")]
            # cpp is skipped only where it cannot be built; its reason then says why
            assert row["status"] == "ok" or (backend == "cpp" and row["status"] == "skipped" and row["reason"])
    # --compile: the torch backend's step under torch.compile, both algorithms.
    assert names[("lars", "lamb_kernels FusedLARS torch + torch.compile")]["status"] == "ok"
    assert names[("lamb", "lamb_kernels FusedLAMB torch + torch.compile")]["status"] == "ok"
    assert names[("lamb", "torch AdamW(fused=True)")]["status"] == "ok"
    assert names[("lars", "torch SGD(momentum=0.9, fused=True)")]["status"] == "ok"
    for row in written:
        assert row["device"] == "cpu" and row["dtype"] == "float32" and row["preset"] == "tiny"
        assert row["date"] and row["torch"] == torch.__version__ and row["device_name"]
        assert row["params"] == "2213" and row["tensors"] == "5"
        if row["status"] == "ok":
            assert float(row["first_step_ms"]) > 0
            median = float(row["median_ms"])
            assert 0 < float(row["p20_ms"]) <= median <= float(row["p80_ms"])
            # GB/s checked by hand from the row's own bytes, size and median
            expected = float(row["bytes_per_param"]) * 2213 / (median / 1e3) / 1e9
            assert float(row["gb_per_s"]) == pytest.approx(expected, rel=1e-4)
            assert float(row["pct_of_copy"]) > 0
            if row["role"] in ("ours", "reference", "external"):
                assert float(row["ratio_to_yardstick"]) > 0
        else:
            assert row["reason"]

    png = (out / "steps.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "lamb_kernels FusedLAMB cpp" in printed.out.split("\n", 2)[-1]  # the table, printed last
    assert "100.0%" in printed.err  # the progress
    assert printed.out.rstrip().endswith("steps.png")

    # The chart drawn again from the CSV alone, as for a GPU machine without matplotlib.
    again = tmp_path / "again"
    assert len(main(["--chart-from", str(out / "steps.csv"), "--out", str(again)])) == len(rows)
    assert (again / "steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_csv_is_still_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "results"
    main(["--preset", "tiny", "--backends", "torch", "--algorithms", "lars", "--out", str(out),
          "--repeats", "1", "--warmup", "1"])
    assert (out / "steps.csv").exists() and not (out / "steps.png").exists()
    assert "no chart: matplotlib cannot be imported" in capsys.readouterr().out


def test_table_lists_what_did_not_run_with_why():
    rows = group_rows([_outcome("copy", "copy", [0.01]), Outcome(Provider("gone", "lamb", "external"),
                                                                  status="skipped", reason="not installed")],
                      preset="tiny", algorithm="lamb", numel=10, tensors=1, itemsize=4, clipping=True, context={})
    text = table(rows)
    assert "skipped tiny gone: not installed" in text


def test_each_repetition_starts_with_the_next_provider():
    order = []
    providers = [Provider(name, "lars", "ours", build=lambda params, name=name: lambda: order.append(name))
                 for name in "abc"]
    run_group(providers, make_params([(3,)], "cpu", torch.float32), "cpu", warmup=1, repeats=2)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_launches_are_counted_on_gpu():
    from bench.harness import count_launches
    from lamb_kernels import FusedLAMB

    x = torch.ones(1000, device="cuda")
    assert count_launches(lambda: x.add_(1)) == 1
    counts = []
    for shapes in ([(1000,), (30, 7)], [(1000,), (30, 7)] * 30):
        step = FusedLAMB(make_params(shapes, "cuda", torch.float32), backend="triton").step
        step()  # compiles the kernels, allocates the state
        counts.append(count_launches(step))
    # At least the five Triton kernels (grad norm 2, moments and norms 2, apply 1), whatever the
    # number of tensors.
    assert counts[0] == counts[1] >= 5


def test_a_backend_that_cannot_run_here_is_listed_with_why():
    from bench.providers import lamb_providers, lars_providers

    for providers in (lamb_providers("cuda", ["cpp"], 1.0), lars_providers("cuda", ["cpp"])):
        (cpp,) = [p for p in providers if p.name.endswith(" cpp")]
        assert cpp.build is None and "CPU tensors only" in cpp.unavailable


def test_every_run_steps_the_same_values():
    first, second = (make_params([(5, 4), (3,)], "cpu", torch.float32) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b) and torch.equal(a.grad, b.grad)


def test_compiled_provider_keeps_compiling_from_preset_to_preset():
    """Past dynamo's recompile limit (8) a new optimizer's step would silently run eagerly."""
    from torch._dynamo.utils import counters

    from bench.providers import lars_providers

    for size in range(1, 11):
        (compiled,) = [p for p in lars_providers("cpu", ["torch"]) if p.name.endswith("torch.compile")]
        step = compiled.build(make_params([(size,), (3, 4)], "cpu", torch.float32))
        graphs = counters["stats"]["unique_graphs"]
        step()
        assert counters["stats"]["unique_graphs"] > graphs, f"optimizer {size} ran without compiling"


def test_the_compiled_providers_are_left_out_unless_asked_for_and_say_how_to_add_them():
    from bench.__main__ import _providers

    for algorithm in ("lamb", "lars"):
        for argv in (["--backends", "torch"], ["--backends", "torch", "--no-compile"]):
            default = _providers(algorithm, parse_args(argv))
            left_out = [p for p in default if p.name.endswith("torch + torch.compile")]
            assert len(left_out) == 1 and "--compile adds it" in left_out[0].unavailable
            assert all(p.unavailable is None for p in default if p not in left_out and p.role != "external")
        asked = _providers(algorithm, parse_args(["--backends", "torch", "--compile"]))
        assert [p.name for p in asked] == [p.name for p in default]
        assert all(p.unavailable is None for p in asked if p.role != "external")


def test_no_ratios_against_a_yardstick_that_failed():
    adamw = Outcome(Provider("adamw", "lamb", "yardstick"), status="failed", reason="raised", times=[0.1])
    rows = group_rows([adamw, _outcome("ours", "ours", [0.15, 0.2])], preset="p", algorithm="lamb",
                      numel=10, tensors=1, itemsize=4, clipping=True, context={})
    assert rows[1]["median_ms"] == pytest.approx(175.0) and "ratio_to_yardstick" not in rows[1]


def test_distributed_benchmark_on_the_tiny_preset(tmp_path):
    """python -m bench.distributed end to end at 2 ranks: a row per provider, the all-reduces a step
    makes (LAMB 2 with clipping, LARS 1, torch's AdamW and SGD none), the state bytes, the CSV and
    the chart."""
    import bench.distributed

    rows = bench.distributed.main(["--preset", "tiny", "--world-sizes", "2", "--steps", "2", "--warmup", "1",
                                   "--backends", "cpp,torch", "--state-dtype", "int8", "--out", str(tmp_path)])
    ran = {(row["algorithm"], row["provider"]): row for row in rows if row["status"] == "ok"}
    # The largest rank's states: tiny's shards cannot hold whole 8-bit blocks (rows of 33, 1-D
    # tensors), so they stay float32: 1118 elements on rank 0 (32 x 33 + 17 + 4 + 1 + 2 x 20).
    assert ran[("lamb", "lamb_kernels FusedLAMB (cpp)")]["state_bytes_per_rank"] == 1118 * 8
    assert ran[("lamb", "torch AdamW")]["state_bytes_per_rank"] == 1118 * 8
    assert ran[("lars", "lamb_kernels FusedLARS (torch)")]["state_bytes_per_rank"] == 1118 * 4
    assert ran[("lamb", "lamb_kernels FusedLAMB (cpp)")]["state_dtype"] == "int8"
    assert ran[("lamb", "torch AdamW")]["state_dtype"] == "float32"
    assert ran[("lamb", "lamb_kernels FusedLAMB (cpp)")]["coded_share"] == 0.0
    assert ran[("lamb", "lamb_kernels FusedLAMB (cpp)")]["all_reduces_per_step"] == 2
    assert ran[("lamb", "lamb_kernels FusedLAMB (torch)")]["all_reduces_per_step"] == 2
    assert ran[("lars", "lamb_kernels FusedLARS (cpp)")]["all_reduces_per_step"] == 1
    assert ran[("lamb", "torch AdamW")]["all_reduces_per_step"] == 0
    assert ran[("lars", "torch SGD momentum")]["ratio_to_yardstick"] == 1.0
    for row in ran.values():
        assert row["world_size"] == 2 and row["median_ms"] > 0 and row["tensors"] == 5
    with open(tmp_path / "distributed.csv", newline="", encoding="utf-8") as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) and set(written[0]) == set(bench.distributed.COLUMNS)
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "distributed.png").stat().st_size > 0


def test_distributed_benchmark_refuses_bad_arguments(capsys):
    import bench.distributed

    for argv, message in ((["--world-sizes", "two"], "whole numbers"), (["--world-sizes", "0"], "at least 1"),
                          (["--preset", "huge"], "not a preset"), (["--algorithms", "adam"], "choose from")):
        with pytest.raises(SystemExit):
            bench.distributed.parse_args(argv)
        assert message in capsys.readouterr().err


def test_stage_bytes_are_spec_section_4_stage_by_stage():
    assert stage_bytes("lamb", clipping=True) == {"grad norm": 4, "moments": 24, "apply": 16}
    assert stage_bytes("lamb", clipping=False) == {"moments": 24, "apply": 16}
    assert stage_bytes("lars", clipping=True) == {"norms": 8, "apply": 20}
    # bf16 params and grads with fp32 masters: the passes read and write the master, and apply also
    # writes the bf16 param.
    assert stage_bytes("lamb", True, 2, True) == {"grad norm": 2, "moments": 4 + 2 + 16, "apply": 4 + 8 + 4 + 2}
    assert stage_bytes("lars", True, 2, True) == {"norms": 4 + 2, "apply": 4 + 2 + 4 + 4 + 4 + 2}
    for algorithm in ("lamb", "lars"):
        for args in ((True,), (False,), (True, 2), (True, 2, True)):
            assert sum(stage_bytes(algorithm, *args).values()) == bytes_moved(algorithm, "ours", *args)


def test_stages_on_the_tiny_preset_time_every_stage_of_every_backend(tmp_path, capsys):
    rows = main(["--stages", "--preset", "tiny", "--device", "cpu", "--repeats", "2", "--warmup", "1",
                 "--out", str(tmp_path)])
    import lamb_kernels

    backends = [name for name in lamb_kernels.available_backends("cpu") if name != "triton"]
    expected = [(algorithm, backend, stage) for algorithm in ("lamb", "lars") for backend in backends
                for stage in [*stage_bytes(algorithm, True), "update"]]
    assert [(row["algorithm"], row["backend"], row["stage"]) for row in rows] == expected
    numel = sum(p.numel() for p in make_params(preset_shapes("tiny"), "cpu", torch.float32))
    for row in rows:
        assert row["status"] == "ok", row
        passes = stage_bytes(row["algorithm"], True)
        # the update is charged the bytes of the passes it replaces (all but the grad norm)
        expected_bytes = passes.get(row["stage"], sum(b for stage, b in passes.items() if stage != "grad norm"))
        assert row["bytes_per_param"] == expected_bytes
        assert math.isclose(row["gb_per_s"], row["bytes_per_param"] * numel / (row["median_ms"] / 1e3) / 1e9)
        assert math.isclose(row["pct_of_copy"], 100 * row["gb_per_s"] / row["copy_gb_per_s"])
    with open(tmp_path / "stages.csv", newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "stages.png").exists() or importlib.util.find_spec("matplotlib") is None
    assert "moments" in capsys.readouterr().out


def test_gpu_run_script_runs_its_steps_dry_on_the_cpu(tmp_path):
    """bench/gpu_run.sh with DRY_RUN=1: every step of the GPU run on the CPU, its files within the
    loan's limits (at most 8, one folder deep), the summary printed, exit status 0."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "gpu")}
    run = subprocess.run(["bash", str(root / "bench" / "gpu_run.sh")], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = sorted(p.relative_to(tmp_path / "gpu") for p in (tmp_path / "gpu").rglob("*") if p.is_file())
    assert 0 < len(files) <= 8 and all(len(p.parts) <= 2 for p in files), files
    assert {"versions.txt", "tests.txt", "many-small/steps.csv", "stages/stages.csv",
            "stages-int8/stages.csv"} <= {str(p) for p in files}
    tests_line = next(line for line in run.stdout.splitlines() if line.startswith("== tests:"))
    assert "skipped" in tests_line and "failed" not in tests_line and "error" not in tests_line  # (gpu-marked)
    assert "FusedLAMB cpp" in run.stdout and "cpp: apply" in run.stdout


def test_int8_states_are_charged_their_bytes():
    """A byte per state and element, and its share of its block's float32 scale (4 / 256), read and
    written with the codes: LAMB 4 + (4 + 4 + 2 x 1.016 read, 2 x 1.016 written) + (4 + 2 x 1.016 read,
    4 written) = 26.09 bytes per fp32 parameter; LARS 8 + (4 + 4 + 1.016 read, 4 + 1.016 written) = 22.03."""
    state = STATE_BYTES["int8"]
    assert state == 1 + 4 / 256 and STATE_DTYPES["int8"] == "int8"
    assert bytes_moved("lamb", "ours", True, 4, False, state) == pytest.approx(26.09375)
    assert bytes_moved("lars", "ours", True, 4, False, state) == pytest.approx(22.03125)
    assert stage_bytes("lamb", False, 4, False, state) == {"moments": pytest.approx(12.0625),
                                                            "apply": pytest.approx(10.03125)}


def test_host_bound_presets_are_tiny_tensors():
    assert preset_shapes("host-bound") == [(16,)] * 1000
    assert preset_shapes("host-bound-200") == [(16,)] * 200


def test_bf16_states_are_charged_their_bytes():
    """SPEC section 4 with 2-byte m and v: LAMB 4 + (4 + 4 + 2 + 2 read, 2 + 2 written) + (4 + 2 + 2
    read, 4 written) = 32 bytes per fp32 parameter with clipping, 28 without; with a 2-byte buffer,
    LARS (4 + 4) + (4 + 4 + 2 read, 4 + 2 written) = 24."""
    assert stage_bytes("lamb", True, 4, False, 2) == {"grad norm": 4, "moments": 16, "apply": 12}
    assert bytes_moved("lamb", "ours", True, 4, False, 2) == 32
    assert bytes_moved("lamb", "ours", False, 4, False, 2) == 28
    # bf16 params with fp32 masters: g 2; master 4, g 2, m v 2 + 2 read and written; master 4, m v, master 4, copy 2.
    assert bytes_moved("lamb", "ours", True, 2, True, 2) == 2 + (4 + 2 + 4 + 4) + (4 + 4 + 4 + 2)
    assert bytes_moved("lars", "ours", True, 4, False, 2) == 24 and bytes_moved("lars", "ours", True) == 28


def test_state_dtype_option_on_the_tiny_preset(tmp_path, capsys):
    rows = main(["--preset", "tiny", "--device", "cpu", "--backends", "cpp", "--state-dtype", "bfloat16",
                 "--no-compile", "--repeats", "2", "--warmup", "1", "--out", str(tmp_path)])
    ours = {(r["algorithm"], r["provider"]): r for r in rows if r["role"] == "ours"}
    lamb = ours[("lamb", "lamb_kernels FusedLAMB cpp")]
    lars = ours[("lars", "lamb_kernels FusedLARS cpp")]
    assert (lamb["state_dtype"], lamb["bytes_per_param"]) == ("bfloat16", 32)
    assert (lars["state_dtype"], lars["bytes_per_param"]) == ("bfloat16", 24)
    yardstick = next(r for r in rows if r["role"] == "yardstick" and r["algorithm"] == "lamb")
    assert yardstick["state_dtype"] == "float32"
