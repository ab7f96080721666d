"""The same `llmpy bench` command on two checkouts of llmpy, run alternately (A B A B ...), per configuration the
median ms/step of each and their ratio: "is this change slower?" answered side by side, under the same drift.

    git worktree add /tmp/before <rev>
    python bench/compare_revisions.py --before /tmp/before --rounds 2 -- \\
        --model d12 -B 4 -T 64 --modes sequential,forkjoin,tasks --threads 1,2 --gemm-split rows,channels

Each checkout runs as `python -m llmpy.commands.cli` or, for checkouts from before the commands package,
`python -m llmpy.cli`, with PYTHONPATH set to it. The ratio is after / before of the per-round medians, with the
spread over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entry_module(checkout: str) -> str:
    return "llmpy.commands.cli" if os.path.isdir(os.path.join(checkout, "llmpy", "commands")) else "llmpy.cli"


def _run(checkout: str, bench_args: list[str], out_json: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=checkout)
    command = [sys.executable, "-m", _entry_module(checkout), "bench", *bench_args, "--json", out_json]
    done = subprocess.run(command, env=env, cwd=checkout, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: llmpy bench failed:\n{done.stderr[-2000:]}")
    with open(out_json) as f:
        return json.load(f)


def _key(result: dict) -> tuple:
    return result["mode"], str(result["runtime"]), result["threads"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="checkout of the revision to compare against")
    parser.add_argument("--after", default=HERE, help="checkout of the changed revision (default: this one)")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds (default 2)")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then the llmpy bench arguments")
    args = parser.parse_args()
    bench_args = [a for a in args.bench_args if a != "--"]
    medians: dict[str, dict[tuple, list[float]]] = {"before": {}, "after": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for name in ("before", "after"):
                checkout = getattr(args, name)
                results = _run(checkout, bench_args, os.path.join(tmp, f"{name}{round_index}.json"))
                for r in results:
                    medians[name].setdefault(_key(r), []).append(r["ms_per_step_median"])
                print(f"round {round_index + 1}: {name} done", file=sys.stderr, flush=True)
    print(f"{'mode':11s} {'runtime':20s} {'thr':>3s} {'before ms':>10s} {'after ms':>10s} {'after/before':>12s}  "
          f"per round")
    for key in medians["before"]:
        before, after = medians["before"][key], medians["after"].get(key)
        if not after:
            continue
        ratios = [a / b for a, b in zip(after, before)]
        print(f"{key[0]:11s} {key[1]:20s} {key[2]:3d} {np.median(before):10.0f} {np.median(after):10.0f} "
              f"{np.median(ratios):12.3f}  {', '.join(f'{r:.3f}' for r in ratios)}")


if __name__ == "__main__":
    main()
