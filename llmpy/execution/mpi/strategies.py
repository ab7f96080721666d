"""Data-parallel training over MPI (`mpiexec -n P llmpy train --mode mpi --strategy S`).

Every rank holds the whole model, reads its own windows of the data (llm.c's rank/world-size layout of
`DataLoader`) and runs forward and backward on them with an inner execution model (rank mode `sequential`,
`forkjoin` or `tasks`, on a number of threads per rank). The gradients are then combined and AdamW applied by one of four
strategies; all of them give every rank the parameters one process would have after a step over the union
of the ranks' batches (gradients averaged over the ranks):

- `allreduce` (`AllreduceStrategy`): Iallreduce of the gradients, every rank runs AdamW on everything;
- `zero1` (`Zero1Strategy`, llm.c's ZeRO-1): Ireduce_scatter of the gradients, each rank runs AdamW on its
  shard with its shard of m and v, Iallgatherv of the parameters;
- `server` (`ParameterServerStrategy`): Ireduce of the gradients to rank 0, rank 0 runs AdamW (and alone
  holds m and v), Ibcast of the parameters;
- `owners` (`OwnerBlocksStrategy`): the parameters cut into blocks of at most BLOCK_ELEMENTS, owned
  round-robin by the ranks; Ireduce of each block to its owner, owner-only AdamW with m and v for its
  blocks only, Ibcast of each block from its owner.

Buckets and overlap. `GPT2.backward` reports (`gradients_ready`) when a group of gradients is final: the final
layernorm, then each transformer block from the last to the first, then the encoder (wte, wpe). llm.c's
layout stores the parameters tensor by tensor, each [L, ...], so the gradients of one block are 12 slices
spread over the flat buffer, each contiguous. A bucket is such a group, and its collective is one
non-blocking call per contiguous slice, started as soon as the block's backward is done: no gradient is
copied into a staging buffer (one such copy of the whole gradient would cost more memory traffic than the
collectives themselves move on one node), and no bucket waits for a later block. `wte` is final only after
the encoder's backward (it is also the output projection), so 31% of d12's gradient cannot overlap the
backward pass. MPI progresses non-blocking collectives only inside MPI calls. By default (`--mpi-progress
thread`) a thread of the rank's own (llmpy.execution.mpi.progress) tests what is in flight every 0.1 ms and
sleeps between tests, and waits on a condition when nothing is in flight (MPI_THREAD_MULTIPLE); with `tests`
the strategy calls MPI_Testall after each kernel of the rest of backward instead, which leaves the large
buckets half sent when the update needs them (about 1.4 MB moves per test over TCP here).
With tasks inside a rank (`--rank-mode tasks`, one micro-step, overlap on) the strategy's whole step is tasks of
the rank's graph (llmpy.execution.mpi.graph_tasks), as OmpSs-2 with TAMPI runs it: per bucket a task starting its
gradient collectives (it reads the bucket's gradients, so it waits for the tasks writing them, and its cost
estimate puts it and them ahead of ordinary tasks), a task that ends when those collectives have (it returns a
`Completion` that the progress thread completes; its worker goes on meanwhile), the bucket's AdamW with the start
of its parameter collectives, and a task that ends when those have. The starts of each kind are chained in program
order, since MPI matches a communicator's collectives by their order; gradients and parameters use two
communicators. With clipping the updates follow a task computing the global norm. With `--mpi-progress tests`
nothing completes by itself: each worker tests what is in flight after every task (`progress`) and the update
tasks wait, after ordinary tasks. Without those tasks (sequential and forkjoin ranks,
gradient accumulation, `--no-comm-overlap`) `update` runs after backward:
it takes the buckets in the order they were started, waits only for that bucket's
collectives, updates it, and starts that bucket's parameter collective (zero1, server, owners) while the
next bucket is updated. With `overlap_steps` it takes them in the order the next forward reads them and
leaves the parameter collectives in flight: the next forward waits for each bucket where it first reads it
(`_parameter_observer` on the model's kernel calls, or the wait tasks heading a task rank's graph).

Equivalence with one process. Gradients are summed over ranks and scaled by 1/P inside AdamW's gradient scale
(as gradient accumulation scales by 1/micro-steps), weight decay follows each tensor's kind as `AdamW` does
(the buckets are per tensor slice), and the global gradient norm for clipping is the sum of squares over the
reduced gradient, each rank summing what it owns and an Allreduce adding those up. The AdamW arithmetic is
`kernels.adamw_update` on slices; it is elementwise, so a slice gives the same bits as the whole buffer.

Metrics. Every MPI call runs through the Recorder as an event named after the MPI function (MPI_Iallreduce,
MPI_Testall, MPI_Waitall, ...), so the per-kernel table, the traces (one Perfetto process and one Paraver task
per rank, merged on rank 0 with the ranks' clocks aligned by a barrier) and `llmpy analyze` see them; analysis
counts them as communication, not useful time. Per step and rank the strategy also records which part of the
gradient (and parameter) bytes had finished their collective before the update had to wait for them: the
overlap that the backward pass (or the update of other buckets) hid.

Failures. Until the run's setup is done every rank meets the others at agreement points (`agree`), so an error
on any rank during setup (bad arguments, data too small for the world size) is printed once by rank 0 and all
ranks exit with status 2. After that a rank that raises prints the error with its rank and calls
MPI_Abort, which ends every rank within a second; a rank that dies is reported by mpiexec with its pid, and
rank 0 prints the pid of every rank at startup.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from llmpy.core.config import GPT2Config
from llmpy.execution.threads import ExecutionError
from llmpy.core.layout import PARAMETER_NAMES, parameter_shapes
from llmpy.core.optim import AdamWConfig, AdamWRule
from llmpy.execution.deferred import Completion
from llmpy.execution.mpi.graph_tasks import GraphTasks
from llmpy.execution.mpi.progress import ProgressThread
from llmpy.execution.mpi.transport import apply_network_defaults

BLOCK_ELEMENTS = 1 << 20  # owners: largest parameter block (4 MiB of float32)
# Failure-handling tests: "RANK:STEP" makes that rank raise at that step's update, "RANK:STEP:kill" kills it (SIGKILL),
# "RANK:STEP:kill-checkpoint" kills it in the checkpoint of that step, after its shard is written.
FAIL_ENV = "LLMPY_FAIL_RANK"
ROOT = 0


NETWORK_DEFAULTS: dict = {}  # the transport variables llmpy set before MPI_Init (transport.DEFAULTS)


def _mpi(thread_level: str = "funneled"):
    """mpi4py's MPI module; MPI_Init happens here, at the first use. FUNNELED: only the main thread calls MPI;
    SERIALIZED (task workers start collectives, one thread at a time: DataParallelStrategy's lock)."""
    if "mpi4py.MPI" not in sys.modules:
        try:
            import mpi4py
        except ImportError:
            raise ExecutionError("mpi mode needs mpi4py (pip install mpi4py mpich)") from None
        mpi4py.rc.thread_level = thread_level
        NETWORK_DEFAULTS.update(apply_network_defaults())
    from mpi4py import MPI

    return MPI


def injected_failure(rank: int) -> tuple[int | None, str]:
    """(step, how) of the failure FAIL_ENV injects into this rank: how is raise, kill or kill-checkpoint."""
    failure = os.environ.get(FAIL_ENV, "").split(":")
    if not failure[0] or int(failure[0]) != rank:
        return None, ""
    return (int(failure[1]) if len(failure) > 1 else 1), (failure[2] if len(failure) > 2 else "raise")


def network_bytes(name: str, nbytes: int, P: int, rank: int, root: int | None) -> tuple[int, int]:
    """(sent, received) bytes of this rank in a collective over `nbytes` of data, as the bandwidth-optimal
    algorithms move them: ring allreduce 2(P-1)/P n each way, reduce-scatter and allgather (P-1)/P n, and
    the rooted ones directly (reduce: n from every other rank to the root; bcast: n from the root to every
    other rank): the least the collective must move. MPI may pick algorithms that move more: MPICH's reduce of
    a large buffer is a reduce-scatter and a gather, so on 2 ranks the root also sends half the buffer."""
    if P == 1:
        return 0, 0
    if name == "MPI_Iallreduce":
        moved = 2 * (P - 1) * nbytes // P
        return moved, moved
    if name in ("MPI_Ireduce_scatter", "MPI_Iallgatherv"):
        moved = (P - 1) * nbytes // P
        return moved, moved
    if name == "MPI_Ireduce":
        return (0, (P - 1) * nbytes) if rank == root else (nbytes, 0)
    if name == "MPI_Ibcast":
        return ((P - 1) * nbytes, 0) if rank == root else (0, nbytes)
    raise ValueError(f"network_bytes: no model for {name}")


def allreduce_sum(MPI, comm, value: float, watchdog, what: str) -> float:
    """The sum of `value` over the ranks: non-blocking, waited for by the watchdog when there is one."""
    send, total = np.array([value], dtype=np.float64), np.zeros(1, dtype=np.float64)
    request = comm.Iallreduce(send, total, MPI.SUM)
    if watchdog is None:
        request.Wait()
    else:
        watchdog.wait_all(MPI, [request], what)
    return float(total[0])


# ---------------------------------------------------------------------------------------------- buckets
FINAL_PARAMETERS = ("lnfw", "lnfb")
ENCODER_PARAMETERS = ("wte", "wpe")
LAYER_PARAMETERS = tuple(n for n in PARAMETER_NAMES if n not in FINAL_PARAMETERS + ENCODER_PARAMETERS)


@dataclass(frozen=True)
class Segment:
    """A contiguous slice [start, stop) of the flat parameter (and gradient) buffer, inside tensor `name`."""

    name: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class Bucket:
    """The gradients `GPT2.backward` finishes together: part = L (final layernorm), l (block l), -1 (encoder)."""

    part: int
    segments: list[Segment]

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)


def gradient_buckets(config: GPT2Config) -> list[Bucket]:
    """Buckets in the order backward finishes them: final layernorm, blocks L-1 .. 0, encoder."""
    shapes = parameter_shapes(config)
    offsets, offset = {}, 0
    for name, shape in shapes.items():
        offsets[name] = offset
        offset += int(np.prod(shape))
    L = config.num_layers

    def whole(names):
        return [Segment(n, offsets[n], offsets[n] + int(np.prod(shapes[n]))) for n in names]

    def layer(l):
        segments = []
        for n in LAYER_PARAMETERS:
            per_layer = int(np.prod(shapes[n][1:]))
            segments.append(Segment(n, offsets[n] + l * per_layer, offsets[n] + (l + 1) * per_layer))
        return segments

    return [Bucket(L, whole(FINAL_PARAMETERS))] + [Bucket(l, layer(l)) for l in reversed(range(L))] + \
        [Bucket(-1, whole(ENCODER_PARAMETERS))]


def split_evenly(size: int, parts: int) -> tuple[list[int], list[int]]:
    """(counts, displacements) of `size` elements cut into `parts` contiguous parts, the first ones 1 larger."""
    counts = [size // parts + (1 if r < size % parts else 0) for r in range(parts)]
    displacements = [int(x) for x in np.cumsum([0] + counts[:-1])]
    return counts, displacements


# ---------------------------------------------------------------------------------------------- strategies
@dataclass
class OwnedRange:
    """A slice of the parameters this rank runs AdamW on: params[start:stop] with moments m[moment:...]; its
    reduced gradient is grads[start:stop] or, with `shard_grads`, the strategy's shard buffer at `moment`."""

    segment: Segment
    start: int
    stop: int
    moment: int


@dataclass
class BucketState:
    bucket: Bucket
    grad_requests: list = field(default_factory=list)
    param_requests: list = field(default_factory=list)
    owned: list[OwnedRange] = field(default_factory=list)
    # this step's timeline (time.perf_counter): its gradient collectives started, the progress thread saw them
    # complete, the update's wait for them returned
    grad_started: float | None = None
    grad_completion: Completion | None = None
    grad_waited: float | None = None


class DataParallelStrategy(GraphTasks, AdamWRule):
    """AdamW over data-parallel ranks, driven by `train_step` like `AdamW` (update(params, grads, lr,
    grad_scale)); it also starts the gradient collectives from `GPT2.gradients_ready` during backward. The
    arithmetic (step counter, scalars, clipping, decay rule, the kernel) is AdamWRule's, applied to the slices
    this rank owns."""

    name = "base"
    shard_grads = False  # the reduced gradient lands in a shard buffer (zero1), not in model.grads
    parameter_collectives = True  # the update starts collectives bringing the parameters to every rank
    # Task mode inside a rank leaves AdamW's own tasks out of its graph: the strategy's (bucket_tasks), or update()
    # after the graph (llmpy.execution.tasks.execution).
    updates_outside_task_graph = True

    def __init__(self, model, config: AdamWConfig, kernels, comm, micro_steps: int = 1, watchdog=None,
                 progress: str = "tests", overlap: bool = True, overlap_steps: bool = False):
        super().__init__(config, kernels)
        self.watchdog = watchdog  # waits without spinning, and not forever (None: MPI's own blocking waits)
        self.MPI = _mpi()
        self.comm = comm
        # the parameter collectives on a communicator of their own: a task rank starts them from its update tasks
        # while gradient collectives still start, each kind in one order on every rank (graph_tensors)
        self.param_comm = comm.Dup()
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()
        self.micro_steps = micro_steps
        self.params, self.grads = model.params, model.grads
        self.states = [BucketState(b) for b in gradient_buckets(model.config)]
        self._by_part = {s.bucket.part: s for s in self.states}
        moment = 0
        for state in self.states:
            for segment in state.bucket.segments:
                for start, stop in self.owned_slices(segment):
                    state.owned.append(OwnedRange(segment, start, stop, moment))
                    moment += stop - start
        self.m = np.zeros(moment, dtype=np.float32)  # only what this rank updates
        self.v = np.zeros(moment, dtype=np.float32)
        self.grad_shard = np.zeros(moment if self.shard_grads else 0, dtype=np.float32)
        self.step_overlap: list[dict] = []  # per step: share of bytes whose collective was done before needed
        self._backwards = 0  # backward passes seen in this optimizer step (gradient accumulation)
        self._started: set[int] = set()
        self._fail_step, how = injected_failure(self.rank)
        if how not in ("raise", "kill"):
            self._fail_step = None  # not in the update
        self._fail_kill = how == "kill"
        self.model = model
        self._model_observer = None  # the model's own observer while backward runs through _progressing_observer
        self._grads_in_flight: list = []
        self._lock = threading.RLock()  # one thread at a time starts, tests or waits (task workers, progress thread)
        # "thread": a sleeping thread tests what is in flight; "tests": a test after every kernel or task
        self._progress_thread = ProgressThread(self.MPI, self._lock, watchdog=watchdog) if progress == "thread" else None
        self.overlap = overlap  # False: no collective starts before the update
        self.overlap_steps = overlap_steps  # the parameter collectives complete behind the next forward
        self._params_pending: list[BucketState] = []  # overlap_steps: buckets whose parameters are still in flight
        self._waits_as_tasks = False  # a task rank's graph waits for them (parameter_wait_tasks), not an observer
        self._traffic: dict[str, list[int]] = {}  # this step: MPI call -> [bytes sent, bytes received]
        # the update as tasks of a task rank's graph (bucket_tasks): tokens that order the collectives' starts, and
        # the Completions of each bucket's collectives in flight
        self._gradient_order, self._parameter_order = np.zeros(1, np.float32), np.zeros(1, np.float32)
        self._grad_completions: dict[int, Completion] = {}
        self._param_completions: dict[int, Completion] = {}
        self._comm_start: float | None = None  # when this step's first collective started
        self._update_started: float | None = None  # when `update` began (a task rank's graph has no such point)
        model.gradients_ready = self._gradients_ready

    # ---- what each strategy defines
    def owned_slices(self, segment: Segment) -> list[tuple[int, int]]:
        """The [start, stop) pieces of `segment` this rank runs AdamW on."""
        raise NotImplementedError

    def start_gradient_collectives(self, state: BucketState) -> None:
        raise NotImplementedError

    def start_parameter_collectives(self, state: BucketState) -> None:
        """After this rank updated its part of the bucket (nothing to do where every rank updates everything)."""

    def norm_needs_allreduce(self) -> bool:
        return True

    def flat_moments(self):
        return self.m, self.v

    def moment_ranges(self):
        return [(o.start, o.stop) for state in self.states for o in state.owned]

    def progress(self) -> None:
        """A test of the collectives in flight, from a task worker after each task (none with a progress thread)."""
        if self._progress_thread is None and self._grads_in_flight and self._lock.acquire(blocking=False):
            try:
                with self._unobserved():
                    self._progress(-1)
            finally:
                self._lock.release()

    @contextlib.contextmanager
    def _unobserved(self):
        """MPI calls made from a task worker are not recorded as kernel-like events (the worker's task is)."""
        observer, self.observer = self.observer, None
        try:
            yield
        finally:
            self.observer = observer

    # ---- common machinery
    def _run(self, name: str, layer: int, fn, *args):
        if self.observer is None:
            return fn(*args)
        return self.observer(name, layer, fn, args)

    def _collective(self, name: str, part: int, elements: int, root: int | None, fn, *args):
        """Start a non-blocking collective of `elements` floats and count the bytes it moves for this rank."""
        if self._comm_start is None:
            self._comm_start = time.perf_counter()
        with self._lock:
            request = self._run(name, part, fn, *args)
        sent, received = network_bytes(name, 4 * elements, self.world_size, self.rank, root)
        entry = self._traffic.setdefault(name, [0, 0])
        entry[0] += sent
        entry[1] += received
        note = getattr(self.observer, "note_traffic", None)
        if note is not None:
            note(name, sent, received)
        return request

    def _test(self, layer: int, requests: list) -> bool:
        """Progress (and check) requests in flight: MPI moves data only inside MPI calls."""
        with self._lock:
            pending = [r for r in requests if r]
            if not pending:
                return True
            return self._run("MPI_Testall", layer, self.MPI.Request.Testall, pending)

    def _wait(self, layer: int, requests: list) -> None:
        with self._lock:
            pending = [r for r in requests if r]
            if not pending:
                return
            if self.watchdog is None:
                self._run("MPI_Waitall", layer, self.MPI.Request.Waitall, pending)
            else:
                self._run("MPI_Waitall", layer, self.watchdog.wait_all, self.MPI, pending,
                          f"the collectives of part {layer}")

    def _gradients_ready(self, part: int, completion: Completion | None = None) -> None:
        """GPT2.gradients_ready: the gradients of `part` are final; start their collectives (the last backward of
        the step, with overlap). `completion` (a task's, with the progress thread) completes when they have."""
        last_backward = self._backwards == self.micro_steps - 1
        if part == -1:
            self._backwards += 1
        if part in self._started:
            raise RuntimeError(f"gradients of part {part} changed after their collective started (more backward "
                               f"passes in this step than the {self.micro_steps} micro-steps announced)")
        if not last_backward or not self.overlap:
            if completion is not None:
                completion.complete()
            return
        state = self._by_part[part]
        self._started.add(part)
        self.start_gradient_collectives(state)
        state.grad_started = time.perf_counter()
        if self._progress_thread is not None:
            state.grad_completion = completion if completion is not None else Completion()
            self._progress_thread.watch(state.grad_requests, state.grad_completion,
                                        f"the gradient collectives of part {part}")
            return
        self._grads_in_flight += state.grad_requests
        self._progress(part)
        model = self.model
        if part != -1 and model.observer != self._progressing_observer:  # the rest of backward progresses MPI
            self._model_observer, model.observer = model.observer, self._progressing_observer
        elif part == -1 and model.observer == self._progressing_observer:
            model.observer = self._model_observer

    def _progress(self, layer: int) -> None:
        self._grads_in_flight = [r for r in self._grads_in_flight if r]
        if self._grads_in_flight:
            self._test(layer, self._grads_in_flight)

    def _progressing_observer(self, name: str, layer: int, kernel, args):
        """The model's observer for the kernels after the first bucket's collective started: it runs the kernel,
        then lets MPI progress the collectives in flight (with no progress thread, MPI moves data only inside
        MPI calls, so one test per bucket would leave most of a large collective for the update's wait)."""
        observer = self._model_observer
        result = kernel(*args) if observer is None else observer(name, layer, kernel, args)
        self._progress(layer)
        return result

    def update(self, params, grads, learning_rate: float, grad_scale: float = 1.0) -> None:
        """One AdamW step on the gradient summed over ranks times grad_scale / P (AdamW.update's contract)."""
        self._update_started = time.perf_counter()
        self.finish_parameters()  # a bucket the forward did not read (none in GPT-2): its collective done first
        self.scalars = self.next_step(learning_rate, grad_scale / self.world_size)
        self._injected_failure()
        for state in self.states:  # a backward that did not report (fewer micro-steps than announced)
            if state.bucket.part not in self._started:
                self._started.add(state.bucket.part)
                self.start_gradient_collectives(state)
        grads_done = sum(4 * s.bucket.size for s in self.states if self._test(s.bucket.part, s.grad_requests))
        if self.clips:
            for state in self.states:
                self._wait(state.bucket.part, state.grad_requests)
            self.grad_norm_sq[0] = self._global_sum_of_squares()
            self.last_grad_norm = self.grad_norm(self.scalars)
        # overlap_steps: the buckets in the order the next forward reads them, their parameter collectives left in
        # flight for it (`wait_parameters`); else in the order their gradients arrive, all waited here
        states = self.states[::-1] if self.overlap_steps else self.states
        in_flight = self._update_buckets(states)
        params_done = sum(4 * s.bucket.size for s in states if s.param_requests
                          and self._test(s.bucket.part, s.param_requests))
        params_total = sum(4 * s.bucket.size for s in states if s.param_requests)
        if self.overlap_steps:
            self._params_pending = [s for s in states if s.param_requests]
            self._params_done_when_read, params_done = 0, None  # known once the next forward read them
        else:
            self._wait(-1, in_flight)
            for state in self.states:
                state.param_requests = []
        self._close_step(grads_done, params_done, params_total)

    def _injected_failure(self) -> None:
        if self._fail_step == self.step:
            if self._fail_kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"failure injected by {FAIL_ENV} at step {self.step}")

    def _close_step(self, grads_done: int, params_done: int | None, params_total: int) -> None:
        """The step's record (bytes whose collectives completed behind compute, traffic, span) and a fresh start."""
        total_bytes = 4 * sum(s.bucket.size for s in self.states)
        span = time.perf_counter() - self._comm_start if self._comm_start is not None else 0.0
        self.step_overlap.append({"grad_hidden": grads_done / total_bytes,
                                  "param_hidden": params_done / params_total if params_total and
                                  params_done is not None else None,
                                  "traffic": self._traffic, "span_s": span,
                                  "timeline": self._bucket_timeline()})
        self._params_total = params_total
        self._traffic, self._comm_start = {}, None
        self._started.clear()
        self._backwards = 0
        if self._params_pending and not self._waits_as_tasks:
            self._install_parameter_observer()

    def _bucket_timeline(self) -> dict | None:
        """When the update began and, per bucket in the order backward finished them, its bytes and when its
        gradient collectives started and completed (when this rank knew: the progress thread's test or the
        update's wait, whichever came first), in ms from the step's first collective; None without a progress
        thread (tests find completions only where they happen to run)."""
        started, self._update_started = self._update_started, None
        if self._progress_thread is None or self._comm_start is None:
            return None
        rows = []
        for state in self.states:
            seen = [t for t in (getattr(state.grad_completion, "completed_at", None), state.grad_waited) if t]
            rows.append({"part": state.bucket.part, "bytes": 4 * state.bucket.size,
                         "start_ms": 1e3 * (state.grad_started - self._comm_start) if state.grad_started else None,
                         "done_ms": 1e3 * (min(seen) - self._comm_start) if seen else None})
            state.grad_started = state.grad_completion = state.grad_waited = None
        return {"update_start_ms": 1e3 * (started - self._comm_start) if started else None, "buckets": rows}

    def _update_buckets(self, states: list[BucketState]) -> list:
        """Per bucket: wait for its gradient collectives, AdamW on what this rank owns, start its parameter
        collectives (testing what is in flight). Returns the parameter requests."""
        in_flight: list = []
        for state in states:
            self._wait(state.bucket.part, state.grad_requests)
            state.grad_requests, state.grad_waited = [], time.perf_counter()
            for owned in state.owned:
                self._adamw(owned)
            self.start_parameter_collectives(state)
            if self._progress_thread is not None:
                self._progress_thread.watch(state.param_requests)
            in_flight += state.param_requests
            self._test(state.bucket.part, in_flight)
        return in_flight

    # ---- overlap_steps: the parameter collectives of a step complete behind the next step's forward
    def parameter_wait_tasks(self) -> list[tuple]:
        """(name, fn, args, parameter views) of the tasks that head a task rank's graph: each waits for one
        bucket's parameter collectives and 'writes' its parameters, so the forward tasks reading them wait for it."""
        self._waits_as_tasks = True
        return [(f"MPI_Wait_params l{s.bucket.part}", self._wait_parameters_task, (s.bucket.part,),
                 [self.params.flat[g.start:g.stop] for g in s.bucket.segments]) for s in self.states[::-1]]

    def _wait_parameters_task(self, part: int) -> None:
        with self._lock, self._unobserved():  # from a task worker: the task is recorded as itself
            self.wait_parameters(part)

    def wait_parameters(self, part: int) -> None:
        """Wait for the parameter collectives of bucket `part` still in flight from the last update, if any."""
        with self._lock:
            state = self._by_part[part]
            if state not in self._params_pending:
                return
            # one event per bucket the forward takes, whether it still had to wait or its bytes were in already
            self._run("MPI_Wait_params", part, self._take_parameters, state)
            self._params_pending.remove(state)
            if not self._params_pending:  # the last step's parameters are all in: its share hidden is known
                self.step_overlap[-1]["param_hidden"] = self._params_done_when_read / self._params_total
                if self.model.observer == self._parameter_observer:
                    self.model.observer = self._observer_before_parameters

    def _take_parameters(self, state: BucketState) -> None:
        with self._unobserved():  # the test and the wait are the MPI_Wait_params event
            if self._test(state.bucket.part, state.param_requests):
                self._params_done_when_read += 4 * state.bucket.size
            self._wait(state.bucket.part, state.param_requests)
        state.param_requests = []

    def finish_parameters(self) -> None:
        """Every parameter collective still in flight done (before anything outside a step reads parameters)."""
        for state in list(self._params_pending):
            self.wait_parameters(state.bucket.part)

    def _install_parameter_observer(self) -> None:
        self._observer_before_parameters, self.model.observer = self.model.observer, self._parameter_observer
        base = self.params.flat.__array_interface__["data"][0]
        self._param_ranges = {s.bucket.part: [(base + 4 * g.start, base + 4 * g.stop) for g in s.bucket.segments]
                              for s in self._params_pending}

    def _parameter_observer(self, name: str, layer: int, kernel, args):
        """The model's observer while parameters are in flight: before a kernel that reads a bucket still in
        flight, wait for that bucket (the ranges of its parameters against each argument's memory)."""
        for arg in args:
            if isinstance(arg, np.ndarray) and self._params_pending:
                start = arg.__array_interface__["data"][0]
                stop = start + arg.nbytes
                for part in [s.bucket.part for s in self._params_pending]:
                    if any(lo < stop and start < hi for lo, hi in self._param_ranges[part]):
                        self.wait_parameters(part)
        observer = self._observer_before_parameters
        return kernel(*args) if observer is None else observer(name, layer, kernel, args)

    def close(self) -> None:
        """Stop the progress thread. (A normal run has waited for every collective by now: `synchronize` before
        the end; after a failure nothing is waited for, so a dead peer cannot hold the exit up.)"""
        if self._progress_thread is not None:
            self._progress_thread.close()
            self._progress_thread = None

    def _adamw(self, owned: OwnedRange, observed: bool = True) -> None:
        """AdamW on one owned range; `observed`: through the observer (not from a task worker, whose task is
        recorded as itself)."""
        n = owned.stop - owned.start
        grad = (self.grad_shard[owned.moment:owned.moment + n] if self.shard_grads
                else self.grads.flat[owned.start:owned.stop])
        args = (self.params.flat[owned.start:owned.stop], grad, self.m[owned.moment:owned.moment + n],
                self.v[owned.moment:owned.moment + n], self.weight_decay(owned.segment.name))
        if observed:
            self._run("adamw_update", -1, self.apply, *args)
        else:
            self.apply(*args)

    def _global_sum_of_squares(self) -> float:
        """The sum of squares of the reduced (summed) gradient, each rank adding what it owns."""
        if self.shard_grads:
            local = self._run("sum_of_squares", -1, self.kernels.sum_of_squares, self.grad_shard)
        else:
            local = sum(self._run("sum_of_squares", -1, self.kernels.sum_of_squares,
                                  self.grads.flat[o.start:o.stop]) for s in self.states for o in s.owned)
        if self.norm_needs_allreduce():
            local = self._run("MPI_Allreduce", -1, allreduce_sum, self.MPI, self.comm, local, self.watchdog,
                              "the gradient norm")
        return float(local)


class AllreduceStrategy(DataParallelStrategy):
    """Allreduce of the gradients; every rank runs AdamW on all parameters (m, v replicated)."""

    name = "allreduce"
    parameter_collectives = False

    def owned_slices(self, segment):
        return [(segment.start, segment.stop)]

    def start_gradient_collectives(self, state):
        MPI = self.MPI
        for s in state.bucket.segments:
            state.grad_requests.append(self._collective("MPI_Iallreduce", state.bucket.part, s.size, None,
                                                        self.comm.Iallreduce, MPI.IN_PLACE,
                                                        self.grads.flat[s.start:s.stop], MPI.SUM))

    def norm_needs_allreduce(self):
        return False  # every rank holds the whole reduced gradient


class Zero1Strategy(DataParallelStrategy):
    """ZeRO-1: ReduceScatter of each gradient slice (rank r gets the r-th of P even parts), AdamW on that part
    with that part's m and v, Allgather of the updated parameter slice."""

    name = "zero1"
    shard_grads = True

    def owned_slices(self, segment):
        counts, displacements = split_evenly(segment.size, self.world_size)
        start = segment.start + displacements[self.rank]
        return [(start, start + counts[self.rank])]

    def start_gradient_collectives(self, state):
        MPI = self.MPI
        for s, owned in zip(state.bucket.segments, state.owned):
            counts, _ = split_evenly(s.size, self.world_size)
            shard = self.grad_shard[owned.moment:owned.moment + owned.stop - owned.start]
            state.grad_requests.append(self._collective("MPI_Ireduce_scatter", state.bucket.part, s.size, None,
                                                        self.comm.Ireduce_scatter, self.grads.flat[s.start:s.stop],
                                                        shard, counts, MPI.SUM))

    def start_parameter_collectives(self, state):
        MPI = self.MPI
        for s in state.bucket.segments:
            counts, displacements = split_evenly(s.size, self.world_size)
            state.param_requests.append(self._collective(
                "MPI_Iallgatherv", state.bucket.part, s.size, None, self.param_comm.Iallgatherv, MPI.IN_PLACE,
                [self.params.flat[s.start:s.stop], (counts, displacements), MPI.FLOAT]))


class ParameterServerStrategy(DataParallelStrategy):
    """Reduce of the gradients to rank 0, which alone holds m and v and runs AdamW; Bcast of the parameters."""

    name = "server"

    def owned_slices(self, segment):
        return [(segment.start, segment.stop)] if self.rank == ROOT else []

    def start_gradient_collectives(self, state):
        for s in state.bucket.segments:
            state.grad_requests.append(self._reduce(state.bucket.part, self.grads.flat[s.start:s.stop], ROOT))

    def _reduce(self, part, buffer, root):
        MPI = self.MPI
        if self.rank == root:
            return self._collective("MPI_Ireduce", part, buffer.size, root, self.comm.Ireduce, MPI.IN_PLACE, buffer,
                                    MPI.SUM, root)
        return self._collective("MPI_Ireduce", part, buffer.size, root, self.comm.Ireduce, buffer, None, MPI.SUM, root)

    def start_parameter_collectives(self, state):
        for s in state.bucket.segments:
            state.param_requests.append(self._collective("MPI_Ibcast", state.bucket.part, s.size, ROOT,
                                                         self.param_comm.Ibcast, self.params.flat[s.start:s.stop], ROOT))

    def norm_needs_allreduce(self):
        return False  # only rank 0 updates, and it holds the whole reduced gradient


class OwnerBlocksStrategy(ParameterServerStrategy):
    """Blocks of at most BLOCK_ELEMENTS (each gradient slice cut evenly), owned round-robin by the ranks in
    backward order; Reduce of each block to its owner, owner-only AdamW (m, v for its blocks), Bcast from it."""

    name = "owners"

    def __init__(self, model, config, kernels, comm, micro_steps=1, watchdog=None, progress="tests", overlap=True,
                 overlap_steps=False):
        self.blocks = owner_blocks(gradient_buckets(model.config), comm.Get_size())
        super().__init__(model, config, kernels, comm, micro_steps, watchdog, progress, overlap, overlap_steps)

    def owned_slices(self, segment):
        return [(start, stop) for start, stop, owner in self.blocks[segment] if owner == self.rank]

    def start_gradient_collectives(self, state):
        for s in state.bucket.segments:
            for start, stop, owner in self.blocks[s]:
                state.grad_requests.append(self._reduce(state.bucket.part, self.grads.flat[start:stop], owner))

    def start_parameter_collectives(self, state):
        for s in state.bucket.segments:
            for start, stop, owner in self.blocks[s]:
                state.param_requests.append(self._collective("MPI_Ibcast", state.bucket.part, stop - start, owner,
                                                             self.param_comm.Ibcast, self.params.flat[start:stop], owner))

    def norm_needs_allreduce(self):
        return True


def owner_blocks(buckets: list[Bucket], world_size: int) -> dict[Segment, list[tuple[int, int, int]]]:
    """Each segment cut evenly into blocks of at most BLOCK_ELEMENTS: segment -> [(start, stop, owner rank)],
    owners round-robin over all blocks in backward order (so every bucket's update is spread over the ranks)."""
    blocks, index = {}, 0
    for bucket in buckets:
        for s in bucket.segments:
            counts, displacements = split_evenly(s.size, max(1, -(-s.size // BLOCK_ELEMENTS)))
            blocks[s] = []
            for count, displacement in zip(counts, displacements):
                blocks[s].append((s.start + displacement, s.start + displacement + count, index % world_size))
                index += 1
    return blocks


STRATEGY_CLASSES = {cls.name: cls for cls in (AllreduceStrategy, Zero1Strategy, ParameterServerStrategy,
                                              OwnerBlocksStrategy)}


