"""Metrics recorded by every run, the cost model, the recorder's per-thread view, and `llmpy bench`."""

import csv
import json
import statistics

import numpy as np
import pytest

from llmpy.core.config import GPT2Config
from llmpy.execution.factory import make_execution_model
from llmpy.execution.threads import available_cores
from llmpy.kernels.costs import kernel_cost
from llmpy.core.model import GPT2
from llmpy.core.optim import AdamW
from llmpy.observe.recorder import Recorder
from llmpy.execution.base import train_step
from test_cli import llmpy, text_dataset  # noqa: F401  (fixture)

CONFIG = GPT2Config(max_seq_len=32, vocab_size=500, padded_vocab_size=512, num_layers=2, num_heads=2, channels=32)


def test_matmul_and_attention_costs_match_hand_counts():
    N, C, OC = 6, 5, 7
    out, inp, weight, bias = np.zeros((N, OC)), np.zeros((N, C)), np.zeros((OC, C)), np.zeros(OC)
    # GEMM: N*OC dot products of length C, a multiply and an add each; bias: one add per output
    assert kernel_cost("matmul_forward", (out, inp, weight, None)) == (2 * N * C * OC, 4 * (N * C + OC * C + N * OC))
    flops, moved = kernel_cost("matmul_forward", (out, inp, weight, bias))
    assert flops == 2 * N * C * OC + N * OC
    # causal attention over T=4 query rows, 2 heads, 2 sequences: (1+2+3+4) query-key pairs per head
    B, T, NH, hs = 2, 4, 2, 3
    qkv = np.zeros((B, T, 3 * NH * hs))
    att = np.zeros((B, NH, T, T))
    flops, _ = kernel_cost("attention_llmc_forward", (np.zeros((B, T, NH * hs)), att, att, qkv, NH, 0, B, 0, T))
    assert flops == B * NH * 10 * (4 * hs + 5)
    # a block of query rows [2, 4) has (3+4) pairs per head
    flops, _ = kernel_cost("attention_llmc_forward", (np.zeros((B, T, NH * hs)), att, att, qkv, NH, 0, B, 2, 4))
    assert flops == B * NH * 7 * (4 * hs + 5)
    # the tiled kernel counts the same causal pairs (not the masked half of its diagonal tiles)
    lse = np.zeros((B, NH, T))
    flops, _ = kernel_cost("attention_forward", (np.zeros((B, T, NH * hs)), lse, qkv, NH, 0, B, 2, 4))
    assert flops == B * NH * 7 * (4 * hs + 5)
    # backward: scores again (2 hs), dv, dP, dq, dk (8 hs) per pair
    flops, _ = kernel_cost("attention_backward", (qkv, np.zeros((B, T, NH * hs)), qkv, np.zeros((B, T, NH * hs)), lse,
                                                  NH, 0, B, 0, T, False))
    assert flops == B * NH * 10 * (10 * hs + 8)
    assert kernel_cost("unknown_kernel", ()) == (0.0, 0.0)


def _recorded_steps(mode, threads, per_thread, steps=3):
    execution = make_execution_model(mode, threads)
    try:
        model = GPT2(CONFIG, 2, 16, execution.kernels)
        model.init_random(0)
        optimizer = AdamW(model.params, kernels=execution.kernels)
        recorder = Recorder(per_thread=per_thread, threads=threads, keep_calls=True)
        model.observer = optimizer.observer = recorder
        rng = np.random.default_rng(0)
        for step in range(1, steps + 1):
            inputs, targets = rng.integers(0, CONFIG.vocab_size, (2, 2, 16))
            train_step(model, optimizer, [(inputs, targets)], 1e-3, recorder, step)
        return recorder
    finally:
        execution.close()


def test_recorder_sees_every_kernel_call_in_its_phase():
    recorder = _recorded_steps("sequential", 1, per_thread=False)
    per_step = [c for c in recorder.calls if c[3] == 2]
    L = CONFIG.num_layers
    names = [c[0] for c in per_step]
    assert names.count("matmul_forward") == 4 * L + 1
    assert names.count("matmul_backward_weight") == 4 * L + 1
    assert names.count("attention_backward") == L
    assert names.count("adamw_update") == 1
    phases = {c[0]: c[1] for c in per_step}
    assert phases["encoder_forward"] == "forward" and phases["encoder_backward"] == "backward"
    assert phases["adamw_update"] == "update"
    for step in recorder.steps:
        # the phases tile the step: they add up to it (within 5%, the bound)
        parts = sum(end - start for start, end in step.phases.values())
        assert abs(parts - step.duration) <= 0.05 * step.duration
        calls = [c for c in recorder.calls if c[3] == step.step]
        assert all(step.start <= c[4] <= c[5] <= step.end for c in calls)
        assert sum(c[5] - c[4] for c in calls) <= step.duration
        # the totals every run keeps agree with the individual calls
        totals = recorder.kernel_totals[step.step]
        assert sum(t[0] for t in totals.values()) == len(calls)
        assert sum(t[1] for t in totals.values()) == pytest.approx(sum(c[5] - c[4] for c in calls))
    assert not Recorder().calls and Recorder().keep_calls is False


@pytest.mark.skipif(available_cores() < 2, reason="needs 2 cores")
def test_per_thread_recording_shows_the_helper_threads():
    recorder = _recorded_steps("forkjoin", 2, per_thread=True)
    trace = recorder.to_trace({"threads": 2})
    rows = {e.thread for e in trace.events}
    assert rows == {0, 1}  # the GEMMs keep OpenBLAS's second thread busy; never more rows than threads
    for row in rows:
        spans = sorted((e.start, e.end) for e in trace.events if e.thread == row)
        assert all(end <= next_start + 1e-9 for (_, end), (next_start, _) in zip(spans, spans[1:]))
    # flops only on row 0, once per call
    assert sum(e.flops for e in trace.events) == sum(c[6] for c in recorder.calls)


def test_train_writes_metrics_that_add_up(text_dataset, tmp_path):  # noqa: F811
    result = llmpy("train", "--model", "d2", "--steps", "4", "--val-every", "0", "--sample-every", "0",
                   "--no-progress", "--output", "", "--data-dir", text_dataset / "data", "--metrics-dir", "m",
                   cwd=tmp_path)
    assert "kernel" in result.stdout and "matmul_forward" in result.stdout and "phases, ms/step" in result.stdout
    document = json.loads((tmp_path / "m" / "metrics.json").read_text())
    steps = document["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    for s in steps:
        parts = s["forward_ms"] + s["zero_grad_ms"] + s["backward_ms"] + s["update_ms"]
        assert abs(parts - s["ms"]) <= 0.05 * s["ms"], s
        assert s["tokens_per_s"] == pytest.approx(4 * 64 / (s["ms"] / 1e3), rel=1e-6)
    kernels = document["kernels"]
    assert {k["name"] for k in kernels} >= {"matmul_forward", "attention_forward", "adamw_update"}
    assert 0.5 < sum(k["share"] for k in kernels) <= 1.0
    with open(tmp_path / "m" / "steps.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    with open(tmp_path / "m" / "kernels.csv") as f:
        assert {row["name"] for row in csv.DictReader(f)} == {k["name"] for k in kernels}


def test_bench_matrix_writes_json_csv_and_plots(tmp_path):
    threads = "1,2" if available_cores() >= 2 else "1"
    result = llmpy("bench", "--model", "d2", "--steps", "2", "--threads", threads, "--threading-layer", "omp,tbb",
                   "--json", "r.json", "--csv", "r.csv", "--plots", "plots", cwd=tmp_path)
    results = json.loads((tmp_path / "r.json").read_text())
    expected = {("sequential", "-", 1)} | {("forkjoin", rt, int(t)) for rt in ("omp", "tbb") for t in threads.split(",")}
    assert {(r["mode"], r["runtime"], r["threads"]) for r in results} == expected
    for r in results:
        for field in ("model", "mode", "threads", "B", "T", "steps", "ms_per_step_median", "ms_per_step_min",
                      "ms_per_step_max", "tokens_per_s", "mfu", "peak_rss_mb", "forward_ms", "backward_ms"):
            assert field in r
        assert r["ms_per_step_min"] <= r["ms_per_step_median"] <= r["ms_per_step_max"]
        assert r["kernels"] and r["steps"] == 2
    with open(tmp_path / "r.csv") as f:
        assert len(list(csv.DictReader(f))) == len(results)
    pngs = list((tmp_path / "plots").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000 for p in pngs)
    assert "speedup" in result.stdout and "kernels: forkjoin tbb" in result.stdout


def test_bench_runs_tasks_configurations_with_idle_time_per_worker(tmp_path):
    threads = [1, 2] if available_cores() >= 2 else [1]
    result = llmpy("bench", "--model", "d2", "--steps", "2", "--modes", "sequential,forkjoin,tasks", "--threads",
                   ",".join(map(str, threads)), "--block-tokens", "16,64", "--runtime", "native,dask",
                   "--json", "r.json", cwd=tmp_path)
    results = json.loads((tmp_path / "r.json").read_text())
    tasks = [r for r in results if r["mode"] == "tasks"]
    assert {(r["task_runtime"], r["block_tokens"], r["threads"]) for r in tasks} == \
        {(rt, k, t) for rt in ("native", "dask") for k in (16, 64) for t in threads}
    sequential = next(r for r in results if r["mode"] == "sequential")
    for r in tasks:
        for field in ("model", "threads", "B", "T", "steps", "ms_per_step_median", "tokens_per_s", "mfu",
                      "peak_rss_mb", "forward_ms", "backward_ms", "update_ms", "speedup", "kernels"):
            assert r[field] is not None, field
        assert r["runtime"] == f"{r['task_runtime']} K{r['block_tokens']}" and r["steps"] == 2
        idle = r["idle_fraction_per_worker"]
        assert len(idle) == r["threads"] and all(0.0 <= f < 1.0 for f in idle)
        # K = T: one block per sequence; K = 16 cuts every token-row kernel into 4 tasks
        assert r["tasks_per_step"] > 0
        assert {k["name"] for k in r["kernels"]} == {k["name"] for k in sequential["kernels"]}
    by_k = {r["block_tokens"]: r["tasks_per_step"] for r in tasks}
    assert by_k[16] > by_k[64]
    assert "idle % per worker" in result.stdout and "native x1" in result.stdout
    bad = llmpy("bench", "--model", "d2", "--modes", "tasks", "--block-tokens", "24", cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "--block-tokens" in bad.stderr and "Traceback" not in bad.stderr


def test_trace_of_a_real_run_exports_and_analyzes(text_dataset, tmp_path):  # noqa: F811
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    threads = min(2, available_cores())
    mode = "forkjoin" if threads > 1 else "sequential"
    llmpy("train", "--model", "d2", "--steps", "3", "--val-every", "0", "--sample-every", "0", "--no-progress",
          "--output", "", "--metrics-dir", "", "--data-dir", text_dataset / "data", "--mode", mode, "--threads",
          threads, "--trace", "tr", cwd=tmp_path)
    trace_dir = tmp_path / "tr"
    chrome = json.loads((trace_dir / "trace.json").read_text())
    slices = [e for e in chrome["traceEvents"] if e.get("ph") == "X" and e.get("cat") in
              ("forward", "backward", "update")]
    per_step = [e for e in slices if e["args"]["step"] == 2 and e["args"]["thread"] == 0]
    # d2 (2 layers): forward 1 + 10 per layer + 3, backward 4 + 14 per layer + 1, update 1 = 58 calls
    assert len(per_step) == len([e for e in slices if e["args"]["step"] == 3 and e["args"]["thread"] == 0]) == 58
    for tid in {e["tid"] for e in slices}:
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in slices if e["tid"] == tid)
        assert all(end <= start + 1e-3 for (_, end), (start, _) in zip(spans, spans[1:]))
    ptd = shutil.which("ptd") or str(Path(sys.executable).parent / "ptd")
    check = subprocess.run([ptd, "comprovar", "-e", str(trace_dir / "trace.prv")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    analysis = llmpy("analyze", "tr", cwd=tmp_path)
    assert "Load balance" in analysis.stdout or "LB" in analysis.stdout
    for name in ("pop.csv", "roofline.csv", "roofline.png"):
        assert (trace_dir / name).stat().st_size > 0
    llmpy("plot", "timeline", "tr", "--steps", "2", cwd=tmp_path)
    assert (trace_dir / "timeline.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_vs_torch_pairs_each_configuration_with_the_torch_baseline(tmp_path):
    pytest.importorskip("torch")
    threads = "1,2" if available_cores() >= 2 else "1"
    result = llmpy("bench", "--model", "d2", "--steps", "2", "--threads", threads, "--vs", "torch",
                   "--json", "r.json", cwd=tmp_path)
    results = json.loads((tmp_path / "r.json").read_text())
    torch_rows = {r["threads"]: r for r in results if r["mode"] == "torch"}
    assert sorted(torch_rows) == [int(t) for t in threads.split(",")]
    llmpy_rows = [r for r in results if r["mode"] != "torch"]
    for r in llmpy_rows:
        baseline = torch_rows[r["threads"]]
        assert r["torch_ms_per_step_median"] == baseline["ms_per_step_median"]
        paired = [a / b for a, b in zip(r["ms_per_step"], baseline["ms_per_step"], strict=True)]
        assert r["ratio_vs_torch"] == pytest.approx(statistics.median(paired))
        assert baseline["peak_rss_mb"] > 0 and r["peak_rss_mb"] > 0
    # same init and batch: the first step's loss (before any update) is the same model's loss in both
    sequential = next(r for r in llmpy_rows if r["mode"] == "sequential")
    assert sequential["first_loss"] == pytest.approx(torch_rows[1]["first_loss"], abs=1e-4)
    assert "vs torch eager" in result.stdout and "ratio" in result.stdout


def test_torch_baseline_runs_with_torchs_own_thread_environment(monkeypatch):
    import llmpy
    from llmpy.commands.bench import _worker_environment

    monkeypatch.setattr(llmpy, "THREAD_ENV_SET_BY_LLMPY", ["OMP_WAIT_POLICY"])
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # as llmpy's import set it
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "7")  # as a user set it
    torch_env = _worker_environment("torch:1,2")
    assert "OMP_WAIT_POLICY" not in torch_env and torch_env["OPENBLAS_THREAD_TIMEOUT"] == "7"
    assert torch_env["LLMPY_KEEP_THREAD_ENV"] == "1"
    llmpy_env = _worker_environment("omp:forkjoin/2")
    assert llmpy_env["OMP_WAIT_POLICY"] == "PASSIVE" and "LLMPY_KEEP_THREAD_ENV" not in llmpy_env


def test_bench_over_shapes_pairs_torch_per_shape_and_plots_time_and_memory(tmp_path):
    pytest.importorskip("torch")
    result = llmpy("bench", "--model", "d2", "--shapes", "1x16,2x32", "--modes", "forkjoin", "--threads", "1",
                   "--steps", "2", "--warmup", "0", "--vs", "torch", "--json", "r.json", "--plots", "plots", cwd=tmp_path)
    results = json.loads((tmp_path / "r.json").read_text())
    assert sorted((r["mode"], r["B"], r["T"]) for r in results) == [
        ("forkjoin", 1, 16), ("forkjoin", 2, 32), ("torch", 1, 16), ("torch", 2, 32)]
    for r in results:
        if r["mode"] == "torch":
            continue
        baseline = next(o for o in results if o["mode"] == "torch" and (o["B"], o["T"]) == (r["B"], r["T"]))
        assert r["torch_ms_per_step_median"] == baseline["ms_per_step_median"]  # paired within its own shape
        assert r["attention"] == "flash" and r["recompute"] == 0
    assert "B x T" in result.stdout and "   2 x 32" in result.stdout
    assert (tmp_path / "plots" / "shapes.png").read_bytes()[:4] == b"\x89PNG"
    bad = llmpy("bench", "--shapes", "4x", cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "--shapes" in bad.stderr and "Traceback" not in bad.stderr
