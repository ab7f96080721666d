"""llmpy: GPT-2 training in Python, llm.c style, on several parallel execution models."""

import os

# OpenBLAS's threads and numba's OpenMP threads take turns on the same cores, kernel after kernel. A
# pool that spin-waits after its kernel steals the cores the other pool needs next (measured on d12,
# 2 threads: 4.7 s/step spinning vs 1.45 s/step with both set), so both must sleep when idle. Set
# before numpy or numba load their libraries; a user's own setting wins. LLMPY_KEEP_THREAD_ENV=1 leaves
# the environment alone (the PyTorch baseline of `llmpy bench --vs torch` runs with torch's own defaults).
THREAD_ENV_SET_BY_LLMPY: list[str] = []
if os.environ.get("LLMPY_KEEP_THREAD_ENV") != "1":
    for _name, _value in (("OMP_WAIT_POLICY", "PASSIVE"), ("OPENBLAS_THREAD_TIMEOUT", "4")):
        if _name not in os.environ:
            os.environ[_name] = _value
            THREAD_ENV_SET_BY_LLMPY.append(_name)

__version__ = "0.1.0"
