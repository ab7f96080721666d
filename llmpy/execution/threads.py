"""Thread settings of a process: cores available, numba's threading layer (omp or tbb) and its thread count."""

from __future__ import annotations

import ctypes
import os
import sys

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


