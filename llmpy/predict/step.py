"""The step of a data-parallel strategy on a cluster, predicted: compute from a measured run, the strategy's real
buckets and collectives (llmpy.execution.mpi.strategies) priced by llmpy.predict.network, and the overlap the
strategy allows.

One rank's step is replayed as the strategy runs it (rank 0: the root of `server`, so the rank with the most
update work): forward; backward, at whose points the buckets' gradients become final (the final layernorm, the
blocks from the last to the first, the encoder; `backward_ready` places them by llm.c's FLOP count of what
backward has done by then) and each bucket's gradient collectives start; the update, which takes the buckets in
that order, waits for the bucket's gradients, runs AdamW on the rank's part of it and starts its parameter
collectives (zero1, server, owners), and at the end waits for all of them. A strategy with gradient clipping first
waits for every gradient and sums the norm (an Allreduce where each rank holds a part).

The rank's link is a FIFO of the collectives' rounds (each bucket's collectives are started together and priced
together, llmpy.predict.network.concurrent_seconds, that time split into the rounds of the largest one's schedule,
network.round_shares): MPI posts a round's messages when the round before it is done, so a collective's next round
queues behind whatever started meanwhile. With 2 ranks, a reduce is a reduce-scatter and a gather: a broadcast
started after AdamW of one bucket goes ahead of the gathers of the buckets whose reduce-scatter is still moving,
and the update's waits for gradients carry parameter traffic too (server at 1 and 2 Gbit/s here: the waits for
reduces and for broadcasts came within 9%; by whole collectives, -67% and +231%). On a TCP link the rounds go in
batches instead (`Target.link_order`, _BatchedLink): UCX's rendezvous protocol completes collectives posted
together at about the same time, so the rounds started when the link falls idle (and within HANDSHAKE_S after)
move and complete together, and what starts later waits for the next batch. While the rank computes, the link
moves `overlap` of what it could (1: the structural limit, every bucket hides behind the backward of the layers
still to run and the updates of the buckets before it; 0: MPI moves data only inside the waits, which is what
MPICH over TCP does with no progress thread: the hidden shares measured here are ~0%); while the rank waits it
moves everything it can.
`calibrate_overlap` finds the value that reproduces a measured run's hidden gradient bytes. Moving data costs
the rank CPU (the progress thread's tests, the kernel's TCP stack: the link's `cpu_gbs`, GB/s of bytes sent +
received per CPU second); where its host has no spare core (`Cluster.network_cpu_per_byte`), each byte moved
while the rank computes stretches that compute by 1 / cpu_gbs, and so does each second the link moves data
meanwhile by the link's `poll_share` (the progress thread's tests wake every 0.1 ms on the rank's core: a fifth
to a quarter of it here), the link moving on meanwhile, while what moves during a wait costs nothing (the rank
is idle then). That CPU work also bounds the link (_Link): while the rank waits, the link moves at most cpu_gbs
of bytes sent + received per second; while it computes, at most poll_share of that (the data moves inside the
progress thread's tests). On d12 runs between two namespace hosts (bench/README.md) the blocks' collectives
completed behind backward at that rate: 1.9-2.1 Gbit/s of a 9.7 Gbit/s link, allreduce (n each way) slower than
server's root (n in, n/2 out) as the bound has it. Parameters are waited for before the step ends: no strategy
lets the next forward start on blocks whose parameters arrived (`params_behind_forward` is that what-if,
ignoring that forward needs the encoder's parameters, updated last).

Model size and batch may differ from the measured run: forward and backward scale by llm.c's training FLOPs per
step (flops_per_token(T) * B * T) at the measured rate, AdamW and the norm by the parameter count (they stream
memory), the rest of the step (Python between kernel calls) by the number of layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from llmpy.core.config import GPT2Config
from llmpy.core.errors import OptionError
from llmpy.execution.mpi.strategies import gradient_buckets, owner_blocks, split_evenly
from llmpy.predict.measured import (GRADIENT_STARTS, NORM_LABEL, PARAMETER_STARTS, MeasuredRun, gradient_label,
                                    parameter_label)
from llmpy.predict.network import Cluster, collective_seconds, concurrent_seconds, network_bytes, round_shares

STRATEGY_NAMES = ("allreduce", "zero1", "server", "owners")
# How the link moves the collectives in flight: first come first served by rounds, or in batches (_BatchedLink:
# UCX's rendezvous protocol over TCP); auto: batches on a TCP link, first come first served otherwise
LINK_ORDERS = ("auto", "fifo", "batches")
GRADIENT_KIND = {"allreduce": "MPI_Iallreduce", "zero1": "MPI_Ireduce_scatter", "server": "MPI_Ireduce",
                 "owners": "MPI_Ireduce"}
PARAMETER_KIND = {"allreduce": None, "zero1": "MPI_Iallgatherv", "server": "MPI_Ibcast", "owners": "MPI_Ibcast"}
DEFAULT_CALL_US = 15.0  # one non-blocking MPI call (start or test) where the measured run made none


@dataclass(frozen=True)
class ComputeProfile:
    """One rank's work per step without communication, ms: forward, backward, AdamW over every parameter (its
    loop included), the gradient norm's sum of squares (0 without clipping), and the rest of the step (zero-grad,
    Python between kernel calls); `call_us`: one MPI start or test call."""

    config: GPT2Config
    B: int
    T: int
    forward_ms: float
    backward_ms: float
    update_ms: float
    norm_ms: float = 0.0
    other_ms: float = 0.0
    call_us: float = DEFAULT_CALL_US

    def __post_init__(self) -> None:
        for name in ("forward_ms", "backward_ms", "update_ms", "norm_ms", "other_ms", "call_us"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"ComputeProfile.{name} must be a time >= 0, got {value!r}")

    @property
    def clips(self) -> bool:
        return self.norm_ms > 0

    def scaled(self, config: GPT2Config, B: int, T: int) -> ComputeProfile:
        """The same machine's profile for another model or batch (see the module docstring)."""
        if T > config.max_seq_len:
            raise OptionError("seq_len", T, f"exceeds the model's {config.max_seq_len} positions")
        flops = config.flops_per_token(T) * B * T / (self.config.flops_per_token(self.T) * self.B * self.T)
        params = config.num_parameters() / self.config.num_parameters()
        calls = (config.num_layers + 2) / (self.config.num_layers + 2)
        return replace(self, config=config, B=B, T=T, forward_ms=self.forward_ms * flops,
                       backward_ms=self.backward_ms * flops, update_ms=self.update_ms * params,
                       norm_ms=self.norm_ms * params, other_ms=self.other_ms * calls)


def profile_from_run(run: MeasuredRun) -> ComputeProfile:
    """The compute of `run`'s rank 0 with its MPI calls taken out, AdamW normalised to the whole model, from
    MeasuredRun.profile_phases (a 1-rank run's median step)."""
    phases, _ = run.profile_phases()
    norm = run.kernels_ms.get("sum_of_squares", 0.0)
    other = max(0.0, phases["step"] - phases["forward"] - phases["backward"] - phases["update"])
    if not run.is_distributed:
        return ComputeProfile(run.config, run.B, run.T, phases["forward"], phases["backward"],
                              max(0.0, phases["update"] - norm), norm, other)
    starts, tests = run.mpi_ms(GRADIENT_STARTS), run.kernels_ms.get("MPI_Testall", 0.0)
    in_update = run.mpi_ms(("MPI_Waitall", "MPI_Allreduce") + PARAMETER_STARTS)
    share = strategy_plan(run.strategy or "allreduce", run.config, run.ranks).update_share
    update = max(0.0, phases["update"] - in_update - norm) / share if share else 0.0
    # a call's cost from the start calls only: a test moves data (it is where MPI progresses), and task workers'
    # calls are not recorded
    calls = run.mpi_calls(GRADIENT_STARTS + PARAMETER_STARTS)
    call_us = 1e3 * run.mpi_ms(GRADIENT_STARTS + PARAMETER_STARTS) / calls if calls else DEFAULT_CALL_US
    return ComputeProfile(run.config, run.B, run.T, phases["forward"], max(0.0, phases["backward"] - starts - tests),
                          update, norm / share if share else norm, other, call_us)


def backward_ready(config: GPT2Config) -> list[float]:
    """The fraction of backward done when each bucket (gradient_buckets' order) is final, by llm.c's backward
    FLOPs per token: the LM head 4 Vp C (before the final layernorm's bucket), each block 4 (12 C^2 + C T)
    (T = the context llm.c counts: max_seq_len), the encoder nothing to speak of."""
    C, L = config.channels, config.num_layers
    head = 4.0 * config.padded_vocab_size * C
    block = 4.0 * (12 * C * C + C * config.max_seq_len)
    total = head + L * block
    return [head / total] + [(head + (i + 1) * block) / total for i in range(L)] + [1.0]


@dataclass(frozen=True)
class StrategyPlan:
    """What a strategy does per bucket (gradient_buckets' order): the collectives it starts for the gradients and
    for the parameters, (kind, bytes, root) each, and rank 0's share of the bucket's AdamW."""

    name: str
    gradient_kind: str
    parameter_kind: str | None
    gradient_items: list
    parameter_items: list
    update_shares: list
    norm_allreduce: bool
    bucket_bytes: list = field(default_factory=list)

    @property
    def update_share(self) -> float:
        """Rank 0's share of all AdamW work."""
        return sum(s * b for s, b in zip(self.update_shares, self.bucket_bytes)) / sum(self.bucket_bytes)


def strategy_plan(name: str, config: GPT2Config, ranks: int) -> StrategyPlan:
    if name not in STRATEGY_NAMES:
        raise OptionError("strategy", name, f"is not a strategy; choose one of {', '.join(STRATEGY_NAMES)}")
    buckets = gradient_buckets(config)
    blocks = owner_blocks(buckets, ranks) if name == "owners" else {}
    grads, params, shares = [], [], []
    for bucket in buckets:
        if name == "owners":
            pieces = [(stop - start, owner) for s in bucket.segments for start, stop, owner in blocks[s]]
        else:
            pieces = [(s.size, 0) for s in bucket.segments]
        grads.append([(GRADIENT_KIND[name], 4.0 * size, root) for size, root in pieces])
        params.append([(PARAMETER_KIND[name], 4.0 * size, root) for size, root in pieces] if PARAMETER_KIND[name] else [])
        if name == "zero1":
            owned = sum(split_evenly(s.size, ranks)[0][0] for s in bucket.segments)
        elif name == "allreduce":
            owned = bucket.size
        else:
            owned = sum(size for size, root in pieces if root == 0)
        shares.append(owned / bucket.size)
    return StrategyPlan(name, GRADIENT_KIND[name], PARAMETER_KIND[name], grads, params, shares,
                        name in ("zero1", "owners") and ranks > 1, [4.0 * b.size for b in buckets])


@dataclass(frozen=True)
class Target:
    """A strategy on a cluster; `overlap`: the share of the link's rate that moves data while the rank computes
    (see the module docstring)."""

    strategy: str
    cluster: Cluster
    overlap: float = 1.0
    params_behind_forward: bool = False
    link_order: str = "auto"

    def __post_init__(self) -> None:
        if self.link_order not in LINK_ORDERS:
            raise OptionError("link order", self.link_order, f"is not one of {', '.join(LINK_ORDERS)}")
        if self.strategy not in STRATEGY_NAMES:
            raise OptionError("strategy", self.strategy, f"is not a strategy; choose one of {', '.join(STRATEGY_NAMES)}")
        if not (isinstance(self.overlap, (int, float)) and 0.0 <= self.overlap <= 1.0):
            raise OptionError("overlap", self.overlap, "must be a share between 0 and 1 (or 'measured')")


@dataclass
class _Job:
    kind: str
    seconds: float  # left to move, at the link's full rate (all its rounds)
    released: float
    bytes_per_second: float = 0.0  # the rank's bytes sent + received per second of the job on the link
    rounds: list = field(default_factory=list)  # the seconds of its rounds not yet queued
    done_at: float | None = None  # when its last round was through


@dataclass
class _Round:
    job: _Job
    seconds: float  # left to move, at the link's full rate
    released: float


class _Link:
    """The collectives a rank has in flight, moved first come first served by rounds: a collective's next round
    joins the queue when its round before is done (MPI posts a round's messages then), behind what came before.
    `cpu_bytes_s`: where moving data takes the rank's core (Cluster.network_cpu_per_byte), the bytes sent +
    received per second of that core: the link moves no more than that while the rank waits, and no more than
    `share` of it while the rank computes (the progress thread's tests, inside which the data moves, get that
    share of the core)."""

    def __init__(self, cpu_bytes_s: float | None = None) -> None:
        self.queue: list[_Round] = []
        self.cpu_bytes_s = cpu_bytes_s

    def _rate(self, rate: float, bytes_per_second: float, share: float) -> float:
        """`rate` of the link, no more than `share` of the core's CPU rate allows for a job moving
        `bytes_per_second` (sent + received) at the link's full rate."""
        if not self.cpu_bytes_s or share <= 0 or bytes_per_second <= 0:
            return rate
        return min(rate, share * self.cpu_bytes_s / bytes_per_second)

    def start(self, kind: str, seconds: float, now: float, nbytes: float = 0.0, shares=(1.0,)) -> _Job:
        rounds = [seconds * share for share in shares]
        job = _Job(kind, seconds, now, nbytes / seconds if seconds > 0 else 0.0, rounds[1:])
        self.queue.append(_Round(job, rounds[0], now))
        return job

    def _move(self, entry: _Round, seconds: float, now: float) -> None:
        """`seconds` of `entry` moved, the link at `now` after them: its job's next round queued when it is done."""
        entry.seconds -= seconds
        entry.job.seconds -= seconds
        if entry.seconds <= 1e-12:
            entry.seconds = 0.0
            if entry.job.rounds:
                self.queue.append(_Round(entry.job, entry.job.rounds.pop(0), now))
            else:
                entry.job.seconds, entry.job.done_at = 0.0, now

    def advance(self, start: float, end: float, rate: float, share: float = 0.0) -> tuple[float, float]:
        """Move what `rate` of the link moves between `start` and `end` (the rank computing, its network getting
        `share` of its core: see the class docstring): (the rank's bytes moved, the seconds the link was moving
        them)."""
        cursor, moved_bytes, busy, index = start, 0.0, 0.0, 0
        while index < len(self.queue):  # (rounds queued meanwhile are appended: reached in turn)
            entry = self.queue[index]
            index += 1
            if entry.seconds <= 0:
                continue
            begin = max(cursor, entry.released)
            entry_rate = self._rate(rate, entry.job.bytes_per_second, share)
            if entry_rate <= 0 or begin >= end:
                break
            moved = min(entry.seconds, (end - begin) * entry_rate)
            cursor = begin + moved / entry_rate
            moved_bytes += moved * entry.job.bytes_per_second
            busy += moved / entry_rate
            self._move(entry, moved, cursor)
        self.queue = [entry for entry in self.queue if entry.seconds > 0]
        return moved_bytes, busy

    def compute(self, start: float, seconds: float, rate: float, cpu_per_byte: float, poll_share: float = 0.0
                ) -> float:
        """The seconds the network's CPU work adds to `seconds` of compute from `start`, the link moving `rate`
        of what it can: each byte the rank sends or receives meanwhile takes `cpu_per_byte` of its core, and
        each second the link moves data `poll_share` of it (the tests of the collectives in flight), which
        stretches the compute; the link moves on during the stretch too (what moves during waits costs
        nothing: the rank is idle)."""
        end = start + seconds
        (moved, busy), added = self.advance(start, end, rate, poll_share), 0.0
        for _ in range(10_000):  # ends when the link runs out of data or the stretch is negligible
            stretch = moved * cpu_per_byte + busy * poll_share
            if stretch < 1e-9:
                break
            moved, busy = self.advance(end, end + stretch, rate, poll_share)
            end, added = end + stretch, added + stretch
        return added

    def wait(self, job: _Job, now: float) -> float:
        """When `job` is done if the rank waits for it from `now` (the rounds before its last finish first)."""
        cursor, index = now, 0
        while job.seconds > 0 and index < len(self.queue):
            entry = self.queue[index]
            index += 1
            if entry.seconds > 0:
                cursor = max(cursor, entry.released) + entry.seconds / self._rate(1.0, entry.job.bytes_per_second, 1.0)
                self._move(entry, entry.seconds, cursor)
        self.queue = [entry for entry in self.queue if entry.seconds > 0]
        return max(cursor, now)


# How long after a batch's first round later rounds still join it: their handshakes done before its data fills
# the socket. In d12 runs at 2 Gbit/s a bucket's collectives took 3-16 ms to start, the encoder's began 10-11 ms
# after block 0's, and the two completed together; kept runs re-predicted with 5-20 ms gave 28-31, 26-28 and 7
# components within 25% (of 45, 45, 7), 0 and 40 ms fewer (bench/README.md).
HANDSHAKE_S = 10e-3


class _BatchedLink(_Link):
    """The link as UCX's rendezvous protocol over TCP moves it: a message's data goes only after a handshake whose
    control messages queue behind the data already on the socket. So when the link falls idle, the rounds
    started by then and within HANDSHAKE_S after move together as one batch, sharing the link, and complete
    together when the last of them is through; rounds started later (and the next rounds of the batch's
    collectives) form the next batch (bench/completion_order.py: collectives posted together, both ways,
    complete together)."""

    def __init__(self, cpu_bytes_s: float | None = None) -> None:
        super().__init__(cpu_bytes_s)
        self.batch: list[_Round] = []
        self.open_until = -1.0

    def _batch_rate(self, rate: float, share: float) -> float:
        """_Link._rate for the batch's mix of jobs (their bytes per second weighted by what each has left)."""
        left = sum(entry.seconds for entry in self.batch)
        mixed = sum(entry.seconds * entry.job.bytes_per_second for entry in self.batch) / left if left > 0 else 0.0
        return self._rate(rate, mixed, share)

    def _next_batch(self, cursor: float) -> float | None:
        """With the batch done: the rounds queued by `cursor` (or, if none, at the next release) and within
        HANDSHAKE_S after form the next one; returns when it starts (None: nothing queued)."""
        if not self.queue:
            return None
        begin = max(cursor, min(entry.released for entry in self.queue))
        self.open_until = begin + HANDSHAKE_S
        self.batch = [entry for entry in self.queue if entry.released <= self.open_until]
        self.queue = [entry for entry in self.queue if entry.released > self.open_until]
        return begin

    def start(self, kind: str, seconds: float, now: float, nbytes: float = 0.0, shares=(1.0,)) -> _Job:
        job = super().start(kind, seconds, now, nbytes, shares)
        if self.batch and now <= self.open_until:  # its handshake done before the batch's data filled the link
            self.batch.append(self.queue.pop())
        return job

    def _finish_batch(self, now: float) -> None:
        batch, self.batch = self.batch, []
        for entry in batch:
            self._move(entry, entry.seconds, now)  # each job's next round joins the queue

    def advance(self, start: float, end: float, rate: float, share: float = 0.0) -> tuple[float, float]:
        cursor, moved_bytes, busy = start, 0.0, 0.0
        while rate > 0 and cursor < end:
            if not self.batch:
                begin = self._next_batch(cursor)
                if begin is None or begin >= end:
                    break
                cursor = begin
            left, batch_rate = sum(entry.seconds for entry in self.batch), self._batch_rate(rate, share)
            moved = min(left, (end - cursor) * batch_rate)
            if moved <= 0 < left:  # the time left is below the clock's resolution
                break
            for entry in self.batch:  # shared: each moves the same share of what it has left
                part = entry.seconds * moved / left if left > 0 else 0.0
                moved_bytes += part * entry.job.bytes_per_second
                entry.seconds -= part
                entry.job.seconds -= part
            cursor, busy = cursor + moved / batch_rate, busy + moved / batch_rate
            if left - moved <= 1e-12:
                self._finish_batch(cursor)
        return moved_bytes, busy

    def wait(self, job: _Job, now: float) -> float:
        cursor = now
        while job.seconds > 0:
            if not self.batch:
                begin = self._next_batch(cursor)
                if begin is None:
                    break
                cursor = begin
            cursor += sum(entry.seconds for entry in self.batch) / self._batch_rate(1.0, 1.0)
            self._finish_batch(cursor)
        return max(cursor, now)


@dataclass
class StepPrediction:
    """Predicted ms per step by component (compute, update, each collective's waiting, wait, communication,
    other), the whole step, the hidden shares, and each collective kind's time on the link."""

    step_ms: float
    components: dict
    grad_hidden: float
    param_hidden: float | None
    link_ms: dict
    network_cpu_ms: float = 0.0  # compute (backward, update) stretched by the network's CPU work and tests
    # when the update began and each bucket's gradient collectives started and were through, in ms from the
    # first one's start (the measured run's `gradient_timeline`)
    gradient_timeline: dict | None = None


def predict_step(profile: ComputeProfile, target: Target) -> StepPrediction:
    """Rank 0's step of `target.strategy` (see the module docstring)."""
    cluster, rate = target.cluster, target.overlap
    plan = strategy_plan(target.strategy, profile.config, cluster.ranks)
    call = profile.call_us * 1e-6 if cluster.ranks > 1 else 0.0
    link, state = _link_for(target), {"t": 1e-3 * profile.forward_ms, "calls": 0, "cpu": 0.0}
    cpu_per_byte, poll_share = cluster.network_cpu_per_byte, cluster.network_poll_share
    waits = {plan.gradient_kind: 0.0, **({plan.parameter_kind: 0.0} if plan.parameter_kind else {}),
             **({"MPI_Allreduce": 0.0} if plan.norm_allreduce and profile.clips else {})}
    link_ms = {kind: 0.0 for kind in waits}

    def compute(seconds: float) -> None:
        added = link.compute(state["t"], seconds, rate, cpu_per_byte, poll_share)
        state["cpu"] += added
        state["t"] += seconds + added

    def start(kind: str, items: list) -> _Job:
        compute(call * (len(items) + 1))  # the starts and a test
        state["calls"] += len(items) + 1
        seconds = concurrent_seconds(items, cluster)
        link_ms[kind] += 1e3 * seconds
        largest = max(items, key=lambda item: item[1])
        return link.start(kind, seconds, state["t"], network_bytes(items, cluster) if cpu_per_byte else 0.0,
                          round_shares(largest[0], largest[1], cluster))

    def wait(job: _Job) -> None:
        done = link.wait(job, state["t"])
        waits[job.kind] += 1e3 * (done - state["t"])
        state["t"] = done

    grad_jobs = _backward(profile, plan, compute, start)
    backward_cpu = state["cpu"]
    total_bytes = sum(plan.bucket_bytes)
    grad_hidden = sum(b for job, b in zip(grad_jobs, plan.bucket_bytes) if job.seconds <= 0) / total_bytes
    update_start = state["t"]
    if profile.clips:
        for job in grad_jobs:
            wait(job)
        compute(1e-3 * profile.norm_ms * plan.update_share)
        if plan.norm_allreduce:
            wait(link.start("MPI_Allreduce", collective_seconds("MPI_Allreduce", 8, cluster), state["t"]))
            link_ms["MPI_Allreduce"] = waits["MPI_Allreduce"]
    param_jobs = []
    for job, items, share, nbytes in zip(grad_jobs, plan.parameter_items, plan.update_shares, plan.bucket_bytes):
        wait(job)
        compute(1e-3 * profile.update_ms * share * nbytes / total_bytes)
        if items:
            param_jobs.append((start(plan.parameter_kind, items), nbytes))
    param_hidden = (sum(b for job, b in param_jobs if job.seconds <= 0) / total_bytes) if param_jobs else None
    if param_jobs:
        _wait_for_parameters(link, param_jobs[-1][0], state, waits, target, 1e-3 * profile.forward_ms * rate)
    wait_ms = sum(waits.values())
    update_ms = 1e3 * (state["t"] - update_start) - wait_ms - 1e3 * call * _calls_in_update(plan)
    labels = {plan.gradient_kind: gradient_label(plan.gradient_kind), "MPI_Allreduce": NORM_LABEL,
              plan.parameter_kind: parameter_label(plan.parameter_kind or "")}
    components = {"compute": profile.forward_ms + profile.backward_ms + 1e3 * backward_cpu, "update": update_ms,
                  **{labels[kind]: ms for kind, ms in waits.items()}, "wait": wait_ms,
                  "communication": wait_ms + 1e3 * call * state["calls"], "other": profile.other_ms}
    step = 1e3 * state["t"] + profile.other_ms
    if cluster.ranks == 1:  # nothing to communicate: no collective rows, nothing hidden
        components = {k: v for k, v in components.items() if k.split(" ")[0] not in link_ms}
        return StepPrediction(step, components, 0.0, None, {})
    return StepPrediction(step, components, grad_hidden, param_hidden, link_ms, 1e3 * state["cpu"],
                          _timeline(grad_jobs, plan, profile.config, update_start))


def _timeline(jobs: list, plan: StrategyPlan, config: GPT2Config, update_start: float) -> dict:
    """The measured run's `gradient_timeline`, predicted: ms from the first bucket's start."""
    first = jobs[0].released
    parts = [b.part for b in gradient_buckets(config)]
    return {"update_start_ms": 1e3 * (update_start - first),
            "buckets": [{"part": part, "bytes": nbytes, "start_ms": 1e3 * (job.released - first),
                         "done_ms": 1e3 * (job.done_at - first) if job.done_at is not None else None}
                        for part, job, nbytes in zip(parts, jobs, plan.bucket_bytes)]}


def _link_for(target: Target) -> _Link:
    order = target.link_order
    if order == "auto":
        order = "batches" if target.cluster.link.tcp else "fifo"
    per_byte = target.cluster.network_cpu_per_byte
    cpu_bytes_s = 1.0 / per_byte if per_byte > 0 else None
    return _BatchedLink(cpu_bytes_s) if order == "batches" else _Link(cpu_bytes_s)


def _backward(profile: ComputeProfile, plan: StrategyPlan, compute, start) -> list:
    """Backward with each bucket's gradient collectives started where its gradients are final."""
    jobs, done = [], 0.0
    for items, ready in zip(plan.gradient_items, backward_ready(profile.config)):
        compute(1e-3 * profile.backward_ms * (ready - done))
        done = ready
        jobs.append(start(plan.gradient_kind, items))
    return jobs


def _calls_in_update(plan: StrategyPlan) -> int:
    return sum(len(items) + 1 for items in plan.parameter_items if items)


def _wait_for_parameters(link: _Link, last: _Job, state: dict, waits: dict, target: Target, forward_moves: float):
    """The update's last wait, for every parameter collective; with `params_behind_forward` the next step's
    forward would move `forward_moves` seconds' worth of it first."""
    done = link.wait(last, state["t"])
    exposed = done - state["t"]
    if target.params_behind_forward:
        exposed = max(0.0, exposed - forward_moves)
    waits[last.kind] += 1e3 * exposed
    state["t"] += exposed


def calibrate_overlap(profile: ComputeProfile, target: Target, measured_hidden: float) -> float:
    """The smallest `overlap` whose predicted hidden gradient bytes reach `measured_hidden` (0 for none)."""
    if measured_hidden <= 1e-6:
        return 0.0
    if predict_step(profile, replace(target, overlap=1.0)).grad_hidden < measured_hidden:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        if predict_step(profile, replace(target, overlap=middle)).grad_hidden >= measured_hidden - 1e-6:
            high = middle
        else:
            low = middle
    return high
