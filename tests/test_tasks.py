"""The task execution model: dependency tracker, graph checks, and training runs against the sequential order."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_cli import llmpy, text_dataset, train_losses  # noqa: F401  (fixture)

from llmpy.core.config import PRESETS, ActivationOptions, GPT2Config
from llmpy.execution.factory import make_execution_model
from llmpy.execution.threads import ExecutionError, available_cores
from llmpy.execution.tasks.runtime import NativeRuntime
from llmpy.execution.tasks.graph import GraphError, Region, Task, TaskGraph, uncovered
from llmpy.execution.tasks.execution import build_step_graph
from llmpy.core.model import GPT2
from llmpy.core.optim import AdamW, AdamWConfig
from llmpy.observe.recorder import Recorder
from llmpy.execution.base import train_step

WORKERS = sorted({1, min(2, available_cores())})


def A(lo, hi):
    return Region("A", ((lo, hi),))


def graph_of(accesses, inputs=()):
    """accesses: [(reads, writes)] in program order -> TaskGraph."""
    graph = TaskGraph(inputs)
    for i, (reads, writes) in enumerate(accesses):
        graph.add(Task(f"t{i}", "none", None, (), tuple(reads), tuple(writes)))
    return graph


# ------------------------------------------------------------------ dependency tracker, hand-made cases
def test_raw_edge_from_the_overlapping_writer_only():
    graph = graph_of([([], [A(0, 4)]), ([], [A(4, 8)]), ([A(2, 3)], [])])
    assert graph.edges() == [(0, 2)]


def test_war_edges_from_every_earlier_reader():
    graph = graph_of([([A(0, 4)], []), ([A(2, 6)], []), ([A(6, 8)], []), ([], [A(3, 5)])], inputs=[A(0, 8)])
    assert graph.edges() == [(0, 3), (1, 3)]


def test_waw_edge_and_covered_writes_retire():
    graph = graph_of([([], [A(0, 8)]), ([], [A(0, 8)]), ([A(0, 4)], [])])
    assert graph.edges() == [(0, 1), (1, 2)]  # not (0, 2): task 1 overwrote all of task 0's output
    partial = graph_of([([], [A(0, 8)]), ([], [A(2, 6)]), ([A(0, 4)], [])])
    assert partial.edges() == [(0, 1), (0, 2), (1, 2)]  # rows 0..1 still come from task 0


def test_disjoint_blocks_and_boxes_have_no_edges():
    graph = graph_of([([], [A(0, 4)]), ([], [A(4, 8)]), ([A(0, 4)], []), ([A(4, 8)], [])])
    assert graph.edges() == [(0, 2), (1, 3)]
    row = lambda b, t0, t1: Region("acts.qkv.0", ((b, b + 1), (t0, t1), (0, 12)))
    boxes = graph_of([([], [row(0, 0, 4)]), ([], [row(1, 0, 4)]), ([], [row(0, 4, 8)]), ([row(0, 0, 8)], [])])
    assert boxes.edges() == [(0, 3), (2, 3)]
    other = graph_of([([], [A(0, 4)]), ([Region("B", ((0, 4),))], [])], inputs=[Region("B", ((0, 4),))])
    assert other.edges() == []


def test_read_write_task_does_not_depend_on_itself():
    graph = graph_of([([], [A(0, 4)]), ([A(0, 4)], [A(0, 4)]), ([A(0, 4)], [A(0, 4)])])
    assert graph.edges() == [(0, 1), (1, 2)]


def test_missing_producer_is_an_error():
    with pytest.raises(GraphError, match="missing producer"):
        graph_of([([A(0, 4)], [])])
    with pytest.raises(GraphError, match=r"A\[4:8\]"):  # rows 0..3 are an input, 4..7 nobody writes
        graph_of([([A(0, 8)], [])], inputs=[A(0, 4)])
    graph_of([([A(0, 8)], [])], inputs=[A(0, 4), A(4, 8)])  # fully declared: fine
    assert uncovered(A(0, 8), [A(0, 3), A(5, 8)]) == [A(3, 5)]


def test_cycle_is_an_error():
    graph = graph_of([([], [A(0, 4)]), ([A(0, 4)], [Region("B", ((0, 1),))])])
    graph.add_edge(1, 0)
    with pytest.raises(GraphError, match="cycle"):
        graph.validate()


# ------------------------------------------------------------------ the GPT-2 step graph
def tiny_model(B=2, T=16, seed=1):
    model = GPT2(PRESETS["tiny"], B, T)
    model.init_random(seed)
    return model


def test_attention_block_waits_for_qkv_blocks_0_to_j_only():
    model = tiny_model(B=2, T=16)
    graph = build_step_graph(model, AdamW(model.params), block_tokens=4).graph
    checked = 0
    for task in graph.tasks:
        if task.kernel != "attention_forward":
            continue
        layer, (b, j) = task.layer, task.block
        expected = {graph.task(f"matmul_forward.qkv l{layer} b{b} j{i}").index for i in range(j + 1)}
        assert task.preds == expected, task.name
        checked += 1
    assert checked == 2 * 2 * 4
    # backward: the query blocks of one sequence accumulate into its dqkv in order j = 0, 1, ...
    for j in range(1, 4):
        task = graph.task(f"attention_backward l1 b0 j{j}")
        assert graph.task(f"attention_backward l1 b0 j{j - 1}").index in task.preds
        assert all(graph.tasks[p].block[0] == 0 for p in task.preds if graph.tasks[p].kernel == "attention_backward")


def test_block_size_must_divide_t():
    model = tiny_model(T=16)
    with pytest.raises(ValueError, match="must divide"):
        build_step_graph(model, AdamW(model.params), block_tokens=5)


def test_graph_exports_json_and_dot(tmp_path):
    model = tiny_model()
    graph = build_step_graph(model, AdamW(model.params), block_tokens=8).graph
    data = json.loads(Path(graph.save(str(tmp_path / "g.json"))).read_text())
    assert len(data["tasks"]) == len(graph) and len(data["edges"]) == len(graph.edges())
    dot = Path(graph.save(str(tmp_path / "g.dot"))).read_text()
    assert dot.startswith("digraph") and dot.count("->") == len(graph.edges())


def run_steps(model, optimizer, step_fn, steps=5, B=2, T=16, seed=0, micro=1):
    rng = np.random.default_rng(seed)
    losses = []
    V = model.config.vocab_size
    for step in range(steps):
        batches = [(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))) for _ in range(micro)]
        losses.append(step_fn(model, optimizer, batches, 1e-3, None, step + 1))
    return np.array(losses)


@pytest.fixture(scope="module")
def sequential_reference():
    model = tiny_model()
    optimizer = AdamW(model.params)
    return run_steps(model, optimizer, train_step), model.params.flat.copy()


@pytest.mark.parametrize("runtime", ["native", "dask"])
@pytest.mark.parametrize("block_tokens", [4, 8, 16])
def test_five_steps_match_sequential(sequential_reference, runtime, block_tokens):
    ref_losses, ref_params = sequential_reference
    results = {}
    for workers in WORKERS:
        execution = make_execution_model("tasks", workers, block_tokens=block_tokens, runtime=runtime)
        try:
            model = tiny_model()
            model.kernels = execution.kernels
            losses = run_steps(model, AdamW(model.params), execution.step_function)
        finally:
            execution.close()
        # GEMMs on row blocks sum in another order inside OpenBLAS than on all rows: equal within float error
        np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
        np.testing.assert_allclose(model.params.flat, ref_params, rtol=0, atol=5e-5)
        results[workers] = (losses, model.params.flat.copy())
    # the same graph gives bitwise the same results whatever the worker count: every reduction order is fixed
    for losses, params in results.values():
        np.testing.assert_array_equal(losses, results[1][0])
        np.testing.assert_array_equal(params, results[1][1])


def test_blocks_are_bitwise_equal_to_sequential_before_the_first_gemm():
    """Without GEMMs in the way, blocks change nothing: the encoder and first layernorm are bitwise equal."""
    model, reference = tiny_model(), tiny_model()
    graph = build_step_graph(model, AdamW(model.params), block_tokens=4, with_update=False)
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 97, (2, 16)), rng.integers(0, 97, (2, 16))
    reference.forward(x, y)
    graph.inputs[...] = x
    graph.targets[...] = y
    runtime = NativeRuntime(1)
    try:
        runtime.run(graph.graph)
    finally:
        runtime.close()
    for name in ("encoded", "ln1", "ln1_mean", "ln1_rstd"):
        np.testing.assert_array_equal(model.acts[name][0] if name != "encoded" else model.acts[name],
                                      reference.acts[name][0] if name != "encoded" else reference.acts[name])


def test_grad_accumulation_clipping_and_matrix_decay_match_sequential():
    config = AdamWConfig(weight_decay=0.1, decay_matrices_only=True, grad_clip=0.5)
    reference = tiny_model()
    ref_opt = AdamW(reference.params, config)
    ref_losses = run_steps(reference, ref_opt, train_step, steps=3, micro=2)
    execution = make_execution_model("tasks", WORKERS[-1], block_tokens=8)
    try:
        model = tiny_model()
        optimizer = AdamW(model.params, config)
        losses = run_steps(model, optimizer, execution.step_function, steps=3, micro=2)
    finally:
        execution.close()
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    np.testing.assert_allclose(model.params.flat, reference.params.flat, rtol=0, atol=5e-5)
    assert optimizer.last_grad_norm == pytest.approx(ref_opt.last_grad_norm, rel=1e-4)


def test_every_task_is_recorded_on_its_worker():
    workers = WORKERS[-1]
    execution = make_execution_model("tasks", workers, block_tokens=8)
    try:
        model = tiny_model()
        optimizer = AdamW(model.params)
        recorder = Recorder(keep_calls=True)
        run_steps(model, optimizer, lambda *a: execution.step_function(*a[:4], recorder, a[5]), steps=2)
        graph = execution.tasks.step_graph(model, optimizer).graph
    finally:
        execution.close()
    trace = recorder.to_trace({"mode": "tasks", "threads": workers})
    assert len(trace.events) == 2 * len(graph)
    assert sorted(e.task for e in trace.events if e.step == 2) == sorted(t.name for t in graph.tasks)
    assert {e.thread for e in trace.events} <= set(range(workers))
    assert set(recorder.steps[-1].phases) == {"forward", "backward", "update"}
    for e in trace.events:
        task = graph.task(e.task)
        assert (e.name, e.layer, e.phase) == (task.kernel, task.layer, task.phase)


def test_native_scheduler_overhead_per_task():
    graph = TaskGraph()
    count = 3000
    for i in range(count):
        region = Region(f"x{i // 10}", ((0, 1),))  # chains of 10 tasks
        graph.add(Task(f"t{i}", "empty", lambda: None, (), (region,) if i % 10 else (), (region,)))
    graph.validate()
    runtime = NativeRuntime(WORKERS[-1])
    try:
        runtime.run(graph)
        import time

        start = time.perf_counter()
        runtime.run(graph)
        per_task = (time.perf_counter() - start) / count
    finally:
        runtime.close()
    assert per_task < 100e-6, f"{1e6 * per_task:.1f} us per task"  # bench/tasks_scaling.py measures ~5-10 us


def test_task_failure_is_raised():
    graph = TaskGraph()
    graph.add(Task("boom", "none", lambda: 1 / 0, (), (), (A(0, 1),)))
    graph.validate()
    runtime = NativeRuntime(1)
    try:
        with pytest.raises(RuntimeError, match="ZeroDivisionError"):
            runtime.run(graph)
    finally:
        runtime.close()


# ------------------------------------------------------------------ the command line
def test_cli_tasks_mode_matches_sequential_and_traces_every_worker(text_dataset, tmp_path):  # noqa: F811
    common = ["train", "--model", "d2", "--steps", "3", "--lr", "1e-3", "--val-every", "0", "--sample-every", "0",
              "--no-progress", "--output", "", "--metrics-dir", ""]
    reference = train_losses(llmpy(*common, "--mode", "sequential", cwd=text_dataset).stdout)
    workers = WORKERS[-1]
    trace_dir = tmp_path / "trace"
    native = llmpy(*common, "--mode", "tasks", "--workers", workers, "--block-tokens", "16", "--trace", trace_dir,
                   cwd=text_dataset)
    assert f"tasks, {workers} worker" in native.stdout and "native runtime" in native.stdout
    np.testing.assert_allclose(train_losses(native.stdout), reference, rtol=0, atol=1e-5)
    dask = llmpy(*common, "--mode", "tasks", "--workers", workers, "--block-tokens", "32", "--runtime", "dask",
                 cwd=text_dataset)
    np.testing.assert_allclose(train_losses(dask.stdout), reference, rtol=0, atol=1e-5)
    split = llmpy(*common, "--mode", "tasks", "--workers", workers, "--block-tokens", "16", "--gemm-split", "channels",
                  cwd=text_dataset)
    assert "GEMMs split by output channels (channels)" in split.stdout
    np.testing.assert_allclose(train_losses(split.stdout), reference, rtol=0, atol=1e-5)

    analysis = llmpy("analyze", trace_dir, cwd=tmp_path).stdout
    idle = analysis.split("Idle time per thread")[1].split("\n\n")[0]
    assert len(re.findall(r"^\s+0\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", idle, re.MULTILINE)) == workers
    chrome = json.loads((trace_dir / "trace.json").read_text())
    tasks = [e for e in chrome["traceEvents"] if e.get("ph") == "X" and "task" in e.get("args", {})]
    assert any(e["args"]["task"].startswith("attention_forward l1 b") for e in tasks)

    bad = llmpy(*common, "--mode", "tasks", "-T", "64", "--block-tokens", "24", cwd=text_dataset, check=False)
    assert bad.returncode == 2 and "--block-tokens 24" in bad.stderr and "Traceback" not in bad.stderr
    wrong_mode = llmpy(*common, "--mode", "forkjoin", "--block-tokens", "16", cwd=text_dataset, check=False)
    assert wrong_mode.returncode == 2 and "--mode tasks" in wrong_mode.stderr
    split_forkjoin = llmpy(*common, "--mode", "forkjoin", "--gemm-split", "channels", cwd=text_dataset, check=False)
    assert split_forkjoin.returncode == 2 and "--gemm-split" in split_forkjoin.stderr


def test_cli_graph_writes_dot_json_and_png(tmp_path):
    result = llmpy("graph", "--model", "tiny", "-B", "2", "-T", "16", "--block-tokens", "4", "--output", "g.json",
                   "--png", "layer1.png", "--layer", "1", cwd=tmp_path)
    assert "tasks" in result.stdout
    data = json.loads((tmp_path / "g.json").read_text())
    assert any(t["name"] == "attention_forward l1 b1 j3" for t in data["tasks"])
    assert (tmp_path / "layer1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    llmpy("graph", "--model", "tiny", "-B", "1", "-T", "8", "--output", "g.dot", cwd=tmp_path)
    assert (tmp_path / "g.dot").read_text().startswith("digraph")
    llmpy("graph", "--model", "tiny", "-B", "1", "-T", "8", "--overlap-steps", "--output", "o.json", cwd=tmp_path)
    tasks = json.loads((tmp_path / "o.json").read_text())["tasks"]
    updates = [t for t in tasks if t["kernel"] == "adamw_update"]
    assert updates and tasks[:len(updates)] == updates and not any(t["preds"] for t in updates)


def test_tasks_mode_refuses_oversubscription():
    with pytest.raises(ExecutionError, match="oversubscribe"):
        make_execution_model("tasks", available_cores() + 1)


# ------------------------------------------------------------------ --overlap-steps
def run_varying_steps(model, optimizer, step_fn, steps=5, micro=1, recorder=None):
    """run_steps with a learning rate that changes every step (each step's update must use its own)."""
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    losses = []
    for step in range(steps):
        batches = [(rng.integers(0, V, (2, 16)), rng.integers(0, V, (2, 16))) for _ in range(micro)]
        losses.append(step_fn(model, optimizer, batches, 1e-3 * (1 + step) / steps, recorder, step + 1))
    return np.array(losses)


@pytest.mark.parametrize("runtime,micro", [("native", 1), ("native", 2), ("dask", 1)])
def test_overlap_steps_give_the_results_of_steps_in_turn(runtime, micro):
    config = AdamWConfig(weight_decay=0.1, grad_clip=1.0)
    reference = tiny_model()
    ref_opt = AdamW(reference.params, config)
    ref_losses = run_varying_steps(reference, ref_opt, train_step, micro=micro)
    results = {}
    for overlap in (False, True):
        execution = make_execution_model("tasks", WORKERS[-1], block_tokens=8, runtime=runtime, overlap_steps=overlap)
        try:
            model = tiny_model()
            optimizer = AdamW(model.params, config)
            losses = run_varying_steps(model, optimizer, execution.step_function, micro=micro)
            before_sync = model.params.flat.copy()
            execution.synchronize()
            execution.synchronize()  # nothing pending: a no-op
        finally:
            execution.close()
        results[overlap] = (losses, model.params.flat.copy(), optimizer.last_grad_norm, optimizer.step)
        if overlap:  # the last step's update was still pending: synchronize ran it
            assert not np.array_equal(before_sync, model.params.flat)
        else:
            np.testing.assert_array_equal(before_sync, model.params.flat)
    (losses, params, norm, steps), (o_losses, o_params, o_norm, o_steps) = results[False], results[True]
    np.testing.assert_array_equal(o_losses, losses)  # same graph blocks, same kernels: bitwise
    np.testing.assert_array_equal(o_params, params)
    assert (o_norm, o_steps) == (norm, steps) == (pytest.approx(ref_opt.last_grad_norm, rel=1e-4), ref_opt.step)
    np.testing.assert_allclose(o_losses, ref_losses, rtol=0, atol=1e-5)
    np.testing.assert_allclose(o_params, reference.params.flat, rtol=0, atol=5e-5)


def ancestors(graph, index):
    seen, todo = set(), [index]
    while todo:
        for p in graph.tasks[todo.pop()].preds:
            if p not in seen:
                seen.add(p)
                todo.append(p)
    return seen


def test_overlap_steps_graph_lets_layer_0_run_while_later_layers_update():
    model = tiny_model()
    optimizer = AdamW(model.params)
    L = model.config.num_layers
    graph = build_step_graph(model, optimizer, block_tokens=8, with_update=False, leading_update=True).graph
    updates = {t.index: t for t in graph.tasks if t.kernel == "adamw_update"}
    plain = build_step_graph(model, optimizer, block_tokens=8).graph
    assert len(updates) == sum(t.kernel == "adamw_update" for t in plain.tasks) and len(graph) == len(plain)
    first = graph.task("layernorm_forward.ln1 l0 b0 j0")
    before = {updates[i].name for i in ancestors(graph, first.index) if i in updates}
    # the forward of layer 0 waits for the update of what it reads (its own layernorm, the embeddings) ...
    assert {"adamw_update.ln1w l0 r0", "adamw_update.ln1b l0 r0", "adamw_update.wte l-1 r0",
            "adamw_update.wpe l-1 r0"} <= before
    # ... and for no update of a later layer
    assert not any(updates[i].layer > 0 for i in ancestors(graph, first.index) if i in updates)
    qkv = graph.task(f"matmul_forward.qkv l{L - 1} b0 j0")
    assert graph.task(f"adamw_update.qkvw l{L - 1} r0").index in qkv.preds  # RAW on the layer's weights
    # the backward's gradient writes wait for the previous step's update to read the gradients (WAR)
    dweight = graph.task(f"matmul_backward_weight.qkv l{L - 1} c0")
    assert graph.task(f"adamw_update.qkvw l{L - 1} r0").index in ancestors(graph, dweight.index)


def test_overlap_steps_run_forward_tasks_before_the_previous_update_ends():
    # one worker: it takes the ready tasks by their critical-path priority, computed from cost estimates, so the
    # order is the same on every run, and layer 0's forward goes before the updates of later layers. On 2 workers
    # whether it starts before the last update ends is a race (the tiny model's updates take microseconds): the
    # assertion failed in 5 of 15 runs on an AMD EPYC Zen 4.
    workers = 1
    execution = make_execution_model("tasks", workers, block_tokens=8, overlap_steps=True)
    try:
        model = tiny_model()
        recorder = Recorder(keep_calls=True)
        run_varying_steps(model, AdamW(model.params), execution.step_function, steps=3, recorder=recorder)
        execution.synchronize()
    finally:
        execution.close()
    trace = recorder.to_trace({"mode": "tasks", "threads": workers})
    for step in (2, 3):  # steps after the first start with the previous step's update
        events = [e for e in trace.events if e.step == step]
        last_update_end = max(e.end for e in events if e.name == "adamw_update")
        early = [e for e in events if e.phase == "forward" and e.start < last_update_end]
        assert any(e.layer == 0 for e in early), f"step {step}: no forward task ran during the previous update"
    assert not any(e.name == "adamw_update" for e in trace.events if e.step == 1)


def test_cli_overlap_steps_matches_steps_in_turn(text_dataset, tmp_path):  # noqa: F811
    common = ["train", "--model", "d2", "--steps", "4", "--lr", "1e-3", "--val-every", "2", "--sample-every", "0",
              "--no-progress", "--metrics-dir", "", "--mode", "tasks", "--block-tokens", "16"]
    runs = {}
    for name, flags in (("plain", []), ("overlap", ["--overlap-steps"])):
        runs[name] = llmpy(*common, *flags, "--output", tmp_path / f"{name}.bin", "--checkpoint-every", "2",
                           "--checkpoint-dir", tmp_path / name, cwd=text_dataset).stdout
    plain, overlap = runs["plain"], runs["overlap"]
    assert "steps overlap" in overlap
    assert train_losses(overlap) == train_losses(plain)
    val = [line for line in plain.splitlines() if line.startswith("val loss")]
    assert len(val) == 3 and val == [line for line in overlap.splitlines() if line.startswith("val loss")]
    # what validation, checkpoints and the final save read is the parameters after each step's update
    assert (tmp_path / "overlap.bin").read_bytes() == (tmp_path / "plain.bin").read_bytes()
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert files == [f"{kind}_{step:08d}.bin" for kind in ("model", "state") for step in (2, 4)]
    for file in files:
        assert (tmp_path / "overlap" / file).read_bytes() == (tmp_path / "plain" / file).read_bytes(), file


# ------------------------------------------------------------------ --gemm-split: GEMMs per block of output columns
@pytest.mark.parametrize("runtime", ["native", "dask"])
@pytest.mark.parametrize("split", ["lm_head", "channels"])
def test_gemm_channel_split_matches_sequential(sequential_reference, runtime, split):
    ref_losses, ref_params = sequential_reference
    # 64-column blocks: the tiny model's qkv, fc, fcproj-input-gradient and lm_head GEMMs get 2 blocks each
    execution = make_execution_model("tasks", WORKERS[-1], block_tokens=8, runtime=runtime, gemm_split=split,
                                     gemm_channel_block=64)
    try:
        model = tiny_model()
        losses = run_steps(model, AdamW(model.params), execution.step_function)
    finally:
        execution.close()
    assert "GEMMs split by output channels" in execution.describe()
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    np.testing.assert_allclose(model.params.flat, ref_params, rtol=0, atol=5e-5)


def test_gemm_channel_split_tasks_wait_for_every_token_block_and_are_waited_for():
    model = tiny_model(B=2, T=16)
    L, Vp = model.config.num_layers, model.config.padded_vocab_size
    graph = build_step_graph(model, AdamW(model.params), block_tokens=4, gemm_split="channels",
                             gemm_channel_block=64).graph
    names = {t.name for t in graph.tasks}
    tokens = [(b, j) for b in range(2) for j in range(4)]

    def index(name):
        return graph.task(name).index

    def preds(name):
        return graph.task(name).preds

    assert not any(name.startswith(("matmul_forward", "matmul_backward_input")) and " b" in name for name in names)
    for l in range(L):
        qkv = [index(f"matmul_forward.qkv l{l} c{o0}") for o0 in (0, 64)]  # 3C = 96 columns: 2 blocks
        for o0 in (0, 64):  # a column block reads every token block of its input, and nothing else
            assert preds(f"matmul_forward.qkv l{l} c{o0}") == {index(f"layernorm_forward.ln1 l{l} b{b} j{j}")
                                                              for b, j in tokens}
        for b, j in tokens:  # a token-row task after it waits for every column block
            assert set(qkv) <= preds(f"attention_forward l{l} b{b} j{j}")
        # dln1[:, 0:32] = dqkv @ qkvw[:, 0:32]: all of dqkv, i.e. the last attention backward of each sequence
        assert {index(f"attention_backward l{l} b{b} j3") for b in range(2)} <= preds(f"matmul_backward_input.qkv l{l} c0")
        fcproj_input = [index(f"matmul_backward_input.fcproj l{l} c{c0}") for c0 in (0, 64)]
        for b, j in tokens:
            assert set(fcproj_input) <= preds(f"gelu_backward l{l} b{b} j{j}")
            # its input, the residual stream's gradient, comes from the layernorm backward above it
            above = f"layernorm_backward_input.lnf b{b} j{j}" if l == L - 1 else \
                f"layernorm_backward_input.ln1 l{l + 1} b{b} j{j}"
            assert index(above) in preds(f"matmul_backward_input.fcproj l{l} c0")
    logits = [index(f"matmul_forward.logits c{o0}") for o0 in range(0, Vp, 64)]
    assert len(logits) == 2
    for b, j in tokens:
        assert index(f"layernorm_forward.lnf b{b} j{j}") in preds("matmul_forward.logits c64")
        assert set(logits) <= preds(f"crossentropy_forward_backward b{b} j{j}")  # the logits' gradient, in place
        assert index(f"crossentropy_forward_backward b{b} j{j}") in preds("matmul_backward_input.logits c0")
        assert index("matmul_backward_input.logits c0") in preds(f"layernorm_backward_input.lnf b{b} j{j}")
    # the lm_head column blocks read disjoint rows of wte: no edges between them
    assert not set(logits) & preds("matmul_forward.logits c64")
    # "rows" keeps the per-token-block GEMMs; "lm_head" splits the lm_head only
    lm_head = {t.name for t in build_step_graph(model, AdamW(model.params), block_tokens=4, gemm_split="lm_head",
                                                gemm_channel_block=64).graph.tasks}
    assert "matmul_forward.logits c0" in lm_head and "matmul_forward.qkv l0 b1 j3" in lm_head
    with pytest.raises(ValueError, match="GEMM split"):
        build_step_graph(model, AdamW(model.params), block_tokens=4, gemm_split="cols")


LONG = GPT2Config(max_seq_len=256, vocab_size=97, padded_vocab_size=128, num_layers=2, num_heads=2, channels=32)


@pytest.mark.parametrize("activations", [ActivationOptions(), ActivationOptions("llmc"), ActivationOptions(recompute=2)],
                         ids=["flash", "llmc", "recompute-all"])
def test_tasks_follow_sequential_over_attention_tiles_and_memory_reuse(activations):
    """T = 256 spans two attention tiles, cut into 64-token query blocks; the activation gradients of one layer are
    reused by every layer (the graph must order each reuse after the last read), recomputation adds forward
    calls to backward: the task graph still gives sequential's losses and parameters."""
    results = {}
    for mode, workers in (("sequential", 1), ("tasks", WORKERS[-1])):
        execution = make_execution_model(mode, workers, **({"block_tokens": 64} if mode == "tasks" else {}))
        try:
            model = GPT2(LONG, 1, 256, execution.kernels, activations=activations)
            model.init_random(3)
            optimizer = execution.make_optimizer(model, AdamWConfig())
            losses = run_steps(model, optimizer, execution.step_function, steps=3, B=1, T=256)
        finally:
            execution.close()
        results[mode] = losses, model.params.flat.copy()
    assert results["sequential"][0][-1] < results["sequential"][0][0]  # it trains
    np.testing.assert_allclose(results["tasks"][0], results["sequential"][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(results["tasks"][1], results["sequential"][1], atol=5e-5, rtol=0)


# ------------------------------------------------------------------ the training classifier in chunks of rows
# (B, T, rows per chunk): pieces of each sequence with a shorter last one (16 = 6 + 6 + 4), runs of two whole sequences
# with a shorter last run (5 sequences of 8: 2 + 2 + 1)
CHUNKS = {"pieces": (2, 16, 6), "sequences": (5, 8, 20)}


def chunked_run(mode, workers, shape, activations=ActivationOptions(), micro=1, **options):
    B, T, rows = shape
    execution = make_execution_model(mode, workers, **options)
    try:
        model = GPT2(PRESETS["tiny"], B, T, execution.kernels,
                     activations=ActivationOptions(activations.attention, activations.recompute, rows))
        model.init_random(3)
        optimizer = execution.make_optimizer(model, AdamWConfig())
        losses = run_steps(model, optimizer, execution.step_function, steps=3, B=B, T=T, micro=micro)
    finally:
        execution.close()
    return losses, model.params.flat.copy()


@pytest.mark.parametrize("shape, split, activations, micro", [
    ("pieces", "rows", ActivationOptions(), 1), ("pieces", "lm_head", ActivationOptions(), 2),
    ("sequences", "channels", ActivationOptions("llmc"), 1), ("sequences", "rows", ActivationOptions(recompute=2), 2)],
    ids=["pieces-rows", "pieces-lm_head-accumulate", "sequences-channels-llmc", "sequences-rows-recompute-accumulate"])
def test_chunked_classifier_gives_sequential_results_in_every_execution_model(shape, split, activations, micro):
    """The chunks' calls reach forkjoin and the task graph unchanged: the same losses and parameters as sequential
    (within float tolerance: OpenBLAS on several threads, and the task graph's GEMMs cut into blocks, may sum
    in another order). Sequential against torch: tests/test_model_vs_torch.py."""
    reference = chunked_run("sequential", 1, CHUNKS[shape], activations, micro)
    for mode, options in (("forkjoin", {}), ("tasks", dict(block_tokens=4, gemm_split=split, gemm_channel_block=64))):
        losses, params = chunked_run(mode, WORKERS[-1], CHUNKS[shape], activations, micro, **options)
        np.testing.assert_allclose(losses, reference[0], atol=1e-5, rtol=0, err_msg=mode)
        np.testing.assert_allclose(params, reference[1], atol=5e-5, rtol=0, err_msg=mode)


def test_chunks_share_one_buffer_in_order_and_are_cut_by_columns_only():
    model = GPT2(PRESETS["tiny"], 2, 16, activations=ActivationOptions(classifier_rows=6))
    graph = build_step_graph(model, AdamW(model.params), block_tokens=4, gemm_split="lm_head",
                             gemm_channel_block=64).graph

    def index(name):
        return graph.task(name).index

    def preds(name):
        return graph.task(name).preds

    # rows [0, 32) in pieces 0, 6, 12 | 16, 22, 28 of each sequence; no classifier task is cut by token blocks
    assert not any(t.name.startswith(("matmul_forward_chunk", "crossentropy_forward_backward_chunk")) and " b" in t.name
                   for t in graph.tasks)
    assert {t.name for t in graph.tasks if t.kernel == "crossentropy_forward_backward_chunk"} == {
        f"crossentropy_forward_backward_chunk.logits{kind} r{r0}" for r0 in (0, 6, 12, 16, 22, 28)
        for kind in ("", "_recomputed") if not (kind and r0 == 28)}  # the last chunk's gradient is not recomputed
    # a chunk's logits wait for the previous chunk's cross-entropy to be done with the buffer (WAR)
    assert index("crossentropy_forward_backward_chunk.logits r0") in preds("matmul_forward_chunk.logits r6 c64")
    assert index("layernorm_forward.lnf b0 j1") in preds("matmul_forward_chunk.logits r6 c0")  # rows 4..7
    # the backward starts from the last chunk's gradient; the recomputed chunk before it waits for both its GEMMs
    last = "crossentropy_forward_backward_chunk.logits r28"
    assert index(last) in preds("matmul_backward_input_chunk.logits r28 c0")
    assert index(last) in preds("matmul_backward_weight.logits r28 l-1 c0")
    for name in ("matmul_backward_input_chunk.logits r28 c0", "matmul_backward_weight.logits r28 l-1 c0"):
        assert index(name) in preds("matmul_forward_chunk.logits_recomputed r22 c0")
    # g.wte: written by the last chunk, then added to by each earlier chunk in turn (RAW on the same rows)
    assert graph.task("matmul_backward_weight.logits r28 l-1 c0").args[4] is False
    assert index("matmul_backward_weight.logits r28 l-1 c0") in preds("matmul_backward_weight.logits r22 l-1 c0")
    assert graph.task("matmul_backward_weight.logits r22 l-1 c0").args[4] is True
    # the final layernorm's backward of a token block waits for the chunk that wrote its rows of d(lnf)
    assert index("matmul_backward_input_chunk.logits r0 c0") in preds("layernorm_backward_input.lnf b0 j1")
