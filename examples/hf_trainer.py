"""FusedLAMB in Hugging Face's Trainer: masked-LM training of a BERT built from a config.

    pip install -e ".[examples]"                   # transformers and accelerate (Trainer needs it)
    python examples/hf_trainer.py --tiny           # a 2-layer BERT on CPU, seconds
    python examples/hf_trainer.py                  # BERT-base, batch 4096 by accumulation, bf16 on a GPU

Nothing is downloaded: the model is BertForMaskedLM built from a config, and the data are generated
here: a motif of 4 tokens drawn with Zipf's frequencies, repeated along the sequence, with 15% of
the positions masked. The loss falls as the model learns the frequencies, then (given more steps)
as it learns to copy a masked token from 4 positions away.

The optimizer and its schedule go to Trainer through `optimizers=`. FusedLAMB clips the global grad
norm inside its step (`max_grad_norm=1.0`), so Trainer's clipping is off (`max_grad_norm=0`);
transformers 5 still reads the grads once a step for the `grad_norm` it logs, but leaves them as
they are.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
from transformers import (BertConfig, BertForMaskedLM, Trainer, TrainingArguments,
                          get_polynomial_decay_schedule_with_warmup)

from lamb_kernels import FusedLAMB, param_groups

IGNORE = -100  # the label of a position that is not predicted


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer BERT, batch 32, 60 steps, on CPU")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 60 tiny, 7038)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: 32 tiny, 4096)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per forward pass; the rest is "
                        "gradient accumulation (default: the batch size tiny, 64)")
    parser.add_argument("--base-lr", type=float, default=None,
                        help="lr at batch 256, scaled by sqrt(batch / 256) (default: 5e-2 tiny, 3.75e-4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 32 tiny, 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/hf_trainer", help="Trainer's output_dir; log.jsonl is written there")
    args = parser.parse_args(argv)
    args.steps = args.steps or (60 if args.tiny else 7038)
    args.batch_size = args.batch_size or (32 if args.tiny else 4096)
    args.micro_batch = args.micro_batch or (args.batch_size if args.tiny else 64)
    args.base_lr = args.base_lr or (5e-2 if args.tiny else 3.75e-4)
    args.seq_len = args.seq_len or (32 if args.tiny else 128)
    if args.batch_size % args.micro_batch:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of --micro-batch {args.micro_batch}")
    return args


class RepeatedMotifs(torch.utils.data.Dataset):
    """Item i: a repeated motif drawn from seed and i alone, masked at 15% of its positions.
    Token ids 0-3 are reserved ([PAD], [CLS], [SEP], [MASK])."""

    MASK = 3
    FIRST = 4

    def __init__(self, size: int, length: int, vocab_size: int, seed: int):
        self.size, self.length, self.seed = size, length, seed
        self.frequency = 1 / torch.arange(1, vocab_size - self.FIRST + 1)  # Zipf's law

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        motif = torch.multinomial(self.frequency, 4, replacement=True, generator=gen) + self.FIRST
        ids = motif.repeat(self.length // 4 + 1)[:self.length]
        picked = torch.rand(self.length, generator=gen) < 0.15
        return {"input_ids": ids.masked_fill(picked, self.MASK), "labels": ids.masked_fill(~picked, IGNORE)}


def main(argv=None) -> list:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.tiny:
        config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=args.seq_len)
    else:
        config = BertConfig(max_position_embeddings=max(512, args.seq_len))  # BERT-base
    model = BertForMaskedLM(config)
    dataset = RepeatedMotifs(args.steps * args.batch_size, args.seq_len, config.vocab_size, args.seed)

    # The LAMB recipe: no decay (and no trust ratio) for biases and LayerNorm; lr ~ sqrt(batch);
    # linear warmup over 10% of the steps, then linear decay to zero.
    lr = args.base_lr * math.sqrt(args.batch_size / 256)
    optimizer = FusedLAMB(param_groups(model, 0.01, no_decay=("bias", "LayerNorm")), lr=lr, max_grad_norm=1.0)
    schedule = get_polynomial_decay_schedule_with_warmup(optimizer, num_warmup_steps=max(1, args.steps // 10),
                                                         num_training_steps=args.steps, power=1.0)

    on_gpu = torch.cuda.is_available() and not args.tiny
    training = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.batch_size // args.micro_batch,
        max_grad_norm=0,  # FusedLAMB clips; Trainer clips only when this is above 0
        use_cpu=not on_gpu,  # transformers >= 4.34 (no_cuda=True before)
        bf16=on_gpu,  # autocast
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
    )
    trainer = Trainer(model=model, args=training, train_dataset=dataset, optimizers=(optimizer, schedule))
    trainer.train()

    log = [{"step": e["step"], "loss": e["loss"], "lr": e["learning_rate"]}
           for e in trainer.state.log_history if "loss" in e]
    with open(os.path.join(args.out, "log.jsonl"), "w", encoding="utf-8") as out:
        out.writelines(json.dumps(entry) + "\n" for entry in log)
    return log


if __name__ == "__main__":
    main()
