"""Tasks whose work ends after their function returns (llmpy.execution.deferred.Completion): the native runtime
releases their successors only when the Completion fires, keeps the worker busy with other tasks meanwhile,
reports the idle spans, and hands on an error; Dask waits for it."""

import threading
import time

import pytest

from llmpy.execution.deferred import Completion
from llmpy.execution.tasks.graph import Region, Task, TaskGraph
from llmpy.execution.tasks.runtime import DaskRuntime, NativeRuntime, TaskFailed

DELAY_S = 0.2


def chain_with_a_deferred_task(log: list, fire_after: float, error: BaseException | None = None):
    """start -> (wait, fired by a timer thread `fire_after` s after it ran) -> after; and an independent task
    `other` of lower priority."""
    graph = TaskGraph()
    completion = Completion()

    def start():
        log.append(("start", time.perf_counter()))
        threading.Timer(fire_after, completion.complete, (error,)).start()
        return completion

    def record(name):
        log.append((name, time.perf_counter()))

    graph.add(Task("start", "start", start, (), (), (Region("x"),), cost=1.0))
    graph.add(Task("after", "after", record, ("after",), (Region("x"),), (), cost=0.5))
    graph.add(Task("other", "other", record, ("other",), (), (Region("y"),), cost=0.1))
    graph.validate()
    return graph, completion


def test_successors_wait_for_the_completion_while_the_worker_runs_other_tasks():
    runtime = NativeRuntime(1)
    try:
        log, idle = [], []
        graph, completion = chain_with_a_deferred_task(log, DELAY_S)
        begin = time.perf_counter()
        runtime.run(graph, on_idle=lambda index, worker, start, end: idle.append((start, end)))
        elapsed = time.perf_counter() - begin
    finally:
        runtime.close()
    names = [name for name, _ in log]
    assert names == ["start", "other", "after"]  # one worker: `other` ran while `after` waited for the completion
    after = dict(log)["after"]
    assert after >= completion.completed_at and after - dict(log)["start"] >= DELAY_S * 0.9
    assert elapsed >= DELAY_S * 0.9
    # the worker's wait with nothing ready but the completion pending is one idle span of about the delay
    assert len(idle) == 1 and idle[0][1] - idle[0][0] == pytest.approx(DELAY_S, abs=0.1)


def test_an_error_completing_a_task_fails_the_run_without_running_its_successors():
    runtime = NativeRuntime(2)
    try:
        log = []
        graph, _ = chain_with_a_deferred_task(log, 0.05, RuntimeError("peer stopped answering"))
        with pytest.raises(TaskFailed, match="peer stopped answering"):
            runtime.run(graph)
        assert "after" not in [name for name, _ in log]
        log.clear()  # the runtime is usable again
        graph, _ = chain_with_a_deferred_task(log, 0.01)
        runtime.run(graph)
        assert sorted(name for name, _ in log) == ["after", "other", "start"]
    finally:
        runtime.close()


def test_a_completion_that_fired_before_the_runtime_asked_releases_at_once():
    completion = Completion()
    completion.complete()
    called = []
    completion.on_complete(called.append)
    assert called == [None]
    completion.wait()


def test_dask_waits_for_the_completion_inside_the_task():
    log = []
    graph, completion = chain_with_a_deferred_task(log, DELAY_S)
    DaskRuntime(1).run(graph)
    assert dict(log)["after"] >= completion.completed_at


class _PendingForever:
    """An MPI request that never completes (a peer that stopped answering)."""

    def __bool__(self):
        return True


class _NoProgressMPI:
    class Request:
        @staticmethod
        def Testsome(requests):
            return []


def test_the_progress_thread_fails_a_completion_whose_collectives_never_end():
    from llmpy.execution.mpi.progress import ProgressThread
    from llmpy.execution.mpi.watchdog import Watchdog

    class StoppedPeer(Watchdog):
        def silent_ranks(self):
            return "rank 1 is stopped"

    thread = ProgressThread(_NoProgressMPI, threading.RLock(), watchdog=StoppedPeer(0, [0, 0], ["", ""], 0.2))
    try:
        completion = Completion()
        start = time.perf_counter()
        thread.watch([_PendingForever()], completion, "the gradient collectives of part 3")
        with pytest.raises(Exception, match="the gradient collectives of part 3: no answer for 0.2 s; rank 1 is stopped"):
            completion.wait()
        assert 0.2 <= time.perf_counter() - start < 2.0
        done = Completion()
        thread.watch([], done)  # nothing in flight: complete at once
        assert done.completed_at is not None and done.error is None
    finally:
        thread.close()
