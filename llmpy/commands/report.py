"""`llmpy report DIR`: one self-contained HTML page of a run or a benchmark (opens offline, no CDN)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="folder of a run (--metrics-dir, --trace) or a benchmark")


def run(args, out=None) -> None:
    out = out if out is not None else sys.stdout
    raise ValueError("llmpy report is not built yet")
