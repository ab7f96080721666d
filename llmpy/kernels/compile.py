"""Compiling one kernel body into the two variants the execution models choose from.

`@kernel` compiles a numba function twice from the same source:
  - `.parallel`: `prange` loops spread over numba's thread pool (fork-join model);
  - `.serial`: `prange` runs as a plain loop on the calling thread, with the GIL released (sequential
    model, and the worker threads of the task model).
Both are `cache=True`. numba's on-disk cache keys entries by qualified name and bytecode but not by
compile flags, so the serial copy gets its own qualified name to keep the two cache entries apart. Nor
does it see the helpers a kernel inlines (vector_math): after editing only vector_math.py, delete the
stale entries (llmpy/kernels/__pycache__/*.nbi, *.nbc).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable

from numba import njit

# No fast math, anywhere: every kernel and helper is compiled with IEEE semantics, so LLVM may neither
# reassociate nor contract (fuse into FMAs) float operations. With `reassoc`, LLVM vectorised a reduction
# such as `total += x[i]` into partial sums whose number depended on the CPU's vector width (AVX2 vs
# AVX-512) and on how each variant was compiled, and `contract` formed different FMAs in the serial and
# parallel copies; results then differed between machines and variants. Now each variant executes the
# operations exactly as written, and is bitwise equal to the other on any CPU and at any thread count.
# Reductions keep their speed through fixed-order lanes (vector_math.Lanes): the source adds 16
# partial sums lane-wise and combines them in a written order, which LLVM maps onto SIMD registers of
# any width without changing the result. Element-wise loops vectorise without fast math anyway. A fused
# multiply-add happens only where the source writes one (vector_math.fma: one rounding, same on every CPU).
FASTMATH = False


@dataclass(frozen=True)
class KernelVariants:
    name: str
    parallel: Callable
    serial: Callable
    python: Callable

    def variant(self, parallel: bool) -> Callable:
        return self.parallel if parallel else self.serial


def kernel(fn: Callable | None = None, *, fastmath: bool = False):
    """`@kernel`: compile the serial and parallel variants, with IEEE arithmetic (bitwise equal results).

    `fastmath` is accepted for older call sites (`@kernel(fastmath=False)`) and must be False."""
    if fastmath:
        raise ValueError("kernels are compiled without fast math (see llmpy/kernels/compile.py); "
                         "write reductions with fixed-order lanes (vector_math.Lanes) instead")
    if fn is None:
        return _compile_variants
    return _compile_variants(fn)


# error_model="numpy": a float division by zero gives inf/nan as in C, instead of numba's default Python
# check (raise ZeroDivisionError), whose branch keeps LLVM from vectorising any loop that divides.
def _compile_variants(fn: Callable) -> KernelVariants:
    parallel = njit(parallel=True, cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")(fn)
    serial_fn = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    serial_fn.__qualname__ = fn.__qualname__ + "_serial"
    serial_fn.__doc__ = fn.__doc__
    serial = njit(parallel=False, cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")(serial_fn)
    return KernelVariants(fn.__name__, parallel, serial, fn)


def helper(fn: Callable) -> Callable:
    """An inlined building block called from kernels (no threading of its own; IEEE arithmetic too)."""
    return njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always", error_model="numpy")(fn)
