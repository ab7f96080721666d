"""llmpy: GPT-2 training in Python, llm.c style, on several parallel execution models."""

import os

# OpenBLAS's threads and numba's OpenMP threads take turns on the same cores, kernel after kernel. A
# pool that spin-waits after its kernel steals the cores the other pool needs next (measured on d12,
# 2 threads: 4.7 s/step spinning vs 1.45 s/step with both set), so both must sleep when idle. Set
# before numpy or numba load their libraries; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

__version__ = "0.1.0"
