"""A measured run, read back: what `llmpy train --metrics-dir DIR` wrote (metrics.json), and, where `--trace`
went to the same folder, its events (events.json), for the per-collective split of the waiting."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from llmpy.core.config import PRESETS, GPT2Config

# MPI calls that start a gradient collective during backward, and the ones the update starts for the parameters
GRADIENT_STARTS = ("MPI_Iallreduce", "MPI_Ireduce_scatter", "MPI_Ireduce")
PARAMETER_STARTS = ("MPI_Iallgatherv", "MPI_Ibcast")
NORM_KERNEL = "sum_of_squares"
NORM_LABEL = "MPI_Allreduce (norm)"


def gradient_label(kind: str) -> str:
    return f"{kind} (gradients)"


def parameter_label(kind: str) -> str:
    return f"{kind} (parameters)"


@dataclass(frozen=True)
class MeasuredRun:
    """The numbers of one run that the step model needs; every time in ms per measured step (means), but for
    `median_phases_ms`."""

    path: str
    config: GPT2Config
    model: str
    B: int
    T: int
    mode: str
    threads: int
    ranks: int
    strategy: str | None
    rank_mode: str | None
    grad_accum: int
    phases_ms: dict
    step_median_ms: float
    kernels_ms: dict  # kernel or MPI call -> ms per step
    kernel_calls: dict  # kernel or MPI call -> calls per step
    per_rank: list = field(default_factory=list)
    kernels_gbytes: dict = field(default_factory=dict)  # kernel -> GB/s by its cost model
    events_path: str | None = None
    warmup_steps: int = 1
    cores: int | None = None  # the machine's cores, where the metrics record them
    median_phases_ms: dict = field(default_factory=dict)  # the median step's phases (median_step_phases)

    @property
    def step_ms(self) -> float:
        return float(self.phases_ms["step"])

    def profile_phases(self) -> tuple[dict, str]:
        """The phases a prediction starts from and their statistic: a 1-rank run's median step where its metrics
        have the steps, else the means (a distributed run's: the means of its MPI calls are taken out of them)."""
        if self.median_phases_ms and not self.is_distributed:
            return self.median_phases_ms, "median"
        return self.phases_ms, "mean"

    @property
    def is_distributed(self) -> bool:
        return self.mode == "mpi" and self.ranks > 1

    @property
    def clips(self) -> bool:
        return NORM_KERNEL in self.kernels_ms

    def mpi_ms(self, names) -> float:
        return sum(self.kernels_ms.get(n, 0.0) for n in names)

    def mpi_calls(self, names) -> float:
        return sum(self.kernel_calls.get(n, 0.0) for n in names)

    def target(self) -> dict:
        return {"model": self.model, "B": self.B, "T": self.T, "ranks": self.ranks, "threads": self.threads,
                "strategy": self.strategy, "rank_mode": self.rank_mode}


def read_run(directory: str) -> MeasuredRun:
    """The run in `directory` (metrics.json; events.json too when the trace was written there)."""
    path = os.path.join(directory, "metrics.json")
    if not os.path.isfile(path):
        raise ValueError(f"{directory}: no metrics.json here (the folder `llmpy train --metrics-dir` writes)")
    try:
        with open(path) as handle:
            document = json.load(handle)
        summary = document["summary"]
        kernels = document["kernels"]
        phases = {k: float(v) for k, v in summary["phases_ms"].items()}
        config = _config(summary, path)
        warmup = int(summary.get("warmup_steps", 1))
        run = MeasuredRun(
            path=directory, config=config, model=str(summary["model"]), B=int(summary["B"]), T=int(summary["T"]),
            mode=str(summary["mode"]), threads=int(summary["threads"]), ranks=int(summary.get("ranks", 1)),
            strategy=summary.get("strategy"), rank_mode=summary.get("rank_mode"),
            grad_accum=int(summary.get("grad_accum", 1)), phases_ms=phases,
            step_median_ms=float(summary["ms_per_step_median"]),
            kernels_ms={k["name"]: float(k["ms_per_step"]) for k in kernels},
            kernel_calls={k["name"]: float(k["calls_per_step"]) for k in kernels},
            per_rank=list(summary.get("per_rank", [])),
            kernels_gbytes={k["name"]: float(k.get("gbytes", 0.0)) for k in kernels},
            events_path=_events(directory), warmup_steps=warmup, cores=_cores(summary),
            median_phases_ms=median_step_phases(document.get("steps") or [], warmup))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a metrics file of llmpy train (missing {error})") from None
    for phase in ("forward", "backward", "update", "step"):
        if phase not in phases:
            raise ValueError(f"{path}: phases_ms has no {phase!r}")
    if run.grad_accum != 1:
        raise ValueError(f"{path}: the run used --grad-accum {run.grad_accum}; the step model takes runs of one micro-step")
    return run


def median_step_phases(steps: list, warmup_steps: int) -> dict:
    """The phases (forward, zero_grad, backward, update, step) of the median measured step by its time, the mean of
    the two middle ones for an even count; {} without per-step records. A profile taken from it is not moved by one
    step that something else on the machine slowed (on the namespace hosts one of four steps took 3.7 s against
    2.6 s, +8% on the mean), and its phases still add up to its step."""
    measured = sorted((s for s in steps if int(s.get("step", 0)) > warmup_steps), key=lambda s: float(s["ms"]))
    if not measured:
        return {}
    middle = measured[(len(measured) - 1) // 2: len(measured) // 2 + 1]
    phases = {"step": "ms", **{p: f"{p}_ms" for p in ("forward", "zero_grad", "backward", "update")}}
    return {p: sum(float(s.get(key, 0.0)) for s in middle) / len(middle) for p, key in phases.items()}


def _config(summary: dict, path: str) -> GPT2Config:
    """The run's model shape: its preset when the name is one (and the parameter count agrees), else the
    padded vocabulary solved from the parameter count with GPT-2's 1024 positions."""
    count, L, C = int(summary["num_parameters"]), int(summary["num_layers"]), int(summary["channels"])
    known = PRESETS.get(str(summary["model"]))
    if known is not None and known.num_parameters() == count:
        return known
    for max_seq_len in (1024, 2048, 512, 256):
        rest = count - max_seq_len * C - L * (12 * C * C + 13 * C) - 2 * C
        if rest > 0 and rest % C == 0:
            vocab = rest // C  # heads do not change the FLOP count or the parameter layout: 1 fits any C
            return GPT2Config(max_seq_len=max_seq_len, vocab_size=vocab, padded_vocab_size=vocab, num_layers=L,
                              num_heads=1, channels=C)
    raise ValueError(f"{path}: cannot tell the model's shape from {count} parameters, {L} layers, {C} channels")


def _cores(summary: dict) -> int | None:
    """The machine's cores from the metrics (`cores` or `cpu_count`, top level or under `machine`), if any."""
    for where in (summary, summary.get("machine") or {}):
        for key in ("cores", "cpu_count"):
            if isinstance(where.get(key), int) and where[key] > 0:
                return where[key]
    return None


def _events(directory: str) -> str | None:
    path = os.path.join(directory, "events.json")
    return path if os.path.isfile(path) else None


def rank_row(run: MeasuredRun, rank: int = 0) -> dict | None:
    for row in run.per_rank:
        if int(row.get("rank", -1)) == rank:
            return row
    return None


def measured_waits(run: MeasuredRun, gradient_kind: str, parameter_kind: str | None, rank: int = 0) -> dict | None:
    """Rank `rank`'s ms per measured step in MPI_Waitall by what it waited for, from the trace's events: in the
    update, a wait after the step's last parameter collective started waits for the parameters, every other wait
    for a bucket's gradients; MPI_Allreduce is the gradient norm. None without a trace. A trace's events carry the
    CPU time a thread spent in a call (a wait that sleeps spends little), so a call's wall time is taken up to
    the start of the main thread's next event (or the step's end)."""
    if run.events_path is None:
        return None
    with open(run.events_path) as handle:
        document = json.load(handle)
    index = {name: i for i, name in enumerate(document["event_fields"])}
    ends = {s["step"]: s["end"] for s in document["steps"] if s.get("rank", 0) == rank}
    by_step: dict[int, list] = {}
    for event in document["events"]:
        step = event[index["step"]]
        if event[index["rank"]] == rank and event[index["thread"]] == 0 and step > run.warmup_steps:
            by_step.setdefault(step, []).append((event[index["start"]], event[index["name"]], event[index["phase"]]))
    if not by_step:
        return None
    totals = {gradient_kind: 0.0, **({parameter_kind: 0.0} if parameter_kind else {}), "MPI_Allreduce": 0.0}
    for step, calls in by_step.items():
        calls.sort()
        last_start = max((start for start, name, _ in calls if name in PARAMETER_STARTS), default=float("inf"))
        for i, (start, name, phase) in enumerate(calls):
            if phase != "update" or name not in ("MPI_Waitall", "MPI_Allreduce"):
                continue
            wall = (calls[i + 1][0] if i + 1 < len(calls) else ends.get(step, start)) - start
            key = name if name == "MPI_Allreduce" else (parameter_kind if parameter_kind and start > last_start
                                                        else gradient_kind)
            totals[key] += 1e3 * wall / len(by_step)
    return totals


def measured_components(run: MeasuredRun, gradient_kind: str | None, parameter_kind: str | None) -> dict:
    """Rank 0's ms per step by the step model's components: compute (forward and backward without the MPI calls
    made in them), update (without the MPI calls), the waiting for each collective (with a trace; else None),
    wait, communication (every MPI call), other (the rest of the step)."""
    phases = run.phases_ms
    other = phases["step"] - phases["forward"] - phases["backward"] - phases["update"]
    if not run.is_distributed:
        return {"compute": phases["forward"] + phases["backward"], "update": phases["update"], "wait": 0.0,
                "communication": 0.0, "other": other}
    row = rank_row(run) or {}
    in_backward = run.mpi_ms(GRADIENT_STARTS + ("MPI_Testall",))
    in_update = run.mpi_ms(("MPI_Waitall", "MPI_Allreduce") + PARAMETER_STARTS)
    components = {"compute": phases["forward"] + phases["backward"] - in_backward,
                  "update": phases["update"] - in_update}
    waits = measured_waits(run, gradient_kind, parameter_kind) if gradient_kind else None
    if gradient_kind:
        components[gradient_label(gradient_kind)] = waits[gradient_kind] if waits else None
    if parameter_kind:
        components[parameter_label(parameter_kind)] = waits[parameter_kind] if waits else None
    if run.clips and run.strategy in ("zero1", "owners"):
        components[NORM_LABEL] = waits["MPI_Allreduce"] if waits else run.kernels_ms.get("MPI_Allreduce", 0.0)
    components.update({"wait": row.get("wait_ms", run.mpi_ms(("MPI_Waitall", "MPI_Allreduce"))),
                       "communication": row.get("communication_ms", in_backward + in_update), "other": other})
    return components
