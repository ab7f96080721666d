"""Data-parallel training over MPI against one process: step time, throughput, communication and overlap.

    python bench/distributed.py --model d12 -T 64 -B 4 --steps 3 --rounds 2

Every configuration trains the same global batch (-B sequences per step: each of P ranks takes B/P) with
`llmpy train` in its own processes (`mpiexec -n P` for the mpi ones), --trace on. Configurations never use
more threads in total than the machine's cores. They run one after the other, and the whole list again
`--rounds` times (A B C A B C), so drift hits them alike; the numbers are medians over all rounds' measured
steps (the first step of every run is warm-up).

From each run's trace (events.json): per rank and step, the share of the step spent in MPI calls
(communication), the part of it spent waiting (MPI_Waitall, blocking MPI_Allreduce); from its metrics.json,
the share of gradient (and parameter) bytes whose collective had finished before the update needed them
(overlap with the backward pass, or with the update of other buckets).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from llmpy.execution.threads import available_cores
from llmpy.execution.mpi.report import WAIT_CALLS
from llmpy.execution.options import STRATEGIES
from llmpy.observe.trace import Trace, is_communication

MPIEXEC = Path(sys.executable).parent / "mpiexec"


def configurations(cores: int, strategies: list[str]) -> list[dict]:
    """sequential x1, forkjoin x cores, and mpi with P ranks x t threads (P * t <= cores) for each strategy."""
    configs = [{"name": "sequential x1", "mode": "sequential", "ranks": 1, "threads": 1}]
    if cores > 1:
        configs.append({"name": f"forkjoin x{cores}", "mode": "forkjoin", "ranks": 1, "threads": cores})
    for ranks in (1, 2):
        for threads in (1, 2):
            if ranks * threads > cores:
                continue
            for strategy in strategies if ranks > 1 else strategies[:1]:
                configs.append({"name": f"mpi {ranks}x{threads} {strategy}", "mode": "mpi", "ranks": ranks,
                                "threads": threads, "strategy": strategy})
    return configs


def run_one(config: dict, args, work: Path, round_index: int) -> dict:
    out = work / f"{config['name'].replace(' ', '_')}-{round_index}"
    per_rank_batch = args.batch_size // config["ranks"]
    command = [sys.executable, "-m", "llmpy", "train", "--model", args.model, "-T", str(args.seq_len),
               "-B", str(per_rank_batch), "--steps", str(args.steps + 1), "--val-every", "0", "--sample-every", "0",
               "--no-progress", "--output", "", "--metrics-dir", str(out), "--trace", str(out / "trace"),
               "--mode", config["mode"], "--threads", str(config["threads"]), "--data-dir", args.data_dir]
    if config["mode"] == "mpi":
        command = [str(MPIEXEC), "-n", str(config["ranks"]), *command, "--strategy", config["strategy"]]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"{config['name']} failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    trace = Trace.load(str(out / "trace"))
    step_ms = {(s.rank, s.step): 1e3 * s.duration for s in trace.steps if s.step > 1}
    comm: dict = {key: 0.0 for key in step_ms}
    wait: dict = {key: 0.0 for key in step_ms}
    for e in trace.events:
        key = (e.rank, e.step)
        if e.thread == 0 and key in step_ms and is_communication(e.name):
            comm[key] += 1e3 * e.duration
            if e.name in WAIT_CALLS:
                wait[key] += 1e3 * e.duration
    per_rank = metrics["summary"].get("per_rank", [])
    return {
        "step_ms": [s["ms"] for s in metrics["steps"][1:]],
        "comm_share": [comm[k] / step_ms[k] for k in step_ms],
        "wait_share": [wait[k] / step_ms[k] for k in step_ms],
        "grads_hidden": [r["grad_hidden"] for r in per_rank if r["grad_hidden"] is not None],
        "params_hidden": [r["param_hidden"] for r in per_rank if r["param_hidden"] is not None],
        "update_ms": [max(r["update_ms"] for r in per_rank)] if per_rank else [],  # the slowest rank's
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="d12")
    parser.add_argument("-B", "--batch-size", type=int, default=4, help="global batch (default 4)")
    parser.add_argument("-T", "--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per run, after 1 warm-up (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="times the whole list runs (default 2)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--only", help="comma list of configuration names to run (default all)")
    parser.add_argument("--data-dir", default="data", help="llmpy train --data-dir (default ./data)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not MPIEXEC.exists():
        sys.exit(f"bench/distributed.py: no {MPIEXEC}; pip install mpich (a dependency of llmpy)")
    cores = available_cores()
    configs = configurations(cores, [s for s in args.strategies.split(",") if s])
    if args.only:
        names = {n.strip() for n in args.only.split(",")}
        configs = [c for c in configs if c["name"] in names]
    if any(args.batch_size % c["ranks"] for c in configs):
        sys.exit(f"bench/distributed.py: -B {args.batch_size} must be divisible by every rank count")
    samples: dict[str, dict[str, list]] = {c["name"]: {} for c in configs}
    with tempfile.TemporaryDirectory(prefix="llmpy-bench-mpi-") as work:
        for round_index in range(args.rounds):
            for config in configs:
                print(f"round {round_index + 1}/{args.rounds}: {config['name']} ...", file=sys.stderr, flush=True)
                for key, values in run_one(config, args, Path(work), round_index).items():
                    samples[config["name"]].setdefault(key, []).extend(values)
    tokens = args.batch_size * args.seq_len
    rows = []
    for config in configs:
        found = {key: statistics.median(values) if values else None for key, values in samples[config["name"]].items()}
        ms = found["step_ms"]
        rows.append(dict(config, ms_per_step=ms, tokens_per_s=tokens / ms * 1e3, comm_share=found["comm_share"],
                         wait_share=found["wait_share"], grads_hidden=found["grads_hidden"],
                         params_hidden=found["params_hidden"], update_ms=found["update_ms"]))
    base = next((r for r in rows if r["mode"] == "forkjoin"), rows[0])
    print(f"\n{args.model}, T={args.seq_len}, global batch B={args.batch_size} (B/P per rank), {cores} cores; median "
          f"of {args.rounds} rounds x {args.steps} measured steps; 'vs {base['name']}' = throughput ratio")

    def pct(share):
        return f"{100 * share:5.1f}%" if share is not None else f"{'-':>6s}"

    print(f"{'configuration':24s} {'ms/step':>8s} {'tok/s':>7s} {'vs base':>7s} {'comm':>6s} {'wait':>6s} "
          f"{'update ms':>9s} {'grads hidden':>12s} {'params hidden':>13s}")
    for r in rows:
        print(f"{r['name']:24s} {r['ms_per_step']:8.0f} {r['tokens_per_s']:7.0f} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:7.2f} {pct(r['comm_share'])} {pct(r['wait_share'])} "
              f"{r['update_ms'] if r['update_ms'] is not None else float('nan'):9.0f} "
              f"{pct(r['grads_hidden']):>12s} {pct(r['params_hidden']):>13s}")
    if args.json:
        Path(os.path.dirname(os.path.abspath(args.json))).mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
