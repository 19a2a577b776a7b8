"""The training loop both convergence studies share (bench/convergence.py, bench/convergence_mlm.py)."""
from __future__ import annotations

import math

import torch


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
