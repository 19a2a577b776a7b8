"""The "cpp" backend against torch's fused CPU optimizers, on BERT-base parameter shapes.

    python -m bench.cpp_ratios [--threads 2] [--repeats 15]

FusedLAMB (apex's defaults, so clipping at max_grad_norm=1.0: 44 bytes per parameter; and with
clipping off: 40) is timed against ``torch.optim.AdamW(fused=True)`` (28) and FusedLARS (28) against
``torch.optim.SGD(momentum=0.9, fused=True)`` (20), one step of each in turn per repetition (interleaved,
so a slower period of the machine hits every provider alike), after two warm-up steps. Prints the
median and p20/p80 per provider, and per ratio the median over repetitions of the ratio within a
repetition (the two steps ran back to back, so a slow spell of the machine cancels out) beside the
ratio of the medians.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

from lamb_kernels import FusedLAMB, FusedLARS

from .presets import preset_shapes


def _providers(params):
    return {
        "AdamW(fused=True)": torch.optim.AdamW(params, lr=1e-9, fused=True),
        "FusedLAMB cpp": FusedLAMB(params, lr=1e-9, backend="cpp"),
        "FusedLAMB cpp, no clipping": FusedLAMB(params, lr=1e-9, max_grad_norm=None, backend="cpp"),
        "SGD(momentum=0.9, fused=True)": torch.optim.SGD(params, lr=1e-9, momentum=0.9, fused=True),
        "FusedLARS cpp": FusedLARS(params, lr=1e-9, momentum=0.9, weight_decay=1e-4, backend="cpp"),
    }


def _quantile(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--preset", default="bert-base")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02) for shape in preset_shapes(args.preset)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    providers = _providers(params)
    times = {name: [] for name in providers}
    for repeat in range(args.repeats + 2):
        for name, opt in providers.items():
            start = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - start
            if repeat >= 2:
                times[name].append(elapsed)
    n_params = sum(p.numel() for p in params)
    print(f"{args.preset}: {len(params)} tensors, {n_params / 1e6:.1f}M fp32 params; {args.threads} threads; "
          f"{platform.processor() or platform.machine()}; torch {torch.__version__}; "
          f"{datetime.date.today().isoformat()}")
    medians = {}
    for name, values in times.items():
        values = sorted(values)
        medians[name] = _quantile(values, 0.5)
        print(f"  {name:30s} median {medians[name] * 1e3:7.1f} ms   p20 {_quantile(values, 0.2) * 1e3:7.1f}"
              f"   p80 {_quantile(values, 0.8) * 1e3:7.1f}")
    for label, ours, yardstick, target in (
        ("LAMB / AdamW", "FusedLAMB cpp", "AdamW(fused=True)", 1.6),
        ("LAMB without clipping / AdamW", "FusedLAMB cpp, no clipping", "AdamW(fused=True)", 1.6),
        ("LARS / SGD", "FusedLARS cpp", "SGD(momentum=0.9, fused=True)", 1.5),
    ):
        paired = sorted(a / b for a, b in zip(times[ours], times[yardstick]))
        print(f"  {label}: {_quantile(paired, 0.5):.2f}x median of paired ratios (p20 {_quantile(paired, 0.2):.2f}, "
              f"p80 {_quantile(paired, 0.8):.2f}); {medians[ours] / medians[yardstick]:.2f}x ratio of medians "
              f"(target <= {target}x)")


if __name__ == "__main__":
    main()
