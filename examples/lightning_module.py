"""FusedLAMB or FusedLARS in a PyTorch Lightning module: a small classifier on generated data.

    pip install -e ".[examples]"                                  # lightning among them
    python examples/lightning_module.py --tiny                    # CPU, seconds
    python examples/lightning_module.py --optimizer lars --tiny   # FusedLARS instead
    python examples/lightning_module.py                           # a GPU, larger batch and model

The data: random inputs, labelled by a fixed random "teacher" network, so the labels can be learned
and the loss falls. `configure_optimizers` returns the optimizer and a per-step schedule (linear
warmup, then linear decay to zero) in Lightning's dict format. Lightning clips grads only when the
Trainer's `gradient_clip_val` is set; it is left unset, and FusedLAMB clips the global grad norm
inside its step (`max_grad_norm=1.0`). `param_groups` keeps weight decay and the trust ratio off
biases and LayerNorm weights.
"""
from __future__ import annotations

import argparse
import math

import lightning as L
import torch
import torch.nn.functional as F

from lamb_kernels import FusedLAMB, FusedLARS, param_groups


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small model, 60 steps, on CPU")
    parser.add_argument("--optimizer", choices=("lamb", "lars"), default="lamb")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 60 tiny, 2000)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 tiny, 8192")
    parser.add_argument("--train-size", type=int, default=None, help="examples (default: 16384 tiny, 262144)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak lr (default: 1e-2 for LAMB, 2.0 for LARS, whose trust ratio is small)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.steps = args.steps or (60 if args.tiny else 2000)
    args.batch_size = args.batch_size or (256 if args.tiny else 8192)
    args.train_size = args.train_size or (16384 if args.tiny else 262144)
    args.lr = args.lr or (1e-2 if args.optimizer == "lamb" else 2.0)
    return args


def teacher_data(count: int, features: int, classes: int, seed: int) -> torch.utils.data.TensorDataset:
    """Random inputs with the labels a fixed random two-layer network gives them."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count, features, generator=gen)
    hidden = torch.tanh(inputs @ torch.randn(features, 64, generator=gen))
    labels = (hidden @ torch.randn(64, classes, generator=gen)).argmax(1)
    return torch.utils.data.TensorDataset(inputs, labels)


class Classifier(L.LightningModule):
    def __init__(self, features: int, width: int, classes: int, optimizer: str, lr: float, steps: int):
        super().__init__()
        self.save_hyperparameters()
        self.model = torch.nn.Sequential(
            torch.nn.Linear(features, width), torch.nn.LayerNorm(width), torch.nn.GELU(),
            torch.nn.Linear(width, width), torch.nn.LayerNorm(width), torch.nn.GELU(),
            torch.nn.Linear(width, classes))
        self.losses = []

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        loss = F.cross_entropy(self.model(inputs), labels)
        self.log("loss", loss, prog_bar=True)
        self.losses.append(loss.detach())  # read after training: no host sync per step
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "lamb":
            groups = param_groups(self.model, 0.01, no_decay=("bias", "LayerNorm"))
            optimizer = FusedLAMB(groups, lr=hp.lr, max_grad_norm=1.0)
        else:
            groups = param_groups(self.model, 5e-4)
            optimizer = FusedLARS(groups, lr=hp.lr, momentum=0.9)
        warmup = max(1, hp.steps // 10)

        def warmup_then_decay(step):
            return (step + 1) / warmup if step < warmup else max(0.0, 1 - (step - warmup) / max(1, hp.steps - warmup))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def main(argv=None) -> list:
    """Train, and return the loss of every step."""
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    features, classes = (32, 8) if args.tiny else (256, 100)
    data = teacher_data(args.train_size, features, classes, args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
    module = Classifier(features, 128 if args.tiny else 1024, classes, args.optimizer, args.lr, args.steps)
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu" if args.tiny else "auto", devices=1,
                        logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, loader)
    losses = torch.stack(module.losses).tolist()
    first, last = losses[:10], losses[-10:]
    print(f"{args.optimizer}: mean loss {math.fsum(first) / len(first):.4f} over the first 10 steps, "
          f"{math.fsum(last) / len(last):.4f} over the last 10")
    return losses


if __name__ == "__main__":
    main()
