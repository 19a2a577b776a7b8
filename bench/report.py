"""What a run reports: rows (one per provider, preset and group), the table printed last, the CSV,
the PNG chart, and the progress bar shown while it runs."""
from __future__ import annotations

import csv
import os
import sys
import time

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


def yardstick_label(name: str) -> str:
    """How the table names a row's yardstick: "fused AdamW" beside LAMB, "fused SGD" beside LARS."""
    return "fused " + ("AdamW" if "AdamW" in name else "SGD" if "SGD" in name else name)


def table(rows) -> str:
    """The short table printed last: runnable providers first, each with its algorithm and its step
    time over its yardstick's ("1.84x fused AdamW"), then what was skipped and why."""
    ran = [row for row in rows if row["status"] == "ok"]
    lines = []
    header = (f"{'preset':11s} {'algo':4s} {'provider':48s} {'median ms':>10s} {'p20-p80 ms':>17s} {'GB/s':>7s} "
              f"{'% copy':>7s} {'step time vs':>18s}")
    if any(row.get("launches_per_step") is not None for row in ran):
        header += f" {'launches':>8s}"
    lines += [header, "-" * len(header)]
    for row in ran:
        pct = f"{row['pct_of_copy']:6.0f}%" if row.get("pct_of_copy") is not None else ""
        ratio = (f"{row['ratio_to_yardstick']:.2f}x {yardstick_label(row['yardstick'])}"
                 if row.get("ratio_to_yardstick") is not None else "")
        line = (f"{row['preset']:11s} {row['algorithm']:4s} {row['provider']:48s} {row['median_ms']:10.2f} "
                f"{row['p20_ms']:8.2f}-{row['p80_ms']:<8.2f} {row['gb_per_s']:7.1f} {pct:>7s} {ratio:>18s}")
        if row.get("launches_per_step") is not None:
            line += f" {row['launches_per_step']:8d}"
        lines.append(line)
    others = [row for row in rows if row["status"] != "ok"]
    if others:
        lines.append("")
        lines += [f"{row['status']:7s} {row['preset']} {row['provider']}: {row['reason']}" for row in others]
    return "\n".join(lines)


# p80 / p20 of a provider's step times. On this 2-core VM, quiet, they were 1.03 to 1.24 for most
# providers and up to 1.72 for one or two (bench/results/cpu-*: 2026-11-21 to 12-02); a busy machine
# spreads all of them.
BUSY_MEDIAN_SPREAD = 1.5  # the providers' median spread above which the machine was busy
BUSY_ANY_SPREAD = 3.0  # or any one provider's (a quiet run reached 2.2 once, 2026-12-07)
BUSY_FLOOR_MS = 1.0  # steps shorter than this spread on any machine (timer, scheduler): not judged


def busy_warning(rows) -> str | None:
    """A warning when the repetitions spread more than a quiet machine's do (the providers' median
    p80 / p20 above BUSY_MEDIAN_SPREAD, or one provider's above BUSY_ANY_SPREAD): something else ran
    meanwhile, and the figures are noise as much as result."""
    spread = sorted(((row["p80_ms"] / row["p20_ms"], row) for row in rows
                     if row["status"] == "ok" and row.get("p20_ms") and row.get("p80_ms") is not None
                     and row["median_ms"] >= BUSY_FLOOR_MS), key=lambda item: item[0])
    if not spread:
        return None
    median = quantile([ratio for ratio, _ in spread], 0.5)
    widest, row = spread[-1]
    if median <= BUSY_MEDIAN_SPREAD and widest <= BUSY_ANY_SPREAD:
        return None
    return (f"warning: the step times spread more than on a quiet machine (p80/p20: {median:.2f} for the median "
            f"provider, up to {widest:.1f} for {row['provider']} on {row['preset']}): the machine was busy while "
            "they ran, so the figures above are noisy; rerun on a quiet machine before reading them as results")


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


def heartbeat(what: str, work, stream=None, every: float = 1.0, clock=time.monotonic):
    """Runs `work()` (a C++ build, say: a minute or more of silence otherwise) and, while it runs, says
    so with the seconds it has taken: redrawn in place on a terminal, a line every 15 s elsewhere.
    Returns what `work` returns; raises what it raises."""
    import threading

    stream = stream if stream is not None else sys.stderr
    live = hasattr(stream, "isatty") and stream.isatty()
    outcome = {}

    def run():
        try:
            outcome["value"] = work()
        except BaseException as exc:  # (raised again in the caller's thread)
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    began = clock()
    thread.start()
    thread.join(every)
    said = 0.0
    while thread.is_alive():
        seconds = clock() - began
        if live:
            stream.write(f"\r{what} ... {seconds:.0f} s")
        elif seconds - said >= 15 or not said:
            stream.write(f"{what} ... {seconds:.0f} s{os.linesep}")
            said = seconds
        stream.flush()
        thread.join(every)
    if live and clock() - began > every:
        stream.write(f"\r{what}: done in {clock() - began:.0f} s{os.linesep}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds + 0.5), 60)
    return f"{minutes}:{seconds:02d}"


class Progress:
    """Where a run is: on a terminal one line redrawn in place (what is running now, the elapsed time
    and an estimate of what is left); elsewhere (CI logs, pipes) a line at every tenth of the way."""

    def __init__(self, total: int, stream=None, clock=time.monotonic):
        self.total, self.done, self.label, self.detail = max(total, 1), 0, "", ""
        self.stream = stream if stream is not None else sys.stderr
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._clock = clock
        self._began = clock()
        self._last_tenth = -1
        self._last_draw = -1.0

    def start(self, label: str) -> None:
        self.label, self.detail = label, ""
        self._draw(force=True)

    def advance(self, steps: int = 1, detail: str | None = None) -> None:
        """`steps` more done; `detail` says what runs now (a provider and its repetition)."""
        if detail is not None:
            self.detail = detail
        if steps:
            self.done = min(self.total, self.done + steps)
        self._draw(force=self.done == self.total)

    def times(self) -> str:
        """The elapsed time and, once something is done, an estimate of what is left (at the pace so far)."""
        elapsed = self._clock() - self._began
        if not self.done:
            return f"elapsed {_clock(elapsed)}"
        left = elapsed / self.done * (self.total - self.done)
        return f"elapsed {_clock(elapsed)}, about {_clock(left)} left"

    def _draw(self, force: bool = False) -> None:
        fraction = self.done / self.total
        if self.live:
            now = self._clock()
            if not force and now - self._last_draw < 0.2:  # (a redraw per step would cost more than a step)
                return
            self._last_draw = now
            bar = "#" * int(30 * fraction)
            what = f"{self.label}: {self.detail}" if self.detail else self.label
            self.stream.write(f"\r[{bar:30s}] {100 * fraction:5.1f}%  {self.times():32s} {what[:70]:70s}")
            if self.done == self.total:
                self.stream.write("\n")
        elif int(10 * fraction) != self._last_tenth:
            self._last_tenth = int(10 * fraction)
            when = f"  ({self.times()})" if self.done else ""
            self.stream.write(f"{100 * fraction:5.1f}%  {self.label}{when}{os.linesep}")
        self.stream.flush()
