"""The masked-language-model study (python -m bench.convergence --task mlm, bench/convergence_mlm.py
and bench/mlm_data.py): the corpus and its splits, the tokenizer, BERT's masking, the loss taken at
the masked positions only, the LR rules, the grid at the ends, determinism and what it writes; on
tiny configurations."""
import csv
import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from bench import convergence_mlm, mlm_data  # noqa: E402
from bench.convergence import Run, main, parse_args, run_study, train  # noqa: E402


def test_the_corpus_is_the_standard_library_docstrings_split_by_file():
    splits = mlm_data.corpus()
    assert set(splits) == {"train", "validation", "test"}
    assert len(splits["train"]) > 1000 and len(splits["validation"]) > 50 and len(splits["test"]) > 50
    # A file's docstrings go to one split, chosen by its path alone: about 5% each held out.
    shares = [mlm_data._split_of(f"module{i}.py") for i in range(2000)]
    assert 0.02 < shares.count("validation") / 2000 < 0.08 and 0.02 < shares.count("test") / 2000 < 0.08


def test_the_vocabulary_is_the_most_frequent_training_words_after_the_specials():
    vocabulary = mlm_data.vocabulary()
    assert vocabulary[:5] == mlm_data.SPECIALS and len(vocabulary) == mlm_data.VOCAB == len(set(vocabulary))
    assert "the" in vocabulary[:10] and "return" in vocabulary
    assert mlm_data.vocabulary.__wrapped__() == vocabulary  # built afresh: the same words in the same order
    assert mlm_data.words("Return x.sum() of 12 items!") == ["return", "x", ".", "sum", "(", ")", "of", "12",
                                                              "items", "!"]
    streams = mlm_data.token_streams()
    assert streams["train"].dtype == torch.int64 and int(streams["train"].max()) < mlm_data.VOCAB
    assert float((streams["train"] == mlm_data.UNK).float().mean()) < 0.05


def test_masking_as_bert_fifteen_percent_eighty_ten_ten():
    tokens = mlm_data.sequences("train", limit=512)
    inputs, labels = mlm_data.mask(tokens, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert abs(float(chosen.float().mean()) - 0.15) < 0.01
    assert torch.equal(labels[chosen], tokens[chosen]) and torch.equal(inputs[~chosen], tokens[~chosen])
    masked = float((inputs[chosen] == mlm_data.MASK).float().mean())
    kept = float((inputs[chosen] == tokens[chosen]).float().mean())
    assert abs(masked - 0.8) < 0.02 and 0.08 < kept < 0.13  # (10% kept, plus random tokens that hit the same word)
    again = mlm_data.mask(tokens, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)


def test_the_loss_at_the_masked_positions_is_bert_for_masked_lms_own():
    net = convergence_mlm.model(0)
    tokens = mlm_data.sequences("validation", limit=4)
    inputs, labels = mlm_data.mask(tokens, torch.Generator().manual_seed(1))
    ours = F.cross_entropy(*convergence_mlm.masked_logits(net, inputs, labels))
    theirs = net(input_ids=inputs, labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_lr_rules_sqrt_for_lamb_linear_for_adamw_and_lars():
    base = convergence_mlm.BASE_BATCH
    for name, factor in (("FusedLAMB", 8.0), ("FusedLAMB-int8", 8.0), ("AdamW", 64.0), ("FusedLARS", 64.0)):
        assert convergence_mlm.scaled_lr(name, 64 * base) == pytest.approx(factor * convergence_mlm.RECIPES[name].base_lr)


def test_defaults_span_64x_and_the_grid_runs_only_at_the_ends(capsys):
    full, _ = parse_args(["--task", "mlm"])
    quick, _ = parse_args(["--task", "mlm", "--quick"])
    assert max(full.batch_sizes) / min(full.batch_sizes) >= 64 and len(full.seeds) >= 2 and len(full.lr_grid) >= 3
    assert quick.seeds == (0,) and quick.lr_grid == (1.0,)
    assert set(full.optimizers) == {"FusedLAMB", "FusedLAMB-bf16", "FusedLAMB-int8", "AdamW", "FusedLARS"}
    study, _ = parse_args(["--task", "mlm", "--batch-sizes", "8,16,32", "--lr-grid", "0.5,2", "--seeds", "1",
                           "--optimizers", "AdamW", "--train-size", "64", "--epochs", "1", "--workers", "1"])
    assert study.lr_grid == (0.5, 1.0, 2.0)  # the rule's own LR is always run
    calls = []
    import bench.convergence as module

    original = module.train
    module.train = lambda s, run: calls.append(run) or dict(val_acc=0.0)
    try:
        run_study(study)
    finally:
        module.train = original
    assert sorted((r.batch_size, r.lr_multiplier) for r in calls) == [
        (8, 0.5), (8, 1.0), (8, 2.0), (16, 1.0), (32, 0.5), (32, 1.0), (32, 2.0)]
    for argv, message in ((["--optimizers", "SGD"], "unknown SGD"), (["--train-size", "0"], "--train-size"),
                          (["--batch-sizes", "99999"], "--batch-sizes"), (["--warmup", "2"], "--warmup")):
        with pytest.raises(SystemExit):
            parse_args(["--task", "mlm", *argv])
        assert message in capsys.readouterr().err, argv


def test_a_tiny_study_is_deterministic_and_writes_its_files(tmp_path):
    study, _ = parse_args(["--task", "mlm", "--train-size", "32", "--batch-sizes", "8", "--epochs", "1",
                           "--seeds", "1", "--lr-grid", "1", "--workers", "1", "--backend", "torch"])
    first = train(study, Run("FusedLAMB-int8", 8, 1.0, 0))
    second = train(study, Run("FusedLAMB-int8", 8, 1.0, 0))
    first.pop("seconds"), second.pop("seconds")
    assert first == second and first["steps"] == 4 and first["status"] == "ok"
    assert 0 <= first["val_acc"] <= 1 and first["val_loss"] < 9  # about ln(4096) = 8.3 untrained
    out = tmp_path / "mlm"
    assert main(["--task", "mlm", "--quick", "--train-size", "32", "--batch-sizes", "8,16", "--epochs", "1",
                 "--optimizers", "FusedLAMB,AdamW", "--workers", "1", "--out", str(out)]) == 0
    with open(out / "runs.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["optimizer"] for r in rows} == {"FusedLAMB", "AdamW"}
    settings = json.loads((out / "settings.json").read_text())
    assert settings["task"] == "mlm" and settings["corpus"]["tokens"]["train"] > 100_000
    assert settings["model"]["num_hidden_layers"] == 2 and (out / "summary.csv").exists()
