"""Masked-LM pretraining of a BERT with FusedLAMB, the LAMB paper's recipe.

    python examples/bert_pretrain.py --tiny                # a 2-layer BERT on CPU, seconds
    python examples/bert_pretrain.py --batch-size 4096 --micro-batch 64 --steps 7038   # a GPU, bf16

The model is Hugging Face's BertForMaskedLM built from a config (nothing is downloaded). The corpus
is generated here: token sequences from a fixed random Markov chain, so that the masked tokens can
be predicted from their neighbours and the loss falls; the batch for a step depends only on the seed
and the step, so a resumed run sees the data an uninterrupted one would. The recipe (You et al.,
2019): no weight decay for biases and LayerNorm, lr scaled with the square root of the batch size,
linear warmup then polynomial decay, global grad-norm clipping at 1 (inside the FusedLAMB step),
gradient accumulation up to the batch size, bf16 autocast on CUDA. It logs loss, lr and tokens per
second, and checkpoints (model, optimizer, schedule, RNG) so that --resume continues the run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from transformers import BertConfig, BertForMaskedLM

from lamb_kernels import FusedLAMB, param_groups

IGNORE = -100  # the label of a position that is not predicted


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer BERT, small batches, 60 steps: CPU")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 60 tiny, 7038)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per optimizer step (default: 32 tiny, 4096)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per forward pass; the rest is "
                        "gradient accumulation (default: the batch size tiny, 64)")
    parser.add_argument("--base-lr", type=float, default=None,
                        help="lr at --base-batch, scaled by sqrt(batch / base batch) (default: 5e-2 tiny; 3.75e-4, "
                             "which gives NVIDIA's phase-1 6e-3 at batch 65536, 1.5e-3 at 4096)")
    parser.add_argument("--base-batch", type=int, default=256, help="batch size of --base-lr (default: 256)")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of steps warming up (default: 0.1)")
    parser.add_argument("--decay-power", type=float, default=1.0, help="polynomial decay's power (default: 1)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 32 tiny, 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="out/bert_pretrain", help="log and checkpoint folder")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="checkpoint and stop after this step, as an interrupted run would (to try --resume)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.steps = args.steps or (60 if tiny else 7038)
    args.batch_size = args.batch_size or (32 if tiny else 4096)
    args.micro_batch = args.micro_batch or (args.batch_size if tiny else 64)
    args.base_lr = args.base_lr or (5e-2 if tiny else 3.75e-4)
    args.seq_len = args.seq_len or (32 if tiny else 128)
    if args.batch_size % args.micro_batch:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of --micro-batch {args.micro_batch}")
    return args


def bert_config(args) -> BertConfig:
    if args.tiny:
        return BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=128, max_position_embeddings=args.seq_len)
    return BertConfig(max_position_embeddings=max(512, args.seq_len))  # BERT-base


class MarkovCorpus:
    """Sequences from a fixed random chain: each token is followed by one of four, most often the
    first. Token ids 0-3 are reserved ([PAD], [CLS], [SEP], [MASK])."""

    MASK = 3
    FIRST = 4

    def __init__(self, vocab_size: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        words = vocab_size - self.FIRST
        self.successors = torch.randint(self.FIRST, vocab_size, (vocab_size, 4), generator=gen)
        self.weights = torch.tensor([0.7, 0.1, 0.1, 0.1])
        self.words = words

    def batch(self, size: int, length: int, gen: torch.Generator):
        """(input ids with 15% of positions masked BERT's way, labels: the original token there)."""
        ids = torch.empty(size, length, dtype=torch.long)
        ids[:, 0] = torch.randint(self.FIRST, self.vocab_size, (size,), generator=gen)
        for t in range(1, length):
            choice = torch.multinomial(self.weights.expand(size, 4), 1, generator=gen).squeeze(1)
            ids[:, t] = self.successors[ids[:, t - 1], choice]
        labels = ids.clone()
        picked = torch.rand(size, length, generator=gen) < 0.15
        labels[~picked] = IGNORE
        roll = torch.rand(size, length, generator=gen)
        masked = ids.clone()
        masked[picked & (roll < 0.8)] = self.MASK  # 80% [MASK], 10% a random token, 10% unchanged
        randomised = picked & (roll >= 0.8) & (roll < 0.9)
        masked[randomised] = torch.randint(self.FIRST, self.vocab_size, (int(randomised.sum()),), generator=gen)
        return masked, labels


def lr_factor(step: int, total: int, warmup: float, power: float) -> float:
    """Linear warmup over the first `warmup` of the steps, then (1 - progress)^power to zero."""
    warm = max(1, int(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, 1 - (step - warm) / max(1, total - warm)) ** power


def main(argv=None) -> list:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = BertForMaskedLM(bert_config(args)).to(device)
    corpus = MarkovCorpus(model.config.vocab_size, args.seed)

    # The recipe: no decay (and no trust ratio) for biases and LayerNorm; lr ~ sqrt(batch).
    lr = args.base_lr * math.sqrt(args.batch_size / args.base_batch)
    groups = param_groups(model, weight_decay=0.01, no_decay=("bias", "LayerNorm"))
    optimizer = FusedLAMB(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, args.steps, args.warmup, args.decay_power))

    os.makedirs(args.out, exist_ok=True)
    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    start = 0
    if args.resume and os.path.exists(checkpoint_path):
        saved = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        torch.set_rng_state(saved["rng"])  # dropout continues as it would have
        start = saved["step"]
        print(f"resumed at step {start}")

    def save(step):
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "schedule": schedule.state_dict(), "rng": torch.get_rng_state(), "step": step}
        torch.save(state, checkpoint_path + ".tmp")
        os.replace(checkpoint_path + ".tmp", checkpoint_path)  # never a half-written checkpoint

    accumulation = args.batch_size // args.micro_batch
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    log, log_path = [], os.path.join(args.out, "log.jsonl")
    model.train()
    for step in range(start, args.steps):
        started = time.perf_counter()
        total = 0.0
        for micro in range(accumulation):
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * accumulation + micro)
            ids, labels = (t.to(device) for t in corpus.batch(args.micro_batch, args.seq_len, gen))
            with autocast:
                loss = model(input_ids=ids, labels=labels).loss / accumulation
            loss.backward()
            total += loss.item()
        optimizer.step()  # clips the global grad norm at 1, then the LAMB step
        schedule.step()
        optimizer.zero_grad()
        seconds = time.perf_counter() - started
        entry = {"step": step + 1, "loss": total, "lr": schedule.get_last_lr()[0],
                 "tokens_per_s": args.batch_size * args.seq_len / seconds}
        log.append(entry)
        with open(log_path, "a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")
        if (step + 1) % 10 == 0 or step + 1 == args.steps:
            print(f"step {entry['step']:6d}  loss {entry['loss']:.4f}  lr {entry['lr']:.3e}  "
                  f"{entry['tokens_per_s']:,.0f} tokens/s", flush=True)
        if (step + 1) % args.checkpoint_every == 0 or step + 1 in (args.steps, args.stop_after):
            save(step + 1)
        if step + 1 == args.stop_after:
            break
    return log


if __name__ == "__main__":
    main()
