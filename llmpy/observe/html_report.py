"""One self-contained HTML page of a run or a benchmark (`llmpy report DIR`).

The page opens offline: CSS inline, every plot a PNG in a base64 data: URI, no script, no external URL. Its
sections are always there, in this order, each with an id (summary, steps, kernels, pop, roofline, timeline,
scaling, communication, prediction); one whose data DIR lacks says so and what to run to record it.

What is read, in DIR itself or in a folder one level down:
  metrics.json (summary, steps, kernels) or steps.csv / kernels.csv   `llmpy train --metrics-dir DIR`
  events.json, the trace: POP table, roofline, timeline               `llmpy train --trace DIR/trace`
  a JSON list of benchmark results: the scaling plots                 `llmpy bench --json DIR/results.json`
  prediction.json: predicted against measured                         `llmpy predict`
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import tempfile
from dataclasses import dataclass, field

from llmpy.observe.analysis import TE_NOTE, TOTAL, describe, kept_steps, meta_float, pop_table, roofline_rows
from llmpy.observe.trace import CHROME_FILE, EVENTS_FILE, Trace

REPORT_FILE = "report.html"
METRICS_FILE = "metrics.json"
PREDICTION_FILE = "prediction.json"
SECTIONS = (("summary", "Run summary"), ("steps", "Steps"), ("kernels", "Kernels"), ("pop", "POP metrics"),
            ("roofline", "Roofline"), ("timeline", "Timeline"), ("scaling", "Scaling"),
            ("communication", "Per-rank communication"), ("prediction", "Predicted vs measured"))
NOT_BENCH_JSON = {METRICS_FILE, EVENTS_FILE, CHROME_FILE, PREDICTION_FILE}
LARGEST_BENCH_JSON = 64 << 20  # bytes: a benchmark's results are small; a bigger JSON is something else
STEP_ROWS_SHOWN = 60  # a long run's step table: the first and last half of these, the rest in steps.csv
POP_STEPS_SHOWN = 8  # per-step POP rows beyond the totals, when the trace has at most this many kept steps
TIMELINE_STEPS = 3  # the timeline draws this many kept steps, so the bars stay readable

# ---------------------------------------------------------------------------------------------------------
# Finding and reading the inputs


@dataclass
class ReportInputs:
    directory: str
    summary: dict = field(default_factory=dict)  # metrics.json "summary"
    step_rows: list[dict] = field(default_factory=list)
    kernel_rows: list[dict] = field(default_factory=list)
    trace: Trace | None = None
    trace_dir: str | None = None
    other_traces: list[str] = field(default_factory=list)
    bench_results: list[dict] = field(default_factory=list)
    prediction: dict | None = None
    sources: list[str] = field(default_factory=list)  # the files the page was made from

    def empty(self) -> bool:
        return not (self.summary or self.step_rows or self.kernel_rows or self.trace or self.bench_results
                    or self.prediction)


def _candidate_dirs(directory: str) -> list[str]:
    """DIR itself first, then its sub-folders (one level down), by name."""
    children = sorted(os.path.join(directory, name) for name in os.listdir(directory)
                      if not name.startswith(".") and os.path.isdir(os.path.join(directory, name)))
    return [directory] + children


def _first_with(dirs: list[str], *names: str) -> str | None:
    return next((d for d in dirs if any(os.path.isfile(os.path.join(d, n)) for n in names)), None)


def _number(text: str):
    """A CSV cell as int or float when it reads as one, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _read_csv(path: str) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except (OSError, csv.Error, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read run metrics ({error}); rerun with `llmpy train --metrics-dir "
                         f"{os.path.dirname(path)}`") from None


def _read_metrics(metrics_dir: str, inputs: ReportInputs) -> None:
    path = os.path.join(metrics_dir, METRICS_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                document = json.load(f)
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")  # one line from the CLI, as for a JSON error
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: cannot read run metrics ({error}); rerun with `llmpy train --metrics-dir "
                             f"{metrics_dir}`") from None
        inputs.summary = document.get("summary") or {}
        inputs.step_rows = list(document.get("steps") or [])
        inputs.kernel_rows = list(document.get("kernels") or [])
        inputs.sources.append(path)
    for name, attribute in (("steps.csv", "step_rows"), ("kernels.csv", "kernel_rows")):
        csv_path = os.path.join(metrics_dir, name)
        if not getattr(inputs, attribute) and os.path.isfile(csv_path):
            setattr(inputs, attribute, _read_csv(csv_path))
            inputs.sources.append(csv_path)


def _bench_results(path: str) -> list[dict] | None:
    """The entries of a `llmpy bench --json` file, or None when the JSON at `path` is something else."""
    try:
        if os.path.getsize(path) > LARGEST_BENCH_JSON:
            return None
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(results, list) and results and all(
            isinstance(r, dict) and "ms_per_step_median" in r and "mode" in r for r in results):
        return results
    return None


def _find_bench(dirs: list[str], inputs: ReportInputs) -> None:
    for d in dirs:
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            if name.endswith(".json") and name not in NOT_BENCH_JSON and os.path.isfile(path):
                results = _bench_results(path)
                if results:
                    inputs.bench_results = results
                    inputs.sources.append(path)
                    return


def _read_prediction(path: str) -> dict:
    try:
        with open(path) as f:
            prediction = json.load(f)
        if not isinstance(prediction, dict) or "step_ms" not in prediction:
            raise ValueError('not a prediction: no "step_ms"')
        components = prediction.get("components") or []
        if not isinstance(components, list) or not all(isinstance(c, dict) for c in components):
            raise ValueError('"components" is not a list of objects')
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the prediction ({error}); write it again with `llmpy predict`") from None
    return prediction


def _trace_dirs(dirs: list[str], bench_results: list[dict]) -> list[str]:
    """Folders holding a trace: DIR and its sub-folders, then the traces a benchmark's entries name."""
    found = [d for d in dirs if os.path.isfile(os.path.join(d, EVENTS_FILE))]
    for entry in bench_results:
        named = entry.get("trace")
        if isinstance(named, str) and os.path.isfile(os.path.join(named, EVENTS_FILE)) and named not in found:
            found.append(named)
    return found


def find_inputs(directory: str) -> ReportInputs:
    """Everything the page can show, read from `directory` and the folders one level below it."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"{directory}: no such folder; give the folder of a run (`llmpy train --metrics-dir DIR "
                         f"--trace DIR/trace`) or of a benchmark (`llmpy bench --json DIR/results.json`)")
    dirs = _candidate_dirs(directory)
    inputs = ReportInputs(directory)
    metrics_dir = _first_with(dirs, METRICS_FILE, "steps.csv", "kernels.csv")
    if metrics_dir:
        _read_metrics(metrics_dir, inputs)
    _find_bench(dirs, inputs)
    traces = _trace_dirs(dirs, inputs.bench_results)
    if traces:
        inputs.trace_dir, inputs.other_traces = traces[0], traces[1:]
        inputs.trace = Trace.load(traces[0])
        inputs.sources.append(os.path.join(traces[0], EVENTS_FILE))
    prediction_dir = _first_with(dirs, PREDICTION_FILE)
    if prediction_dir:
        inputs.prediction = _read_prediction(os.path.join(prediction_dir, PREDICTION_FILE))
        inputs.sources.append(os.path.join(prediction_dir, PREDICTION_FILE))
    if inputs.empty():
        raise ValueError(f"{directory}: nothing to report (no {METRICS_FILE}, steps.csv, trace {EVENTS_FILE}, "
                         f"benchmark JSON or {PREDICTION_FILE} here or one level down); run `llmpy train "
                         f"--metrics-dir {directory} --trace {directory}/trace` or `llmpy bench --json "
                         f"{directory}/results.json` first")
    return inputs


# ---------------------------------------------------------------------------------------------------------
# HTML pieces (every text through html.escape)


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value, digits: int = 1) -> str:
    """A number for a table cell: integers with separators, floats to `digits` decimals (3 significant
    figures when small), '-' for None, NaN or infinity."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if not math.isfinite(value):
        return "-"
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if value != 0 and abs(value) < 10 ** -digits * 10:
        return f"{value:.3g}"
    return f"{value:,.{digits}f}"


def pct(value) -> str:
    return f"{100 * value:.1f}%" if _finite(value) else "-"


def _table(headers: list[str], rows: list[list], numeric_from: int = 1) -> str:
    """A table of already formatted cells; columns from `numeric_from` on are right-aligned."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f'<td class="{"num" if i >= numeric_from else "txt"}">{_esc(c)}</td>'
                        for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _missing(text: str) -> str:
    return f'<p class="missing">{_esc(text)}</p>'


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _png(path: str, alt: str) -> str:
    """An image file as an <img> with its bytes inline (data: URI), so the page needs no other file."""
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'


def _key_values(pairs: list[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


# ---------------------------------------------------------------------------------------------------------
# Sections: each returns its body; a section without data says what to run

SUMMARY_FIELDS = (("model", "model"), ("num_parameters", "parameters"), ("mode", "mode"), ("runtime", "runtime"),
                  ("rank_mode", "rank mode"), ("strategy", "strategy"), ("threads", "threads (per rank)"),
                  ("ranks", "ranks"), ("block_tokens", "block tokens K"), ("B", "B"), ("T", "T"),
                  ("grad_accum", "gradient accumulation"), ("steps", "steps"), ("measured_steps", "measured steps"),
                  ("warmup_steps", "warm-up steps"), ("ms_per_step_median", "ms/step (median)"),
                  ("tokens_per_s", "tokens/s"), ("mfu", "MFU"), ("peak_gflops", "peak GFLOP/s (MFU's)"),
                  ("bandwidth_gbs", "memory bandwidth GB/s"))


def _summary_pairs(summary: dict) -> list[tuple[str, str]]:
    """The run's description in a fixed order, then any other plain value it holds."""
    known = dict(SUMMARY_FIELDS)
    pairs = [(label, pct(summary[key]) if key == "mfu" else fmt(summary[key]))
             for key, label in SUMMARY_FIELDS if key in summary]
    pairs += [(key, fmt(value)) for key, value in summary.items()
              if key not in known and not isinstance(value, (dict, list))]
    return pairs


def _phase_table(phases: dict) -> str:
    step = phases.get("step") or 0.0
    rows = [[name, fmt(ms, 2), pct(ms / step) if step and name != "step" else ""] for name, ms in phases.items()]
    return _table(["phase", "ms/step", "share of step"], rows)


def summary_section(inputs: ReportInputs) -> str:
    if inputs.summary:
        body = _key_values(_summary_pairs(inputs.summary))
        if inputs.summary.get("phases_ms"):
            body += "<h3>Phases (mean over the measured steps)</h3>" + _phase_table(inputs.summary["phases_ms"])
        return body
    if inputs.trace is not None:
        return (_note(f"no {METRICS_FILE}: the description the trace recorded") +
                _key_values(_summary_pairs(inputs.trace.meta)) + f"<pre>{_esc(describe(inputs.trace))}</pre>")
    if inputs.bench_results:
        first = inputs.bench_results[0]
        pairs = [("benchmark", f"{len(inputs.bench_results)} configurations")]
        pairs += [(label, fmt(first[key])) for key, label in (("model", "model"), ("B", "B"), ("T", "T"),
                                                                ("steps", "measured steps each")) if key in first]
        return _key_values(pairs)
    return _missing(f"not recorded: run with `llmpy train --metrics-dir {inputs.directory}`")


STEP_COLUMNS = (("step", "step", 0), ("loss", "loss", 4), ("ms", "ms", 1), ("tokens_per_s", "tokens/s", 0),
                ("tokens_per_s_per_core", "tokens/s/core", 0), ("mfu", "MFU", None), ("forward_ms", "forward ms", 1),
                ("zero_grad_ms", "zero_grad ms", 2), ("backward_ms", "backward ms", 1), ("update_ms", "update ms", 1))


def _trace_step_rows(trace: Trace) -> list[dict]:
    """Step rows from a trace alone (rank 0's steps): loss, wall ms and each phase's ms."""
    rows = []
    for record in sorted((s for s in trace.steps if s.rank == min(trace.ranks() or [0])), key=lambda s: s.step):
        row = {"step": record.step, "loss": record.loss, "ms": 1e3 * record.duration}
        for phase, (start, end) in record.phases.items():
            row[f"{phase}_ms"] = 1e3 * (end - start)
        rows.append(row)
    return rows


def _shown_rows(rows: list[dict]) -> tuple[list[dict], int]:
    """A long run's first and last rows (the whole table is in steps.csv), and how many were left out."""
    if len(rows) <= STEP_ROWS_SHOWN:
        return rows, 0
    half = STEP_ROWS_SHOWN // 2
    return rows[:half] + rows[-half:], len(rows) - 2 * half


def steps_section(inputs: ReportInputs) -> str:
    rows, note = inputs.step_rows, ""
    if not rows and inputs.trace is not None:
        rows, note = _trace_step_rows(inputs.trace), _note("from the trace (rank 0), no steps.csv here")
    if not rows:
        return _missing(f"not recorded: run with `llmpy train --metrics-dir {inputs.directory}` (steps.csv)")
    columns = [c for c in STEP_COLUMNS if c[0] in rows[0]]
    columns += [(k, k, 2) for k in rows[0] if k not in {c[0] for c in STEP_COLUMNS}]
    shown, left_out = _shown_rows(rows)
    cells = [[pct(row.get(key)) if digits is None else fmt(row.get(key), digits) for key, _, digits in columns]
             for row in shown]
    if left_out:
        half = STEP_ROWS_SHOWN // 2
        cells.insert(half, [f"... {left_out} steps not shown (all in steps.csv)"] + [""] * (len(columns) - 1))
    warmup = inputs.summary.get("warmup_steps")
    if warmup:
        which = "step 1 is" if warmup == 1 else f"the first {warmup} steps are"
        note += _note(f"{which} warm-up, left out of the averages")
    return note + _table([label for _, label, _ in columns], cells)


def kernels_section(inputs: ReportInputs) -> str:
    if not inputs.kernel_rows:
        return _missing(f"not recorded: run with `llmpy train --metrics-dir {inputs.directory}` (kernels.csv)")
    rows = [[k.get("name"), fmt(k.get("calls_per_step"), 0), fmt(k.get("ms_per_step"), 2), fmt(k.get("mean_us"), 0),
             pct(k.get("share")), fmt(k.get("gflops"), 1), fmt(k.get("gbytes"), 1)] for k in inputs.kernel_rows]
    inside = sum(k.get("ms_per_step") or 0.0 for k in inputs.kernel_rows)
    rows.append(["all kernels", "", fmt(inside, 2), "", "", "", ""])
    return (_table(["kernel", "calls/step", "ms/step", "mean us", "share of step", "GFLOP/s", "GB/s"], rows) +
            _note("means over the measured steps; share can pass 100% when kernels run side by side (tasks, "
                  "helper threads); GFLOP/s and GB/s by each kernel's cost model"))


def _trace_hint(inputs: ReportInputs) -> str:
    return _missing(f"not recorded: run with --trace (`llmpy train --trace {inputs.directory}/trace`)")


def pop_section(inputs: ReportInputs) -> str:
    if inputs.trace is None:
        return _trace_hint(inputs)
    rows = pop_table(inputs.trace)
    kept, _ = kept_steps(inputs.trace)
    shown = [r for r in rows if r.step == TOTAL] + ([r for r in rows if r.step != TOTAL]
                                                     if len(kept) <= POP_STEPS_SHOWN else [])
    cells = []
    for row in shown:
        m = row.metrics
        cells.append([("all measured" if row.step == TOTAL else row.step), row.region, fmt(1e3 * m.runtime, 2),
                      m.processes, fmt(1e3 * m.useful_mean, 2), pct(m.load_balance),
                      pct(m.serialization_efficiency), pct(m.transfer_efficiency),
                      pct(m.communication_efficiency), pct(m.parallel_efficiency)])
    if not cells:
        return _missing("the trace holds no steps")
    table = _table(["step", "region", "runtime ms", "processes", "useful ms (mean)", "LB", "SerE", "TE", "CommE",
                    "PE"], cells, numeric_from=2)
    more = "" if len(kept) <= POP_STEPS_SHOWN else f" Per-step rows: `llmpy analyze {inputs.trace_dir}`."
    return table + _note("processes = thread rows of all ranks; LB = mean/max useful time; CommE = max useful/"
                         "runtime; PE = LB x CommE. " + TE_NOTE + "." + more)


def roofline_section(inputs: ReportInputs, workdir: str) -> str:
    from llmpy.observe.plots import roofline_png

    if inputs.trace is None:
        return _trace_hint(inputs)
    peak, bandwidth = meta_float(inputs.trace.meta, "peak_gflops"), meta_float(inputs.trace.meta, "bandwidth_gbs")
    rows = roofline_rows(inputs.trace)
    image = _png(roofline_png(rows, peak, bandwidth, os.path.join(workdir, "roofline.png")), "roofline")
    cells = [[r.name, r.calls, fmt(1e3 * r.time, 2), fmt(r.arithmetic_intensity, 2), fmt(r.gflops, 2),
              fmt(r.gbs, 2), fmt(r.attainable_gflops, 1), r.bound, pct(r.fraction_of_roof)] for r in rows]
    roofs = (f"roofs: peak {fmt(peak)} GFLOP/s, memory bandwidth {fmt(bandwidth)} GB/s" if peak and bandwidth else
             "no peak or bandwidth recorded in the trace: no roof")
    return (_note(roofs) + image +
            _table(["kernel", "calls", "wall ms", "AI FLOP/B", "GFLOP/s", "GB/s", "attainable GFLOP/s", "bound",
                    "of roof"], cells))


def _timeline_steps(trace: Trace) -> tuple[int, int] | None:
    kept, _ = kept_steps(trace)
    return (kept[0], kept[min(len(kept), TIMELINE_STEPS) - 1]) if kept else None


def timeline_section(inputs: ReportInputs, workdir: str) -> str:
    from llmpy.observe.plots import timeline_png

    if inputs.trace is None:
        return _trace_hint(inputs)
    steps = _timeline_steps(inputs.trace)
    path = timeline_png(inputs.trace, os.path.join(workdir, "timeline.png"), steps=steps)
    which = "all steps" if steps is None else f"steps {steps[0]}-{steps[1]}"
    others = (_note("other traces here (report each one with `llmpy report` on its folder): " +
                    ", ".join(inputs.other_traces)) if inputs.other_traces else "")
    return _note(f"{inputs.trace_dir}: {which}, every thread row (task mode: every worker) of every rank") + \
        _png(path, "timeline") + others


def _bench_table(results: list[dict]) -> str:
    cells = [[r.get("mode"), r.get("runtime", "-"), r.get("threads"), r.get("ranks", 1), r.get("B"), r.get("T"),
              fmt(r.get("ms_per_step_median"), 1), fmt(r.get("ms_per_step_min"), 1), fmt(r.get("ms_per_step_max"), 1),
              fmt(r.get("speedup"), 2), pct(r.get("efficiency")), fmt(r.get("tokens_per_s"), 0), pct(r.get("mfu"))]
             for r in results]
    return _table(["mode", "runtime", "threads", "ranks", "B", "T", "ms/step median", "min", "max", "speedup",
                   "efficiency", "tokens/s", "MFU"], cells, numeric_from=2)


def scaling_section(inputs: ReportInputs, workdir: str) -> str:
    from llmpy.observe.plots import scaling_pngs

    if not inputs.bench_results:
        return _missing(f"not recorded: a benchmark's results, `llmpy bench --json {inputs.directory}/results.json`")
    paths = scaling_pngs(inputs.bench_results, os.path.join(workdir, "scaling"))
    images = "".join(_png(p, os.path.splitext(os.path.basename(p))[0].replace("_", " ")) for p in paths)
    return _bench_table(inputs.bench_results) + images


def _megabytes(value) -> str:
    return fmt(value / 1e6, 2) if _finite(value) else "-"


def _rank_row(r: dict) -> list:
    return [r.get("rank"), fmt(r.get("step_ms"), 1), fmt(r.get("compute_ms"), 1), fmt(r.get("update_ms"), 1),
            fmt(r.get("communication_ms"), 1), fmt(r.get("wait_ms"), 1), pct(r.get("communication_share")),
            pct(r.get("grad_hidden")), pct(r.get("param_hidden")), _megabytes(r.get("sent_bytes")),
            _megabytes(r.get("received_bytes")), fmt(r.get("sent_gbits"), 2), fmt(r.get("received_gbits"), 2)]


def _call_rows(per_rank: list[dict]) -> list[list]:
    """Per rank and MPI call: ms per step and the network bytes of that call."""
    rows = []
    for r in per_rank:
        traffic = r.get("bytes_by_call") or {}
        for name, ms in sorted((r.get("communication_by_call_ms") or {}).items()):
            moved = traffic.get(name) or {}
            rows.append([r.get("rank"), name, fmt(ms, 2), _megabytes(moved.get("sent")),
                         _megabytes(moved.get("received"))])
    return rows


def communication_section(inputs: ReportInputs) -> str:
    per_rank = inputs.summary.get("per_rank")
    if not per_rank:
        return _missing(f"not recorded: a data-parallel run records it (`mpiexec -n 2 llmpy train --mode mpi "
                        f"--metrics-dir {inputs.directory}`)")
    strategy = inputs.summary.get("strategy", "-")
    head = _note(f"strategy {strategy}, {len(per_rank)} ranks; ms per measured step. compute = forward+backward "
                 "kernels, update = AdamW kernels, comm = time in MPI calls (wait: MPI_Waitall and blocking ones); "
                 "hidden = share of the bytes whose collective had finished before the update needed them; MB = "
                 "network bytes per step; Gbit/s over the span from the step's first collective to its last wait")
    ranks = _table(["rank", "step ms", "compute ms", "update ms", "comm ms", "wait ms", "comm share",
                    "grads hidden", "params hidden", "MB out", "MB in", "Gbit/s out", "Gbit/s in"],
                   [_rank_row(r) for r in per_rank])
    calls = _table(["rank", "MPI call", "ms/step", "MB out", "MB in"], _call_rows(per_rank), numeric_from=2)
    return head + ranks + "<h3>By collective</h3>" + calls


def _relative_error(predicted, measured) -> str:
    if not (_finite(predicted) and _finite(measured)) or measured == 0:
        return "-"
    return f"{100 * (predicted - measured) / measured:+.1f}%"


def prediction_section(inputs: ReportInputs) -> str:
    prediction = inputs.prediction
    if prediction is None:
        return _missing(f"not recorded: `llmpy predict` writes {PREDICTION_FILE} into the run's folder")
    target = prediction.get("target") or {}
    pairs = [(str(k), v if isinstance(v, str) else json.dumps(v)) for k, v in target.items()]
    rows = [["step", fmt(prediction.get("step_ms"), 2), fmt(prediction.get("measured_step_ms"), 2),
             _relative_error(prediction.get("step_ms"), prediction.get("measured_step_ms"))]]
    for c in prediction.get("components") or []:
        rows.append([c.get("name"), fmt(c.get("predicted_ms"), 2), fmt(c.get("measured_ms"), 2),
                     _relative_error(c.get("predicted_ms"), c.get("measured_ms"))])
    return ("<h3>Target</h3>" + (_key_values(pairs) if pairs else _note("no target recorded")) +
            _table(["component", "predicted ms", "measured ms", "error (predicted - measured) / measured"], rows) +
            _note("'-': no measurement of that component") + _timeline_table(prediction.get("gradient_timeline")))


def _timeline_table(timeline: dict | None) -> str:
    """Per bucket, predicted and measured: when its gradient collectives started and completed (rank 0)."""
    predicted, measured = (timeline or {}).get("predicted"), (timeline or {}).get("measured")
    if not predicted or not measured or len(predicted["buckets"]) != len(measured["buckets"]):
        return ""
    rows = [[str(p["part"]), fmt(p["bytes"] / 1e6, 1), fmt(p["start_ms"], 0), fmt(m["start_ms"], 0),
             fmt(p["done_ms"], 0), fmt(m["done_ms"], 0)] for p, m in zip(predicted["buckets"], measured["buckets"])]
    rows.append(["update started", "", fmt(predicted["update_start_ms"], 0), fmt(measured["update_start_ms"], 0),
                 "", ""])
    return ("<h3>Gradient timeline</h3>" +
            _table(["bucket (part)", "MB", "started, predicted", "started, measured", "completed, predicted",
                    "completed, measured"], rows) +
            _note("ms from the first bucket's collectives; parts in backward's order: the final layernorm (the "
                  "highest), the blocks from the last, the encoder (-1)"))


# ---------------------------------------------------------------------------------------------------------
# The page

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1400px; padding: 0 1.5em 3em; color: #222; }
h1 { font-size: 1.5em; margin-top: 1em; } h3 { font-size: 1.05em; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 2px 8px; } th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; } table.kv th { width: 14em; }
tbody tr:nth-child(even) { background: #fafafa; }
img { display: block; max-width: 100%; height: auto; margin: 0.5em 0; border: 1px solid #eee; }
.missing { color: #8a5a00; background: #fff7e0; padding: 0.4em 0.8em; border-left: 3px solid #e0b040; }
.note { color: #555; font-size: 0.92em; } pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
footer { margin-top: 3em; color: #777; font-size: 0.85em; }
"""


def _title(inputs: ReportInputs) -> str:
    meta = inputs.summary or (inputs.trace.meta if inputs.trace is not None else {})
    parts = [str(meta[k]) for k in ("model", "mode", "strategy") if k in meta]
    if _finite(meta.get("ranks")) and meta["ranks"] > 1:
        parts.append(f"{meta['ranks']} ranks")
    if "threads" in meta:
        parts.append(f"{meta['threads']} threads")
    if not parts and inputs.bench_results:
        parts.append(f"benchmark of {len(inputs.bench_results)} configurations")
    return "llmpy report: " + (", ".join(parts) if parts else os.path.basename(os.path.abspath(inputs.directory)))


def _section_bodies(inputs: ReportInputs, workdir: str) -> dict[str, str]:
    return {"summary": summary_section(inputs), "steps": steps_section(inputs), "kernels": kernels_section(inputs),
            "pop": pop_section(inputs), "roofline": roofline_section(inputs, workdir),
            "timeline": timeline_section(inputs, workdir), "scaling": scaling_section(inputs, workdir),
            "communication": communication_section(inputs), "prediction": prediction_section(inputs)}


def build_report(directory: str) -> str:
    """The whole page as one HTML string (plots drawn into a temporary folder, then inlined)."""
    inputs = find_inputs(directory)
    with tempfile.TemporaryDirectory(prefix="llmpy-report-") as workdir:
        bodies = _section_bodies(inputs, workdir)
    title = _title(inputs)
    nav = "".join(f'<a href="#{sid}">{_esc(name)}</a>' for sid, name in SECTIONS)
    sections = "".join(f'<section id="{sid}"><h2>{_esc(name)}</h2>{bodies[sid]}</section>' for sid, name in SECTIONS)
    sources = "".join(f"<li>{_esc(path)}</li>" for path in inputs.sources)
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<link rel="icon" href="data:,">'  # no favicon request: the page asks for no other file
            f"<title>{_esc(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{_esc(title)}</h1><nav>{nav}</nav>{sections}"
            f"<footer>made by llmpy report from:<ul>{sources}</ul></footer></body></html>\n")


def write_report(directory: str, output: str | None = None) -> str:
    """Write the page atomically to `output` (default DIR/report.html); returns its path."""
    from llmpy.io.formats import atomic_write_bytes

    page = build_report(directory)
    path = output or os.path.join(directory, REPORT_FILE)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
