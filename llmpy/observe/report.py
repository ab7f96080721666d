"""Analysis files written beside a trace: the POP and roofline tables as CSV and the roofline plot."""

from __future__ import annotations

import os

from llmpy.observe.analysis import (POP_FILE, ROOFLINE_FILE, ROOFLINE_PNG, meta_float, pop_csv, pop_table,
                                    roofline_csv, roofline_rows)
from llmpy.observe.plots import roofline_png
from llmpy.observe.trace import Trace


def write_analysis(trace_dir: str, skip_steps: int | None = None) -> dict[str, str]:
    """Write pop.csv, roofline.csv and roofline.png into the trace directory; returns {name: path}."""
    trace = Trace.load(trace_dir)
    directory = os.path.dirname(trace_dir) if trace_dir.endswith(".json") else trace_dir
    directory = directory or "."
    peak = meta_float(trace.meta, "peak_gflops")
    bw = meta_float(trace.meta, "bandwidth_gbs")
    rows = roofline_rows(trace, skip_steps)
    paths = {"pop": os.path.join(directory, POP_FILE), "roofline": os.path.join(directory, ROOFLINE_FILE),
             "roofline_png": os.path.join(directory, ROOFLINE_PNG)}
    with open(paths["pop"], "w", newline="") as f:
        f.write(pop_csv(pop_table(trace, skip_steps)))
    with open(paths["roofline"], "w", newline="") as f:
        f.write(roofline_csv(rows))
    roofline_png(rows, peak, bw, paths["roofline_png"])
    return paths
