"""Execution models: where and when the kernel calls run, never what they compute.

- `sequential`: one thread everywhere (serial numba kernels, 1 BLAS thread): the reference order.
- `forkjoin`: each kernel a parallel loop with a barrier after it (numba `prange` over rows or channel
  blocks on the chosen threading layer, `omp` or `tbb`; OpenBLAS with the same thread count).

Both run the model's one list of kernel calls. Creating an execution model fixes the thread settings
for the process (numba's threading layer can be chosen once per process); `close()` restores BLAS.
"""

from __future__ import annotations

import ctypes
import os
import sys

from threadpoolctl import threadpool_limits

from llmpy.kernels import KernelSet

MODES = ("sequential", "forkjoin")
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


def make_execution_model(mode: str, threads: int = 1, threading_layer: str = "omp") -> ExecutionModel:
    if mode == "sequential":
        return Sequential(threads, threading_layer)
    if mode == "forkjoin":
        return ForkJoin(threads, threading_layer)
    raise ExecutionError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
