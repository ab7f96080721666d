"""Execution models: where and when the kernel calls run, never what they compute.

- `sequential`: one thread everywhere (serial numba kernels, 1 BLAS thread): the reference order.
- `forkjoin`: each kernel a parallel loop with a barrier after it (numba `prange` over rows or channel
  blocks on the chosen threading layer, `omp` or `tbb`; OpenBLAS with the same thread count).
- `tasks`: the step as a dataflow graph of kernel calls on token / channel / parameter blocks, run by N
  worker threads (llmpy's own scheduler or Dask's), serial nogil kernels and 1-thread BLAS (see .tasks).
- `mpi`: this process is one data-parallel rank under mpiexec, running `sequential` or `forkjoin` inside;
  gradients and updates combined by a strategy (see .distributed).

Both run the model's one list of kernel calls. Creating an execution model fixes the thread settings
for the process (numba's threading layer can be chosen once per process); `close()` restores BLAS.
"""

from __future__ import annotations

import ctypes
import os
import sys

from threadpoolctl import threadpool_limits

from llmpy.kernels import KernelSet

MODES = ("sequential", "forkjoin", "tasks", "mpi")
THREADING_LAYERS = ("omp", "tbb")


class ExecutionError(RuntimeError):
    pass


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _load_tbb() -> None:
    """numba's TBB layer needs libtbb.so.12 loadable; the `tbb` wheel puts it in <prefix>/lib, which is
    not on the loader's path outside conda, so load it globally by path first."""
    for prefix in (sys.prefix, sys.base_prefix):
        path = os.path.join(prefix, "lib", "libtbb.so.12")
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return


def configure_numba_threads(threads: int, threading_layer: str) -> None:
    import numba

    if threading_layer not in THREADING_LAYERS:
        raise ExecutionError(f"unknown threading layer {threading_layer!r}; choose one of {', '.join(THREADING_LAYERS)}")
    current = _active_threading_layer()
    if current is not None and current != threading_layer:
        raise ExecutionError(
            f"numba's threading layer is already {current!r} in this process; it cannot switch to"
            f" {threading_layer!r} (start a new process)"
        )
    if threading_layer == "tbb":
        _load_tbb()
    numba.config.THREADING_LAYER = threading_layer
    if threads > numba.config.NUMBA_NUM_THREADS:
        raise ExecutionError(f"{threads} threads asked, numba was started with {numba.config.NUMBA_NUM_THREADS}")
    _start_threading_layer()
    numba.set_num_threads(threads)


def _active_threading_layer() -> str | None:
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return None


def _start_threading_layer() -> None:
    """Run one tiny parallel kernel so the layer is loaded now (and a missing TBB fails here, clearly)."""
    import numpy as np

    from llmpy.kernels.residual import residual_forward

    x = np.zeros(8, dtype=np.float32)
    try:
        residual_forward.parallel(x, x, x)
    except ValueError as error:
        raise ExecutionError(f"numba could not start its threading layer: {error}") from None


class ExecutionModel:
    """Thread settings plus the kernel variant the model runs."""

    name = "base"
    # A model's own training-step function (same signature as llmpy.train.train_step), or None for the shared one.
    step_function = None
    # This process is the only rank of its run. Data-parallel execution (`mpi`: llmpy.execution.distributed)
    # overrides these and the methods below, which llmpy.train calls where the ranks of a run meet.
    rank = 0
    world_size = 1

    def __init__(self, threads: int, threading_layer: str = "omp"):
        cores = available_cores()
        if threads < 1:
            raise ExecutionError(f"--threads must be at least 1, got {threads}")
        if threads > cores:
            raise ExecutionError(
                f"{threads} threads would oversubscribe this machine's {cores} cores; use --threads <= {cores}"
            )
        self.threads = threads
        self.threading_layer = threading_layer
        self._blas_limits = threadpool_limits(limits=threads, user_api="blas")
        self.kernels = KernelSet(parallel=self.name == "forkjoin")

    @property
    def cores(self) -> int:
        """Cores this execution model keeps busy (for tokens/s per core)."""
        return self.threads

    def describe(self) -> str:
        return f"{self.name}, {self.threads} thread{'s' if self.threads > 1 else ''}"

    def close(self) -> None:
        self._blas_limits.restore_original_limits()

    def synchronize(self) -> None:
        """Finish the work of the last step still in flight (task mode with --overlap-steps), so the parameters
        can be read from outside a step: validation, sampling, checkpoints, the final save."""

    # ---- where the ranks of a run meet (one process: nothing to meet)
    def make_optimizer(self, model, config, micro_steps: int = 1):
        """The optimizer train_step drives: AdamW over the model's parameters."""
        from llmpy.optim import AdamW

        return AdamW(model.params, config, self.kernels)

    def agree(self, error: BaseException | None = None) -> None:
        """A point every rank reaches during setup; raises `error` or another rank's error."""
        if error is not None:
            raise error

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


class Sequential(ExecutionModel):
    name = "sequential"

    def __init__(self, threads: int = 1, threading_layer: str = "omp"):
        if threads != 1:
            raise ExecutionError(f"sequential mode runs on 1 thread; got --threads {threads} (use --mode forkjoin)")
        super().__init__(1, threading_layer)


class ForkJoin(ExecutionModel):
    name = "forkjoin"

    def __init__(self, threads: int = 1, threading_layer: str = "omp"):
        super().__init__(threads, threading_layer)
        configure_numba_threads(threads, threading_layer)

    def describe(self) -> str:
        return f"forkjoin, {self.threads} thread{'s' if self.threads > 1 else ''} (numba {self.threading_layer}, BLAS {self.threads})"


class Tasks(ExecutionModel):
    """Dataflow of tasks on `threads` worker threads; BLAS on 1 thread, serial nogil numba kernels."""

    name = "tasks"

    def __init__(self, threads: int = 1, threading_layer: str = "omp", block_tokens: int | None = None,
                 runtime: str = "native", overlap_steps: bool = False, gemm_split: str = "rows",
                 gemm_channel_block: int | None = None):
        from llmpy.execution.tasks import GEMM_SPLITS, TaskExecution

        super().__init__(threads, threading_layer)
        self._blas_limits.restore_original_limits()
        self._blas_limits = threadpool_limits(limits=1, user_api="blas")
        if block_tokens is not None and block_tokens < 1:
            raise ExecutionError(f"--block-tokens must be positive, got {block_tokens}")
        if gemm_split not in GEMM_SPLITS:
            raise ExecutionError(f"unknown --gemm-split {gemm_split!r}; choose one of {', '.join(GEMM_SPLITS)}")
        self.tasks = TaskExecution(threads, block_tokens, runtime, overlap_steps, gemm_split=gemm_split,
                                   gemm_channel_block=gemm_channel_block)
        self.step_function = self.tasks.train_step

    def describe(self) -> str:
        blocks = f"{self.tasks.block_tokens}-token blocks" if self.tasks.block_tokens else "whole-sequence blocks"
        overlap = ", steps overlap" if self.tasks.overlap_steps else ""
        split = "" if self.tasks.gemm_split == "rows" else f", GEMMs split by output channels ({self.tasks.gemm_split})"
        return (f"tasks, {self.threads} worker{'s' if self.threads > 1 else ''} ({self.tasks.runtime_name} runtime, "
                f"{blocks}{overlap}{split}, BLAS 1)")

    def synchronize(self) -> None:
        """With --overlap-steps, run the last step's pending update (see TaskExecution.synchronize)."""
        self.tasks.synchronize()

    def close(self) -> None:
        self.tasks.close()
        super().close()


def make_execution_model(mode: str, threads: int = 1, threading_layer: str = "omp", **task_options) -> ExecutionModel:
    """task_options (mode tasks only): block_tokens, runtime ("native" or "dask"), overlap_steps, gemm_split,
    gemm_channel_block."""
    if mode == "tasks":
        return Tasks(threads, threading_layer, **task_options)
    if mode == "mpi":  # task_options: strategy, rank_mode; threads per rank (None: the node's cores / its ranks)
        from llmpy.execution.distributed import DataParallel

        return DataParallel(threads, threading_layer, **task_options)
    if mode == "sequential":
        return Sequential(threads, threading_layer)
    if mode == "forkjoin":
        return ForkJoin(threads, threading_layer)
    raise ExecutionError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
