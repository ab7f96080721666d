"""The `mpi` execution model: this process is one data-parallel rank (see .strategies for how the ranks combine
gradients and updates, and how failures are handled)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from dataclasses import replace

from llmpy.core.optim import AdamWConfig
from llmpy.io.checkpoints import complete_sharded_checkpoint, model_path, save_shard
from llmpy.io.formats import write_model
from llmpy.execution.base import ExecutionModel
from llmpy.execution.mpi.report import rank_summary
from llmpy.execution.mpi.strategies import (NETWORK_DEFAULTS, ROOT, STRATEGY_CLASSES, DataParallelStrategy, _mpi,
                                             allreduce_sum, injected_failure)
from llmpy.execution.mpi.transport import describe_transport
from llmpy.execution.mpi.watchdog import Watchdog
from llmpy.execution.options import MpiOptions
from llmpy.execution.threads import ExecutionError
from llmpy.observe.trace import Trace


ABORT_GRACE_S = 0.2  # see MpiRanks.fail


class MpiRanks:
    """Where the ranks of MPI_COMM_WORLD meet: setup agreements, failures, averages, traces, per-rank reports."""

    def __init__(self, MPI):
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        self._agreement = self.comm.Dup()  # setup agreements never match a training collective
        self._setup_over = False
        self.clock_reference = 0.0
        self.watchdog: Watchdog | None = None
        self._failed_in_setup = False

    def agree(self, error: BaseException | None = None) -> None:
        """A point every rank reaches during setup: if `error` (or another rank's) happened, rank 0 raises it
        (the same error on every rank is reported once) and the other ranks exit with status 2."""
        if self._setup_over:
            if error is not None:
                raise error
            return
        messages = self._agreement.allgather(None if error is None else str(error))
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if not failed:
            return
        self._setup_over = self._failed_in_setup = True
        if self.rank != ROOT:
            raise SystemExit(2)
        if error is not None and len(failed) == self.world_size and len({m for _, m in failed}) == 1:
            raise error  # the same error everywhere: as one process would report it
        rank, message = failed[0]
        more = f" (and on {len(failed) - 1} more rank{'s' if len(failed) > 2 else ''})" if len(failed) > 1 else ""
        raise ExecutionError(f"rank {rank}: {message}{more}")

    def setup_done(self) -> None:
        """The last agreement: from here on a failing rank aborts every rank."""
        self.agree(None)
        self._setup_over = True

    def fail(self, error: BaseException) -> None:
        """A rank raised `error`. During setup: agree on it (see agree). After: print it naming the rank and abort
        every rank."""
        if isinstance(error, SystemExit) or self._failed_in_setup:  # agreed on already: every rank is stopping
            return
        if not self._setup_over:
            self.agree(error)  # raises
        if os.environ.get("LLMPY_DEBUG"):
            import traceback

            traceback.print_exception(error)
        what = "interrupted" if isinstance(error, KeyboardInterrupt) else f"error: {error}"
        sys.stderr.write(f"llmpy train: rank {self.rank} of {self.world_size} (pid {os.getpid()}) {what}; "
                         f"aborting all ranks\n")
        sys.stderr.flush()
        # mpiexec forwards a rank's stderr through a pipe; MPI_Abort tears the ranks (and that pipe) down at
        # once, and with another thread of ours in MPI (the progress thread) the line was lost 1 time in 8
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(1)

    def average(self, value: float) -> float:
        return allreduce_sum(self.MPI, self.comm, value, self.watchdog, "the loss average") / self.world_size

    def agree_on(self, fields: dict) -> None:
        """Every rank was started with the same run configuration, or every rank stops with one error naming the
        first rank and field that differ (before any training collective could hang or mix buffers)."""
        everyone = self._agreement.allgather(fields)
        error = None
        for rank, theirs in enumerate(everyone[1:], start=1):
            for name, value in everyone[0].items():
                if theirs.get(name) != value:
                    error = ExecutionError(f"rank {rank} was started with {name} = {theirs.get(name)!r}, rank 0 with "
                                           f"{value!r}; start every rank with the same command")
                    break
            if error is not None:
                break
        self.agree(error)

    def gather_trace(self, recorder, meta: dict) -> Trace | None:
        """Every rank's trace merged on rank 0 (times shifted to rank 0's clock origin); None on the others."""
        trace = recorder.to_trace(meta)
        offset = recorder.origin - self.clock_reference
        parts = self.comm.gather((trace.events, trace.steps, offset), root=ROOT)
        if self.rank != ROOT:
            return None
        events, steps = [], []
        base = parts[ROOT][2]
        for rank_events, rank_steps, rank_offset in parts:
            shift = rank_offset - base
            events += [replace(e, start=e.start + shift, end=e.end + shift) for e in rank_events]
            for s in rank_steps:
                phases = {k: (a + shift, b + shift) for k, (a, b) in s.phases.items()}
                steps.append(replace(s, start=s.start + shift, end=s.end + shift, phases=phases))
        return Trace(events, steps, dict(trace.meta, ranks=self.world_size))

    def gather(self, value):
        """Every rank's `value` as a list on rank 0 (None on the others); outside any training collective."""
        return self._agreement.gather(value, root=ROOT)

    def rank_report(self, recorder, optimizer: DataParallelStrategy, skip: int) -> list[dict] | None:
        """Per rank: mean ms per step of compute, update, each MPI call and waiting, overlap, and the moment
        elements held, gathered on rank 0 (None on the others)."""
        rows = self.comm.gather(rank_summary(recorder, optimizer, skip), root=ROOT)
        return rows if self.rank == ROOT else None


class DataParallel(ExecutionModel):
    """`mpi` mode: this process is one rank of MPI_COMM_WORLD and runs an inner execution model."""

    name = "mpi"

    def __init__(self, make_inner, threads: int | None = None, threading_layer: str = "omp",
                 options: MpiOptions | None = None):
        """make_inner(mode, threads, threading_layer, options): the factory of the execution model inside the rank."""
        options = options or MpiOptions()
        # a progress thread calls MPI beside the main thread: MULTIPLE; task workers start the collectives
        # one at a time (tasks rank mode): SERIALIZED
        level = "multiple" if options.progress == "thread" else "serialized" if options.rank_mode == "tasks" else "funneled"
        self.group = group = MpiRanks(_mpi(level))
        self._strategies: list[DataParallelStrategy] = []
        world = group.comm
        self.inner: ExecutionModel | None = None
        node = world.Split_type(group.MPI.COMM_TYPE_SHARED)
        self.local_ranks = node.Get_size()
        try:
            node_cores = len(set().union(*node.allgather(_affinity())))
        finally:
            node.Free()
        self.options, self.strategy, self.threading_layer = options, options.strategy, threading_layer
        error = None
        try:
            if threads is None:
                threads = max(1, node_cores // self.local_ranks)
            if threads < 1:
                raise ExecutionError(f"threads must be at least 1, got {threads}")
            if threads * self.local_ranks > node_cores:
                raise ExecutionError(
                    f"{self.local_ranks} ranks x {threads} thread{'s' if threads > 1 else ''} on this node would oversubscribe its {node_cores}"
                    f" cores; use at most {max(1, node_cores // self.local_ranks)} threads per rank or fewer ranks per node")
            self.rank_mode = options.rank_mode or ("sequential" if threads == 1 else "forkjoin")
            # tasks inside a rank: its graph runs forward and backward; the strategy runs the update after it
            self.inner = make_inner(self.rank_mode, threads, threading_layer,
                                              options.tasks if self.rank_mode == "tasks" else None)
        except (ExecutionError, ValueError) as caught:
            error = caught
        group.agree(error)
        self.threads = self.inner.threads
        self.kernels = self.inner.kernels
        world.Barrier()
        group.clock_reference = time.perf_counter()  # the ranks' clocks are aligned at this barrier's exit
        self.pids = world.allgather(os.getpid())
        self.hosts = world.allgather(socket.gethostname())
        group.watchdog = Watchdog(group.rank, self.pids, self.hosts, options.timeout_s)
        self.where = world.allgather((self.threads, self.local_ranks,
                                      describe_transport(group.MPI.Get_library_version(), defaults=NETWORK_DEFAULTS)))

    @property
    def cores(self) -> int:
        return self.threads * self.world_size

    def meta(self) -> dict:
        return dict(self.inner.meta(), mode=self.name, ranks=self.world_size, strategy=self.strategy,
                    rank_mode=self.rank_mode, mpi_progress=self.options.progress,
                    comm_overlap=self.options.overlap)

    def describe(self) -> str:
        inner = self.inner.describe()
        pids = ", ".join(f"{rank}={pid}" for rank, pid in enumerate(self.pids))
        return (f"mpi, {self.world_size} rank{'s' if self.world_size > 1 else ''} x ({inner}), strategy "
                f"{self.strategy} (rank pids {pids})")

    def placement(self) -> list[str]:
        lines = []
        for rank, (host, pid, (threads, local, transport)) in enumerate(zip(self.hosts, self.pids, self.where)):
            lines.append(f"rank {rank}: host {host}, pid {pid}, {threads} thread{'s' if threads > 1 else ''}"
                         f" ({self.rank_mode}), {local} rank{'s' if local > 1 else ''} on its node; {transport}")
        return lines

    def train_step(self, model, optimizer, batches, learning_rate: float, recorder=None, step: int = 0) -> float:
        return self.inner.train_step(model, optimizer, batches, learning_rate, recorder, step)

    def close(self) -> None:
        for strategy in self._strategies:
            strategy.close()
        if self.inner is not None:
            self.inner.close()

    def synchronize(self) -> None:
        if self.inner is not None:
            self.inner.synchronize()
        for strategy in self._strategies:  # --overlap-steps: the last update's parameters all in
            strategy.finish_parameters()

    def save_checkpoint(self, directory: str, config, params, state, keep: int) -> None:
        """A sharded checkpoint (llmpy.io.checkpoints): rank 0 writes the model, every rank its moments, and
        rank 0 the completion record once it has heard from every rank that its shard is written."""
        group = self.group
        if group.rank == ROOT:
            write_model(model_path(directory, state.step), config, params)
        entry = save_shard(directory, state.step, group.rank, group.world_size, state)
        if injected_failure(group.rank) == (state.step, "kill-checkpoint"):
            os.kill(os.getpid(), signal.SIGKILL)
        entries = group.gather(entry)
        if entries is not None:
            complete_sharded_checkpoint(directory, state.step, config.num_parameters(), state, entries, keep)

    def make_optimizer(self, model, config: AdamWConfig, micro_steps: int = 1) -> DataParallelStrategy:
        strategy = STRATEGY_CLASSES[self.strategy](model, config, self.kernels, self.group.comm, micro_steps,
                                                   self.group.watchdog, self.options.progress,
                                                   self.options.overlap, self.options.overlap_steps)
        self._strategies.append(strategy)
        return strategy


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


