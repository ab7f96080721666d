"""Fork-join and tasks on N cores: predicted from 1-core references (llmpy.predict.cores), checked against runs.

    python bench/predict_cores.py --model d12 -B 4 -T 64 --steps 6 --json predict_cores.json

Runs, one after the other, each a fresh `llmpy train` process (-B, -T, --steps; the first step is warm-up), in
--rounds rounds (roundN/ in the work folder) of:
  reference/tasks     --mode tasks --threads 1 --trace     per-task costs
  reference/forkjoin  --mode forkjoin --threads 1 --trace  per-call costs
  measured: forkjoin and tasks on 1 and 2 threads (this machine's cores at most), no trace
Predictions for 1 and 2 cores, each round's from its own references against its own runs (the table: medians
over rounds, and each round's error): from the reference folder (each execution model from the run of its own
granularity), and from the tasks reference alone (fork-join's calls converted from
the task costs, the GEMM rates at call and block shape timed here). Then what the references predict for
--cores (4..64 by default): a table of both models and where tasks overtake fork-join. Run it on a quiet
machine: what else runs distorts the references, the timed GEMM scaling and the checks alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of the six runs; each round's references predict its own runs (default 3)")
    parser.add_argument("--block-tokens", type=int, help="tokens per task block (default: whole sequences)")
    parser.add_argument("--cores", default="4,8,16,32,64", help="core counts to predict beyond the checked ones")
    parser.add_argument("--bandwidth-gbs", type=float,
                        help="the target's memory bandwidth with all its cores (default: this machine's, measured)")
    parser.add_argument("--data-dir", help="llmpy train --data-dir (default: the offline corpus in the work folder)")
    parser.add_argument("--work", help="folder for the runs (default: a temporary one, removed)")
    parser.add_argument("--json", metavar="FILE", help="write runs, predictions and errors as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 2:
        parser.error("--rounds must be at least 1 and --steps at least 2 (the first step is warm-up)")
    return args


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


def run_all(args, work: Path) -> tuple[list[list[dict]], list[int]]:
    """Per round, the two references then the measured runs: the runs of one round are a few minutes apart, and
    the host's speed moves by 20% and more over an hour, so each round's references predict its own runs."""
    checked = sorted({1, min(2, available_cores())})
    print(f"runs ({args.model}, B={args.batch_size}, T={args.seq_len}, {args.steps} steps each, 1 warm-up, "
          f"{args.rounds} round{'s' if args.rounds > 1 else ''}):")
    rounds = []
    for r in range(args.rounds):
        folder = work / f"round{r + 1}"
        for mode in ("tasks", "forkjoin"):
            train(args, work, folder / "reference" / mode, mode, 1, trace=True)
        rounds.append([train(args, work, folder / "measured" / f"{mode}{n}", mode, n, trace=False)
                       for mode in ("forkjoin", "tasks") for n in checked])
    return rounds, checked


def validation_table(rounds: list[list[dict]], both: list[list[dict]], tasks_only: list[list[dict]]):
    """Per (mode, cores): medians over rounds of the measured and predicted steps, the median of the rounds'
    errors (each round's prediction against its own run) and each round's error."""
    key = lambda r: (r["mode"], r["cores"])  # noqa: E731
    median = statistics.median
    header = (f"{'mode':9s} {'cores':>5s} {'measured':>9s} {'predicted':>10s} {'error':>7s} "
              f"{'tasks ref only':>15s} {'error':>7s}   rounds' errors | phases measured / predicted "
              f"(fwd/bwd/update ms)")
    lines, records = [header], []
    for index, first in enumerate(rounds[0]):
        ms = [r[index] for r in rounds]
        ps = [{key(x): x for x in rows}[key(first)] for rows in both]
        qs = [{key(x): x for x in rows}[key(first)] for rows in tasks_only]
        errors = [p["step_ms"] / m["step_ms"] - 1 for m, p in zip(ms, ps)]
        errors_q = [q["step_ms"] / m["step_ms"] - 1 for m, q in zip(ms, qs)]
        phases = {name: {x: median(r["phases_ms"][x] for r in rows) for x in ("forward", "backward", "update")}
                  for name, rows in (("measured", ms), ("predicted", ps))}
        text = lambda ph: "/".join(f"{v:.0f}" for v in ph.values())  # noqa: E731
        record = {"mode": first["mode"], "cores": first["cores"], "step_ms": median(m["step_ms"] for m in ms),
                  "predicted_ms": median(p["step_ms"] for p in ps), "error": median(errors),
                  "round_errors": errors, "tasks_reference_only_ms": median(q["step_ms"] for q in qs),
                  "tasks_reference_only_error": median(errors_q), "phases_ms": phases["measured"],
                  "predicted_phases_ms": phases["predicted"], "rounds": ms}
        lines.append(f"{record['mode']:9s} {record['cores']:5d} {record['step_ms']:9.1f} "
                     f"{record['predicted_ms']:10.1f} {record['error']:+7.1%} "
                     f"{record['tasks_reference_only_ms']:15.1f} {record['tasks_reference_only_error']:+7.1%}   "
                     f"{' '.join(f'{e:+.1%}' for e in errors)} | {text(phases['measured'])} / "
                     f"{text(phases['predicted'])}")
        records.append(record)
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
        rounds, checked = run_all(args, work)
        started = time.perf_counter()
        timer = KernelTimer()  # one set of timings for every round: the rounds differ only by their references
        both, tasks_only, what_if = [], [], None
        for r in range(len(rounds)):
            reference = str(work / f"round{r + 1}" / "reference")
            step = measured_step(reference, timer)
            tasks_step = measured_step(os.path.join(reference, "tasks"), timer)
            machine = this_machine(step.reference.meta, args.bandwidth_gbs)
            both.append(predict_step(step, checked, MODES, machine))
            tasks_only.append(predict_step(tasks_step, checked, MODES, machine))
            if what_if is None:  # beyond this machine: from the first round's references
                what_if = predict_step(step, sorted(set(checked + extra)), MODES, machine)
        print(f"\npredicted in {time.perf_counter() - started:.1f} s")
    table, records = validation_table(rounds, both, tasks_only)
    print("\npredicted from the 1-core references against measured runs (median ms per step):\n" + table)
    print("\nwhat the references predict for more cores:\n" + what_if_table(what_if))
    print("\n" + where_tasks_overtake(what_if))
    if args.json:
        payload = {"config": {"model": args.model, "B": args.batch_size, "T": args.seq_len, "steps": args.steps,
                              "rounds": args.rounds, "block_tokens": args.block_tokens,
                              "bandwidth_gbs": args.bandwidth_gbs},
                   "validation": records, "what_if": what_if, "overtake": where_tasks_overtake(what_if)}
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
