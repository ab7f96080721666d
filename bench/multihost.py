"""Data-parallel strategies between hosts that are really separate: 2 network-namespace hosts on one machine
joined by a veth link (tests/netns_hosts.py), unshaped and shaped with tc tbf, TCP forced (root only).

    sudo .venv/bin/python bench/multihost.py --model d12 -T 64 -B 4 --steps 5 --rounds 1 --json multihost.json

Every strategy x every link rate runs `llmpy train --mode mpi --threads 1` as one rank per host (B sequences
per rank), one mpiexec across both hosts; the configurations run one after the other, the whole list
`--rounds` times. Per configuration (medians over rounds, measured steps only, the first step is warm-up):
ms per step; the share of the step in MPI calls and in waiting (rank means); the share of gradient and
parameter bytes whose collective had finished before the update needed them (hidden); the network bytes per
step and rank the collectives move (llmpy's per-rank table) and the achieved Gbit/s over the step's
communication span; and, measured independently, the bytes the veth links carried per step and what share of
the link's capacity over the whole step that is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import netns_hosts  # noqa: E402

from llmpy.execution.options import STRATEGIES  # noqa: E402

RATES = {"unshaped": None, "2gbit": "2gbit", "1gbit": "1gbit"}
# --progress: how the collectives' data moves while kernels run; off: every collective starts in the update
PROGRESS_FLAGS = {"thread": ("--mpi-progress", "thread"), "tests": ("--mpi-progress", "tests"),
                  "off": ("--mpi-progress", "thread", "--no-comm-overlap"),
                  "steps": ("--mpi-progress", "thread", "--overlap-steps")}  # parameters behind the next forward
LINK_GBITS = {"unshaped": None, "2gbit": 2.0, "1gbit": 1.0}


def run_shaped(hosts, rate: str, command: list, timeout: float, what: str, env: dict | None = None) -> list[int]:
    """One mpiexec of `command`, one rank per host, over links shaped to `rate`; the bytes each host sent."""
    hosts.shape(RATES[rate])
    try:
        # from a folder without an llmpy of its own: `python -m` puts the working directory first on sys.path
        result, sent = hosts.mpiexec(1, command, timeout, cwd=tempfile.gettempdir(), env=env)
    finally:
        hosts.shape(None)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return sent


def add_probe_arguments(parser: argparse.ArgumentParser, rate: str, repeats: int, saved: str) -> None:
    """The options of a probe script run by `run_probe` (`saved`: what its --json holds)."""
    parser.add_argument("--rate", default=rate, choices=tuple(RATES))
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", help=f"write the {saved} here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the file rank 0 writes


def run_probe(script: str, parser: argparse.ArgumentParser, args, what: str):
    """`script --worker FILE --repeats N` as one rank per host over the link shaped to args.rate; returns what
    its rank 0 wrote to FILE (JSON). Exits with the reason where the hosts cannot be made (not root)."""
    reason = netns_hosts.skip_reason()
    if reason:
        parser.exit(2, f"bench/{Path(script).name}: {reason}\n")
    with tempfile.TemporaryDirectory(prefix="llmpy-probe-") as scratch, netns_hosts.NetnsHosts(2) as hosts:
        out = Path(scratch) / "found.json"
        command = [sys.executable, str(Path(script).resolve()), "--worker", out, "--repeats", args.repeats]
        run_shaped(hosts, args.rate, command, args.timeout, what)
        return json.loads(out.read_text())


def run_one(hosts, strategy: str, rate: str, args, work: Path, round_index: int) -> dict:
    progress = getattr(args, "mpi_progress", "thread")
    revision, source = getattr(args, "revision", ("", None))
    out = work / f"{strategy}-{rate}-{progress}{'-' + revision if revision else ''}-{round_index}"
    command = [sys.executable, "-m", "llmpy", "train", "--model", args.model, "-T", args.seq_len, "-B",
               args.batch_size, "--steps", args.steps + 1, "--val-every", "0", "--sample-every", "0", "--no-progress",
               "--output", "", "--metrics-dir", out, "--mode", "mpi", "--threads", "1", "--strategy", strategy,
               "--rank-mode", args.rank_mode, *PROGRESS_FLAGS[progress], *(["--train-data", args.train_data] if args.train_data else
                                                 ["--data-dir", args.data_dir])]
    sent = run_shaped(hosts, rate, command, args.timeout, f"{strategy} over {rate}",
                      {"PYTHONPATH": source} if source else None)
    metrics = json.loads((out / "metrics.json").read_text())
    ranks = metrics["summary"]["per_rank"]
    steps = metrics["steps"][1:] or metrics["steps"]
    step_ms = statistics.median(s["ms"] for s in steps)
    on_link = max(sent) / (args.steps + 1)  # the busier host's bytes per step (warm-up step included)
    link = LINK_GBITS[rate]
    return {
        "step_ms": step_ms,
        "comm_share": statistics.mean(r["communication_share"] for r in ranks),
        "wait_share": statistics.mean(r["wait_ms"] / r["step_ms"] if r["step_ms"] else 0.0 for r in ranks),
        "grads_hidden": statistics.mean(r["grad_hidden"] for r in ranks if r["grad_hidden"] is not None),
        "params_hidden": _mean([r["param_hidden"] for r in ranks if r["param_hidden"] is not None]),
        "collective_mb": max(r["sent_bytes"] for r in ranks) / 1e6,
        "achieved_gbits": max(r["sent_gbits"] for r in ranks),
        "veth_mb_per_step": on_link / 1e6,
        "link_use": 8 * on_link / (step_ms * 1e-3) / (link * 1e9) if link else None,
    }


def _mean(values):
    return statistics.mean(values) if values else None


def format_table(results: dict) -> str:
    def pct(x):
        return f"{100 * x:5.0f}%" if x is not None else "     -"

    lines = [f"{'strategy':10s} {'link':9s} {'progress':14s} {'ms/step':>8s} {'comm':>6s} {'wait':>6s} {'grads':>6s} {'params':>6s} "
             f"{'MB/step':>8s} {'Gbit/s':>7s} {'veth MB':>8s} {'link use':>8s}",
             f"{'':10s} {'':9s} {'':14s} {'':>8s} {'':>6s} {'':>6s} {'hidden':>6s} {'hidden':>6s} {'(coll.)':>8s} "
             f"{'(span)':>7s} {'/step':>8s} {'(step)':>8s}"]
    for (strategy, rate, progress), r in results.items():
        lines.append(f"{strategy:10s} {rate:9s} {progress:14s} {r['step_ms']:8.1f} {pct(r['comm_share'])} {pct(r['wait_share'])} "
                     f"{pct(r['grads_hidden'])} {pct(r['params_hidden'])} {r['collective_mb']:8.2f} "
                     f"{r['achieved_gbits']:7.2f} {r['veth_mb_per_step']:8.2f} {pct(r['link_use']):>8s}")
    return "\n".join(lines)


def add_run_arguments(parser: argparse.ArgumentParser, steps: int) -> None:
    """The options of a matrix of runs between the namespace hosts (this bench's and predict_validation.py's)."""
    parser.add_argument("--model", default="d12")
    parser.add_argument("-T", "--seq-len", type=int, default=64)
    parser.add_argument("-B", "--batch-size", type=int, default=4, help="sequences per rank (default 4)")
    parser.add_argument("--steps", type=int, default=steps, help="measured steps per run (plus one warm-up)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--rates", default=",".join(RATES), help="unshaped,2gbit,1gbit")
    parser.add_argument("--rank-mode", default="sequential", choices=("sequential", "tasks"))
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--train-data", help="glob of training shards (overrides --data-dir)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, steps=5)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--progress", default="thread",
                        help="comma list of thread, tests (--mpi-progress), off (--no-comm-overlap: no "
                             "overlap, the baseline) and steps (thread with --overlap-steps), each run beside the others")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--keep", metavar="DIR", help="keep every run's metrics folder in DIR "
                                                      "(STRATEGY-LINK-PROGRESS-ROUND), e.g. for `llmpy predict --validate`")
    parser.add_argument("--revisions", default="", metavar="NAME=DIR,...",
                        help="run every configuration once per checkout DIR (its llmpy first on PYTHONPATH), "
                             "alternately, e.g. before=/tmp/before,after=.")
    args = parser.parse_args(argv)
    revisions = [tuple(r.split("=", 1)) for r in args.revisions.split(",") if r] or [("", None)]
    if any(len(r) != 2 or (r[1] is not None and not Path(r[1], "llmpy").is_dir()) for r in revisions):
        parser.error(f"--revisions: expected NAME=DIR with DIR/llmpy, got {args.revisions!r}")
    reason = netns_hosts.skip_reason()
    if reason:
        parser.exit(2, f"bench/multihost.py: {reason}\n")
    strategies, rates = args.strategies.split(","), args.rates.split(",")
    for rate in rates:
        if rate not in RATES:
            parser.error(f"--rates: {rate!r} is not one of {', '.join(RATES)}")
    samples: dict = {}
    with tempfile.TemporaryDirectory(prefix="llmpy-multihost-") as scratch, netns_hosts.NetnsHosts(2) as hosts:
        work = args.keep or scratch
        for round_index in range(args.rounds):
            for strategy in strategies:
                for rate in rates:
                    for progress in args.progress.split(","):
                        for revision in revisions:
                            args.mpi_progress, args.revision = progress, (revision[0], str(Path(revision[1]).resolve())
                                                                          if revision[1] else None)
                            found = run_one(hosts, strategy, rate, args, Path(work), round_index)
                            label = f"{progress} {revision[0]}".strip()
                            samples.setdefault((strategy, rate, label), []).append(found)
                            print(f"round {round_index + 1}: {strategy} over {rate}, {label}: "
                                  f"{found['step_ms']:.1f} ms/step", flush=True)
    results = {key: {k: _median([r[k] for r in runs]) for k in runs[0]} for key, runs in samples.items()}
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([{"strategy": s, "link": r, "progress": p, **v}
                                               for (s, r, p), v in results.items()], indent=1))


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


if __name__ == "__main__":
    main()
