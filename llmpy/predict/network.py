"""Collective cost models: what each MPI collective the strategies call costs on a given network.

The model is Hockney's alpha-beta with a reduction term (as in Thakur, Rabenseifner and Gropp, "Optimization of
collective communication operations in MPICH", 2005): a message of m bytes between two hosts takes
alpha + m / beta (latency, link bandwidth per direction, full duplex), and summing m received bytes into a local
buffer takes m * gamma (gamma: seconds per byte of a memory-bound sum). A collective is a schedule of rounds; in a
round every rank sends at most one message, and the round ends when its slowest message has arrived:

    round = alpha + max(bytes one host's link carries out or in during the round) / beta + gamma * reduced bytes

so ranks that share a host (`ranks_per_node`, placed consecutively as mpiexec -ppn and srun place them) share its
link: in a round where all k ranks of a host send off it, the link carries k messages. Messages between ranks on
one host go through shared memory (the `shm` link). Hand-checked closed forms for one rank per host (gamma = 0,
pof2 = p a power of two, L = ceil(log2 p)):

    ring allreduce                       2(p-1) (alpha + n/(p beta))
    recursive-halving reduce-scatter     log2(p) alpha + (p-1)/p n/beta   (MPICH's reduce-scatter below 512 KiB)
    pairwise reduce-scatter              (p-1) (alpha + n/(p beta))       (MPICH's above)
    Rabenseifner allreduce               2 log2(p) alpha + 2 (p-1)/p n/beta  (recursive-halving RS + doubling AG)
    recursive-doubling allgather         log2(p) alpha + (p-1)/p n/beta
    ring allgather                       (p-1) (alpha + n/(p beta))
    binomial broadcast / reduce          L (alpha + n/beta)
    scatter + ring allgather broadcast   log2(p) alpha + (p-1)/p n/beta + (p-1) (alpha + n/(p beta))
    reduce-scatter + gather reduce       2 log2(p) alpha + 2 (p-1)/p n/beta

Which algorithm: `algorithms="mpich"` (the default) takes the one MPICH picks for the non-blocking collective by
message size and rank count (its selection table maint/tuning/coll/mpir/generic.json: Iallreduce: recursive
doubling up to 2 KiB, else Rabenseifner; Ireduce_scatter: recursive halving below 512 KiB, else pairwise;
Iallgatherv: recursive doubling (2^k ranks, < 512 KiB) or Bruck (< 80 KiB), else ring; Ireduce: binomial up to
2 KiB, else reduce-scatter + gather; Ibcast: binomial below 8 ranks or 12 KiB, else scatter + recursive-doubling
(2^k ranks, < 512 KiB) or ring allgather; with several ranks per host Ireduce and Ibcast go through the host
first (MPICH's smp algorithms: within each host, then between one leader per host). `algorithms="best"` takes the
cheapest applicable algorithm instead (what a tuned MPI could reach). Non-powers of two fold the extra ranks in
with one step of the whole buffer before and after, as MPICH does.

Collectives in flight at once (a bucket's segments; the `owners` strategy's reduce and broadcast per parameter
block, with owners round robin, so several roots) share the links: `concurrent_seconds` bounds their time by the
busiest link's bytes (every collective's messages summed per host) plus the deepest schedule's latencies, and
can cap what several in flight get (`Cluster.concurrent_gbit`, see there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache

from llmpy.core.errors import OptionError

BYTES_PER_GBIT = 1e9 / 8
Message = tuple[int, int, float, bool]  # (source rank, destination rank, bytes, summed into the destination)
Schedule = tuple[tuple[Message, ...], ...]  # rounds of messages


@dataclass(frozen=True)
class Link:
    """A host's network link: `bandwidth_gbit` per direction (full duplex) and `latency_us` per message (the MPI
    library's end-to-end small-message latency, not the wire's)."""

    name: str
    bandwidth_gbit: float
    latency_us: float
    cpu_gbs: float | None = None  # GB/s of bytes sent + received per second of a rank's CPU (None: free)
    poll_share: float | None = None  # share of a rank's core its progress thread's tests take while data moves
    tcp: bool = True  # MPI's messages go over TCP sockets (not RDMA or shared memory): see step.LINK_ORDERS

    def __post_init__(self) -> None:
        if not (isinstance(self.bandwidth_gbit, (int, float)) and math.isfinite(self.bandwidth_gbit)
                and self.bandwidth_gbit > 0):
            raise OptionError("bandwidth", self.bandwidth_gbit, "must be a positive number of Gbit/s")
        if not (isinstance(self.latency_us, (int, float)) and math.isfinite(self.latency_us) and self.latency_us >= 0):
            raise OptionError("latency", self.latency_us, "must be a number of microseconds >= 0")
        if self.cpu_gbs is not None and not (isinstance(self.cpu_gbs, (int, float)) and math.isfinite(self.cpu_gbs)
                                             and self.cpu_gbs > 0):
            raise OptionError("network_cpu_gbs", self.cpu_gbs, "must be a positive rate in GB/s")
        if self.poll_share is not None and not (isinstance(self.poll_share, (int, float))
                                                and 0.0 <= self.poll_share < 1.0):
            raise OptionError("network_poll_share", self.poll_share, "must be a share of a core, 0 <= share < 1")

    @property
    def alpha(self) -> float:
        return 1e-6 * self.latency_us

    @property
    def seconds_per_byte(self) -> float:
        return 1.0 / (self.bandwidth_gbit * BYTES_PER_GBIT)


# Named links. veth: this machine's veth link between two network-namespace hosts (tests/netns_hosts.py), MPICH
# over UCX's TCP transport, from Sendrecv exchanges of 8 B - 16 MiB: 3.6-6.5 Gbit/s and 38-41 us on the shared
# 2-core development machine (bench/predict_validation.py measures it again on every run). Several collectives
# in flight, polled as llmpy waits, got ~0.35 Gbit/s there on any link (Cluster.concurrent_gbit). Moving data
# cost a rank ~0.7 GB/s of bytes sent + received per CPU second there (0.64-0.71 from 8 Iallreduces of 1-16 MiB
# polled, unshaped and at 2 and 1 Gbit/s, process CPU time: MPI's tests and the kernel's TCP work).
LINK_PRESETS: dict[str, Link] = {
    "1gbe": Link("1gbe", 1.0, 50.0),
    "10gbe": Link("10gbe", 10.0, 20.0),
    "25gbe": Link("25gbe", 25.0, 10.0),
    "ib100": Link("ib100", 100.0, 2.0, tcp=False),
    "ib200": Link("ib200", 200.0, 1.5, tcp=False),
    "veth": Link("veth", 5.0, 40.0, cpu_gbs=0.7),
    "shm": Link("shm", 80.0, 0.5, tcp=False),  # ranks on one host: a copy through shared memory
}


def link_preset(name: str) -> Link:
    try:
        return LINK_PRESETS[name]
    except KeyError:
        raise OptionError("link", name, f"is not a named link; choose one of {', '.join(LINK_PRESETS)}") from None


ALGORITHM_CHOICES = ("mpich", "best")


@dataclass(frozen=True)
class Cluster:
    """Where the ranks run: `ranks` in all, `ranks_per_node` of them on each host (consecutive ranks), the hosts
    joined by `link`, ranks within a host by `intra`; `reduce_gbytes_s`: how fast a rank sums a received buffer
    into its own (GB/s of data summed; math.inf: free)."""

    ranks: int
    link: Link
    ranks_per_node: int = 1
    intra: Link = field(default_factory=lambda: LINK_PRESETS["shm"])
    reduce_gbytes_s: float = 4.0
    algorithms: str = "mpich"
    concurrent_gbit: float | None = None  # what several collectives in flight at once get (see concurrent_seconds)
    cores_per_node: int | None = None  # None: no spare core for the network's CPU work (see network_cpu_per_byte)
    threads_per_rank: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.ranks, int) or self.ranks < 1:
            raise OptionError("ranks", self.ranks, "must be a positive number of ranks")
        if not isinstance(self.ranks_per_node, int) or self.ranks_per_node < 1:
            raise OptionError("ranks_per_node", self.ranks_per_node, "must be a positive number of ranks")
        if self.ranks % self.ranks_per_node:
            raise OptionError("ranks_per_node", self.ranks_per_node, f"must divide --ranks {self.ranks}")
        if not (self.reduce_gbytes_s > 0):
            raise OptionError("reduce_gbytes_s", self.reduce_gbytes_s, "must be a positive rate in GB/s")
        if self.algorithms not in ALGORITHM_CHOICES:
            raise OptionError("algorithms", self.algorithms, f"is not one of {', '.join(ALGORITHM_CHOICES)}")
        if self.concurrent_gbit is not None and not (math.isfinite(self.concurrent_gbit) and self.concurrent_gbit > 0):
            raise OptionError("concurrent_gbit", self.concurrent_gbit, "must be a positive number of Gbit/s")
        if self.cores_per_node is not None and (not isinstance(self.cores_per_node, int) or self.cores_per_node < 1):
            raise OptionError("cores_per_node", self.cores_per_node, "must be a positive number of cores")

    @property
    def nodes(self) -> int:
        return self.ranks // self.ranks_per_node

    @property
    def gamma(self) -> float:
        return 0.0 if math.isinf(self.reduce_gbytes_s) else 1.0 / (1e9 * self.reduce_gbytes_s)

    @property
    def spare_core(self) -> bool:
        """Whether a host has a core beyond its ranks' threads for the network's CPU work (the progress thread's
        tests, the kernel's TCP stack)."""
        return self.cores_per_node is not None and self.ranks_per_node * self.threads_per_rank < self.cores_per_node

    @property
    def network_cpu_per_byte(self) -> float:
        """Seconds of a rank's compute lost per byte it sends or receives off its host while it computes: the
        link's CPU cost where the host has no spare core, else 0."""
        if self.link.cpu_gbs is None or self.spare_core or self.ranks == 1:
            return 0.0
        return 1.0 / (1e9 * self.link.cpu_gbs)

    @property
    def network_poll_share(self) -> float:
        """The share of a rank's core that testing its collectives in flight takes while it computes (llmpy's
        progress thread wakes every 0.1 ms): the link's where the host has no spare core, else 0."""
        if not self.link.poll_share or self.spare_core or self.ranks == 1:
            return 0.0
        return self.link.poll_share

    def subgroup(self, ranks: int, per_node: int, link: Link) -> Cluster:
        return replace(self, ranks=ranks, ranks_per_node=per_node, link=link)


# ---------------------------------------------------------------------------------------------- schedules
# Every builder returns the rounds of one collective over ranks 0..p-1 (the root is rank 0) on n bytes.
def _pof2(p: int) -> int:
    return 1 << (p.bit_length() - 1)


def _folded(p: int) -> tuple[int, int, Callable[[int], int]]:
    """MPICH's fold for p not a power of two: (pof2, rem, rank of new rank): ranks 2i < 2 rem hand their data
    to 2i + 1 and sit out; the others are new ranks 0..pof2-1."""
    pof2 = _pof2(p)
    rem = p - pof2
    return pof2, rem, (lambda new: 2 * new + 1 if new < rem else new + rem)


def _fold_in(p: int, n: float) -> list:
    _, rem, _ = _folded(p)
    return [tuple((2 * i, 2 * i + 1, n, True) for i in range(rem))] if rem else []


def _fold_out(p: int, n: float) -> list:
    _, rem, _ = _folded(p)
    return [tuple((2 * i + 1, 2 * i, n, False) for i in range(rem))] if rem else []


def _exchange(pof2: int, real, mask: int, nbytes: float, reduce: bool) -> tuple:
    return tuple((real(r), real(r ^ mask), nbytes, reduce) for r in range(pof2))


def _halving_rounds(p: int, n: float) -> list:
    """Recursive halving among the pof2 new ranks, nearest partner first (MPICH's allreduce order): n/2, n/4, ..."""
    pof2, _, real = _folded(p)
    rounds, mask = [], 1
    while mask < pof2:
        rounds.append(_exchange(pof2, real, mask, n / (2 * mask), True))
        mask *= 2
    return rounds


def _doubling_rounds(p: int, n: float) -> list:
    """The allgather mirror of _halving_rounds: farthest partner first, n/pof2 ... n/2."""
    pof2, _, real = _folded(p)
    rounds, mask = [], pof2 // 2
    while mask >= 1:
        rounds.append(_exchange(pof2, real, mask, n / (2 * mask), False))
        mask //= 2
    return rounds


def ring_rounds(p: int, n: float, reduce: bool) -> list:
    return [tuple((r, (r + 1) % p, n / p, reduce) for r in range(p))] * (p - 1)


def ring_allreduce(p: int, n: float) -> list:
    return ring_rounds(p, n, True) + ring_rounds(p, n, False)


def rabenseifner_allreduce(p: int, n: float) -> list:
    return _fold_in(p, n) + _halving_rounds(p, n) + _doubling_rounds(p, n) + _fold_out(p, n)


def recursive_doubling_allreduce(p: int, n: float) -> list:
    pof2, _, real = _folded(p)
    rounds, mask = _fold_in(p, n), 1
    while mask < pof2:
        rounds.append(_exchange(pof2, real, mask, n, True))
        mask *= 2
    return rounds + _fold_out(p, n)


def recursive_halving_reduce_scatter(p: int, n: float) -> list:
    return _fold_in(p, n) + _halving_rounds(p, n) + _fold_out(p, n / p)


def pairwise_reduce_scatter(p: int, n: float) -> list:
    return [tuple((r, (r + i) % p, n / p, True) for r in range(p)) for i in range(1, p)]


def recursive_doubling_allgather(p: int, n: float) -> list:
    """2^k ranks: partner r ^ mask, the data gathered so far (mask n/p bytes)."""
    rounds, mask = [], 1
    while mask < p:
        rounds.append(tuple((r, r ^ mask, mask * n / p, False) for r in range(p)))
        mask *= 2
    return rounds


def bruck_allgather(p: int, n: float) -> list:
    rounds, step = [], 1
    while step < p:
        rounds.append(tuple((r, (r - step) % p, min(step, p - step) * n / p, False) for r in range(p)))
        step *= 2
    return rounds


def binomial_bcast(p: int, n: float) -> list:
    """The root sends to the farthest subtree first; every rank that has the data passes it on."""
    rounds, mask = [], _pof2(p - 1) if p > 1 else 0
    while mask >= 1:
        rounds.append(tuple((r, r + mask, n, False) for r in range(0, p, 2 * mask) if r + mask < p))
        mask //= 2
    return rounds


def binomial_reduce(p: int, n: float) -> list:
    rounds, mask = [], 1
    while mask < p:
        rounds.append(tuple((r, r - mask, n, True) for r in range(mask, p, 2 * mask)))
        mask *= 2
    return rounds


def binomial_scatter(p: int, n: float) -> list:
    rounds, mask = [], _pof2(p - 1) if p > 1 else 0
    while mask >= 1:
        rounds.append(tuple((r, r + mask, min(mask, p - r - mask) * n / p, False)
                            for r in range(0, p, 2 * mask) if r + mask < p))
        mask //= 2
    return rounds


def binomial_gather(p: int, n: float) -> list:
    rounds, mask = [], 1
    while mask < p:
        rounds.append(tuple((r, r - mask, min(mask, p - r) * n / p, False) for r in range(mask, p, 2 * mask)))
        mask *= 2
    return rounds


def reduce_scatter_gather_reduce(p: int, n: float) -> list:
    """Rabenseifner's reduce: fold, recursive-halving reduce-scatter, binomial gather of the pieces to new rank 0
    (real rank 1 when ranks were folded: it hands the result to rank 0)."""
    pof2, rem, real = _folded(p)
    gather = [tuple((real(s), real(d), b, False) for s, d, b, _ in rnd) for rnd in binomial_gather(pof2, n)]
    handover = [((real(0), 0, n, False),)] if rem else []
    return _fold_in(p, n) + _halving_rounds(p, n) + gather + handover


def scatter_ring_bcast(p: int, n: float) -> list:
    return binomial_scatter(p, n) + ring_rounds(p, n, False)


def scatter_doubling_bcast(p: int, n: float) -> list:
    return binomial_scatter(p, n) + recursive_doubling_allgather(p, n)


ALGORITHMS = {
    "MPI_Iallreduce": {"ring": ring_allreduce, "rabenseifner": rabenseifner_allreduce,
                       "recursive_doubling": recursive_doubling_allreduce},
    "MPI_Ireduce_scatter": {"recursive_halving": recursive_halving_reduce_scatter, "pairwise": pairwise_reduce_scatter,
                            "ring": lambda p, n: ring_rounds(p, n, True)},
    "MPI_Iallgatherv": {"recursive_doubling": recursive_doubling_allgather, "bruck": bruck_allgather,
                        "ring": lambda p, n: ring_rounds(p, n, False)},
    "MPI_Ireduce": {"binomial": binomial_reduce, "reduce_scatter_gather": reduce_scatter_gather_reduce},
    "MPI_Ibcast": {"binomial": binomial_bcast, "scatter_ring_allgather": scatter_ring_bcast,
                   "scatter_recursive_doubling_allgather": scatter_doubling_bcast},
}
ALGORITHMS["MPI_Allreduce"] = ALGORITHMS["MPI_Iallreduce"]  # the blocking one (the gradient norm)
ROOTED = ("MPI_Ireduce", "MPI_Ibcast")


def _applicable(kind: str, algorithm: str, p: int) -> bool:
    power_of_two = p & (p - 1) == 0
    return not (algorithm in ("recursive_doubling", "scatter_recursive_doubling_allgather") and
                kind in ("MPI_Iallgatherv", "MPI_Ibcast") and not power_of_two)


def mpich_algorithm(kind: str, nbytes: float, p: int) -> str:
    """The algorithm MPICH's selection table picks for this non-blocking collective (one rank per host)."""
    count, power_of_two = nbytes / 4, p & (p - 1) == 0
    if kind in ("MPI_Iallreduce", "MPI_Allreduce"):
        return "recursive_doubling" if nbytes <= 2048 or count < _pof2(p) else "rabenseifner"
    if kind == "MPI_Ireduce_scatter":
        return "recursive_halving" if nbytes < 524288 else "pairwise"
    if kind == "MPI_Iallgatherv":
        if power_of_two:
            return "recursive_doubling" if nbytes < 524288 else "ring"
        return "bruck" if nbytes < 81920 else "ring"
    if kind == "MPI_Ireduce":
        return "binomial" if nbytes <= 2048 or count < _pof2(p) else "reduce_scatter_gather"
    if kind == "MPI_Ibcast":
        if p < 8 or nbytes < 12288:
            return "binomial"
        return "scatter_recursive_doubling_allgather" if power_of_two and nbytes < 524288 else "scatter_ring_allgather"
    raise ValueError(f"no cost model for {kind}")


# ---------------------------------------------------------------------------------------------- costs
@dataclass(frozen=True)
class Cost:
    """A schedule's time on a cluster, the alphas on its path (`latency`), and the bytes it puts on each host's
    link per direction, through each rank's shared-memory copies, into each rank's sums, and each rank's bytes
    sent and received off its host (`loads`)."""

    seconds: float
    latency: float
    loads: dict  # ("link", host, "out"|"in") / ("shm", rank) / ("sum", rank) / ("net", rank): sent + received -> bytes


def _round_seconds(messages: tuple, cluster: Cluster, loads: dict) -> tuple[float, float]:
    """(seconds, latency) of one round; adds its bytes to `loads`."""
    k = cluster.ranks_per_node
    link: dict = {}
    shm: dict = {}
    summed: dict = {}
    for source, destination, nbytes, reduce in messages:
        if source // k != destination // k:
            link[(source // k, "out")] = link.get((source // k, "out"), 0.0) + nbytes
            link[(destination // k, "in")] = link.get((destination // k, "in"), 0.0) + nbytes
            for rank in (source, destination):
                loads[("net", rank)] = loads.get(("net", rank), 0.0) + nbytes
        else:
            shm[source] = shm.get(source, 0.0) + nbytes
        if reduce:
            summed[destination] = summed.get(destination, 0.0) + nbytes
    seconds = latency = 0.0
    if link:
        latency = cluster.link.alpha
        seconds = latency + max(link.values()) * cluster.link.seconds_per_byte
    if shm:
        seconds = max(seconds, cluster.intra.alpha + max(shm.values()) * cluster.intra.seconds_per_byte)
        latency = max(latency, cluster.intra.alpha)
    for key, value in link.items():
        loads[("link",) + key] = loads.get(("link",) + key, 0.0) + value
    for rank, value in shm.items():
        loads[("shm", rank)] = loads.get(("shm", rank), 0.0) + value
    for rank, value in summed.items():
        loads[("sum", rank)] = loads.get(("sum", rank), 0.0) + value
    return seconds + cluster.gamma * max(summed.values(), default=0.0), latency


def _on_ranks(rounds: list, mapping) -> list:
    return [tuple((mapping(s), mapping(d), b, r) for s, d, b, r in rnd) for rnd in rounds]


def _merge(per_node: list[list]) -> list:
    """Schedules that run side by side (one per host), round by round."""
    depth = max((len(s) for s in per_node), default=0)
    return [tuple(m for s in per_node if i < len(s) for m in s[i]) for i in range(depth)]


def pick(kind: str, nbytes: float, cluster: Cluster) -> str:
    """The algorithm the cost model uses for `kind` on `nbytes` (see the module docstring)."""
    p = cluster.ranks
    if kind in ROOTED and cluster.ranks_per_node > 1 and cluster.nodes > 1 and cluster.algorithms == "mpich":
        return "smp"
    if cluster.algorithms == "mpich":
        return mpich_algorithm(kind, nbytes, p)
    candidates = [a for a in ALGORITHMS[kind] if _applicable(kind, a, p)]
    return min(candidates, key=lambda a: _cost(kind, a, nbytes, cluster).seconds)


def schedule(kind: str, algorithm: str, nbytes: float, cluster: Cluster) -> list:
    """The rounds of `kind` by `algorithm` on the cluster's ranks (root: rank 0). smp (rooted, several ranks per
    host): within every host at once, then between the hosts' first ranks (reduce: in that order; bcast: the
    other way round)."""
    p, k = cluster.ranks, cluster.ranks_per_node
    if algorithm != "smp":
        return ALGORITHMS[kind][algorithm](p, nbytes)
    hosts, flat_inter = cluster.nodes, Cluster(cluster.nodes, cluster.link, 1, cluster.intra, cluster.reduce_gbytes_s)
    inner = ALGORITHMS[kind][mpich_algorithm(kind, nbytes, k)](k, nbytes)
    within = _merge([_on_ranks(inner, lambda r, h=h: h * k + r) for h in range(hosts)])
    between = _on_ranks(ALGORITHMS[kind][pick(kind, nbytes, flat_inter)](hosts, nbytes), lambda r: r * k)
    return within + between if kind == "MPI_Ireduce" else between + within


@lru_cache(maxsize=4096)
def _cost(kind: str, algorithm: str, nbytes: float, cluster: Cluster) -> Cost:
    loads: dict = {}
    seconds = latency = 0.0
    for messages in schedule(kind, algorithm, nbytes, cluster):
        round_seconds, round_latency = _round_seconds(messages, cluster, loads)
        seconds += round_seconds
        latency += round_latency
    return Cost(seconds, latency, loads)


def collective_cost(kind: str, nbytes: float, cluster: Cluster) -> Cost:
    """One collective of `nbytes` (the whole buffer: what every rank contributes or receives) alone."""
    if kind not in ALGORITHMS:
        raise ValueError(f"no cost model for {kind}")
    if cluster.ranks == 1 or nbytes <= 0:
        return Cost(0.0, 0.0, {})
    return _cost(kind, pick(kind, float(nbytes), cluster), float(nbytes), cluster)


def collective_seconds(kind: str, nbytes: float, cluster: Cluster) -> float:
    return collective_cost(kind, nbytes, cluster).seconds


def algorithm_seconds(kind: str, algorithm: str, nbytes: float, cluster: Cluster) -> float:
    """`kind` by a named algorithm (ALGORITHMS[kind]), whatever MPICH would pick."""
    if algorithm not in ALGORITHMS.get(kind, {}) and algorithm != "smp":
        raise ValueError(f"no algorithm {algorithm!r} for {kind}")
    return _cost(kind, algorithm, float(nbytes), cluster).seconds if cluster.ranks > 1 else 0.0


def _rotated(loads: dict, root: int, cluster: Cluster) -> dict:
    """A root-0 schedule's loads moved to `root`'s host (ranks shift by whole hosts, so hosts stay hosts)."""
    k, hosts, p = cluster.ranks_per_node, cluster.nodes, cluster.ranks
    shift = root // k
    if shift == 0:
        return loads
    moved = {}
    for key, value in loads.items():
        if key[0] == "link":
            moved[("link", (key[1] + shift) % hosts, key[2])] = value
        else:
            moved[(key[0], (key[1] + shift * k) % p)] = value
    return moved


def concurrent_seconds(items: list[tuple[str, float, int]], cluster: Cluster) -> float:
    """Collectives started together and in flight at once, (kind, bytes, root) each (root ignored where there is
    none): their bytes share the links, their latencies overlap. Bounded below by the slowest one alone and by
    the busiest link's (or rank's copy's, or sum's) bytes plus the deepest schedule's latencies.

    With `cluster.concurrent_gbit`, the bytes of all but the largest collective move at that rate: MPI moves
    data only inside MPI calls, and several collectives waited for by polling MPI_Testall with sleeps (llmpy's
    waits) get a rate of their own, whatever the link (measured here: 12 MiB as one Iallreduce between two
    namespace hosts in 21 ms, as 4 to 128 of them in 240-340 ms, on an unshaped or a 1 Gbit/s link alike);
    the largest one, left alone at the end, streams at the link's rate."""
    if cluster.ranks == 1:
        return 0.0
    loads: dict = {}
    alone = latency = 0.0
    for kind, nbytes, root in items:
        cost = collective_cost(kind, nbytes, cluster)
        alone, latency = max(alone, cost.seconds), max(latency, cost.latency)
        for key, value in _rotated(cost.loads, root or 0, cluster).items():
            loads[key] = loads.get(key, 0.0) + value
    busiest = {kind: max((v for key, v in loads.items() if key[0] == kind), default=0.0)
               for kind in ("link", "shm", "sum")}
    per_byte = cluster.link.seconds_per_byte
    if cluster.concurrent_gbit is not None and len(items) > 1:
        shared = 1.0 - max(n for _, n, _ in items) / sum(n for _, n, _ in items)
        per_byte = shared * max(per_byte, 1.0 / (cluster.concurrent_gbit * BYTES_PER_GBIT)) + (1 - shared) * per_byte
    transfer = max(busiest["link"] * per_byte, busiest["shm"] * cluster.intra.seconds_per_byte)
    return max(alone, latency + transfer + busiest["sum"] * cluster.gamma)




def round_shares(kind: str, nbytes: float, cluster: Cluster) -> list[float]:
    """Each round's share of one collective's time alone, in order (MPI posts a round's messages when the round
    before it is done)."""
    if cluster.ranks == 1 or nbytes <= 0:
        return [1.0]
    rounds = schedule(kind, pick(kind, float(nbytes), cluster), float(nbytes), cluster)
    seconds = [_round_seconds(messages, cluster, {})[0] for messages in rounds]
    total = sum(seconds)
    return [s / total for s in seconds] if total > 0 else [1.0]


def network_bytes(items: list[tuple[str, float, int]], cluster: Cluster, rank: int = 0) -> float:
    """The bytes `rank` sends and receives off its host in the collectives `items` (kind, bytes, root)."""
    if cluster.ranks == 1:
        return 0.0
    total = 0.0
    for kind, nbytes, root in items:
        loads = _rotated(collective_cost(kind, nbytes, cluster).loads, root or 0, cluster)
        total += loads.get(("net", rank), 0.0)
    return total


def rate_for(seconds_at: Callable[[float], float], target: float, low: float, high: float) -> float:
    """The rate in [low, high] (Gbit/s, say) at which `seconds_at(rate)`, a cost that falls as the rate rises,
    equals `target`: bisection on a log scale (the rates of interest span orders of magnitude)."""
    for _ in range(60):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if seconds_at(middle) > target else (low, middle)
    return math.sqrt(low * high)
