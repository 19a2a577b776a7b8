"""Large-batch image classification with FusedLARS: the recipe of Goyal et al. (2017) and You et al.
(2017), in plain PyTorch (no torchvision needed).

    python examples/lars_large_batch.py --tiny               # CPU, seconds
    python examples/lars_large_batch.py --batch-size 8192    # a GPU

A convolutional classifier (conv, batch norm, ReLU blocks, then a linear head) in channels_last
memory format, on images generated here: each class is a striped pattern of its own orientation and
frequency under Gaussian noise, drawn from a seed, so nothing is downloaded. The recipe: the lr
scaled linearly with the batch size (lr = base_lr x batch / 256), a linear warmup over the first
epochs, then polynomial decay; weight decay and the layer-wise trust ratio only for the weights of
convolutions and the head (biases and batch-norm weights excluded by lamb_kernels.param_groups);
momentum 0.9. It logs loss, accuracy and lr per epoch, and checkpoints so that --resume continues.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from lamb_kernels import FusedLARS, param_groups


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small network and data set: CPU, seconds")
    parser.add_argument("--epochs", type=int, default=None, help="default: 6 tiny, 90")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 tiny, 4096")
    parser.add_argument("--base-lr", type=float, default=0.2, help="lr at batch 256 (default: 0.2)")
    parser.add_argument("--warmup-epochs", type=float, default=None, help="default: 1 tiny, 5")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--trust-coeff", type=float, default=0.001)
    parser.add_argument("--train-size", type=int, default=None, help="images (default: 2048 tiny, 65536)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="out/lars_large_batch", help="checkpoint folder")
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this epoch, as an interrupted run would (to try --resume)")
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (6 if args.tiny else 90)
    args.batch_size = args.batch_size or (256 if args.tiny else 4096)
    args.warmup_epochs = args.warmup_epochs if args.warmup_epochs is not None else (1 if args.tiny else 5)
    args.train_size = args.train_size or (2048 if args.tiny else 65536)
    return args


def stripes(count: int, classes: int, size: int, seed: int):
    """Images of striped patterns: class c has its own angle and frequency; a random phase and
    contrast per image, and noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (count,), generator=gen)
    angle = labels.float() * (torch.pi / classes)
    frequency = 2.0 + (labels % 3).float()
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    along = torch.cos(angle)[:, None, None] * xs + torch.sin(angle)[:, None, None] * ys
    phase = torch.rand(count, 1, 1, generator=gen) * 2 * torch.pi
    image = torch.sin(2 * torch.pi * frequency[:, None, None] * along + phase)
    image = image * (0.5 + torch.rand(count, 1, 1, generator=gen)) + 0.8 * torch.randn(count, size, size, generator=gen)
    return image.unsqueeze(1).repeat(1, 3, 1, 1), labels


def network(width: int, classes: int) -> torch.nn.Module:
    def block(cin, cout):
        return [torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False), torch.nn.BatchNorm2d(cout),
                torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(2)]

    return torch.nn.Sequential(*block(3, width), *block(width, 2 * width), *block(2 * width, 4 * width),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4 * width, classes))


def main(argv=None) -> list:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    classes, size = 10, (16 if args.tiny else 32)
    images, labels = stripes(args.train_size, classes, size, args.seed)
    model = network(16 if args.tiny else 64, classes).to(device, memory_format=torch.channels_last)

    # Linear scaling; biases and batch-norm weights get neither weight decay nor the trust ratio.
    lr = args.base_lr * args.batch_size / 256
    groups = param_groups(model, weight_decay=args.weight_decay)
    optimizer = FusedLARS(groups, lr=lr, momentum=0.9, trust_coeff=args.trust_coeff)
    steps_per_epoch = max(1, args.train_size // args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, 1 - (s - warmup) / max(1, total - warmup)) ** 2)

    os.makedirs(args.out, exist_ok=True)
    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    first_epoch = 0
    if args.resume and os.path.exists(checkpoint_path):
        saved = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        first_epoch = saved["epoch"]
        print(f"resumed after epoch {first_epoch}")

    log = []
    for epoch in range(first_epoch, args.epochs):
        order = torch.randperm(args.train_size, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        model.train()
        seen, loss_sum, correct = 0, 0.0, 0
        for step in range(steps_per_epoch):
            index = order[step * args.batch_size:(step + 1) * args.batch_size]
            x = images[index].to(device, memory_format=torch.channels_last)
            y = labels[index].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            seen += len(index)
            loss_sum += loss.item() * len(index)
            correct += int((logits.argmax(1) == y).sum())
        entry = {"epoch": epoch + 1, "loss": loss_sum / seen, "accuracy": correct / seen,
                 "lr": schedule.get_last_lr()[0]}
        log.append(entry)
        print(f"epoch {entry['epoch']:3d}  loss {entry['loss']:.4f}  accuracy {entry['accuracy']:.3f}  "
              f"lr {entry['lr']:.3e}", flush=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "epoch": epoch + 1}, checkpoint_path + ".tmp")
        os.replace(checkpoint_path + ".tmp", checkpoint_path)
        if epoch + 1 == args.stop_after:
            break
    return log


if __name__ == "__main__":
    main()
