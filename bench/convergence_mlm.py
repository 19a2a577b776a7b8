"""The masked-language-model study (python -m bench.convergence --task mlm): a small BERT learns the
Python standard library's docstrings (bench/mlm_data.py) at batch sizes 64 times apart.

The model: transformers' ``BertForMaskedLM`` built from a config (nothing downloaded): 2 layers,
hidden 128, 2 heads, feed-forward 512, 32 positions, the 4096-word vocabulary, no dropout (a budget
this small underfits; dropout would only slow it), the output layer tied to the input embedding as
BERT's. Every run sees the same number of training tokens (``--epochs`` passes over the training
split), so a batch 64 times larger takes 64 times fewer steps. The learning rate follows each
optimizer's scaling rule from its base LR at ``BASE_BATCH`` sequences: the square root of the batch
ratio for FusedLAMB (You et al. 2019), linear for AdamW, as the LAMB paper scales its Adam baselines,
and for FusedLARS (the control); linear warmup over the first 10% of steps, then linear decay to 0.
An LR grid (``--lr-grid``) is tried at the smallest and the largest batch only, the multiple with the
best mean validation loss chosen per point; the test split is never used to choose.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lamb_kernels
from lamb_kernels.backends import resolve_backend

from . import mlm_data
from .training import Recipe, run_row, train_epochs, warmup_then_decay

BASE_BATCH = 8  # sequences of 32 tokens: the batch at which the base LRs were chosen
EVAL_SEQUENCES = 512  # per held-out split (16,384 tokens, about 2,450 masked)


RECIPES = {
    "FusedLAMB": Recipe("sqrt", 4e-3, 0.01),
    "FusedLAMB-bf16": Recipe("sqrt", 4e-3, 0.01),
    "FusedLAMB-int8": Recipe("sqrt", 4e-3, 0.01),
    "AdamW": Recipe("linear", 1e-3, 0.01),
    "FusedLARS": Recipe("linear", 2.0, 1e-4),
}
STATE_DTYPES = {"FusedLAMB": torch.float32, "FusedLAMB-bf16": torch.bfloat16, "FusedLAMB-int8": "int8",
                "FusedLARS": torch.float32}


@dataclass(frozen=True)
class MlmStudy:
    """The fields bench.convergence.run_study reads, and the MLM study's own."""
    optimizers: tuple
    batch_sizes: tuple
    seeds: tuple
    lr_grid: tuple
    epochs: int
    train_size: int  # training sequences
    warmup_fraction: float
    backend: str
    workers: int
    grid_at_ends: bool = True  # the LR grid at the smallest and largest batch only


def model(seed: int):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=mlm_data.VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=512, max_position_embeddings=mlm_data.SEQ_LEN, type_vocab_size=1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=mlm_data.PAD)
    return BertForMaskedLM(config)


def scaled_lr(name: str, batch_size: int) -> float:
    return RECIPES[name].lr(batch_size, BASE_BATCH)


def build_optimizer(name: str, net, lr: float, backend: str):
    """All parameters in one group, as a drop-in user writes it; apex's and timm's defaults otherwise
    (FusedLAMB clips the grad norm at 1, as apex)."""
    weight_decay = RECIPES[name].weight_decay
    if name.startswith("FusedLAMB"):
        return lamb_kernels.FusedLAMB(net.parameters(), lr=lr, weight_decay=weight_decay, backend=backend,
                                      state_dtype=STATE_DTYPES[name])
    if name == "FusedLARS":
        return lamb_kernels.FusedLARS(net.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, backend=backend)
    return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def masked_logits(net, inputs: torch.Tensor, labels: torch.Tensor) -> tuple:
    """(logits, targets) at the masked positions only: BertForMaskedLM's head applied where the loss
    is taken (the same loss as its `labels` argument gives, for about 1/7 of the head's work, which is
    most of this small model's)."""
    hidden = net.bert(input_ids=inputs).last_hidden_state
    chosen = labels != -100
    return net.cls(hidden[chosen]), labels[chosen]


@torch.no_grad()
def evaluate(net, split: str) -> tuple:
    """(masked-token accuracy, mean loss over the masked tokens) on a held-out split's fixed masks."""
    tokens = mlm_data.sequences(split, limit=EVAL_SEQUENCES)
    inputs, labels = mlm_data.mask(tokens, torch.Generator().manual_seed(mlm_data.EVAL_SEEDS[split]))
    logits, targets = masked_logits(net, inputs, labels)
    loss = F.cross_entropy(logits, targets)
    return float((logits.argmax(-1) == targets).float().mean()), float(loss)


def train(study: MlmStudy, run) -> dict:
    """One run on one CPU thread: its row of runs.csv (val_acc and test_acc: masked-token accuracy)."""
    started = time.perf_counter()
    sequences = mlm_data.sequences("train", limit=study.train_size)
    net = model(run.seed)
    lr = scaled_lr(run.optimizer, run.batch_size) * run.lr_multiplier
    optimizer = build_optimizer(run.optimizer, net, lr, study.backend)
    steps_per_epoch = sequences.shape[0] // run.batch_size
    total_steps = study.epochs * steps_per_epoch
    schedule, warmup_steps = warmup_then_decay(optimizer, total_steps, study.warmup_fraction)
    generator = torch.Generator().manual_seed(run.seed)  # (the order of the sequences, then each batch's masks)
    outcome = train_epochs(
        optimizer, schedule, study.epochs, sequences.shape[0], run.batch_size,
        lambda batch: F.cross_entropy(*masked_logits(net, *mlm_data.mask(sequences[batch], generator))), generator)
    net.eval()
    fused = run.optimizer.startswith("Fused")
    return run_row(run, RECIPES[run.optimizer], lr=lr, steps=total_steps, warmup_steps=warmup_steps, outcome=outcome,
                   validation=evaluate(net, "validation"), test=evaluate(net, "test"),
                   backend=resolve_backend(study.backend, torch.device("cpu")) if fused else "torch.optim (fused)",
                   momentum=0.9 if run.optimizer == "FusedLARS" else None, started=started)
