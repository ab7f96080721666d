"""Fork-join and tasks on N cores: predicted from 1-core references (llmpy.predict.cores), checked against runs.

    python bench/predict_cores.py --model d12 -B 4 -T 64 --steps 6 --json predict_cores.json

Runs, one after the other, each a fresh `llmpy train` process (-B, -T, --steps; the first step is warm-up):
  reference/tasks     --mode tasks --threads 1 --trace     per-task costs
  reference/forkjoin  --mode forkjoin --threads 1 --trace  per-call costs
  measured: forkjoin and tasks on 1 and 2 threads (this machine's cores at most), no trace
Predictions for 1 and 2 cores, checked against the measured medians: from the reference folder (each execution
model from the run of its own granularity), and from the tasks reference alone (fork-join's calls converted from
the task costs, the GEMM rates at call and block shape timed here). Then what the references predict for
--cores (4..64 by default): a table of both models and where tasks overtake fork-join. Run it on a quiet
machine: what else runs distorts the references, the timed GEMM scaling and the checks alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmpy.execution.threads import available_cores
from llmpy.predict.cores import MODES, predict_step, this_machine, where_tasks_overtake
from llmpy.predict.measured_tasks import KernelTimer, measured_step


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="d12")
    parser.add_argument("-B", "--batch-size", type=int, default=4)
    parser.add_argument("-T", "--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="steps per run, the first one warm-up (default 6)")
    parser.add_argument("--block-tokens", type=int, help="tokens per task block (default: whole sequences)")
    parser.add_argument("--cores", default="4,8,16,32,64", help="core counts to predict beyond the checked ones")
    parser.add_argument("--bandwidth-gbs", type=float,
                        help="the target's memory bandwidth with all its cores (default: this machine's, measured)")
    parser.add_argument("--data-dir", help="llmpy train --data-dir (default: the offline corpus in the work folder)")
    parser.add_argument("--work", help="folder for the runs (default: a temporary one, removed)")
    parser.add_argument("--json", metavar="FILE", help="write runs, predictions and errors as JSON")
    return parser.parse_args(argv)


def train(args, work: Path, out: Path, mode: str, threads: int, trace: bool) -> dict:
    command = [sys.executable, "-m", "llmpy", "train", "--model", args.model, "-B", str(args.batch_size),
               "-T", str(args.seq_len), "--steps", str(args.steps), "--val-every", "0", "--sample-every", "0",
               "--no-progress", "--output", "", "--mode", mode, "--threads", str(threads), "--metrics-dir", str(out)]
    if mode == "tasks" and args.block_tokens:
        command += ["--block-tokens", str(args.block_tokens)]
    if trace:
        command += ["--trace", str(out / "trace")]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=work, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-2000:]}")
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    print(f"  {out.relative_to(work)}: {summary['ms_per_step_median']:.1f} ms/step "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    return {"mode": mode, "cores": threads, "step_ms": summary["ms_per_step_median"],
            "phases_ms": {p: summary["phases_ms"][p] for p in ("forward", "backward", "update")}}


def run_all(args, work: Path) -> tuple[list[dict], list[int]]:
    checked = sorted({1, min(2, available_cores())})
    print(f"runs ({args.model}, B={args.batch_size}, T={args.seq_len}, {args.steps} steps each, 1 warm-up):")
    for mode in ("tasks", "forkjoin"):
        train(args, work, work / "reference" / mode, mode, 1, trace=True)
    measured = [train(args, work, work / "measured" / f"{mode}{n}", mode, n, trace=False)
                for mode in ("forkjoin", "tasks") for n in checked]
    return measured, checked


def validation_table(measured, both, tasks_only) -> tuple[str, list[dict]]:
    key = lambda r: (r["mode"], r["cores"])  # noqa: E731
    both, tasks_only = {key(r): r for r in both}, {key(r): r for r in tasks_only}
    header = (f"{'mode':9s} {'cores':>5s} {'measured':>9s} {'predicted':>10s} {'error':>7s} "
              f"{'tasks ref only':>15s} {'error':>7s}   phases measured / predicted (fwd, bwd, update ms)")
    lines = [header]
    records = []
    for m in measured:
        p, q = both[key(m)], tasks_only[key(m)]
        error, error_q = p["step_ms"] / m["step_ms"] - 1, q["step_ms"] / m["step_ms"] - 1
        phases = lambda r: "/".join(f"{r['phases_ms'][x]:.0f}" for x in ("forward", "backward", "update"))  # noqa
        lines.append(f"{m['mode']:9s} {m['cores']:5d} {m['step_ms']:9.1f} {p['step_ms']:10.1f} {error:+7.1%} "
                     f"{q['step_ms']:15.1f} {error_q:+7.1%}   {phases(m)} / {phases(p)}")
        records.append({**m, "predicted_ms": p["step_ms"], "error": error, "predicted_phases_ms": p["phases_ms"],
                        "tasks_reference_only_ms": q["step_ms"], "tasks_reference_only_error": error_q})
    return "\n".join(lines), records


def what_if_table(rows) -> str:
    forkjoin = {r["cores"]: r for r in rows if r["mode"] == "forkjoin"}
    tasks = {r["cores"]: r for r in rows if r["mode"] == "tasks"}
    lines = [f"{'cores':>5s} {'fork-join ms':>12s} {'tasks ms':>9s} {'faster':>9s}   what bounds fork-join | tasks"]
    for n in sorted(forkjoin):
        f, t = forkjoin[n], tasks[n]
        faster = "tasks" if t["step_ms"] < f["step_ms"] else "fork-join"
        lines.append(f"{n:5d} {f['step_ms']:12.1f} {t['step_ms']:9.1f} {faster:>9s}   {f['limit']} | {t['limit']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    extra = [int(n) for n in args.cores.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="predict-cores-") as scratch:
        work = Path(args.work or scratch).resolve()
        work.mkdir(parents=True, exist_ok=True)
        measured, checked = run_all(args, work)
        reference = str(work / "reference")
        started = time.perf_counter()
        timer = KernelTimer()  # one set of timings for both: the tasks rows differ only by the references
        both = measured_step(reference, timer)
        tasks_only = measured_step(os.path.join(reference, "tasks"), timer)
        machine = this_machine(both.reference.meta, args.bandwidth_gbs)
        what_if = predict_step(both, sorted(set(checked + extra)), MODES, machine)
        tasks_only_rows = predict_step(tasks_only, checked, MODES, machine)
        print(f"\npredicted in {time.perf_counter() - started:.1f} s")
    table, records = validation_table(measured, what_if, tasks_only_rows)
    print("\npredicted from the 1-core references against measured runs (median ms per step):\n" + table)
    print("\nwhat the references predict for more cores:\n" + what_if_table(what_if))
    print("\n" + where_tasks_overtake(what_if))
    if args.json:
        payload = {"config": {"model": args.model, "B": args.batch_size, "T": args.seq_len, "steps": args.steps,
                              "block_tokens": args.block_tokens, "bandwidth_gbs": args.bandwidth_gbs},
                   "validation": records, "what_if": what_if, "overtake": where_tasks_overtake(what_if)}
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
