"""The execution model's base and the two models that run the model's list of kernel calls as it is:
`sequential` (one thread) and `forkjoin` (each kernel a parallel loop with a barrier after it).

An execution model fixes the thread settings of the process (numba's threading layer can be chosen once per
process; `close()` restores BLAS), picks the kernel variant the model's calls use, and runs a training step.
Where the ranks of a data-parallel run meet (agreement during setup, averaging a loss, gathering traces) is
its `group`'s business: one process here, MPI ranks in llmpy.execution.mpi.
"""

from __future__ import annotations

from contextlib import contextmanager

from threadpoolctl import threadpool_limits

from llmpy.execution.threads import ExecutionError, available_cores, configure_numba_threads
from llmpy.kernels import KernelSet


def train_step(model, optimizer, batches, learning_rate: float, recorder=None, step: int = 0) -> float:
    """One optimizer step over the micro-batches `batches` ((inputs, targets) pairs; gradients averaged
    over them): the model's forward and backward calls in order, then the optimizer's, with the phases marked
    on `recorder`. Returns the mean loss."""
    batches = list(batches)
    if recorder is not None:
        recorder.begin_step(step)
    loss = 0.0
    for micro_step, (inputs, targets) in enumerate(batches):
        if recorder is not None:
            recorder.set_phase("forward")
        loss += model.forward(inputs, targets) / len(batches)
        if recorder is not None:
            recorder.set_phase("backward")
        model.backward(accumulate_gradients=micro_step > 0)
    if recorder is not None:
        recorder.set_phase("update")
    optimizer.update(model.params, model.grads, learning_rate, grad_scale=1.0 / len(batches))
    if recorder is not None:
        recorder.end_step(loss, sum(inputs.size for inputs, _ in batches))
    return loss


class SingleProcess:
    """The ranks of a run when there is one process: nothing to meet, nothing to combine."""

    rank = 0
    world_size = 1

    def agree(self, error: BaseException | None = None) -> None:
        """A point every rank reaches during setup; raises `error` or another rank's error."""
        if error is not None:
            raise error

    def agree_on(self, fields: dict) -> None:
        """Every rank was started with the same run configuration (one process: trivially)."""

    def setup_done(self) -> None:
        """Setup is over: from here a failing rank stops every rank."""

    def fail(self, error: BaseException) -> None:
        """This rank raised `error` (it propagates after this returns)."""

    def average(self, value: float) -> float:
        """The mean of `value` over the ranks."""
        return value

    def gather_trace(self, recorder, meta: dict):
        """The run's trace (every rank's, on rank 0; None on the other ranks)."""
        return recorder.to_trace(meta)

    def rank_report(self, recorder, optimizer, skip: int) -> list[dict] | None:
        """Per-rank communication numbers (data-parallel runs; None otherwise)."""
        return None


class ExecutionModel:
    """Thread settings, the kernel variant the model runs, and the training step."""

    name = "base"

    def __init__(self, threads: int, threading_layer: str = "omp"):
        cores = available_cores()
        if threads < 1:
            raise ExecutionError(f"threads must be at least 1, got {threads}")
        if threads > cores:
            raise ExecutionError(
                f"{threads} threads would oversubscribe this machine's {cores} cores; use at most {cores}"
            )
        self.threads = threads
        self.threading_layer = threading_layer
        self.group = SingleProcess()
        self._blas_limits = threadpool_limits(limits=self.blas_threads, user_api="blas")
        self.kernels = KernelSet(parallel=self.name == "forkjoin")

    @property
    def blas_threads(self) -> int:
        """OpenBLAS threads: the GEMMs of a kernel call run on all of this model's threads."""
        return self.threads

    @contextmanager
    def activate(self):
        """This model's thread settings for the duration of the block (several models in one process take turns:
        llmpy bench interleaves them step by step)."""
        import numba

        with threadpool_limits(limits=self.blas_threads, user_api="blas"):
            if self.kernels.parallel:
                previous = numba.get_num_threads()
                numba.set_num_threads(self.threads)
                try:
                    yield self
                finally:
                    numba.set_num_threads(previous)
            else:
                yield self

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size

    @property
    def cores(self) -> int:
        """Cores this execution model keeps busy (for tokens/s per core)."""
        return self.threads

    def describe(self) -> str:
        return f"{self.name}, {self.threads} thread{'s' if self.threads > 1 else ''}"

    def placement(self) -> list[str]:
        """Where each rank of a data-parallel run runs: host, threads, the transport MPI uses (one process: none)."""
        return []

    def meta(self) -> dict:
        """What this execution model is, for metrics files and traces."""
        return {"mode": self.name, "threads": self.threads, "runtime": "-", "ranks": self.world_size}

    def close(self) -> None:
        self._blas_limits.restore_original_limits()

    def train_step(self, model, optimizer, batches, learning_rate: float, recorder=None, step: int = 0) -> float:
        """One optimizer step (see `train_step`)."""
        return train_step(model, optimizer, batches, learning_rate, recorder, step)

    @property
    def step_function(self):
        return self.train_step

    def synchronize(self) -> None:
        """Finish the work of the last step still in flight (task mode with overlapping steps), so the parameters
        can be read from outside a step: validation, sampling, checkpoints, the final save."""

    def save_checkpoint(self, directory: str, config, params, state, keep: int) -> None:
        """A resumable checkpoint of `state` (a RunState holding this process's m and v) and `params`."""
        from dataclasses import replace

        from llmpy.io.checkpoints import save_checkpoint

        save_checkpoint(directory, state.step, config, params, replace(state, ranges=None), keep)

    def make_optimizer(self, model, config, micro_steps: int = 1):
        """The optimizer train_step drives: AdamW over the model's parameters."""
        from llmpy.core.optim import AdamW

        return AdamW(model.params, config, self.kernels)


class Sequential(ExecutionModel):
    name = "sequential"

    def __init__(self, threads: int = 1, threading_layer: str = "omp"):
        if threads != 1:
            raise ExecutionError(f"sequential mode runs on 1 thread; got threads={threads} (use forkjoin)")
        super().__init__(1, threading_layer)


class ForkJoin(ExecutionModel):
    name = "forkjoin"

    def __init__(self, threads: int = 1, threading_layer: str = "omp"):
        super().__init__(threads, threading_layer)
        configure_numba_threads(threads, threading_layer)

    def meta(self) -> dict:
        return dict(super().meta(), runtime=self.threading_layer)

    def describe(self) -> str:
        return f"forkjoin, {self.threads} thread{'s' if self.threads > 1 else ''} (numba {self.threading_layer}, BLAS {self.threads})"
