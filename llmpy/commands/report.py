"""`llmpy report DIR`: one self-contained HTML page of a run or a benchmark (opens offline, no CDN).

DIR is a run's --metrics-dir, its --trace folder, a folder holding both (one level down), or a benchmark's
folder (`llmpy bench --json DIR/results.json`); a prediction.json there (`llmpy predict`) adds predicted
against measured. The page has the run summary, the step and kernel tables, POP metrics, the roofline, the
timeline, scaling plots, per-rank communication and the prediction; a section whose data DIR lacks says what
to run. Plots are inlined, so the one file can be mailed or opened anywhere.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="folder of a run (--metrics-dir, --trace) or a benchmark")
    parser.add_argument("--output", metavar="FILE", help="where to write the page (default RUN_DIR/report.html)")


def run(args, out=None) -> str:
    from llmpy.observe.html_report import write_report

    out = out if out is not None else sys.stdout
    path = write_report(args.run_dir, args.output)
    print(f"wrote {path}", file=out)
    return path
