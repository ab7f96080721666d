"""`llmpy predict DIR`: the step time of a measured run carried to other ranks, links, strategies and cores."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="metrics/trace folder of a measured run")


def run(args, out=None) -> None:
    out = out if out is not None else sys.stdout
    raise ValueError("llmpy predict is not built yet")
