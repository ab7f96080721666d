"""Compiling one kernel body into the two variants the execution models choose from.

`@kernel` compiles a numba function twice from the same source:
  - `.parallel`: `prange` loops spread over numba's thread pool (fork-join model);
  - `.serial`: `prange` runs as a plain loop on the calling thread, with the GIL released (sequential
    model, and the worker threads of the task model).
Both are `cache=True`. numba's on-disk cache keys entries by qualified name and bytecode but not by
compile flags, so the serial copy gets its own qualified name to keep the two cache entries apart.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable

from numba import njit

# Reassociation lets LLVM vectorise reductions; NaN/Inf semantics are kept (no nnan/ninf).
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@dataclass(frozen=True)
class KernelVariants:
    name: str
    parallel: Callable
    serial: Callable
    python: Callable

    def variant(self, parallel: bool) -> Callable:
        return self.parallel if parallel else self.serial


def kernel(fn: Callable) -> KernelVariants:
    parallel = njit(parallel=True, cache=True, nogil=True, fastmath=FASTMATH)(fn)
    serial_fn = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    serial_fn.__qualname__ = fn.__qualname__ + "_serial"
    serial_fn.__doc__ = fn.__doc__
    serial = njit(parallel=False, cache=True, nogil=True, fastmath=FASTMATH)(serial_fn)
    return KernelVariants(fn.__name__, parallel, serial, fn)


def helper(fn: Callable) -> Callable:
    """An inlined building block called from kernels (no threading of its own)."""
    return njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")(fn)
