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

# Reassociation lets LLVM vectorise reductions; NaN/Inf semantics are kept (no nnan/ninf). Elementwise
# kernels need none of it to vectorise, and with it LLVM contracts `(1-b)*g + b*m` into different FMAs
# in the two variants (constants are visible to one, not the other), so the variants would disagree.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@dataclass(frozen=True)
class KernelVariants:
    name: str
    parallel: Callable
    serial: Callable
    python: Callable

    def variant(self, parallel: bool) -> Callable:
        return self.parallel if parallel else self.serial


def kernel(fn: Callable | None = None, *, fastmath: bool = True):
    """`@kernel` for kernels with reductions (fast math), `@kernel(fastmath=False)` for elementwise ones
    (IEEE arithmetic: the serial and parallel variants give bitwise equal results)."""
    if fn is None:
        return lambda f: _compile_variants(f, FASTMATH if fastmath else False)
    return _compile_variants(fn, FASTMATH if fastmath else False)


# error_model="numpy": a float division by zero gives inf/nan as in C, instead of numba's default Python
# check (raise ZeroDivisionError), whose branch keeps LLVM from vectorising any loop that divides.
def _compile_variants(fn: Callable, fastmath) -> KernelVariants:
    parallel = njit(parallel=True, cache=True, nogil=True, fastmath=fastmath, error_model="numpy")(fn)
    serial_fn = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    serial_fn.__qualname__ = fn.__qualname__ + "_serial"
    serial_fn.__doc__ = fn.__doc__
    serial = njit(parallel=False, cache=True, nogil=True, fastmath=fastmath, error_model="numpy")(serial_fn)
    return KernelVariants(fn.__name__, parallel, serial, fn)


def helper(fn: Callable) -> Callable:
    """An inlined building block called from kernels (no threading of its own)."""
    return njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always", error_model="numpy")(fn)
