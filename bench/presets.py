"""Parameter shapes of real models (no weights needed): what an optimizer step touches."""
from __future__ import annotations


def _bert(layers: int, hidden: int, intermediate: int, vocab: int = 30522, positions: int = 512) -> list:
    shapes = [(vocab, hidden), (positions, hidden), (2, hidden), (hidden,), (hidden,)]  # embeddings + LN
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4  # query, key, value, attention output
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm
        shapes += [(intermediate, hidden), (intermediate,), (hidden, intermediate), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # output LayerNorm
    shapes += [(hidden, hidden), (hidden,)]  # pooler
    return shapes


PRESETS = {
    "bert-base": lambda: _bert(12, 768, 3072),
}


def preset_shapes(name: str) -> list:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not a preset; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()
