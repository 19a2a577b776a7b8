"""The training examples end to end on their --tiny settings (CPU): the loss falls, and a run
stopped and resumed from its checkpoint continues exactly as an uninterrupted one."""
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
