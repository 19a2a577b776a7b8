"""What both convergence studies share (bench/convergence.py, bench/convergence_mlm.py): an
optimizer's recipe and its scaled learning rate, the warmup-then-decay schedule, the training loop."""
from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Recipe:
    """How one optimizer is built and how its learning rate grows with the batch."""
    rule: str  # "sqrt" or "linear"
    base_lr: float  # at the study's base batch
    weight_decay: float

    def lr(self, batch_size: int, base_batch: int) -> float:
        """The base LR scaled from base_batch to batch_size by the rule."""
        ratio = batch_size / base_batch
        return self.base_lr * (math.sqrt(ratio) if self.rule == "sqrt" else ratio)


def lr_factor(step: int, total_steps: int, warmup_steps: int, power: float = 1.0) -> float:
    """Multiplier of the peak LR at 0-based `step`: linear warmup to 1 over warmup_steps, then
    polynomial decay towards 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = max(total_steps - warmup_steps, 1)
    return max(1.0 - (step - warmup_steps) / remaining, 0.0) ** power


def warmup_then_decay(optimizer, total_steps: int, warmup_fraction: float, power: float = 1.0) -> tuple:
    """(the LambdaLR scheduler of `lr_factor`, its warmup steps: at least 1)."""
    warmup_steps = max(1, round(warmup_fraction * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, total_steps=total_steps, warmup_steps=warmup_steps, power=power))
    return schedule, warmup_steps


def train_epochs(optimizer, schedule, epochs: int, size: int, batch_size: int, batch_loss, generator) -> tuple:
    """`epochs` passes over `size` examples in a fresh random order each (from `generator`), the last
    partial batch dropped: per batch, ``batch_loss(indices)``, backward, an optimizer step and a
    scheduler step. Returns (status, the last epoch's mean training loss): "diverged" as soon as an
    epoch's loss is not finite (later epochs could not recover NaN weights), else "ok"."""
    steps_per_epoch = size // batch_size
    train_loss = float("nan")
    for _ in range(epochs):
        order = torch.randperm(size, generator=generator)
        epoch_loss = torch.zeros(())
        for step in range(steps_per_epoch):
            loss = batch_loss(order[step * batch_size:(step + 1) * batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_loss += loss.detach()
        train_loss = float(epoch_loss) / steps_per_epoch
        if not math.isfinite(train_loss):
            return "diverged", train_loss
    return "ok", train_loss


def run_row(run, recipe: Recipe, *, lr: float, steps: int, warmup_steps: int, outcome: tuple, validation: tuple,
            test: tuple, backend: str, momentum, started: float) -> dict:
    """A run's row of runs.csv: the run and its recipe, its LR and steps, `outcome` (train_epochs'
    status and last epoch's loss), its (accuracy, loss) on the validation and test splits, and the
    seconds since `started` (a time.perf_counter() reading)."""
    status, train_loss = outcome
    return dict(asdict(run), rule=recipe.rule, base_lr=recipe.base_lr, weight_decay=recipe.weight_decay, lr=lr,
                steps=steps, momentum=momentum, backend=backend, warmup_steps=warmup_steps, status=status,
                final_train_loss=train_loss, val_acc=validation[0], val_loss=validation[1], test_acc=test[0],
                test_loss=test[1], seconds=time.perf_counter() - started)
