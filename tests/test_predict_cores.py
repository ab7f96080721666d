"""Core predictions (llmpy.predict.cores): list scheduling on hand-computable graphs, the bandwidth cap of fork-join
calls and of tasks that run side by side, and predictions from a small measured run."""

import json
import statistics

import pytest
from test_cli import llmpy, text_dataset  # noqa: F401  (fixture)

from llmpy.observe.trace import StepRecord, Trace
from llmpy.predict.cores import Machine, forkjoin_call, list_schedule, predict_cores, where_tasks_overtake
from llmpy.predict.measured_tasks import StepCall

GB = 1e9


def schedule(work, edges, workers, priority=None, demand=None, bandwidth=None):
    n = len(work)
    preds, succs = [set() for _ in range(n)], [[] for _ in range(n)]
    for a, b in edges:
        preds[b].add(a)
        succs[a].append(b)
    return list_schedule(work, preds, succs, priority or [0.0] * n, workers, demand, bandwidth)


# ------------------------------------------------------------------ list scheduling
def test_a_chain_takes_the_sum_of_its_costs_on_any_number_of_workers():
    for workers in (1, 4):
        result = schedule([1.0, 2.0, 3.0], [(0, 1), (1, 2)], workers)
        assert result.makespan == pytest.approx(6.0)
        assert result.start == pytest.approx([0.0, 1.0, 3.0])


def test_independent_tasks_fill_the_workers():
    for workers, expected in ((1, 5.0), (2, 3.0), (3, 2.0), (5, 1.0), (8, 1.0)):  # ceil(5 / workers)
        assert schedule([1.0] * 5, [], workers).makespan == pytest.approx(expected)


def test_a_diamond():
    # a(1) -> b(2), c(3) -> d(1)
    edges = [(0, 1), (0, 2), (1, 3), (2, 3)]
    assert schedule([1.0, 2.0, 3.0, 1.0], edges, 1).makespan == pytest.approx(7.0)
    two = schedule([1.0, 2.0, 3.0, 1.0], edges, 2)
    assert two.makespan == pytest.approx(5.0)  # 1 + max(2, 3) + 1
    assert two.start[3] == pytest.approx(4.0)


def test_the_critical_path_goes_first():
    # tasks 0, 1 alone (1 s each); task 2 (1 s) heads a chain to task 3 (5 s). On 2 workers taking the chain's
    # head first ends at 6; taking the lowest indices first delays the chain to 7.
    work, edges = [1.0, 1.0, 1.0, 5.0], [(2, 3)]
    by_path = [1.0, 1.0, 6.0, 5.0]  # each task's longest chain to the end, by hand
    assert schedule(work, edges, 2, priority=by_path).makespan == pytest.approx(6.0)
    assert schedule(work, edges, 2).makespan == pytest.approx(7.0)


def test_memory_bound_tasks_side_by_side_share_the_bandwidth():
    # each task alone moves 10 GB/s, which is all the memory system gives: two at once take twice as long
    saturated = lambda k: 10 * GB  # noqa: E731
    assert schedule([1.0, 1.0], [], 2, demand=[10 * GB] * 2, bandwidth=saturated).makespan == pytest.approx(2.0)
    # a compute-bound task beside it moves nothing and loses nothing
    assert schedule([1.0, 1.0], [], 2, demand=[0.0, 10 * GB], bandwidth=saturated).makespan == pytest.approx(1.0)
    # max-min fair: needs of 2 and 10 GB/s from 10: the small one gets 2, the big one 8 (speed 0.8) until the small
    # one ends at 1 s; then it runs alone at full speed: 0.2 s of work left
    result = schedule([1.0, 1.0], [], 2, demand=[2 * GB, 10 * GB], bandwidth=saturated)
    assert result.end == pytest.approx([1.0, 1.2])
    # with bandwidth for both there is no slowdown
    ample = lambda k: k * 10 * GB  # noqa: E731
    assert schedule([1.0, 1.0], [], 2, demand=[10 * GB] * 2, bandwidth=ample).makespan == pytest.approx(1.0)


# ------------------------------------------------------------------ fork-join calls
def call(kernel, seconds, moved, args=()):
    return StepCall(kernel, kernel, "forward", 0, None, args, [0], 0.0, moved, seconds)


def test_a_memory_bound_call_stops_scaling_at_the_memory_systems_bandwidth():
    machine = Machine(core_gbs=10.0, total_gbs=20.0, cores=64)
    # 1 s at 1 core moving 10 GB: all one core draws
    streaming = call("adamw_update", 1.0, 10 * GB, (_Sized(1 << 24),))
    expected = {1: 1.0, 2: 0.5, 4: 0.5, 16: 0.5}  # 10 GB at min(n * 10, 20) GB/s
    for threads, seconds in expected.items():
        assert forkjoin_call(None, streaming, threads, machine)[0] == pytest.approx(seconds)
    assert forkjoin_call(None, streaming, 16, machine)[1] == "memory"
    compute = call("gelu_forward", 1.0, 0.0, (_Sized(1 << 24),))
    assert forkjoin_call(None, compute, 16, machine)[0] == pytest.approx(1.0 / 16)


def test_attention_splits_over_heads_only():
    machine = Machine(core_gbs=10.0, total_gbs=1000.0, cores=64)
    attention = call("attention_forward", 1.0, 0.0, (None, None, None, 4, 0, 1, 0, 64))  # 4 heads
    assert forkjoin_call(None, attention, 2, machine) == (pytest.approx(0.5), "compute")
    assert forkjoin_call(None, attention, 3, machine) == (pytest.approx(0.5), "imbalance")  # groups of 1, 1, 2 heads
    assert forkjoin_call(None, attention, 8, machine) == (pytest.approx(0.25), "imbalance")


class _Sized:
    def __init__(self, size):
        self.size = size


# ------------------------------------------------------------------ from a measured run
COMMON = ["train", "--model", "d2", "-B", "2", "-T", "32", "--steps", "4", "--lr", "1e-3", "--val-every", "0",
          "--sample-every", "0", "--no-progress", "--output", "", "--threads", "1"]


@pytest.fixture(scope="module")
def reference(text_dataset, tmp_path_factory):  # noqa: F811
    """A folder with a tasks run and a forkjoin run, 1 core each, traced."""
    folder = tmp_path_factory.mktemp("reference")
    for mode, extra in (("tasks", ["--block-tokens", "16"]), ("forkjoin", [])):
        run = folder / mode
        llmpy(*COMMON, "--mode", mode, *extra, "--metrics-dir", run, "--trace", run / "trace", cwd=text_dataset)
    return folder


def measured_steps_ms(run_dir) -> list[float]:
    """The trace's steps after its warm-up step, read here from the file."""
    payload = json.loads((run_dir / "trace" / "events.json").read_text())
    steps = sorted(payload["steps"], key=lambda s: s["step"])[payload["meta"]["warmup_steps"]:]
    return [1e3 * (s["end"] - s["start"]) for s in steps]


def test_one_core_predicted_from_its_own_reference(reference):
    rows = predict_cores(str(reference), [1], bandwidth_gbs=1000.0)
    by_mode = {row["mode"]: row for row in rows}
    for mode in ("tasks", "forkjoin"):
        measured = measured_steps_ms(reference / mode)
        # its own reference: within the measured steps (the bounds loose, as others may share the machine)
        assert 0.8 * min(measured) <= by_mode[mode]["step_ms"] <= 1.2 * max(measured)
        assert by_mode[mode]["step_ms"] == pytest.approx(statistics.median(measured), rel=0.5)
        assert set(by_mode[mode]["phases_ms"]) == {"forward", "backward", "update"}
        assert by_mode[mode]["limit"]


def test_more_cores_are_not_slower_without_a_memory_limit(reference):
    rows = predict_cores(str(reference / "tasks"), [1, 2, 4], bandwidth_gbs=1e6)
    for mode in ("tasks", "forkjoin"):
        times = [row["step_ms"] for row in rows if row["mode"] == mode]
        assert times[1] <= times[0] and times[2] <= times[0]


def test_a_folder_without_a_trace_is_refused_naming_the_file_and_its_command(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match=r"trace/events.json: not found; write it with `llmpy train .*--trace"):
        predict_cores(str(tmp_path), [2])
    with pytest.raises(ValueError, match="cores must be positive"):
        predict_cores(str(tmp_path), [0])


def test_where_tasks_overtake_names_the_first_core_count_and_both_limits():
    rows = [{"mode": "forkjoin", "cores": n, "step_ms": ms, "limit": f"fj{n}"} for n, ms in ((1, 10), (2, 6), (4, 4))]
    rows += [{"mode": "tasks", "cores": n, "step_ms": ms, "limit": f"t{n}"} for n, ms in ((1, 12), (2, 7), (4, 3))]
    sentence = where_tasks_overtake(rows)
    assert sentence.startswith("tasks overtake fork-join from 4 cores (3.0 vs 4.0 ms")
    assert "fork-join: fj4" in sentence and "tasks: t4" in sentence
    behind = [r for r in rows if r["mode"] == "forkjoin"] + [dict(r, step_ms=99) for r in rows if r["mode"] == "tasks"]
    assert where_tasks_overtake(behind).startswith("fork-join is faster at every core count")


def write_trace(folder, **meta):
    base = {"model": "d2", "B": 2, "T": 32, "mode": "tasks", "threads": 1, "warmup_steps": 0}
    Trace([], [StepRecord(1, 0, 0.0, 1.0, 0.0, 64)], {**base, **meta}).save_events(str(folder / "trace"))


def test_a_folder_of_runs_must_hold_one_configuration_on_one_core(tmp_path):
    write_trace(tmp_path / "a", mode="forkjoin")
    write_trace(tmp_path / "b", mode="forkjoin", B=4)
    with pytest.raises(ValueError, match="differ in B"):
        predict_cores(str(tmp_path), [1])
    write_trace(tmp_path / "two", mode="forkjoin", threads=2)
    with pytest.raises(ValueError, match="ran on 2 threads; predictions start from a 1-core run"):
        predict_cores(str(tmp_path / "two"), [1])
