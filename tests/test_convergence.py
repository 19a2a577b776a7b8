"""The convergence study (python -m bench.convergence): its task, model, learning-rate rules and
schedule, the choice of LR on validation, determinism, what it writes, and its argument checks; on
tiny configurations (a few hundred images, one or two epochs)."""
import csv
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import bench.convergence as study_module
from bench.convergence import (
    BASE_BATCH, DEFAULT_OPTIMIZERS, RECIPES, RUN_COLUMNS, SUMMARY_COLUMNS, Run, Study, build_optimizer, lr_factor, main, parse_args,
    run_study, scaled_lr, summarise, train, write_png,
)
from bench.report import Progress
from bench.convergence_data import CLASSES, PatchCNN, _masks, make_shapes
from tolerances import FORWARD_TOL


def tiny_study(**changes) -> Study:
    settings = dict(optimizers=tuple(RECIPES), batch_sizes=(16, 64), seeds=(0,), lr_grid=(1.0,), epochs=1,
                    train_size=256, noise=0.25, warmup_fraction=0.1, decay_power=1.0, backend="torch", workers=1)
    settings.update(changes)
    return Study(**settings)


def test_shapes_are_the_same_every_time_and_balanced():
    images, labels = make_shapes(60, seed=5, noise=0.25)
    again_images, again_labels = make_shapes(60, seed=5, noise=0.25)
    assert images.shape == (60, 1, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.equal(images, again_images) and torch.equal(labels, again_labels)
    assert torch.bincount(labels, minlength=len(CLASSES)).tolist() == [6] * len(CLASSES)
    other_images, other_labels = make_shapes(60, seed=6, noise=0.25)
    assert not torch.equal(images, other_images) and not torch.equal(labels, other_labels)


def test_every_class_is_its_own_shape_and_visible_without_noise():
    grid = torch.arange(16, dtype=torch.float32)
    dy, dx = grid.view(1, 16, 1) - 7.0, grid.view(1, 1, 16) - 7.0  # outlines on the pixel grid
    half_size = torch.full((1, 1, 1), 4.0)
    masks = [_masks(label, dy, dx, half_size) for label in range(len(CLASSES))]
    for i, mask in enumerate(masks):
        assert 0 <= float(mask.min()) and 0.8 < float(mask.max()) <= 1, CLASSES[i]
        assert mask.sum() < 0.8 * 256, CLASSES[i]  # a shape, not the whole image
        for j in range(i):
            assert (mask - masks[j]).abs().sum() > 5, (CLASSES[i], CLASSES[j])
    images, labels = make_shapes(400, seed=0, noise=0.0)
    assert images.min() >= 0 and images.amax(dim=(1, 2, 3)).min() > 0.3  # every image shows its shape
    noisy, noisy_labels = make_shapes(400, seed=0, noise=0.25)
    assert torch.equal(labels, noisy_labels)
    assert float((noisy - images).std()) == pytest.approx(0.25, rel=0.02)


def test_patch_cnn_layers_are_convolutions_with_kernel_equal_to_stride():
    torch.manual_seed(0)
    model = PatchCNN(width=8)
    images = torch.randn(3, 1, 16, 16)

    def as_conv(linear, channels, k):  # (out, k*k*channels), (ky, kx, c) order -> (out, c, ky, kx)
        return linear.weight.view(-1, k, k, channels).permute(0, 3, 1, 2)

    x = F.relu(F.conv2d(images, as_conv(model.conv1, 1, 4), model.conv1.bias, stride=4))
    x = F.relu(F.conv2d(x, as_conv(model.conv2, 8, 2), model.conv2.bias, stride=2))
    expected = model.head(x.permute(0, 2, 3, 1).flatten(1))  # the head reads the map channels-last
    torch.testing.assert_close(model(images), expected, rtol=FORWARD_TOL, atol=FORWARD_TOL)
    assert sum(p.numel() for p in PatchCNN().parameters()) == 11_370


def test_learning_rate_rules_square_root_for_lamb_and_adamw_linear_for_lars_and_sgd():
    assert {name: recipe.rule for name, recipe in RECIPES.items()} == {
        "FusedLAMB": "sqrt", "AdamW": "sqrt", "FusedLARS": "linear", "SGD": "linear", "FusedLAMB-bf16": "sqrt",
        "FusedLARS-bf16": "linear", "FusedLAMB-int8": "sqrt", "FusedLARS-int8": "linear"}
    for name, recipe in RECIPES.items():
        assert scaled_lr(name, BASE_BATCH) == recipe.base_lr
        growth = 2.0 if recipe.rule == "sqrt" else 4.0
        assert scaled_lr(name, 4 * BASE_BATCH) == pytest.approx(growth * recipe.base_lr)
        assert scaled_lr(name, BASE_BATCH // 4) == pytest.approx(recipe.base_lr / growth)


def test_schedule_warms_up_linearly_then_decays_polynomially_to_zero():
    total, warmup = 100, 10
    factors = [lr_factor(step, total, warmup, 1.0) for step in range(total)]
    assert factors[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert factors[warmup] == 1.0 and factors[-1] == pytest.approx(1 / 90)
    assert all(a > b for a, b in zip(factors[warmup:], factors[warmup + 1:]))
    assert lr_factor(55, total, warmup, 2.0) == pytest.approx(0.5 ** 2)
    assert lr_factor(0, 1, 1, 1.0) == 1.0  # a one-step run takes its step at the peak LR


@pytest.mark.parametrize("optimizer", list(RECIPES))
def test_each_step_uses_the_scaled_lr_times_the_schedule(optimizer, monkeypatch):
    study = tiny_study(train_size=128, epochs=2, warmup_fraction=0.25)
    seen = []
    build = study_module.build_optimizer

    def recording_build(*args):
        opt = build(*args)
        opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
        return opt

    monkeypatch.setattr(study_module, "build_optimizer", recording_build)
    row = train(study, Run(optimizer, 16, 2.0, 0))
    peak = 2.0 * scaled_lr(optimizer, 16)
    assert row["lr"] == pytest.approx(peak) and row["steps"] == 16 == len(seen) and row["warmup_steps"] == 4
    assert seen == pytest.approx([peak * lr_factor(step, 16, 4, 1.0) for step in range(16)])


def test_a_run_starts_from_its_seeds_weights_on_one_thread(monkeypatch):
    starts, threads = [], []
    build = study_module.build_optimizer

    def recording_build(name, model, lr, backend):
        starts.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        threads.append(torch.get_num_threads())
        return build(name, model, lr, backend)

    monkeypatch.setattr(study_module, "build_optimizer", recording_build)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for seed in (0, 0, 1):
            train(tiny_study(), Run("SGD", 64, 1.0, seed))
        assert torch.get_num_threads() == 2  # the caller's threads given back
    finally:
        torch.set_num_threads(before)
    assert torch.equal(starts[0], starts[1]) and not torch.equal(starts[0], starts[2])
    assert threads == [1, 1, 1]


@pytest.mark.parametrize("optimizer", list(RECIPES))
def test_small_batch_training_learns_the_task(optimizer):
    study = tiny_study(train_size=4096, epochs=3)
    row = train(study, Run(optimizer, 32, 1.0, 0))
    assert row["status"] == "ok"
    assert row["test_acc"] > 0.25 and row["val_acc"] > 0.25  # chance is 0.1
    # the last epoch's mean loss: below ln 10 = 2.30 (a uniform guess), far from 0 after 3 epochs
    assert 0.5 < row["final_train_loss"] < 2.0


def test_the_last_partial_batch_of_an_epoch_is_dropped():
    row = train(tiny_study(train_size=100, epochs=2), Run("SGD", 16, 1.0, 0))
    assert row["steps"] == 2 * 6 and row["status"] == "ok"


def test_a_run_that_blows_up_is_marked_diverged():
    row = train(tiny_study(), Run("SGD", 16, 1e6, 0))
    assert row["status"] == "diverged" and math.isnan(row["final_train_loss"])


def test_runs_are_deterministic_whatever_the_number_of_workers():
    # Runs this small do not split work across threads: that each run is pinned to one thread, which is
    # what makes bigger runs independent of the workers, is checked above.
    study = tiny_study(optimizers=("FusedLAMB", "SGD"), batch_sizes=(32,), seeds=(0, 1), train_size=128)

    def results(rows):
        return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]

    alone = results(run_study(study, Progress(1, _Sink())))
    assert alone == results(run_study(study, Progress(1, _Sink())))
    assert alone == results(run_study(dataclasses.replace(study, workers=2), Progress(1, _Sink())))
    assert alone[0]["test_acc"] != alone[1]["test_acc"] or alone[0]["val_loss"] != alone[1]["val_loss"]  # seeds differ


class _Sink:
    def write(self, text):
        pass

    def flush(self):
        pass


def _row(optimizer, batch, multiplier, seed, val, test):
    return dict(optimizer=optimizer, batch_size=batch, lr_multiplier=multiplier, seed=seed, val_acc=val,
                test_acc=test, rule="sqrt", lr=multiplier * 0.01, steps=10, status="ok", final_train_loss=1.0,
                test_loss=1.0, backend="torch.optim")


def test_the_lr_multiple_is_chosen_on_validation_never_on_test():
    rows = [_row("AdamW", 64, 1.0, 0, 0.70, 0.90), _row("AdamW", 64, 1.0, 1, 0.72, 0.92),
            _row("AdamW", 64, 2.0, 0, 0.80, 0.60), _row("AdamW", 64, 2.0, 1, 0.78, 0.70),
            _row("SGD", 64, 0.5, 0, 0.5, 0.5), _row("SGD", 64, 1.0, 0, 0.5, 0.4)]
    adamw, sgd = summarise(rows)
    assert adamw["lr_multiplier"] == 2.0 and adamw["lr_grid"] == "1 2"
    assert adamw["test_acc_mean"] == pytest.approx(0.65) and adamw["test_acc_std"] == pytest.approx(0.0707107)
    assert (adamw["test_acc_min"], adamw["test_acc_max"]) == (0.60, 0.70)
    assert adamw["test_acc_at_x1_mean"] == pytest.approx(0.91)
    assert sgd["lr_multiplier"] == 0.5  # a tie goes to the smaller LR
    assert adamw["seeds"] == "0 1" and sgd["seeds"] == "0"


def test_diverged_runs_are_counted_and_a_grid_without_x1_still_charts(tmp_path):
    rows = [_row("SGD", 64, 0.25, seed, 0.5, 0.5) for seed in (0, 1)] + [_row("SGD", 128, 0.25, 0, 0.4, 0.4),
                                                                         _row("SGD", 128, 0.25, 1, 0.1, 0.1)]
    rows[-1]["status"] = "diverged"
    summary = summarise(rows)
    assert [s["diverged"] for s in summary] == [0, 1] and all(s["test_acc_at_x1_mean"] is None for s in summary)
    assert write_png(summary, tmp_path / "chart.png", "title") is None
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_that_fails_in_a_worker_fails_the_study():
    study = tiny_study(optimizers=("FusedLAMB",), batch_sizes=(64,), seeds=(0, 1, 2), train_size=64,
                       backend="no-such-backend", workers=2)
    with pytest.raises(ValueError, match="no-such-backend"):
        run_study(study, Progress(1, _Sink()))


def test_tiny_study_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    code = main(["--train-size", "256", "--batch-sizes", "16,64", "--epochs", "1", "--seeds", "2",
                 "--lr-grid", "0.5,1", "--workers", "1", "--backend", "torch", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    assert "100.0%" in printed.err and "FusedLAMB" in printed.out and "32 runs" in printed.out
    with open(out / "runs.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 4 * 2 * 2 * 2 and tuple(runs[0]) == RUN_COLUMNS
    assert {(r["optimizer"], int(r["batch_size"]), float(r["lr_multiplier"]), int(r["seed"])) for r in runs} == {
        (o, b, m, s) for o in DEFAULT_OPTIMIZERS for b in (16, 64) for m in (0.5, 1.0) for s in (0, 1)}
    for r in runs:
        assert r["status"] == "ok" and 0 <= float(r["test_acc"]) <= 1 and r["date"] and r["torch"] == torch.__version__
        assert r["backend"] == ("torch" if r["optimizer"].startswith("Fused") else "torch.optim") and r["machine"]
        assert (r["val_acc"], r["val_loss"]) != (r["test_acc"], r["test_loss"])  # two different splits
        assert int(r["steps"]) == 256 // int(r["batch_size"])
        assert float(r["lr"]) == pytest.approx(float(r["lr_multiplier"]) * scaled_lr(r["optimizer"], int(r["batch_size"])))
    with open(out / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 8 and tuple(summary[0]) == SUMMARY_COLUMNS
    assert all(s["seeds"] == "0 1" and s["lr_grid"] == "0.5 1" and s["lr_multiplier"] in ("0.5", "1") for s in summary)
    for s in summary:  # the figures of the chosen multiple's runs, as written in runs.csv
        chosen = [float(r["test_acc"]) for r in runs if (r["optimizer"], r["batch_size"], r["lr_multiplier"]) ==
                  (s["optimizer"], s["batch_size"], s["lr_multiplier"])]
        assert float(s["test_acc_mean"]) == pytest.approx(sum(chosen) / 2, abs=1e-5)
        assert (float(s["test_acc_min"]), float(s["test_acc_max"])) == (min(chosen), max(chosen))
    with open(out / "settings.json") as f:
        settings = json.load(f)
    assert settings["command"][3:] == ["--train-size", "256", "--batch-sizes", "16,64", "--epochs", "1", "--seeds",
                                       "2", "--lr-grid", "0.5,1", "--workers", "1", "--backend", "torch", "--out",
                                       str(out)]
    assert settings["seeds"] == [0, 1] and settings["data"]["seeds"] == {"train": 1, "validation": 2, "test": 3}
    assert settings["recipes"]["FusedLARS"]["rule"] == "linear" and settings["torch"] == torch.__version__
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_defaults_sweep_at_least_six_batch_sizes_over_64x_and_quick_is_one_seed_at_the_rules_lr():
    full, _ = parse_args([])
    quick, _ = parse_args(["--quick"])
    for study in (full, quick):
        assert len(study.batch_sizes) >= 6 and max(study.batch_sizes) >= 64 * min(study.batch_sizes)
        assert set(study.optimizers) == {"FusedLAMB", "FusedLARS", "AdamW", "SGD"}
    assert len(full.seeds) >= 3 and len(full.lr_grid) > 1 and 1.0 in full.lr_grid
    assert quick.seeds == (0,) and quick.lr_grid == (1.0,)


@pytest.mark.parametrize("argv, option", [
    (["--batch-sizes", "0,64"], "--batch-sizes"),
    (["--batch-sizes", ","], "--batch-sizes"),
    (["--lr-grid", ","], "--lr-grid"),
    (["--batch-sizes", "512", "--train-size", "256"], "--batch-sizes"),
    (["--seeds", "0"], "--seeds"),
    (["--lr-grid", "1,-2"], "--lr-grid"),
    (["--optimizers", "FusedLAMB,Adam"], "--optimizers"),
    (["--epochs", "0"], "--epochs"),
    (["--warmup", "1.5"], "--warmup"),
    (["--decay-power", "0"], "--decay-power"),
    (["--noise", "-1"], "--noise"),
    (["--workers", "0"], "--workers"),
    (["--backend", "tpu"], "--backend"),
    (["--state-dtypes", "float32,int4"], "--state-dtypes"),
])
def test_bad_arguments_are_refused_by_name(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and option in capsys.readouterr().err


def test_a_backend_that_cannot_run_here_is_refused_by_name_before_any_run(monkeypatch, tmp_path, capsys):
    import lamb_kernels.backends as ops

    monkeypatch.setattr(ops, "_unavailable_reason", lambda name, device_type: "switched off for this test")
    assert main(["--backend", "cpp", "--out", str(tmp_path / "never"), "--train-size", "64", "--batch-sizes", "64",
                 "--epochs", "1", "--seeds", "1", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "--backend" in err and "switched off for this test" in err
    assert not (tmp_path / "never").exists()


def test_state_dtypes_study_fused_lamb_with_each():
    both, _ = parse_args(["--quick", "--state-dtypes", "float32,bfloat16"])
    assert both.optimizers == ("FusedLAMB", "AdamW", "FusedLARS", "SGD", "FusedLAMB-bf16", "FusedLARS-bf16")
    only, _ = parse_args(["--optimizers", "FusedLAMB,AdamW", "--state-dtypes", "bfloat16"])
    assert only.optimizers == ("AdamW", "FusedLAMB-bf16")
    lars = build_optimizer("FusedLARS-bf16", torch.nn.Linear(3, 2), 0.1, "torch")
    assert lars.param_groups[0]["state_dtype"] == torch.bfloat16
    optimizer = build_optimizer("FusedLAMB-bf16", torch.nn.Linear(3, 2), 0.1, "torch")
    assert optimizer.param_groups[0]["state_dtype"] == torch.bfloat16
    every, _ = parse_args(["--optimizers", "FusedLAMB,FusedLARS", "--state-dtypes", "float32,int8,bfloat16"])
    assert every.optimizers == ("FusedLAMB", "FusedLARS", "FusedLAMB-bf16", "FusedLAMB-int8", "FusedLARS-bf16",
                                "FusedLARS-int8")
    for name in ("FusedLAMB-int8", "FusedLARS-int8"):
        assert build_optimizer(name, torch.nn.Linear(3, 2), 0.1, "torch").param_groups[0]["state_dtype"] == "int8"
    assert build_optimizer("FusedLARS", torch.nn.Linear(3, 2), 0.1, "torch").param_groups[0]["state_dtype"] == \
        torch.float32


def test_a_runs_row_takes_each_figure_from_its_own_place():
    """bench/training.run_row, which both studies' runs use: each split's accuracy and loss, the outcome
    and the recipe in their own columns, and every run column the studies do not add themselves."""
    from bench.training import run_row

    run = Run("AdamW", 128, 2.0, 1)
    row = run_row(run, RECIPES["AdamW"], lr=0.05, steps=40, warmup_steps=4, outcome=("diverged", 7.5),
                  validation=(0.25, 1.5), test=(0.75, 2.5), backend="torch.optim", momentum=None, started=0.0)
    assert (row["val_acc"], row["val_loss"], row["test_acc"], row["test_loss"]) == (0.25, 1.5, 0.75, 2.5)
    assert (row["status"], row["final_train_loss"], row["lr"], row["steps"], row["warmup_steps"]) == ("diverged", 7.5,
                                                                                                     0.05, 40, 4)
    assert (row["rule"], row["base_lr"], row["weight_decay"]) == (RECIPES["AdamW"].rule, RECIPES["AdamW"].base_lr,
                                                                  RECIPES["AdamW"].weight_decay)
    assert (row["optimizer"], row["batch_size"], row["lr_multiplier"], row["seed"]) == ("AdamW", 128, 2.0, 1)
    study_columns = {"date", "epochs", "warmup_fraction", "decay_power", "train_size", "noise", "lamb_kernels", "torch",
                     "python", "machine"}  # (main() adds them to every row)
    assert set(RUN_COLUMNS) - study_columns == set(row) and row["seconds"] > 0
