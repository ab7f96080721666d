"""Throughput and model-FLOPs utilisation (MFU) of training steps."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from llmpy.config import GPT2Config


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llmpy")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_peak_gflops(threads: int, use_cache: bool = True) -> float:
    """Best float32 GEMM rate (GFLOP/s) of numpy's BLAS on `threads` threads: the roof MFU is read
    against unless a peak is given. Measured once per CPU model and thread count, then cached."""
    key = f"{_cpu_name()}|sgemm|{threads}"
    path = os.path.join(cache_dir(), "peak_gflops.json")
    cached: dict[str, float] = {}
    if use_cache:
        try:
            with open(path) as f:
                cached = json.load(f)
            if key in cached:
                return float(cached[key])
        except (OSError, ValueError):
            cached = {}
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
    gflops = 2 * n**3 / best / 1e9
    if use_cache:
        cached[key] = gflops
        try:
            os.makedirs(cache_dir(), exist_ok=True)
            with open(path, "w") as f:
                json.dump(cached, f, indent=1)
        except OSError:
            pass  # a read-only home only costs a re-measurement next time
    return gflops


@dataclass
class StepStats:
    """Numbers reported for one training step."""

    step: int
    loss: float
    seconds: float
    tokens: int
    flops: float
    cores: int
    peak_gflops: float

    @property
    def ms(self) -> float:
        return self.seconds * 1e3

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def tokens_per_second_per_core(self) -> float:
        return self.tokens_per_second / self.cores

    @property
    def mfu(self) -> float:
        return self.flops / self.seconds / (self.peak_gflops * 1e9)


def step_flops(config: GPT2Config, B: int, T: int) -> float:
    """FLOPs of one forward+backward over B*T tokens by llm.c's count (6N + 6LCT per token)."""
    return float(config.flops_per_token(T) * B * T)
