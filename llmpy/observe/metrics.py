"""Throughput and model-FLOPs utilisation (MFU) of training steps."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


from llmpy.core.config import GPT2Config


@dataclass
class StepStats:
    """Numbers reported for one training step."""

    step: int
    loss: float
    seconds: float
    tokens: int
    flops: float
    cores: int
    peak_gflops: float

    @property
    def ms(self) -> float:
        return self.seconds * 1e3

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def tokens_per_second_per_core(self) -> float:
        return self.tokens_per_second / self.cores

    @property
    def mfu(self) -> float:
        return self.flops / self.seconds / (self.peak_gflops * 1e9)


def step_flops(config: GPT2Config, B: int, T: int) -> float:
    """FLOPs of one forward+backward over B*T tokens by llm.c's count (6N + 6LCT per token)."""
    return float(config.flops_per_token(T) * B * T)


@dataclass
class KernelSummary:
    """One kernel's share of the measured steps (means per step)."""

    name: str
    calls_per_step: float
    ms_per_step: float
    mean_us: float
    share: float  # of the mean step time
    gflops: float  # achieved GFLOP/s over its calls
    gbytes: float  # achieved GB/s by its cost model

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def measured_steps(steps, skip_steps: int):
    """The steps averaged over: all but the first `skip_steps` (warm-up), or the last one if that is all."""
    return steps[skip_steps:] if len(steps) > skip_steps else steps[-1:]


def kernel_summary(kernel_totals: dict[int, dict[str, list[float]]], steps, skip_steps: int = 1) -> list[KernelSummary]:
    """Per-kernel means over the measured steps, from Recorder.kernel_totals (step -> kernel -> [calls,
    seconds, flops, bytes]), biggest first."""
    kept = [s.step for s in measured_steps(steps, skip_steps)]
    if not kept:
        return []
    step_seconds = sum(s.duration for s in steps if s.step in kept) / len(kept)
    totals: dict[str, list[float]] = {}
    for step in kept:
        for name, (count, seconds, flops, moved) in kernel_totals.get(step, {}).items():
            entry = totals.setdefault(name, [0, 0.0, 0.0, 0.0])
            entry[0] += count
            entry[1] += seconds
            entry[2] += flops
            entry[3] += moved
    rows = []
    for name, (count, seconds, flops, moved) in totals.items():
        rows.append(KernelSummary(
            name, count / len(kept), 1e3 * seconds / len(kept), 1e6 * seconds / count,
            seconds / len(kept) / step_seconds if step_seconds else 0.0,
            flops / seconds / 1e9 if seconds else 0.0, moved / seconds / 1e9 if seconds else 0.0,
        ))
    return sorted(rows, key=lambda r: -r.ms_per_step)


def phase_summary(steps, skip_steps: int = 1) -> dict[str, float]:
    """Mean ms per step of each phase (forward, zero_grad, backward, update) and of the whole step."""
    kept = measured_steps(steps, skip_steps)
    result: dict[str, float] = {}
    for phase in ("forward", "zero_grad", "backward", "update"):
        total = sum(s.phases[phase][1] - s.phases[phase][0] for s in kept if phase in s.phases)
        result[phase] = 1e3 * total / len(kept) if kept else 0.0
    result["step"] = 1e3 * sum(s.duration for s in kept) / len(kept) if kept else 0.0
    return result


def format_kernel_table(rows: list[KernelSummary], phases: dict[str, float]) -> str:
    step = phases.get("step", 0.0)
    lines = [f"{'kernel':28s} {'calls':>6s} {'ms/step':>9s} {'mean us':>9s} {'share':>6s} {'GFLOP/s':>8s} {'GB/s':>7s}"]
    for r in rows:
        lines.append(f"{r.name:28s} {r.calls_per_step:6.0f} {r.ms_per_step:9.1f} {r.mean_us:9.0f} "
                     f"{100 * r.share:5.1f}% {r.gflops:8.1f} {r.gbytes:7.1f}")
    inside = sum(r.ms_per_step for r in rows)
    lines.append(f"{'all kernels':28s} {'':6s} {inside:9.1f} {'':9s} {100 * inside / step if step else 0:5.1f}%"
                 f"   (rest of the step: Python between kernel calls)")
    lines.append("phases, ms/step: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    return "\n".join(lines)


def write_run_metrics(directory: str, summary: dict, step_rows: list[dict], kernel_rows: list[KernelSummary]) -> dict:
    """metrics.json (summary, steps, kernels), steps.csv and kernels.csv in `directory`."""
    import csv
    import io

    from llmpy.io.formats import atomic_write_bytes

    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, name) for name in ("metrics.json", "steps.csv", "kernels.csv")}
    document = {"summary": summary, "steps": step_rows, "kernels": [r.as_dict() for r in kernel_rows]}
    atomic_write_bytes(paths["metrics.json"], json.dumps(document, indent=1).encode())
    for name, rows in (("steps.csv", step_rows), ("kernels.csv", [r.as_dict() for r in kernel_rows])):
        text = io.StringIO()
        if rows:
            writer = csv.DictWriter(text, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        atomic_write_bytes(paths[name], text.getvalue().encode())
    return paths
