"""What a run reports: rows (one per provider, preset and group), the table printed last, the CSV,
the PNG chart, and the progress bar shown while it runs."""
from __future__ import annotations

import csv
import os
import sys

from .harness import bytes_moved, quantile
from .providers import ROLES

COLUMNS = (
    "date", "preset", "algorithm", "provider", "role", "status", "reason",
    "device", "device_name", "dtype", "master_weights", "state_dtype", "threads", "tensors", "params", "bytes_per_param", "warmup", "repeats",
    "first_step_ms", "median_ms", "p20_ms", "p80_ms", "gb_per_s", "copy_gb_per_s", "pct_of_copy",
    "yardstick", "ratio_to_yardstick", "ratio_p20", "ratio_p80", "launches_per_step",
    "provider_version", "lamb_kernels", "torch", "triton", "python",
)


def group_rows(outcomes, *, preset, algorithm, numel, tensors, itemsize, clipping, context,
               master_weights=False, state_bytes=4) -> list:
    """One row per outcome of one group. GB/s charges docs/design.md section 4's bytes to the median step;
    ratios are the median over repetitions of (provider's step / the yardstick's step in the same
    repetition)."""
    by_role = {}
    for outcome in outcomes:
        by_role.setdefault(outcome.provider.role, outcome)
    copy, yardstick = by_role.get("copy"), by_role.get("yardstick")

    def bytes_per_param(outcome):
        ours = outcome.provider.role in ("ours", "reference")
        return bytes_moved(algorithm, outcome.provider.role, clipping, itemsize, master_weights and ours,
                           state_bytes if ours else 4)

    def gb_per_s(outcome):
        return bytes_per_param(outcome) * numel / quantile(outcome.times, 0.5) / 1e9

    copy_gbps = gb_per_s(copy) if copy is not None and copy.status == "ok" else None
    rows = []
    for outcome in outcomes:
        provider = outcome.provider
        row = dict(context, preset=preset, algorithm=algorithm, provider=provider.name, role=provider.role,
                   status=outcome.status, reason=outcome.reason, tensors=tensors, params=numel,
                   provider_version=provider.version)
        row["bytes_per_param"] = bytes_per_param(outcome)
        if provider.role not in ("ours", "reference"):
            row["state_dtype"] = "float32"  # (the yardstick's and other libraries' states)
        if outcome.first_step is not None:
            row["first_step_ms"] = outcome.first_step * 1e3
        if outcome.status == "ok" and outcome.times:
            row["median_ms"] = quantile(outcome.times, 0.5) * 1e3
            row["p20_ms"] = quantile(outcome.times, 0.2) * 1e3
            row["p80_ms"] = quantile(outcome.times, 0.8) * 1e3
            row["gb_per_s"] = gb_per_s(outcome)
            if copy_gbps is not None:
                row["copy_gb_per_s"] = copy_gbps
                row["pct_of_copy"] = 100.0 * row["gb_per_s"] / copy_gbps
            if yardstick is not None and yardstick.status == "ok" and provider.role not in ("copy", "yardstick"):
                paired = [a / b for a, b in zip(outcome.times, yardstick.times)]
                row["yardstick"] = yardstick.provider.name
                row["ratio_to_yardstick"] = quantile(paired, 0.5)
                row["ratio_p20"] = quantile(paired, 0.2)
                row["ratio_p80"] = quantile(paired, 0.8)
            row["launches_per_step"] = outcome.launches
        rows.append(row)
    return rows


def table(rows) -> str:
    """The short table printed last: runnable providers first, then what was skipped and why."""
    ran = [row for row in rows if row["status"] == "ok"]
    lines = []
    header = f"{'preset':11s} {'provider':48s} {'median ms':>10s} {'p20-p80 ms':>17s} {'GB/s':>7s} {'% copy':>7s} {'ratio':>7s}"
    if any(row.get("launches_per_step") is not None for row in ran):
        header += f" {'launches':>8s}"
    lines += [header, "-" * len(header)]
    for row in ran:
        pct = f"{row['pct_of_copy']:6.0f}%" if row.get("pct_of_copy") is not None else ""
        ratio = f"{row['ratio_to_yardstick']:6.2f}x" if row.get("ratio_to_yardstick") is not None else ""
        line = (f"{row['preset']:11s} {row['provider']:48s} {row['median_ms']:10.2f} "
                f"{row['p20_ms']:8.2f}-{row['p80_ms']:<8.2f} {row['gb_per_s']:7.1f} {pct:>7s} {ratio:>7s}")
        if row.get("launches_per_step") is not None:
            line += f" {row['launches_per_step']:8d}"
        lines.append(line)
    others = [row for row in rows if row["status"] != "ok"]
    if others:
        lines.append("")
        lines += [f"{row['status']:7s} {row['preset']} {row['provider']}: {row['reason']}" for row in others]
    return "\n".join(lines)


def write_csv(rows, path, columns=COLUMNS) -> None:
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_value(row.get(key)) for key in columns})


def read_csv(path) -> list:
    """Rows written by write_csv, with the step times and GB/s as numbers again (for the chart)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("median_ms", "p20_ms", "p80_ms", "gb_per_s"):
            row[key] = float(row[key]) if row[key] else None
    return rows


def chart_title(row) -> str:
    return (f"{row['device_name']}, {row['dtype']}, torch {row['torch']}, triton {row['triton'] or '-'}, "
            f"lamb_kernels {row['lamb_kernels']}, {row['date'][:10]}")


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


ROLE_COLOURS = {"copy": "#9e9e9e", "yardstick": "#4c72b0", "ours": "#dd8452", "reference": "#55a868",
                "external": "#8172b3"}


def pyplot():
    """(matplotlib.pyplot drawing to files, None), or (None, why not) when matplotlib is missing: the
    charts are optional, the CSVs are not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return None, f"matplotlib cannot be imported ({exc}); pip install matplotlib for the chart"
    return plt, None


def write_png(rows, path, title) -> str | None:
    """Step time and GB/s per provider, a row of two panels per preset. Returns why not, when
    matplotlib is missing."""
    plt, why_not = pyplot()
    if plt is None:
        return why_not
    from matplotlib.ticker import NullFormatter
    presets = list(dict.fromkeys(row["preset"] for row in rows))
    ran = {preset: [row for row in rows if row["preset"] == preset and row["status"] == "ok"] for preset in presets}
    heights = [max(len(ran[preset]), 1) * 0.32 + 0.9 for preset in presets]
    fig, axes = plt.subplots(len(presets), 2, figsize=(13, sum(heights) + 0.8), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for (time_ax, bw_ax), preset in zip(axes, presets):
        preset_rows = ran[preset]
        labels = [f"{row['algorithm'].upper()}: {row['provider']}" for row in preset_rows]
        colours = [ROLE_COLOURS[row["role"]] for row in preset_rows]
        ys = range(len(preset_rows))
        medians = [row["median_ms"] for row in preset_rows]
        spread = [[m - row["p20_ms"] for m, row in zip(medians, preset_rows)],
                  [row["p80_ms"] - m for m, row in zip(medians, preset_rows)]]
        time_ax.barh(ys, medians, xerr=spread, color=colours, capsize=2)
        time_ax.set_xscale("log")
        time_ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis collide
        time_ax.set_yticks(list(ys), labels, fontsize=8)
        time_ax.invert_yaxis()
        time_ax.set_xlabel("step time, ms (median, p20-p80; log scale)")
        time_ax.set_title(preset, loc="left", fontsize=10)
        bw_ax.barh(ys, [row["gb_per_s"] for row in preset_rows], color=colours)
        bw_ax.set_yticks(list(ys), [""] * len(preset_rows))
        bw_ax.invert_yaxis()
        bw_ax.set_xlabel("effective GB/s (docs/design.md section 4 bytes / median step)")
        for y, row in zip(ys, preset_rows):
            bw_ax.annotate(f" {row['gb_per_s']:.1f}", (row["gb_per_s"], y), va="center", fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=ROLE_COLOURS[role]) for role in ROLES]
    fig.legend(handles, ROLES, loc="lower center", ncol=len(ROLES), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


class Progress:
    """A one-line bar on a terminal; elsewhere (CI logs, pipes) a line at every tenth of the way."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.label = max(total, 1), 0, ""
        self.stream = stream if stream is not None else sys.stderr
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_tenth = -1

    def start(self, label: str) -> None:
        self.label = label
        self._draw()

    def advance(self, steps: int = 1) -> None:
        if steps:
            self.done = min(self.total, self.done + steps)
            self._draw()

    def _draw(self) -> None:
        fraction = self.done / self.total
        if self.live:
            bar = "#" * int(30 * fraction)
            self.stream.write(f"\r[{bar:30s}] {100 * fraction:5.1f}%  {self.label:40s}")
            if self.done == self.total:
                self.stream.write("\n")
        elif int(10 * fraction) != self._last_tenth:
            self._last_tenth = int(10 * fraction)
            self.stream.write(f"{100 * fraction:5.1f}%  {self.label}{os.linesep}")
        self.stream.flush()
