"""Making an execution model by name."""

from __future__ import annotations

from llmpy.execution.base import ExecutionModel, ForkJoin, Sequential
from llmpy.execution.options import MpiOptions, TaskOptions
from llmpy.execution.threads import ExecutionError

MODES = ("sequential", "forkjoin", "tasks", "mpi")


def make_execution_model(mode: str, threads: int | None = 1, threading_layer: str = "omp",
                         options: TaskOptions | MpiOptions | None = None, **option_fields) -> ExecutionModel:
    """options: TaskOptions (mode tasks) or MpiOptions (mode mpi), or their fields as keywords. threads: per rank in
    mpi mode (None: the node's cores shared by its ranks)."""
    if mode not in MODES:
        raise ExecutionError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if option_fields:
        if options is not None or mode not in ("tasks", "mpi"):
            raise ExecutionError(f"options {', '.join(option_fields)} do not apply to mode {mode}")
        options = (TaskOptions if mode == "tasks" else MpiOptions)(**option_fields)
    if mode == "tasks":
        from llmpy.execution.tasks.model import Tasks

        return Tasks(threads, threading_layer, options)
    if mode == "mpi":
        from llmpy.execution.mpi.model import DataParallel

        return DataParallel(make_execution_model, threads, threading_layer, options or MpiOptions())
    if options is not None:
        raise ExecutionError(f"mode {mode} takes no options")
    return (Sequential if mode == "sequential" else ForkJoin)(threads, threading_layer)
