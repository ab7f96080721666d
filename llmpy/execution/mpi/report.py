"""The per-rank report of a data-parallel run: compute, update, each MPI call, waiting, and overlap per step;
the network bytes each rank sent and received per collective (strategies.network_bytes) and the bandwidth it
achieved: bytes per direction over the step's communication span, from its first collective's start to the
end of the update's last wait (a lower bound on what the link carried while it was busy)."""

from __future__ import annotations

import numpy as np

from llmpy.observe.trace import is_communication


UPDATE_KERNELS = ("adamw_update", "sum_of_squares")
# the calls where a rank waits for the others (MPI_Wait_idle: a task rank's workers idle while only collectives
# in flight hold its graph up, llmpy.execution.tasks.execution; MPI_Wait_params: the forward takes a bucket whose
# parameters were left in flight, overlap_steps)
WAIT_CALLS = ("MPI_Waitall", "MPI_Allreduce", "MPI_Wait_idle", "MPI_Wait_params")


def rank_summary(recorder, optimizer, skip: int) -> dict:
    measured = recorder.steps[skip:] or recorder.steps
    numbers = {s.step for s in measured}
    n = max(1, len(measured))
    compute = update = wait = 0.0
    communication: dict[str, float] = {}
    for step, kernels in recorder.kernel_totals.items():
        if step not in numbers:
            continue
        for name, (_, seconds, _, _) in kernels.items():
            if is_communication(name):
                communication[name] = communication.get(name, 0.0) + 1e3 * seconds / n
                if name in WAIT_CALLS:
                    wait += 1e3 * seconds / n
            elif name in UPDATE_KERNELS:
                update += 1e3 * seconds / n
            else:
                compute += 1e3 * seconds / n
    overlap = optimizer.step_overlap[skip:] or optimizer.step_overlap
    grad_hidden = [o["grad_hidden"] for o in overlap]
    param_hidden = [o["param_hidden"] for o in overlap if o["param_hidden"] is not None]
    step_ms = float(np.mean([1e3 * s.duration for s in measured])) if measured else 0.0
    comm_ms = sum(communication.values())
    return {**_traffic_summary(overlap),
        "rank": optimizer.rank, "step_ms": step_ms, "compute_ms": compute, "update_ms": update,
        "communication_ms": comm_ms, "wait_ms": wait, "communication_share": comm_ms / step_ms if step_ms else 0.0,
        "grad_hidden": float(np.mean(grad_hidden)) if grad_hidden else None,
        "param_hidden": float(np.mean(param_hidden)) if param_hidden else None,
        "communication_by_call_ms": communication, "moment_elements": int(optimizer.m.size),
        "parameters": int(optimizer.params.size), "gradient_timeline": _timeline_summary(overlap),
    }


def _timeline_summary(overlap: list[dict]) -> dict | None:
    """The steps' bucket timelines averaged (ms from each step's first collective): when the update began and,
    per bucket, when its gradient collectives started and completed; None where a step has none."""
    timelines = [o.get("timeline") for o in overlap]
    if not timelines or any(t is None for t in timelines):
        return None

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    rows = [{"part": first["part"], "bytes": first["bytes"],
             "start_ms": mean(t["buckets"][i]["start_ms"] for t in timelines),
             "done_ms": mean(t["buckets"][i]["done_ms"] for t in timelines)}
            for i, first in enumerate(timelines[0]["buckets"])]
    return {"update_start_ms": mean(t["update_start_ms"] for t in timelines), "buckets": rows}


def _traffic_summary(overlap: list[dict]) -> dict:
    """Mean bytes sent and received per step (in all and per MPI call) and the achieved Gbit/s each way."""
    n = max(1, len(overlap))
    by_call: dict[str, list[float]] = {}
    for o in overlap:
        for name, (sent, received) in o.get("traffic", {}).items():
            entry = by_call.setdefault(name, [0.0, 0.0])
            entry[0] += sent / n
            entry[1] += received / n
    span = sum(o.get("span_s", 0.0) for o in overlap) / n
    sent = sum(s for s, _ in by_call.values())
    received = sum(r for _, r in by_call.values())
    return {"sent_bytes": sent, "received_bytes": received, "communication_span_ms": 1e3 * span,
            "sent_gbits": 8 * sent / span / 1e9 if span else 0.0,
            "received_gbits": 8 * received / span / 1e9 if span else 0.0,
            "bytes_by_call": {name: {"sent": s, "received": r} for name, (s, r) in by_call.items()}}


def format_rank_report(rows: list[dict]) -> str:
    """The per-rank table train prints at the end of an mpi run."""
    def hidden(share):
        return f"{100 * share:.0f}%" if share is not None else "-"

    lines = [("per rank, ms per step: compute = forward+backward kernels, update = AdamW kernels, comm = time in "
              "MPI calls (wait: MPI_Waitall and blocking ones); hidden = share of the bytes whose collective had "
              "finished before the update needed them; MB out/in = network bytes sent/received per step, Gbit/s "
              "= those over the span from the step's first collective to its last wait"),
             (f"{'rank':>4s} {'step':>8s} {'compute':>8s} {'update':>8s} {'comm':>8s} {'wait':>8s} {'comm%':>6s} "
              f"{'grads hidden':>12s} {'params hidden':>13s} {'m,v floats':>12s} {'MB out':>8s} {'MB in':>8s} "
              f"{'Gbit/s out':>10s} {'Gbit/s in':>9s}  comm by call (ms; MB out/in)")]
    for r in rows:
        calls = ", ".join(f"{name[4:]} {ms:.1f}{_call_bytes(r, name)}" for name, ms in
                          sorted(r["communication_by_call_ms"].items(), key=lambda kv: -kv[1]))
        lines.append(f"{r['rank']:4d} {r['step_ms']:8.1f} {r['compute_ms']:8.1f} {r['update_ms']:8.1f} "
                     f"{r['communication_ms']:8.1f} {r['wait_ms']:8.1f} {100 * r['communication_share']:5.1f}% "
                     f"{hidden(r['grad_hidden']):>12s} {hidden(r['param_hidden']):>13s} "
                     f"{r['moment_elements']:12,d} {r['sent_bytes'] / 1e6:8.2f} {r['received_bytes'] / 1e6:8.2f} "
                     f"{r['sent_gbits']:10.2f} {r['received_gbits']:9.2f}  {calls}")
    return "\n".join(lines)


def _call_bytes(row: dict, name: str) -> str:
    moved = row["bytes_by_call"].get(name)
    return f" ({moved['sent'] / 1e6:.2f}/{moved['received'] / 1e6:.2f} MB)" if moved else ""
