"""Plots of traces and benchmark results (matplotlib, Agg backend: files only, no window).

  timeline_png   threads of each rank as rows, one coloured bar per kernel event, step boundaries
  roofline_png   log-log roofline with one labelled point per kernel (rows from llmpy.analysis.roofline_rows)
  scaling_pngs   runtime, speedup and efficiency against threads, for the step, forward and backward
  loss_curves_png  training and validation loss (and HellaSwag accuracy) of an llm.c main.log
"""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from llmpy.observe.trace import Trace  # noqa: E402

LEGEND_KERNELS = 12
DPI = 120


def _palette() -> list:
    colours = []
    for name in ("tab20", "tab20b", "tab20c"):
        cmap = matplotlib.colormaps[name]
        colours.extend(cmap(i) for i in range(cmap.N))
    return colours


def _prepare(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)


def _save(fig, path: str) -> str:
    _prepare(path)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _step_filter(steps) -> tuple[int, int] | None:
    """None (all), an int (that step), a (first, last) pair (inclusive) or a range."""
    if steps is None:
        return None
    if isinstance(steps, int):
        return steps, steps
    if isinstance(steps, range):
        if len(steps) == 0:
            raise ValueError("empty step range")
        return min(steps), max(steps)
    first, last = steps
    return int(first), int(last)


def timeline_png(trace: Trace, path: str, steps=None) -> str:
    """Timeline of the trace: one row per thread ("rank R thread N", ranks grouped), each kernel event a bar
    coloured by kernel name (legend: the kernels with the most time), idle time left white, thin vertical
    lines at step boundaries. `steps`: None for all, a step number, or an inclusive (first, last) range."""
    from llmpy.observe.analysis import processes

    selected = _step_filter(steps)

    def wanted(step: int) -> bool:
        return selected is None or selected[0] <= step <= selected[1]

    events = [e for e in trace.events if wanted(e.step)]
    records = [s for s in trace.steps if wanted(s.step)]
    rows = processes(trace)
    row_of = {proc: i for i, proc in enumerate(rows)}

    time_by_name: dict[str, float] = defaultdict(float)
    for e in events:
        time_by_name[e.name] += e.duration
    names = sorted(time_by_name, key=lambda n: (-time_by_name[n], n))
    palette = _palette()
    colour = {name: palette[i % len(palette)] for i, name in enumerate(names)}

    bars: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
    for e in events:
        if e.end > e.start:
            bars[(row_of[(e.rank, e.thread)], e.name)].append((e.start, e.end - e.start))

    height = min(40.0, 1.6 + 0.32 * max(1, len(rows)))
    fig, ax = plt.subplots(figsize=(14, height))
    for (row, name), spans in bars.items():
        ax.broken_barh(spans, (row - 0.4, 0.8), facecolors=colour[name], linewidth=0)

    boundaries = sorted({t for s in records for t in (s.start, s.end)})
    for t in boundaries:
        ax.axvline(t, color="0.35", linewidth=0.6, zorder=3)
    for s in records:
        if s.rank == min(r.rank for r in records):
            ax.text((s.start + s.end) / 2, -0.75, f"step {s.step}", ha="center", va="bottom", fontsize=7,
                    color="0.3")

    starts = [e.start for e in events] + [s.start for s in records]
    ends = [e.end for e in events] + [s.end for s in records]
    if starts:
        lo, hi = min(starts), max(ends)
        pad = 0.01 * (hi - lo or 1.0)
        ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(len(rows) - 0.5, -1.0)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"rank {r} thread {t}" for r, t in rows], fontsize=7)
    ranks = sorted({r for r, _ in rows})
    for rank in ranks[1:]:  # separate the ranks
        first = min(i for i, (r, _) in enumerate(rows) if r == rank)
        ax.axhline(first - 0.5, color="black", linewidth=0.8)
    ax.set_xlabel("time since trace start (s)")
    meta = trace.meta
    title = " ".join(f"{k}={meta[k]}" for k in ("model", "mode", "runtime", "threads", "ranks") if k in meta)
    if selected is not None:
        title += f"  steps {selected[0]}-{selected[1]}" if selected[0] != selected[1] else f"  step {selected[0]}"
    ax.set_title(title or "llmpy timeline", fontsize=9)
    ax.set_facecolor("white")
    if names:
        handles = [Patch(facecolor=colour[n], label=n) for n in names[:LEGEND_KERNELS]]
        if len(names) > LEGEND_KERNELS:
            handles.append(Patch(facecolor="none", edgecolor="none", label=f"+{len(names) - LEGEND_KERNELS} more"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, frameon=False,
                  title="kernels by time", title_fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _finite_positive(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def roofline_png(rows, peak_gflops: float | None, bandwidth_gbs: float | None, path: str) -> str:
    """Log-log roofline: the memory roof AI * bandwidth up to the ridge, the compute roof at the peak, one
    labelled point (AI, achieved GFLOP/s) per kernel. Kernels without FLOPs or bytes cannot sit on a log
    axis and are left out (counted in the title)."""
    points = [r for r in rows if _finite_positive(r.arithmetic_intensity) and _finite_positive(r.gflops)]
    fig, ax = plt.subplots(figsize=(9, 6.5))
    ais = [r.arithmetic_intensity for r in points]
    perf = [r.gflops for r in points]
    have_roof = _finite_positive(peak_gflops) and _finite_positive(bandwidth_gbs)
    ridge = peak_gflops / bandwidth_gbs if have_roof else None
    xs = ais + ([ridge] if ridge else [])
    x_lo = min(xs) / 4 if xs else 0.01
    x_hi = max(xs) * 4 if xs else 100.0
    if have_roof:
        grid = [x_lo * (x_hi / x_lo) ** (i / 200) for i in range(201)]
        if ridge not in grid:
            grid = sorted(grid + [ridge])
        ax.plot(grid, [min(peak_gflops, x * bandwidth_gbs) for x in grid], color="black", linewidth=1.6,
                label="attainable = min(peak, AI x bandwidth)")
        ax.axhline(peak_gflops, color="0.6", linestyle=":", linewidth=0.8)
        ax.axvline(ridge, color="0.6", linestyle=":", linewidth=0.8)
        ax.text(x_lo * 1.1, peak_gflops * 1.08, f"peak {peak_gflops:.1f} GFLOP/s", fontsize=8)
        ax.text(ridge * 1.05, (min(perf) if perf else peak_gflops) / 3 if perf else peak_gflops / 10,
                f"ridge {ridge:.2f} F/B", fontsize=8, color="0.4")
        slope_x = x_lo * 1.3
        ax.text(slope_x, slope_x * bandwidth_gbs * 1.15, f"{bandwidth_gbs:.1f} GB/s", fontsize=8, rotation=30,
                rotation_mode="anchor")
    palette = _palette()
    by_position = sorted(points, key=lambda r: (r.arithmetic_intensity, r.gflops))
    for i, r in enumerate(by_position):
        ax.scatter([r.arithmetic_intensity], [r.gflops], color=palette[(2 * i) % len(palette)], s=36, zorder=4,
                   edgecolors="black", linewidths=0.4)
        # neighbours' labels alternate above and below their points, so close kernels stay readable
        ax.annotate(r.name, (r.arithmetic_intensity, r.gflops), textcoords="offset points",
                    xytext=(5, 4) if i % 2 == 0 else (5, -11), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_lo, x_hi)
    ys = perf + ([peak_gflops] if have_roof else []) + ([x_lo * bandwidth_gbs] if have_roof else [])
    if ys:
        ax.set_ylim(min(ys) / 4, max(ys) * 3)
    ax.set_xlabel("arithmetic intensity (FLOP/byte, cost model)")
    ax.set_ylabel("achieved GFLOP/s (FLOPs / wall time of the calls)")
    left_out = len(rows) - len(points)
    title = "llmpy roofline" + (f" ({left_out} kernel{'s' if left_out != 1 else ''} without FLOPs/bytes "
                                f"not shown)" if left_out else "")
    if not have_roof:
        title += " (no peak/bandwidth recorded: no roof)"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
    if have_roof:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------
# Scaling

SCALING_METRICS = (("ms_per_step_median", "step"), ("forward_ms", "forward"), ("backward_ms", "backward"))


def _value(entry: dict, key: str) -> float | None:
    value = entry.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _workers(entry: dict) -> int:
    return int(entry.get("threads") or 1) * int(entry.get("ranks") or 1)


def _group_key(entry: dict) -> tuple[str, str, int]:
    return str(entry.get("mode")), str(entry.get("runtime")), int(entry.get("ranks") or 1)


def _group_label(key: tuple[str, str, int]) -> str:
    mode, runtime, ranks = key
    label = mode if runtime in ("None", "", "-", mode) else f"{mode}/{runtime}"
    return label + (f" x{ranks} ranks" if ranks != 1 else "")


def _medians(entries: list[dict], key: str) -> dict[int, float]:
    """workers -> median of `key` over the entries with that many workers (repeated measurements)."""
    samples: dict[int, list[float]] = defaultdict(list)
    for e in entries:
        v = _value(e, key)
        if v is not None:
            samples[_workers(e)].append(v)
    return {w: statistics.median(vs) for w, vs in samples.items()}


def scaling_bases(results: list[dict]) -> dict[tuple[str, str, int], tuple[dict, str]]:
    """Per group (mode, runtime, ranks): the entry speedups are read against, and why. The sequential run on one
    thread when measured (the fastest if several), for every group; else the group's own one-thread run; else
    its run on the fewest threads."""
    sequential = [e for e in results if str(e.get("mode")) == "sequential" and _workers(e) == 1
                  and _value(e, "ms_per_step_median") is not None]
    seq = min(sequential, key=lambda e: _value(e, "ms_per_step_median")) if sequential else None
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for e in results:
        groups[_group_key(e)].append(e)
    bases = {}
    for key, entries in groups.items():
        if seq is not None:
            bases[key] = (seq, "sequential, 1 thread")
            continue
        smallest = min(_workers(e) for e in entries)
        candidates = [e for e in entries if _workers(e) == smallest]
        base = min(candidates, key=lambda e: _value(e, "ms_per_step_median") or math.inf)
        bases[key] = (base, f"{_group_label(key)}, {smallest} thread{'s' if smallest != 1 else ''}")
    return bases


def scaling_pngs(results: list[dict], directory: str) -> list[str]:
    """Runtime (ms), speedup and parallel efficiency against threads (threads x ranks with several ranks), one
    line per (mode, runtime[, ranks]) group, for the whole step, forward and backward: writes
    scaling_runtime.png, scaling_speedup.png and scaling_efficiency.png into `directory`, returns their paths.

    Speedup = T(base) / T, against the sequential 1-thread run when `results` has one (the same base for all
    groups, so groups compare), else the group's own smallest thread count. Efficiency = speedup x base
    threads / threads, i.e. speedup / threads when the base ran on one thread."""
    if not results:
        raise ValueError("no results to plot")
    os.makedirs(directory, exist_ok=True)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for e in results:
        groups[_group_key(e)].append(e)
    bases = scaling_bases(results)
    palette = _palette()
    colour = {key: palette[(2 * i) % len(palette)] for i, key in enumerate(sorted(groups))}
    all_workers = sorted({_workers(e) for e in results})
    many_ranks = any(int(e.get("ranks") or 1) != 1 for e in results)
    xlabel = "threads x ranks" if many_ranks else "threads"
    base_notes = sorted({why for _, why in bases.values()})

    paths = []
    for kind, ylabel, filename in (("runtime", "ms", "scaling_runtime.png"),
                                   ("speedup", "speedup", "scaling_speedup.png"),
                                   ("efficiency", "parallel efficiency", "scaling_efficiency.png")):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
        for ax, (metric, label) in zip(axes, SCALING_METRICS):
            for key in sorted(groups):
                series = _medians(groups[key], metric)
                base_entry, _ = bases[key]
                base_value = _value(base_entry, metric)
                base_workers = _workers(base_entry)
                xs = sorted(series)
                if kind == "runtime":
                    ys = [series[w] for w in xs]
                elif base_value is None:
                    continue
                elif kind == "speedup":
                    ys = [base_value / series[w] for w in xs]
                else:
                    ys = [base_value * base_workers / (series[w] * w) for w in xs]
                if xs:
                    ax.plot(xs, ys, marker="o", color=colour[key], label=_group_label(key))
            if kind == "speedup" and all_workers:
                ax.plot(all_workers, all_workers, linestyle="--", color="0.5", linewidth=0.8, label="ideal")
            if kind == "efficiency":
                ax.axhline(1.0, linestyle="--", color="0.5", linewidth=0.8, label="ideal")
                ax.set_ylim(bottom=0)
            if kind == "runtime":
                ax.set_yscale("log")
            ax.set_xscale("log", base=2)
            ax.set_xticks(all_workers)
            ax.set_xticklabels([str(w) for w in all_workers])
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(label)
            ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="upper right", fontsize=8, frameon=False)
        suptitle = {"runtime": "median time", "speedup": "speedup",
                    "efficiency": "parallel efficiency = speedup x base threads / threads"}
        note = "" if kind == "runtime" else f"  (base: {'; '.join(base_notes)})"
        fig.suptitle(suptitle[kind] + note, fontsize=10, x=0.02, ha="left")
        fig.tight_layout(rect=(0, 0, 0.86, 0.95))
        paths.append(_save(fig, os.path.join(directory, filename)))
    return paths


def loss_curves_png(series: dict[str, list[tuple[int, float]]], path: str, title: str = "") -> str:
    """Training and validation loss against step (llm.c's main.log series), HellaSwag accuracy on a second axis."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label, style in (("trl", "train loss", "-"), ("tel", "val loss", "o-")):
        if series.get(key):
            steps, values = zip(*series[key])
            ax.plot(steps, values, style, label=label, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    if series.get("eval"):
        acc = ax.twinx()
        steps, values = zip(*series["eval"])
        acc.plot(steps, values, "s--", color="tab:green", label="HellaSwag acc_norm", markersize=3)
        acc.set_ylabel("accuracy")
        more_handles, more_labels = acc.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def shape_png(results: list[dict], path: str) -> str:
    """ms per step and peak RSS against the sequence length T, one line per (configuration, B), llmpy's
    configurations and the torch baseline alike (`llmpy bench --shapes`)."""
    if not results:
        raise ValueError("no results to plot")
    _prepare(path)
    series: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for r in results:
        name = "torch eager" if r["mode"] == "torch" else f"llmpy {r['mode']} {r['runtime']}"
        series[f"{name} x{r['threads']}, B={r['B']}"].append((r["T"], r["ms_per_step_median"], r["peak_rss_mb"] / 1024))
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(12, 4.6))
    palette = _palette()
    for i, (label, points) in enumerate(sorted(series.items())):
        points.sort()
        t, ms, gb = zip(*points)
        style = dict(marker="o", color=palette[i % len(palette)], label=label,
                     linestyle="--" if label.startswith("torch") else "-")
        time_ax.plot(t, ms, **style)
        memory_ax.plot(t, gb, **style)
    for ax, ylabel in ((time_ax, "ms per step (median)"), (memory_ax, "peak RSS of the process (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    time_ax.set_yscale("log")
    memory_ax.legend(fontsize=7)
    fig.suptitle("training step against sequence length")
    return _save(fig, path)
