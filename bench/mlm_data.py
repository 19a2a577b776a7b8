"""The masked-language-model study's corpus, tokenizer and batches (python -m bench.convergence --task mlm).

The corpus: the docstrings of the Python standard library installed with the interpreter that runs
the study (module, class and function docstrings of every ``.py`` file under ``sysconfig``'s
``stdlib`` path, test suites, ``idlelib``, ``lib2to3`` and ``site-packages`` left out), read with
``ast`` (nothing is imported), files in sorted order. It is real English prose about programming,
available offline on every machine that has Python, and the same bits wherever the Python version
is the same (a different version is a different corpus: settings.json records its size and hash).
A file goes to the validation split, the test split or the training split by a hash of its path
relative to the library (5%, 5%, 90%): no docstring is shared between the splits.

The tokenizer: words, built in the run from the training split alone: the text is lowercased and cut
into runs of letters, runs of digits and single other characters (punctuation), and the
``VOCAB - 5`` most frequent tokens (ties broken alphabetically) get ids after the five special ones;
every other token is ``[UNK]``. A word-level vocabulary keeps the model's embedding small and the
build free of extra dependencies; its cost is the unknown words (the share is in settings.json).

Sequences: each split's token stream (docstrings joined with ``[SEP]``) cut into sequences of
``SEQ_LEN`` tokens. Masking as BERT: 15% of the positions of a batch chosen at random, of those 80%
become ``[MASK]``, 10% a random token and 10% stay; the loss is the cross-entropy over the chosen
positions. Training batches are masked afresh at every step from a generator seeded by the run's seed;
the validation and test masks are drawn once from fixed seeds, so every run is scored on the same
positions.
"""
from __future__ import annotations

import ast
import collections
import functools
import hashlib
import os
import re
import sysconfig
import warnings

import torch

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD, UNK, CLS, SEP, MASK = range(len(SPECIALS))
VOCAB = 4096
SEQ_LEN = 32
MASK_RATE = 0.15
SKIPPED = ("test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__")
EVAL_SEEDS = {"validation": 2, "test": 3}
TOKEN = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")


def _docstrings(path: str) -> list:
    with open(path, encoding="utf-8", errors="replace") as f:
        source = f.read()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (invalid escape sequences in old sources)
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [text for text in (ast.get_docstring(n) for n in nodes) if text]


def _split_of(relative: str) -> str:
    bucket = int(hashlib.sha256(relative.encode()).hexdigest(), 16) % 20
    return "validation" if bucket == 0 else "test" if bucket == 1 else "train"


@functools.lru_cache(maxsize=1)
def corpus(root: str | None = None) -> dict:
    """{"train" | "validation" | "test": [docstring, ...]} of the standard library at `root`."""
    root = root or sysconfig.get_paths()["stdlib"]
    splits = {"train": [], "validation": [], "test": []}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED and not d.startswith("test"))
        for name in sorted(files):
            if name.endswith(".py") and not name.startswith("test_"):
                path = os.path.join(folder, name)
                relative = os.path.relpath(path, root).replace(os.sep, "/")
                splits[_split_of(relative)] += _docstrings(path)
    return splits


def words(text: str) -> list:
    return TOKEN.findall(text.lower())


@functools.lru_cache(maxsize=2)
def vocabulary(vocab_size: int = VOCAB) -> tuple:
    """The VOCAB - 5 most frequent training tokens after the specials (ties alphabetical)."""
    counts = collections.Counter(w for text in corpus()["train"] for w in words(text))
    common = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[: vocab_size - len(SPECIALS)]
    return SPECIALS + tuple(word for word, _ in common)


@functools.lru_cache(maxsize=2)
def token_streams(vocab_size: int = VOCAB) -> dict:
    """Each split as one int64 stream of token ids, docstrings joined by [SEP]."""
    ids = {word: i for i, word in enumerate(vocabulary(vocab_size))}
    streams = {}
    for split, texts in corpus().items():
        tokens = []
        for text in texts:
            tokens += [ids.get(w, UNK) for w in words(text)] + [SEP]
        streams[split] = torch.tensor(tokens, dtype=torch.int64)
    return streams


def sequences(split: str, vocab_size: int = VOCAB, seq_len: int = SEQ_LEN, limit: int | None = None) -> torch.Tensor:
    """A split's stream cut into [n, seq_len] (the last partial sequence dropped; `limit`: at most
    that many sequences, the first ones)."""
    stream = token_streams(vocab_size)[split]
    n = stream.numel() // seq_len if limit is None else min(stream.numel() // seq_len, limit)
    return stream[: n * seq_len].view(n, seq_len)


def mask(tokens: torch.Tensor, generator: torch.Generator, vocab_size: int = VOCAB) -> tuple:
    """(inputs, labels) as BERT masks them: labels -100 except at the chosen positions."""
    chosen = torch.rand(tokens.shape, generator=generator) < MASK_RATE
    action = torch.rand(tokens.shape, generator=generator)
    random_tokens = torch.randint(len(SPECIALS), vocab_size, tokens.shape, generator=generator)
    inputs = torch.where(chosen & (action < 0.8), MASK, tokens)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
    labels = torch.where(chosen, tokens, -100)
    return inputs, labels


def fingerprint() -> dict:
    """What the corpus is on this machine: sizes, the share of unknown tokens, and a hash."""
    streams = token_streams()
    digest = hashlib.sha256()
    for split in ("train", "validation", "test"):
        digest.update(streams[split].numpy().tobytes())
    return dict(root=sysconfig.get_paths()["stdlib"], docstrings={k: len(v) for k, v in corpus().items()},
                tokens={k: int(v.numel()) for k, v in streams.items()},
                unknown_share={k: round(float((v == UNK).float().mean()), 4) for k, v in streams.items()},
                vocabulary=VOCAB, sha256=digest.hexdigest())
