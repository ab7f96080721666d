"""The `tasks` execution model: the step as a dataflow graph on worker threads (see .execution)."""

from __future__ import annotations

from llmpy.execution.base import ExecutionModel
from llmpy.execution.options import TaskOptions


class Tasks(ExecutionModel):
    """Dataflow of tasks on `threads` worker threads; BLAS on 1 thread, serial nogil numba kernels."""

    name = "tasks"

    def __init__(self, threads: int = 1, threading_layer: str = "omp", options: TaskOptions | None = None):
        from llmpy.execution.tasks.execution import TaskExecution

        super().__init__(threads, threading_layer)
        self.options = options or TaskOptions()
        self.tasks = TaskExecution(threads, self.options)

    @property
    def blas_threads(self) -> int:
        return 1  # each worker runs its own GEMMs

    def describe(self) -> str:
        o = self.options
        blocks = f"{o.block_tokens}-token blocks" if o.block_tokens else "whole-sequence blocks"
        overlap = ", steps overlap" if o.overlap_steps else ""
        split = "" if o.gemm_split == "rows" else f", GEMMs split by output channels ({o.gemm_split})"
        return (f"tasks, {self.threads} worker{'s' if self.threads > 1 else ''} ({o.runtime} runtime, "
                f"{blocks}{overlap}{split}, BLAS 1)")

    def meta(self) -> dict:
        return dict(super().meta(), runtime=self.options.runtime, block_tokens=self.options.block_tokens)

    def train_step(self, model, optimizer, batches, learning_rate: float, recorder=None, step: int = 0) -> float:
        return self.tasks.train_step(model, optimizer, batches, learning_rate, recorder, step)

    def synchronize(self) -> None:
        """With overlapping steps, run the last step's pending update (see TaskExecution.synchronize)."""
        self.tasks.synchronize()

    def close(self) -> None:
        self.tasks.close()
        super().close()
