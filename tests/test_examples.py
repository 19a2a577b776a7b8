"""The training examples end to end on their --tiny settings (CPU): the loss falls, and (the BERT and
LARS scripts) a run stopped and resumed from its checkpoint continues exactly as an uninterrupted
one; the optimizers also train inside Hugging Face's Trainer and PyTorch Lightning."""
import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bert_pretraining_with_lamb_learns_and_resumes(tmp_path):
    pytest.importorskip("transformers", reason="the BERT example needs the examples extra: pip install -e '.[examples]'")
    example = load("bert_pretrain")
    straight = example.main(["--tiny", "--steps", "30", "--out", str(tmp_path / "straight")])
    first, last = straight[:5], straight[-5:]
    assert sum(e["loss"] for e in last) < sum(e["loss"] for e in first) - 5 * 0.1, (first, last)
    assert straight[0]["lr"] < straight[2]["lr"] and straight[-1]["lr"] == 0.0  # warmup, then decay to 0
    resumed_dir = str(tmp_path / "resumed")
    stopped = example.main(["--tiny", "--steps", "30", "--stop-after", "18", "--out", resumed_dir])
    assert [e["step"] for e in stopped] == list(range(1, 19))
    resumed = example.main(["--tiny", "--steps", "30", "--resume", "--out", resumed_dir])
    assert [e["step"] for e in resumed] == list(range(19, 31))
    assert [(e["loss"], e["lr"]) for e in resumed] == [(e["loss"], e["lr"]) for e in straight[18:]]


def test_large_batch_lars_learns_and_resumes(tmp_path):
    example = load("lars_large_batch")
    straight = example.main(["--tiny", "--out", str(tmp_path / "straight")])
    assert straight[-1]["loss"] < straight[0]["loss"] - 0.2 and straight[-1]["accuracy"] > 0.3, straight
    resumed_dir = str(tmp_path / "resumed")
    example.main(["--tiny", "--stop-after", "3", "--out", resumed_dir])
    resumed = example.main(["--tiny", "--resume", "--out", resumed_dir])
    assert [e["epoch"] for e in resumed] == [4, 5, 6]
    assert [(e["loss"], e["accuracy"]) for e in resumed] == [(e["loss"], e["accuracy"]) for e in straight[3:]]


def test_hugging_face_trainer_takes_fused_lamb_and_its_schedule(tmp_path):
    pytest.importorskip("transformers", reason="the Trainer example needs transformers: pip install -e '.[examples]'")
    pytest.importorskip("accelerate", reason="Hugging Face's Trainer needs accelerate: pip install -e '.[examples]'")
    example = load("hf_trainer")
    log = example.main(["--tiny", "--steps", "30", "--out", str(tmp_path)])
    assert [e["step"] for e in log] == [10, 20, 30]
    assert log[-1]["loss"] < log[0]["loss"] - 0.3, log
    # The example's schedule (peak 1.8e-2), not Trainer's default (linear decay from 5e-5).
    assert log[0]["lr"] > 1e-2 and log[0]["lr"] > log[1]["lr"] > log[2]["lr"], log


@pytest.mark.parametrize("optimizer", ["lamb", "lars"])
def test_lightning_module_learns_with_fused_lamb_and_lars(optimizer):
    pytest.importorskip("lightning", reason="the Lightning example needs lightning: pip install -e '.[examples]'")
    example = load("lightning_module")
    losses = example.main(["--tiny", "--optimizer", optimizer])
    assert len(losses) == 60
    assert sum(losses[-10:]) < sum(losses[:10]) - 10 * 0.5, (losses[:10], losses[-10:])
