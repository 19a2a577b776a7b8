"""The convergence study's task and model (python -m bench.convergence).

The task: 16x16 grey images, each of one of ten shapes drawn at a random place, size and brightness
with soft edges, under Gaussian pixel noise; name the shape. Everything comes from a seed, so the
data are the same on every machine and nothing is downloaded. At the smallest sizes a disk, a square
and a diamond differ by a few pixels under the noise, so no classifier gets every image right; the
noise level sets how far from 100% the ceiling is.

The model: a compact CNN whose convolutions do not overlap (kernel = stride, like a ViT's patch
embedding), written as reshapes and matrix products. On one CPU thread the same layers as nn.Conv2d
took 2.3 to 2.8 times as long per step, and overlapping 3x3 convolutions of the same widths 10 to 50
times (their backward pass dominates), which would put the study past its time budget.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SIZE = 16
CLASSES = ("disk", "ring", "square", "square outline", "plus", "cross", "diamond", "diamond outline",
           "ellipse", "triangle")
EDGE = 0.35  # width, in pixels, of the sigmoid that softens every edge


def _masks(label: int, dy: torch.Tensor, dx: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Soft masks in [0, 1] of shape `label`, centred where dy = dx = 0, of half-size r."""
    def inside(signed_distance):  # > 0 inside the shape
        return torch.sigmoid(signed_distance / EDGE)

    ady, adx = dy.abs(), dx.abs()
    euclid = torch.sqrt(dy * dy + dx * dx)
    chebyshev = torch.maximum(ady, adx)
    manhattan = ady + adx
    name = CLASSES[label]
    if name == "disk":
        return inside(r - euclid)
    if name == "ring":
        return inside(0.8 - (euclid - r).abs())
    if name == "square":
        return inside(r - chebyshev)
    if name == "square outline":
        return inside(0.7 - (chebyshev - r).abs())
    if name == "plus":
        return torch.maximum(inside(0.8 - adx) * inside(r - ady), inside(0.8 - ady) * inside(r - adx))
    if name == "cross":
        diagonals = torch.minimum((dx - dy).abs(), (dx + dy).abs()) / 2 ** 0.5
        return inside(0.9 - diagonals) * inside(r - chebyshev)
    if name == "diamond":
        return inside(r - manhattan)
    if name == "diamond outline":
        return inside(0.7 - (manhattan - r).abs())
    if name == "ellipse":  # twice as wide as tall
        return inside(1 - torch.sqrt((dx / r) ** 2 + (dy / (0.5 * r)) ** 2))
    # triangle, apex up: rows from -r to r, half-width growing from 0 to r
    return inside(torch.minimum(r - ady, (dy + r) / 2 - adx))


def make_shapes(n: int, seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (float32, n x 1 x 16 x 16) and their labels (int64), as many of each class as n
    allows, in an order drawn from the seed."""
    if n < 1:
        raise ValueError(f"n={n}: need at least one image")
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % len(CLASSES))[torch.randperm(n, generator=gen)]
    centre_y = 3.5 + 8 * torch.rand(n, 1, 1, generator=gen)
    centre_x = 3.5 + 8 * torch.rand(n, 1, 1, generator=gen)
    half_size = 2.5 + 2.5 * torch.rand(n, 1, 1, generator=gen)
    brightness = 0.6 + 0.8 * torch.rand(n, 1, 1, generator=gen)
    pixel_noise = noise * torch.randn(n, SIZE, SIZE, generator=gen)
    grid = torch.arange(SIZE, dtype=torch.float32)
    dy, dx = grid.view(1, SIZE, 1) - centre_y, grid.view(1, 1, SIZE) - centre_x
    images = torch.empty(n, SIZE, SIZE)
    for label in range(len(CLASSES)):
        rows = (labels == label).nonzero().squeeze(1)
        images[rows] = _masks(label, dy[rows], dx[rows], half_size[rows])
    images = images * brightness + pixel_noise
    return images.unsqueeze(1), labels


def _patches(x: torch.Tensor, k: int) -> torch.Tensor:
    """(n, H, W, c) -> (n, H/k, W/k, k*k*c): the input of a k x k convolution with stride k."""
    n, height, width, channels = x.shape
    x = x.view(n, height // k, k, width // k, k, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, height // k, width // k, k * k * channels)


class PatchCNN(nn.Module):
    """16x16x1 -> 4x4 conv, stride 4 -> ReLU -> 2x2 conv, stride 2 -> ReLU -> linear over the 2x2x64
    map -> 10 logits (11,370 parameters with the default width 32)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.conv1 = nn.Linear(4 * 4, width)
        self.conv2 = nn.Linear(2 * 2 * width, 2 * width)
        self.head = nn.Linear(2 * 2 * 2 * width, len(CLASSES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.view(-1, SIZE, SIZE, 1)
        x = F.relu(self.conv1(_patches(x, 4)))
        x = F.relu(self.conv2(_patches(x, 2)))
        return self.head(x.flatten(1))
