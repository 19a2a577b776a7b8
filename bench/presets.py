"""Parameter shapes of real models (no weights needed): the tensors an optimizer step touches.

Each preset lists the shapes of a model's parameters in the order its ``named_parameters()`` gives
them (Hugging Face ``BertModel`` and ``GPT2Model``, torchvision ``resnet50`` and ``vit_b_16``);
tests/test_bench.py checks the totals against the models' published parameter counts.
"""
from __future__ import annotations

import numpy as np


def _bert(layers: int, hidden: int, intermediate: int, vocab: int = 30522, positions: int = 512) -> list:
    shapes = [(vocab, hidden), (positions, hidden), (2, hidden), (hidden,), (hidden,)]  # embeddings + LN
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4  # query, key, value, attention output
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm
        shapes += [(intermediate, hidden), (intermediate,), (hidden, intermediate), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # output LayerNorm
    shapes += [(hidden, hidden), (hidden,)]  # pooler
    return shapes


def _gpt2(layers: int = 12, hidden: int = 768, vocab: int = 50257, positions: int = 1024) -> list:
    shapes = [(vocab, hidden), (positions, hidden)]  # token and position embeddings (the head is tied)
    for _ in range(layers):
        shapes += [(hidden,), (hidden,)]  # ln_1
        shapes += [(hidden, 3 * hidden), (3 * hidden,), (hidden, hidden), (hidden,)]  # c_attn, c_proj
        shapes += [(hidden,), (hidden,)]  # ln_2
        shapes += [(hidden, 4 * hidden), (4 * hidden,), (4 * hidden, hidden), (hidden,)]  # c_fc, c_proj
    shapes += [(hidden,), (hidden,)]  # ln_f
    return shapes


def _vit(layers: int = 12, hidden: int = 768, mlp: int = 3072, patch: int = 16, image: int = 224,
         classes: int = 1000) -> list:
    tokens = (image // patch) ** 2 + 1
    shapes = [(1, 1, hidden), (hidden, 3, patch, patch), (hidden,), (1, tokens, hidden)]  # class token, patches
    for _ in range(layers):
        shapes += [(hidden,), (hidden,)]  # ln_1
        shapes += [(3 * hidden, hidden), (3 * hidden,), (hidden, hidden), (hidden,)]  # attention
        shapes += [(hidden,), (hidden,)]  # ln_2
        shapes += [(mlp, hidden), (mlp,), (hidden, mlp), (hidden,)]
    shapes += [(hidden,), (hidden,), (classes, hidden), (classes,)]  # final LayerNorm, head
    return shapes


def _resnet(blocks=(3, 4, 6, 3), classes: int = 1000) -> list:
    def conv_bn(out_channels, in_channels, kernel):
        return [(out_channels, in_channels, kernel, kernel), (out_channels,), (out_channels,)]

    shapes = conv_bn(64, 3, 7)
    channels = 64
    for stage, count in enumerate(blocks):
        width = 64 * 2**stage
        for block in range(count):
            shapes += conv_bn(width, channels, 1) + conv_bn(width, width, 3) + conv_bn(4 * width, width, 1)
            if block == 0:
                shapes += conv_bn(4 * width, channels, 1)  # the downsampling shortcut
            channels = 4 * width
    return shapes + [(classes, channels), (classes,)]


def _many_small(count: int = 4000, largest: int = 65536) -> list:
    """Launch-bound: `count` tensors of 1 to `largest` elements, sizes spread evenly on a log scale
    (a fixed draw, so every run and machine steps the same tensors)."""
    sizes = np.exp(np.random.default_rng(0).uniform(0.0, np.log(largest), size=count))
    return [(int(n),) for n in np.clip(np.rint(sizes), 1, largest)]


def _host_bound(count: int) -> list:
    """`count` tensors of 16 elements: a step moves a few hundred KB, so on any device its time is
    the host's work per tensor (checks, bookkeeping, dispatch), the cost a model of many small
    tensors pays on a fast GPU."""
    return [(16,)] * count


PRESETS = {
    "bert-base": lambda: _bert(12, 768, 3072),
    "bert-large": lambda: _bert(24, 1024, 4096),
    "resnet50": _resnet,
    "gpt2": _gpt2,
    "vit-b/16": _vit,
    "many-small": _many_small,
    "host-bound": lambda: _host_bound(1000),
    "host-bound-200": lambda: _host_bound(200),
    # For the harness's own tests: finishes in seconds, even under the Triton interpreter.
    "tiny": lambda: [(64, 33), (33,), (7,), (1,), (3, 5, 2, 2)],
}
# `--preset all`: the models and many-small (the host-bound presets measure the host, not the kernels).
ALL = [name for name in PRESETS if name not in ("tiny", "host-bound", "host-bound-200")]


def preset_shapes(name: str) -> list:
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r} is not a preset; choose from: {', '.join(PRESETS)}")
    return PRESETS[name]()
