"""Execution options: frozen, validated once when built (at the command line's boundary or by a caller).

The library names options by their field; the command line spells them as flags (`block_tokens` is
`--block-tokens`): an `OptionError` carries the field, so the command can say which flag was wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llmpy.core.errors import OptionError

RUNTIMES = ("native", "dask")
GEMM_SPLITS = ("rows", "lm_head", "channels")
STRATEGIES = ("allreduce", "zero1", "server", "owners")
RANK_MODES = ("sequential", "forkjoin", "tasks")


def _positive_multiple_of_64(option: str, value: int) -> None:
    if value <= 0 or value % 64 != 0:
        raise OptionError(option, value, "must be a positive multiple of 64")


@dataclass(frozen=True)
class TaskOptions:
    """How the task model cuts and runs the step (llmpy.execution.tasks)."""

    block_tokens: int | None = None  # tokens per block of a sequence; None: whole sequences
    runtime: str = "native"  # llmpy's scheduler, or Dask's threaded one
    overlap_steps: bool = False  # a step's AdamW tasks head the next step's graph
    gemm_split: str = "rows"  # forward and input-gradient GEMMs per token block, or per output-column block
    gemm_channel_block: int = 384  # columns per column-split GEMM task
    channel_block: int = 256  # output channels per weight-gradient task
    param_block: int = 1 << 20  # parameters per AdamW task (at most; whole rows)

    def __post_init__(self) -> None:
        if self.block_tokens is not None and self.block_tokens < 1:
            raise OptionError("block_tokens", self.block_tokens, "must be positive")
        if self.runtime not in RUNTIMES:
            raise OptionError("runtime", self.runtime, f"is not a task runtime; choose one of {', '.join(RUNTIMES)}")
        if self.gemm_split not in GEMM_SPLITS:
            raise OptionError("gemm_split", self.gemm_split,
                              f"is not a GEMM split; choose one of {', '.join(GEMM_SPLITS)}")
        _positive_multiple_of_64("gemm_channel_block", self.gemm_channel_block)
        _positive_multiple_of_64("channel_block", self.channel_block)
        if self.param_block < 1:
            raise OptionError("param_block", self.param_block, "must be positive")

    def tokens_per_block(self, T: int) -> int:
        """K for sequences of T tokens; it must divide T."""
        K = T if self.block_tokens is None else self.block_tokens
        if T % K != 0:
            raise OptionError("block_tokens", K, f"must divide the sequence length T={T}")
        return K


MPI_PROGRESS = ("thread", "tests")  # llmpy.execution.mpi.progress; tests after every kernel or task


@dataclass(frozen=True)
class MpiOptions:
    """Data-parallel ranks (llmpy.execution.mpi): the strategy, and the execution model inside each rank."""

    strategy: str = "allreduce"
    rank_mode: str | None = None  # None: sequential on 1 thread per rank, else forkjoin
    tasks: TaskOptions = field(default_factory=TaskOptions)  # with rank_mode "tasks"
    timeout_s: float = 600.0  # how long a rank waits for the others before it aborts the run, naming them
    progress: str = "thread"  # who drives MPI's progress: a sleeping thread of its own, or tests between kernels
    overlap: bool = True  # False: every collective starts in the update, after backward (the baseline to compare)
    overlap_steps: bool = False  # the parameter collectives complete behind the next forward (zero1, server, owners)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise OptionError("mpi_timeout", self.timeout_s, "must be a positive number of seconds")
        if self.strategy not in STRATEGIES:
            raise OptionError("strategy", self.strategy, f"is not a strategy; choose one of {', '.join(STRATEGIES)}")
        if self.rank_mode is not None and self.rank_mode not in RANK_MODES:
            raise OptionError("rank_mode", self.rank_mode,
                              f"is not an execution model inside a rank; choose one of {', '.join(RANK_MODES)}")
        if self.progress not in MPI_PROGRESS:
            raise OptionError("mpi_progress", self.progress, f"is not a way to drive MPI's progress; choose one of "
                                                             f"{', '.join(MPI_PROGRESS)}")
        if self.tasks.overlap_steps:
            raise OptionError("overlap_steps", True, "of the task graph needs its AdamW tasks; in mpi mode the "
                                                     "strategy's update overlaps (MpiOptions.overlap_steps)")
