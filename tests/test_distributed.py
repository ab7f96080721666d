"""Data-parallel training over MPI (`--mode mpi`), run as users run it: `mpiexec -n 2 python -m llmpy.commands.cli train`.

The reference is one process in sequential mode. Two ranks with per-rank batch B read, in llm.c's layout,
exactly the rows one process reads with batch 2B (and, in the same order, the two micro-batches of one process
with batch B and --grad-accum 2): `test_two_ranks_read_the_rows_of_one_process_with_twice_the_batch` checks that
on the data loader, so the runs below differ from the reference only by float rounding in where the gradient
sums are added up.
"""

import itertools
import contextlib
import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llmpy.core.config import PRESETS
from llmpy.data.loader import DataLoader
from llmpy.execution.threads import available_cores
from llmpy.execution.mpi.strategies import BLOCK_ELEMENTS, gradient_buckets, owner_blocks, split_evenly
from llmpy.execution.mpi.transport import apply_network_defaults, describe_transport
from llmpy.io.formats import read_model, write_shard
from test_cli import train_losses

MPIEXEC = Path(sys.executable).parent / "mpiexec"
STRATEGIES = ("allreduce", "zero1", "server", "owners")
B, T, STEPS = 2, 16, 5
# --no-shuffle: llm.c's shuffle draws each rank's order from its own mt19937 (seed 42 + rank), so only the file
# order makes R ranks of B sequences see what one process of R*B sees
COMMON = ["--model", "tiny", "-T", T, "--steps", STEPS, "--val-every", "0", "--sample-every", "0",
          "--peak-gflops", "10", "--no-progress", "--train-data", "tiny_train.bin", "--no-shuffle"]
PLAIN = ["--lr", "1e-3"]
# eps 1 makes AdamW's step proportional to the gradient, so a wrong clipping scale changes the parameters
OPTIONS = ["--lr", "0.05", "--eps", "1.0", "--weight-decay", "0.1", "--decay-matrices-only", "--grad-clip", "0.05"]

needs_mpi = pytest.mark.skipif(not MPIEXEC.exists() or available_cores() < 2,
                               reason=f"needs {MPIEXEC} (pip install mpich) and 2 cores for 2 ranks")


def run(command, cwd, env_extra=None, timeout=120):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([str(c) for c in command], cwd=cwd, check=False, capture_output=True, text=True, env=env,
                          timeout=timeout)


def llmpy_train(args, cwd, ranks=None, check=True, env_extra=None):
    command = [sys.executable, "-m", "llmpy", "train", *args]
    if ranks is not None:
        command = [MPIEXEC, "-n", ranks, *command]
    result = run(command, cwd, env_extra)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A shard of 16,000 tokens below tiny's vocabulary of 97: a repeating sequence with 20% noise."""
    work = tmp_path_factory.mktemp("mpi")
    rng = np.random.default_rng(0)
    tokens = np.where(rng.random(16000) < 0.2, rng.integers(0, 97, 16000), np.arange(16000) % 97)
    write_shard(work / "tiny_train.bin", tokens.astype(np.uint16))
    return work


@pytest.fixture(scope="module")
def references(data_dir):
    """One sequential process with batch 2B, for each optimizer setting: (losses, parameters)."""
    found = {}
    for name, options in (("plain", PLAIN), ("options", OPTIONS), ("unclipped", OPTIONS[:-2])):
        out = f"ref-{name}"
        result = llmpy_train([*COMMON, *options, "--mode", "sequential", "-B", 2 * B, "--output", f"{out}/model.bin",
                              "--metrics-dir", out], data_dir)
        found[name] = (train_losses(result.stdout), read_model(data_dir / out / "model.bin")[1])
    return found


# ------------------------------------------------------------------------------------ without MPI
def test_two_ranks_read_the_rows_of_one_process_with_twice_the_batch(data_dir):
    shard = str(data_dir / "tiny_train.bin")
    ranks = [DataLoader(shard, B, T, rank=r, world_size=2) for r in range(2)]
    double = DataLoader(shard, 2 * B, T)
    accumulating = DataLoader(shard, B, T)
    assert double.num_batches == ranks[0].num_batches == (16000 - 1) // (2 * B * T)
    for step in range(double.num_batches + 5):  # into the second epoch
        parts = [loader.next_batch() for loader in ranks]
        inputs, targets = double.next_batch()
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), inputs)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), targets)
        if step < double.num_batches:
            micro = [accumulating.next_batch() for _ in range(2)]
            np.testing.assert_array_equal(np.concatenate([m[0] for m in micro]), inputs)
            np.testing.assert_array_equal(np.concatenate([m[1] for m in micro]), targets)
    # Gradient accumulation is the same only within an epoch: here the shard holds an odd number of B-batches
    # (499), so the epoch of the accumulating loader ends in the middle of a step; 2B is the exact equivalent.
    assert accumulating.num_batches % 2 == 1


MPICH_VERSION = ("MPICH Version:      5.0.2\nMPICH Release date: Fri Sep 25 20:45:26 UTC 2026\n"
                 "MPICH Device:       ch4:ucx ofi\n")


@pytest.mark.parametrize("environ, line", [
    ({}, "MPICH 5.0.2 ch4:ucx (UCX_TLS unset: UCX picks, shared memory between ranks on one kernel)"),
    ({"UCX_TLS": "tcp,self", "UCX_RNDV_THRESH": "inf", "PATH": "/bin"},
     "MPICH 5.0.2 ch4:ucx (UCX_TLS=tcp,self, UCX_RNDV_THRESH=inf)"),
    ({"MPIR_CVAR_CH4_NETMOD": "ofi"},
     "MPICH 5.0.2 ch4:ofi (MPIR_CVAR_CH4_NETMOD=ofi, FI_PROVIDER unset: libfabric picks)"),
])
def test_the_transport_line_names_the_network_module_and_the_variables_that_chose_it(environ, line):
    assert describe_transport(MPICH_VERSION, environ) == line


def test_llmpy_sets_ucx_rendezvous_threshold_only_where_the_user_did_not_and_says_so():
    unset = {"UCX_TLS": "tcp,self"}
    assert apply_network_defaults(unset) == {"UCX_RNDV_THRESH": "64k"}
    assert unset == {"UCX_TLS": "tcp,self", "UCX_RNDV_THRESH": "64k"}
    assert describe_transport(MPICH_VERSION, unset, defaults={"UCX_RNDV_THRESH": "64k"}) == \
        "MPICH 5.0.2 ch4:ucx (UCX_TLS=tcp,self, UCX_RNDV_THRESH=64k (llmpy's default))"
    chosen = {"UCX_RNDV_THRESH": "inf"}
    assert apply_network_defaults(chosen) == {}
    assert chosen == {"UCX_RNDV_THRESH": "inf"}


@pytest.mark.parametrize("model", ["tiny", "d12"])
def test_buckets_and_owner_blocks_cover_every_parameter_once(model):
    config = PRESETS[model]
    buckets = gradient_buckets(config)
    assert [b.part for b in buckets] == [config.num_layers, *reversed(range(config.num_layers)), -1]
    covered = np.zeros(config.num_parameters(), dtype=np.int8)
    for bucket in buckets:
        for s in bucket.segments:
            covered[s.start:s.stop] += 1
    assert (covered == 1).all()
    blocks = owner_blocks(buckets, 3)
    sizes = np.zeros(3, dtype=np.int64)
    for segment, pieces in blocks.items():
        assert pieces[0][0] == segment.start and pieces[-1][1] == segment.stop
        assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
        assert all(0 < stop - start <= BLOCK_ELEMENTS for start, stop, _ in pieces)
        for start, stop, owner in pieces:
            sizes[owner] += stop - start
    assert sizes.sum() == config.num_parameters()
    if model == "d12":  # big tensors are cut into many blocks, so round-robin ownership balances the update
        assert sizes.max() / sizes.min() < 1.05
    assert split_evenly(10, 3) == ([4, 3, 3], [0, 4, 7])


# ------------------------------------------------------------------------------------ real mpiexec runs
@needs_mpi
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_match_one_process_with_twice_the_batch(strategy, data_dir, references):
    parameters = references["plain"][1].size
    for name, options in (("plain", PLAIN), ("options", OPTIONS)):
        out = f"{strategy}-{name}"
        result = llmpy_train([*COMMON, *options, "--mode", "mpi", "--strategy", strategy, "-B", B,
                              "--output", f"{out}/model.bin", "--metrics-dir", out], data_dir, ranks=2)
        losses, params = train_losses(result.stdout), read_model(data_dir / out / "model.bin")[1]
        ref_losses, ref_params = references[name]
        assert len(losses) == STEPS
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        # With eps 1e-8 AdamW divides by sqrt(v): an element whose gradient is near zero turns the rounding of a
        # sum into a visible fraction of one step (at most lr): 2B and --grad-accum 2 differ by 5e-5 from each
        # other there. With eps 1 the step is proportional to the gradient and rounding stays at 1e-8.
        np.testing.assert_allclose(params, ref_params, rtol=0, atol=1e-4 if name == "plain" else 1e-6)
        assert result.stdout.count(f"step    1/{STEPS}") == 1  # only rank 0 prints: one line per step
        assert "rank 1: host " in result.stdout  # once, where the ranks run
        per_rank = json.loads((data_dir / out / "metrics.json").read_text())["summary"]["per_rank"]
        held = [r["moment_elements"] for r in per_rank]  # floats of m (and of v) each rank holds
        if strategy == "allreduce":
            assert held == [parameters, parameters]
        elif strategy == "zero1":
            assert sum(held) == parameters and abs(held[0] - held[1]) <= len(per_rank) * 64
        elif strategy == "server":
            assert held == [parameters, 0]
        else:
            assert sum(held) == parameters and max(held) < parameters and min(held) > 0
        assert all(r["communication_ms"] > 0 and "MPI_Waitall" in r["communication_by_call_ms"] for r in per_rank)
    # the clipping and decay settings matter here: without clipping the reference differs by far more
    assert np.abs(references["unclipped"][1] - references["options"][1]).max() > 1e-3


@needs_mpi
@pytest.mark.parametrize("rank_mode", ["sequential", "tasks"])
def test_each_bucket_reports_when_its_gradient_collectives_started_and_completed(rank_mode, data_dir):
    out = f"timeline-{rank_mode}"
    blocks = ["--block-tokens", "8"] if rank_mode == "tasks" else []
    llmpy_train([*COMMON, *PLAIN, "--steps", "3", "--mode", "mpi", "--strategy", "allreduce", "--rank-mode",
                 rank_mode, *blocks, "-B", B, "--metrics-dir", out, "--output", ""], data_dir, ranks=2)
    layers = PRESETS["tiny"].num_layers
    for rank in json.loads((data_dir / out / "metrics.json").read_text())["summary"]["per_rank"]:
        timeline = rank["gradient_timeline"]
        buckets = timeline["buckets"]
        # backward's order: the final layernorm, the blocks from the last, the encoder (its wte is also lm_head)
        assert [b["part"] for b in buckets] == [layers, *range(layers - 1, -1, -1), -1]
        assert sum(b["bytes"] for b in buckets) == 4 * rank["parameters"]
        starts = [b["start_ms"] for b in buckets]
        assert starts == sorted(starts) and starts[0] >= 0
        assert all(b["done_ms"] > b["start_ms"] for b in buckets)
        if rank_mode == "sequential":  # the update begins after backward started the encoder's collectives
            assert starts[-1] <= timeline["update_start_ms"]
        else:
            assert timeline["update_start_ms"] is None


@needs_mpi
def test_trace_has_one_process_per_rank_and_analyze_reads_it(data_dir):
    result = llmpy_train([*COMMON, *PLAIN, "--steps", "3", "--mode", "mpi", "--strategy", "zero1", "-B", B,
                          "--trace", "trace-zero1", "--output", ""], data_dir, ranks=2)
    trace = json.loads((data_dir / "trace-zero1" / "trace.json").read_text())
    processes = {e["pid"] for e in trace["traceEvents"] if e.get("ph") == "X"}
    assert processes == {1, 2}
    names = {e["name"] for e in trace["traceEvents"] if e.get("ph") == "X"}
    assert {"MPI_Ireduce_scatter", "MPI_Iallgatherv", "MPI_Waitall", "adamw_update"} <= names
    header = (data_dir / "trace-zero1" / "trace.prv").read_text().splitlines()[0]
    assert header.endswith(":1:2(1:1,1:1)")  # Paraver: one application of 2 tasks (ranks), 1 thread each
    analysis = run([sys.executable, "-m", "llmpy", "analyze", "trace-zero1"], data_dir)
    assert analysis.returncode == 0, analysis.stderr
    assert "ranks=2" in analysis.stdout and "(2 ranks)" in analysis.stdout
    assert "MPI_" not in analysis.stdout.split("Roofline per kernel")[1]  # communication is not a kernel
    assert "per rank, ms per step" in result.stdout


@needs_mpi
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_stops_every_rank_within_seconds(how, data_dir):
    start = time.perf_counter()
    result = llmpy_train([*COMMON, *PLAIN, "--steps", "50", "--mode", "mpi", "-B", B, "--output", ""], data_dir,
                         ranks=2, check=False, env_extra={"LLMPY_FAIL_RANK": "1:3" + (":kill" if how == "kill" else "")})
    elapsed = time.perf_counter() - start
    assert result.returncode != 0
    assert elapsed < 20, elapsed
    assert len(train_losses(result.stdout)) == 2
    if how == "raise":
        assert "llmpy train: rank 1 of 2" in result.stderr and "failure injected" in result.stderr
    else:  # SIGKILL leaves no message of its own; mpiexec reports a rank of this job killed by signal 9: the one
        # killed, or rank 0, which it kills next (whichever end it handles first: seen both ways, ~1 in 20)
        pids = re.search(r"rank pids 0=(\d+), 1=(\d+)", result.stdout).groups()
        output = result.stdout + result.stderr
        assert re.search(r"PID (\d+) RUNNING", output).group(1) in pids, output
        assert "Killed (signal 9)" in output, output


@needs_mpi
@pytest.mark.parametrize("args, message", [
    (["--threads", "2"], "2 ranks x 2 threads on this node would oversubscribe its"),
    (["-B", "600"], "one batch needs B*T*world_size+1 = 600*16*2+1"),
    (["--strategy", "zero2"], "invalid choice: 'zero2'"),
])
def test_bad_arguments_are_refused_before_any_work_in_one_line(args, message, data_dir):
    result = llmpy_train([*COMMON, *PLAIN, "--mode", "mpi", "-B", B, *args, "--output", ""], data_dir, ranks=2,
                         check=False)
    assert result.returncode == 2
    assert "train loss" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    if "invalid choice" in message:  # argparse, before MPI starts: each rank prints its usage
        assert message in result.stderr
    else:
        assert len(errors) == 1 and message in errors[0], result.stderr


@needs_mpi
@pytest.mark.parametrize("strategy, flags, options", [
    ("zero1", [], "plain"), ("server", [], "options"), ("owners", ["--mpi-progress", "tests"], "plain"),
    ("allreduce", ["--no-comm-overlap"], "plain")])
def test_tasks_inside_each_rank_match_one_process_with_twice_the_batch(strategy, flags, options, data_dir, references):
    out = f"tasks-{strategy}"
    result = llmpy_train([*COMMON, *(PLAIN if options == "plain" else OPTIONS), "--mode", "mpi", "--strategy",
                          strategy, "--rank-mode", "tasks", "--block-tokens", "8", "-B", B, "--output",
                          f"{out}/model.bin", "--metrics-dir", out, "--trace", f"{out}/trace", *flags],
                         data_dir, ranks=2)
    assert "tasks, 1 worker" in result.stdout
    ref_losses, ref_params = references[options]
    np.testing.assert_allclose(train_losses(result.stdout), ref_losses, rtol=1e-5)
    np.testing.assert_allclose(read_model(data_dir / out / "model.bin")[1], ref_params, rtol=0, atol=1e-4)
    per_rank = json.loads((data_dir / out / "metrics.json").read_text())["summary"]["per_rank"]
    held = [r["moment_elements"] for r in per_rank]  # the strategy's update ran, sharded where it shards
    assert held == [ref_params.size] * 2 if strategy == "allreduce" else sum(held) == ref_params.size
    overlap = "--no-comm-overlap" not in flags
    # with overlap each bucket's collectives start from a task of the rank's graph, and its update is a task too
    # (one per bucket and step, on a worker row, after the backward's first tasks); without, both follow the graph
    events = json.loads((data_dir / out / "trace" / "events.json").read_text())
    events = [dict(zip(events["event_fields"], e)) for e in events["events"]]
    starts = [e for e in events if e["name"] == "MPI_Istart_bucket"]
    updates = [e for e in events if e["name"] == "adamw_update"]
    parts = [b.part for b in gradient_buckets(PRESETS["tiny"])]
    assert len(starts) == (2 * STEPS * len(parts) if overlap else 0)
    update_tasks = [e["task"] for e in updates]
    if overlap:
        assert sorted(update_tasks) == sorted(f"adamw_update bucket l{p}" for p in parts for _ in range(2 * STEPS))
    else:
        assert update_tasks and not any(update_tasks)  # the strategy's AdamW calls, after the graph
    update_ms = json.loads((data_dir / out / "metrics.json").read_text())["summary"]["phases_ms"]["update"]
    started_in_update = per_rank[0]["communication_span_ms"] <= update_ms * 1.001
    assert started_in_update == (not overlap), (per_rank[0], update_ms)


@needs_mpi
@pytest.mark.parametrize("strategy, rank_mode", [("server", "sequential"), ("zero1", "tasks")])
def test_overlap_steps_leaves_parameter_collectives_to_the_next_forward_with_the_same_results(strategy, rank_mode,
                                                                                            data_dir, references):
    runs = {}
    for overlap in (False, True):
        out = f"overlap-{strategy}-{rank_mode}-{overlap}"
        result = llmpy_train([*COMMON, *PLAIN, "--mode", "mpi", "--strategy", strategy, "--rank-mode", rank_mode,
                              "-B", B, "--output", f"{out}/model.bin", "--trace", f"{out}/trace",
                              *(["--overlap-steps"] if overlap else [])], data_dir, ranks=2)
        runs[overlap] = (train_losses(result.stdout), read_model(data_dir / out / "model.bin")[1], out)
    ref_losses, ref_params = references["plain"]
    np.testing.assert_allclose(runs[True][0], ref_losses, rtol=1e-5)
    np.testing.assert_allclose(runs[True][1], ref_params, rtol=0, atol=1e-4)
    assert runs[True][0] == runs[False][0] and np.array_equal(runs[True][1], runs[False][1])  # same arithmetic
    buckets = len(gradient_buckets(PRESETS["tiny"]))
    for overlap, (_, _, out) in runs.items():  # where each rank's forward took each bucket's parameters
        events = json.loads((data_dir / out / "trace" / "events.json").read_text())
        events = [dict(zip(events["event_fields"], e)) for e in events["events"]]
        taken = collections.Counter((e["rank"], e["step"]) for e in events
                                    if e["phase"] == "forward" and e["name"] == "MPI_Wait_params")
        # (a task rank's graph is headed by its wait tasks from step 1 on; there is nothing to wait for yet)
        steps = range(2 if rank_mode == "sequential" else 1, STEPS + 1) if overlap else ()
        assert taken == {(rank, step): buckets for rank in (0, 1) for step in steps}, (overlap, taken)


# ------------------------------------------------------------------------------------ ranks that disagree or stop
@needs_mpi
@pytest.mark.parametrize("flags, field", [(["--steps", "7"], "--steps"), (["--strategy", "zero1"], "--strategy"),
                                          (["--model", "d2"], "model")])
def test_ranks_started_differently_stop_with_one_error_naming_rank_and_field(flags, field, data_dir):
    train = [sys.executable, "-m", "llmpy", "train", *COMMON, *PLAIN, "--mode", "mpi", "-B", B, "--output", ""]
    start = time.perf_counter()
    # MPMD launch: rank 0 with the common command, rank 1 with one flag changed (the later flag wins)
    result = run([MPIEXEC, "-n", 1, *train, ":", "-n", 1, *train, *flags], data_dir, timeout=120)
    assert result.returncode == 2 and "train loss" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "rank 1 was started with" in errors[0] and field in errors[0], result.stderr
    assert time.perf_counter() - start < 60


@needs_mpi
def test_a_stopped_rank_is_named_and_every_rank_stops_within_the_timeout(data_dir):
    import signal

    command = [MPIEXEC, "-n", 2, sys.executable, "-m", "llmpy", "train", *COMMON, *PLAIN, "--steps", "100000",
               "--mode", "mpi", "-B", B, "--output", "", "--mpi-timeout", "5"]
    process = subprocess.Popen([str(c) for c in command], cwd=data_dir, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    pid = None
    try:
        lines = []
        for line in process.stdout:  # wait until training runs, then stop rank 1
            lines.append(line)
            found = re.search(r"rank pids 0=\d+, 1=(\d+)", line)
            pid = int(found.group(1)) if found else pid
            if "train loss" in line and pid is not None:
                break
        os.kill(pid, signal.SIGSTOP)
        stopped = time.perf_counter()
        out, err = process.communicate(timeout=90)
        elapsed = time.perf_counter() - stopped
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait()
    assert process.returncode != 0
    assert f"rank 1 (pid {pid}) is stopped" in err and "no answer for 5 s" in err, err
    assert elapsed < 45, elapsed  # the 5 s timeout, then MPI_Abort ends every rank


PROGRESS_CHECK = """
import time
import mpi4py
mpi4py.rc.thread_level = "multiple"
from mpi4py import MPI
import numpy as np
import threading
from llmpy.execution.mpi.progress import ProgressThread

comm = MPI.COMM_WORLD
thread = ProgressThread(MPI, threading.RLock())
idle_start = time.process_time()
time.sleep(0.5)  # nothing in flight: the thread waits on its condition
idle_cpu = time.process_time() - idle_start
values = np.full(4 << 20, comm.rank + 1, dtype=np.float32)  # 16 MB: many rounds of MPICH's progress
total = np.zeros_like(values)
comm.Barrier()
request = comm.Iallreduce(values, total, MPI.SUM)
thread.watch([request])
deadline = time.monotonic() + 20
while request and time.monotonic() < deadline:  # no MPI call here: only the thread moves the data
    time.sleep(0.01)
done = not request
thread.close()
print(f"rank {comm.rank}: done {done} sum {total[0]:g}/{total[-1]:g} tests {thread.tests} idle_cpu {idle_cpu:.3f}")
"""


@needs_mpi
def test_the_progress_thread_completes_a_collective_while_the_rank_makes_no_mpi_call_and_idles_without_cpu(tmp_path):
    result = run([MPIEXEC, "-n", 2, sys.executable, "-c", PROGRESS_CHECK], tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    # mpiexec forwards both ranks' stdout through one pipe, and their lines can run together: find each report
    reports = re.findall(r"rank (\d): done (\w+) sum ([0-9.]+)/([0-9.]+) tests (\d+) idle_cpu ([0-9.]+)", result.stdout)
    assert sorted(r[0] for r in reports) == ["0", "1"], result.stdout
    for _, done, first, last, tests, idle_cpu in reports:
        assert done == "True" and first == last == "3", reports  # 1 + 2 everywhere
        assert int(tests) >= 1
        assert float(idle_cpu) < 0.1, reports  # 0.5 s idle: no spinning core
