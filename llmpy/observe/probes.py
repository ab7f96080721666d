"""Machine probes: the float32 GEMM peak and STREAM-triad bandwidth, measured once per CPU model and
thread count and cached in ~/.cache/llmpy/machine.json."""

from __future__ import annotations

import json
import os
import platform
import time

import numpy as np
from threadpoolctl import threadpool_limits

from llmpy.io.formats import atomic_write_bytes


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llmpy")


def _cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, with its family, model, stepping and vector extensions: a
    virtual machine may call different CPUs by one generic name ("Intel(R) Xeon(R) Processor")."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in fields:  # the first core's block is enough
                    break
                fields[key] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    vectors = " ".join(flag for flag in fields.get("flags", "").split() if flag.startswith(("avx", "amx", "sse4")))
    model = "/".join(fields.get(k, "?") for k in ("cpu family", "model", "stepping"))
    return f"{name} [{model}] [{vectors}]" if fields else name


def _cached(key: str, measure) -> float:
    """A machine figure measured once per CPU model and key, then read from ~/.cache/llmpy."""
    path = os.path.join(cache_dir(), "machine.json")
    full_key = f"{_cpu_name()}|{key}"
    try:
        with open(path) as f:
            cached = json.load(f)
    except (OSError, ValueError):
        cached = {}
    if full_key in cached:
        return float(cached[full_key])
    value = float(measure())
    cached[full_key] = value
    try:  # atomic: runs started together never read half a file
        os.makedirs(cache_dir(), exist_ok=True)
        atomic_write_bytes(path, json.dumps(cached, indent=1).encode())
    except OSError:
        pass
    return value


def measure_peak_gflops(threads: int) -> float:
    """Best float32 GEMM rate (GFLOP/s) of numpy's BLAS on `threads` threads: the roof MFU is read
    against unless a peak is given. Measured once per CPU model and thread count, then cached."""

    def measure() -> float:
        n = 1024
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        out = np.empty((n, n), dtype=np.float32)
        best = float("inf")
        with threadpool_limits(limits=threads, user_api="blas"):
            np.matmul(a, b, out=out)
            for _ in range(5):
                start = time.perf_counter()
                np.matmul(a, b, out=out)
                best = min(best, time.perf_counter() - start)
        return 2 * n**3 / best / 1e9

    return _cached(f"sgemm|{threads}", measure)


def measure_memory_bandwidth(threads: int) -> float:
    """Best STREAM-triad rate (GB/s, a = b + s*c over 3 x 128 MiB float32 arrays) on `threads` numba
    threads: the memory roof of the roofline. Measured once per CPU model and thread count, then cached."""

    def measure() -> float:
        import numba

        n = 32 * 1024 * 1024
        a = np.empty(n, dtype=np.float32)
        b = np.ones(n, dtype=np.float32)
        c = np.ones(n, dtype=np.float32)
        previous = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            triad = _triad.variant(threads > 1)
            triad(a, b, c, np.float32(3.0))
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                triad(a, b, c, np.float32(3.0))
                best = min(best, time.perf_counter() - start)
        finally:
            numba.set_num_threads(previous)
        return 3 * 4 * n / best / 1e9

    return _cached(f"triad|{threads}", measure)


def _make_triad():
    from numba import prange

    from llmpy.kernels.compile import kernel

    @kernel(fastmath=False)
    def stream_triad(a, b, c, s):
        """a (N,) = b + s * c (the STREAM triad: 12 bytes per element)."""
        for i in prange(a.shape[0]):
            a[i] = b[i] + s * c[i]

    return stream_triad


_triad = _make_triad()


