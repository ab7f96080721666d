"""`llmpy predict`: each collective's cost against closed forms computed by hand, the shared host link, owner
traffic with several roots, the step model against a hand-computed step, self-prediction of a small real run,
--validate's table, prediction.json, and bad options refused in one line."""

import itertools
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from llmpy.commands.cli import main
from llmpy.core.config import PRESETS
from llmpy.execution.mpi.strategies import gradient_buckets
from llmpy.execution.threads import available_cores
from llmpy.io.formats import write_shard
from llmpy.predict.network import (
    Cluster,
    Link,
    algorithm_seconds,
    collective_seconds,
    concurrent_seconds,
    mpich_algorithm,
    round_shares,
)
from llmpy.predict.measured import median_step_phases
from llmpy.predict.step import ComputeProfile, Target, _BatchedLink, _Link, backward_ready, predict_step

MPIEXEC = Path(sys.executable).parent / "mpiexec"
LINK = Link("test", 8.0, 40.0)  # 1 GB/s: beta = 1e-9 s per byte; alpha = 40 us
ALPHA, BETA = 40e-6, 1e-9
N = 4e6  # bytes
FREE_SUMS = math.inf  # no reduction term (gamma = 0) unless a test asks for one


def cluster(p, per_node=1, reduce=FREE_SUMS, intra=None):
    extra = {"intra": intra} if intra else {}
    return Cluster(p, LINK, per_node, reduce_gbytes_s=reduce, **extra)


# ------------------------------------------------------------------ collectives, one rank per host
@pytest.mark.parametrize("p", [2, 3, 4, 8, 9])
def test_ring_allreduce(p):
    expected = 2 * (p - 1) * (ALPHA + N / (p * (1 / BETA)))
    assert algorithm_seconds("MPI_Iallreduce", "ring", N, cluster(p)) == pytest.approx(expected)


@pytest.mark.parametrize("p, log", [(2, 1), (4, 2), (8, 3), (16, 4)])
def test_power_of_two_halving_and_doubling(p, log):
    c = cluster(p)
    assert algorithm_seconds("MPI_Iallreduce", "rabenseifner", N, c) == pytest.approx(
        2 * log * ALPHA + 2 * (p - 1) / p * N * BETA)
    assert algorithm_seconds("MPI_Ireduce_scatter", "recursive_halving", N, c) == pytest.approx(
        log * ALPHA + (p - 1) / p * N * BETA)
    assert algorithm_seconds("MPI_Iallgatherv", "recursive_doubling", N, c) == pytest.approx(
        log * ALPHA + (p - 1) / p * N * BETA)
    assert algorithm_seconds("MPI_Ireduce", "reduce_scatter_gather", N, c) == pytest.approx(
        2 * log * ALPHA + 2 * (p - 1) / p * N * BETA)
    assert algorithm_seconds("MPI_Ibcast", "scatter_ring_allgather", N, c) == pytest.approx(
        log * ALPHA + (p - 1) / p * N * BETA + (p - 1) * (ALPHA + N / p * BETA))


def test_reduction_term():
    gamma = 1 / 2e9  # 2 GB/s of data summed
    c = cluster(4, reduce=2.0)
    assert algorithm_seconds("MPI_Ireduce_scatter", "pairwise", N, c) == pytest.approx(
        3 * (ALPHA + N / 4 * BETA + N / 4 * gamma))
    assert algorithm_seconds("MPI_Ireduce", "binomial", N, c) == pytest.approx(2 * (ALPHA + N * BETA + N * gamma))


@pytest.mark.parametrize("p, rounds", [(2, 1), (3, 2), (5, 3), (8, 3), (9, 4)])
def test_binomial_broadcast_takes_ceil_log2_rounds_of_the_whole_buffer(p, rounds):
    assert algorithm_seconds("MPI_Ibcast", "binomial", N, cluster(p)) == pytest.approx(rounds * (ALPHA + N * BETA))


def test_non_power_of_two_folds_the_extra_ranks_in_with_the_whole_buffer():
    # 3 ranks: rank 0 hands its buffer to rank 1 (N), ranks 1 and 2 halve and double (2 rounds of N/2), rank 1
    # hands the result back (N)
    assert algorithm_seconds("MPI_Iallreduce", "rabenseifner", N, cluster(3)) == pytest.approx(
        4 * ALPHA + 3 * N * BETA)


def test_mpich_picks_by_message_size_and_ranks():
    assert mpich_algorithm("MPI_Iallreduce", 1024, 4) == "recursive_doubling"
    assert mpich_algorithm("MPI_Iallreduce", 1 << 20, 4) == "rabenseifner"
    assert mpich_algorithm("MPI_Ireduce_scatter", 100_000, 4) == "recursive_halving"
    assert mpich_algorithm("MPI_Ireduce_scatter", 1 << 20, 4) == "pairwise"
    assert mpich_algorithm("MPI_Iallgatherv", 1 << 20, 9) == "ring"
    assert mpich_algorithm("MPI_Iallgatherv", 50_000, 9) == "bruck"
    assert mpich_algorithm("MPI_Ireduce", 1 << 20, 2) == "reduce_scatter_gather"
    assert mpich_algorithm("MPI_Ibcast", 1 << 20, 4) == "binomial"  # fewer than 8 ranks
    assert mpich_algorithm("MPI_Ibcast", 1 << 20, 9) == "scatter_ring_allgather"


def test_one_rank_moves_nothing():
    for kind in ("MPI_Iallreduce", "MPI_Ireduce", "MPI_Ibcast"):
        assert collective_seconds(kind, N, cluster(1)) == 0.0


# ------------------------------------------------------------------ ranks sharing a host's link
SHM = Link("shm-test", 80.0, 1.0)
ALPHA_S, BETA_S = 1e-6, 1e-10


def test_ranks_of_one_host_share_its_link():
    # 4 ranks, 2 per host. Recursive doubling allgather: first round within the hosts (N/4 each through shared
    # memory), second between them: both ranks of a host send N/2 over its one link at once
    c = cluster(4, per_node=2, intra=SHM)
    assert algorithm_seconds("MPI_Iallgatherv", "recursive_doubling", N, c) == pytest.approx(
        ALPHA_S + N / 4 * BETA_S + ALPHA + 2 * (N / 2) * BETA)
    # the ring crosses each host's link once per round (1->2, 3->0), while 0->1 and 2->3 stay inside
    assert algorithm_seconds("MPI_Iallreduce", "ring", N, c) == pytest.approx(6 * (ALPHA + N / 4 * BETA))


def test_rooted_collectives_go_through_each_host_first_with_several_ranks_per_host():
    # MPICH's smp broadcast: between the hosts' first ranks (2 hosts: one message of N), then within each host
    # (binomial over 2 ranks: one copy of N)
    c = cluster(4, per_node=2, intra=SHM)
    assert collective_seconds("MPI_Ibcast", N, c) == pytest.approx(ALPHA + N * BETA + ALPHA_S + N * BETA_S)


# ------------------------------------------------------------------ several roots at once (owners)
def test_owner_blocks_spread_over_roots_share_the_links_evenly():
    c = cluster(2)
    # binomial broadcast on 2 ranks: the root sends N. Roots 0 and 1: each host sends N and receives N, both
    # directions at once: alpha + N beta. One root for both: its link sends 2N.
    assert concurrent_seconds([("MPI_Ibcast", N, 0), ("MPI_Ibcast", N, 1)], c) == pytest.approx(ALPHA + N * BETA)
    assert concurrent_seconds([("MPI_Ibcast", N, 0), ("MPI_Ibcast", N, 0)], c) == pytest.approx(ALPHA + 2 * N * BETA)
    # MPICH's reduce on 2 ranks: exchange halves (N/2 each way), then the other rank sends its reduced half
    # (N/2) to the root: the root receives N, sends N/2. Roots 0 and 1: each host 1.5 N each way.
    assert concurrent_seconds([("MPI_Ireduce", N, 0), ("MPI_Ireduce", N, 1)], c) == pytest.approx(
        2 * ALPHA + 1.5 * N * BETA)
    assert concurrent_seconds([("MPI_Ireduce", N, 0), ("MPI_Ireduce", N, 0)], c) == pytest.approx(
        2 * ALPHA + 2 * N * BETA)


def test_several_collectives_in_flight_can_be_capped_to_what_polling_gets():
    # two broadcasts of N from rank 0: 2N on its link; with a 1 Gbit/s cap for collectives in flight together,
    # all but the largest (half the bytes) move at 8e-9 s per byte, the largest at the link's 1e-9
    capped = Cluster(2, LINK, reduce_gbytes_s=FREE_SUMS, concurrent_gbit=1.0)
    items = [("MPI_Ibcast", N, 0), ("MPI_Ibcast", N, 0)]
    assert concurrent_seconds(items, capped) == pytest.approx(ALPHA + 2 * N * (0.5 * 8e-9 + 0.5 * 1e-9))
    assert concurrent_seconds(items[:1], capped) == pytest.approx(ALPHA + N * BETA)  # one alone: the link's rate


def test_link_and_cluster_options_are_checked():
    with pytest.raises(ValueError, match="bandwidth"):
        Link("x", 0.0, 1.0)
    with pytest.raises(ValueError, match="latency"):
        Link("x", 1.0, -1.0)
    with pytest.raises(ValueError, match="ranks_per_node"):
        Cluster(4, LINK, 3)


# ------------------------------------------------------------------ the step model, by hand
D2 = PRESETS["d2"]


def profile(backward_ms=80.0):
    return ComputeProfile(D2, 4, 64, forward_ms=40.0, backward_ms=backward_ms, update_ms=10.0, other_ms=2.0,
                          call_us=0.0)


def test_without_overlap_every_bucket_waits_after_backward():
    # allreduce on 2 ranks: MPICH's Rabenseifner per segment (2 rounds; recursive doubling, 1 round, up to
    # 2 KiB): a bucket's segments together take their deepest latency (they overlap) + the bucket's bytes * beta
    # (each host sends half of a segment twice, or all of a small one once)
    buckets = gradient_buckets(D2)
    communication = sum((2 if max(s.size for s in b.segments) * 4 > 2048 else 1) * ALPHA + 4 * b.size * BETA
                        for b in buckets)
    found = predict_step(profile(), Target("allreduce", cluster(2), overlap=0.0))
    assert found.step_ms == pytest.approx(40 + 80 + 10 + 2 + 1e3 * communication)
    assert found.grad_hidden == 0.0


def test_with_full_overlap_only_the_last_two_buckets_are_left_after_backward():
    # first come first served: the sums below follow its order
    # a backward so long that every bucket but the last two is done when it ends: block 0's gradients are final
    # only after its backward, and the encoder's (wte, wpe) when backward ends. They still move while AdamW runs
    # on the buckets before the encoder's (10 ms for all parameters, by size): the link is busy all along.
    buckets = gradient_buckets(D2)
    total = sum(b.size for b in buckets)
    updates_before = 10.0 * sum(b.size for b in buckets[:-1]) / total
    left = 1e3 * sum(2 * ALPHA + 4 * b.size * BETA for b in buckets[-2:]) - updates_before
    found = predict_step(profile(backward_ms=1e6), Target("allreduce", cluster(2), overlap=1.0, link_order="fifo"))
    assert found.step_ms - (40 + 1e6 + 10 + 2) == pytest.approx(left)
    assert found.grad_hidden == pytest.approx(1 - (buckets[-1].size + buckets[-2].size) / total)


def test_a_collectives_next_round_queues_behind_what_started_while_its_round_before_moved():
    # a reduce of two 1 s rounds from t = 0 and a one-round broadcast of 1 s from t = 0.5: the broadcast is queued
    # before the reduce's second round exists, so it goes first (by whole collectives it would go last: 2, then 3)
    link = _Link()
    reduce = link.start("MPI_Ireduce", 2.0, 0.0, shares=[0.5, 0.5])
    bcast = link.start("MPI_Ibcast", 1.0, 0.5)
    assert link.wait(reduce, 0.0) == pytest.approx(3.0)
    assert bcast.seconds == 0.0
    # while computing at half the rate from 0 to 1: half of the first round; the second waits for the first
    link = _Link()
    reduce = link.start("MPI_Ireduce", 2.0, 0.0, shares=[0.5, 0.5])
    link.advance(0.0, 1.0, 0.5)
    assert reduce.seconds == pytest.approx(1.5)
    assert link.wait(reduce, 1.0) == pytest.approx(2.5)


def test_batches_complete_together_and_what_starts_after_the_handshake_waits_for_the_next_batch():
    # rendezvous over TCP: a 2 s and a 1 s collective started 5 ms apart share the link and both complete at 3 s
    # (first come first served: 2 and 3 s); one started at 0.5 s, after the handshake, goes once they are through
    link = _BatchedLink()
    first = link.start("MPI_Ireduce_scatter", 2.0, 0.0)
    second = link.start("MPI_Ireduce_scatter", 1.0, 0.005)
    link.advance(0.0, 0.5, 1.0)
    third = link.start("MPI_Iallgatherv", 1.0, 0.5)
    link.advance(0.5, 2.5, 1.0)  # 2.5 s moved of the first batch's 3: nothing is complete yet
    assert (first.seconds, second.seconds, third.seconds) == (pytest.approx(0.5 * 2 / 3), pytest.approx(0.5 / 3), 1.0)
    assert link.wait(first, 2.5) == pytest.approx(3.0) and second.seconds == 0.0
    assert link.wait(third, 3.0) == pytest.approx(4.0)
    # a collective's next round joins the next batch: two rounds of 1 s beside a one-round 1 s collective
    link = _BatchedLink()
    two_rounds = link.start("MPI_Iallreduce", 2.0, 0.0, shares=[0.5, 0.5])
    one_round = link.start("MPI_Iallreduce", 1.0, 0.0)
    assert link.wait(one_round, 0.0) == pytest.approx(2.0)
    assert two_rounds.seconds == pytest.approx(1.0) and link.wait(two_rounds, 2.0) == pytest.approx(3.0)
    fifo = _Link()
    first, second = fifo.start("MPI_Ireduce_scatter", 2.0, 0.0), fifo.start("MPI_Ireduce_scatter", 1.0, 0.005)
    assert fifo.wait(first, 0.0) == pytest.approx(2.0) and fifo.wait(second, 2.0) == pytest.approx(3.0)


def test_round_shares_follow_the_schedule():
    # 2 ranks: a large reduce is a reduce-scatter (n/2 each way) and a gather (n/2): alpha + n/2 beta each;
    # the broadcast is binomial below 8 ranks: one round
    assert round_shares("MPI_Ireduce", N, cluster(2)) == pytest.approx([0.5, 0.5])
    assert round_shares("MPI_Ibcast", N, cluster(2)) == [1.0]
    # ring allgather on 3 ranks: 2 rounds of n/3
    assert round_shares("MPI_Iallgatherv", N, cluster(3)) == pytest.approx([0.5, 0.5])


def test_zero1_updates_half_on_each_of_two_ranks():
    found = predict_step(profile(), Target("zero1", cluster(2), overlap=0.0))
    assert found.components["update"] == pytest.approx(10.0 / 2, rel=1e-3)
    server = predict_step(profile(), Target("server", cluster(2), overlap=0.0))
    assert server.components["update"] == pytest.approx(10.0)


def test_buckets_become_ready_in_backward_order():
    ready = backward_ready(D2)
    assert len(ready) == D2.num_layers + 2 and ready[-1] == 1.0
    assert all(a < b for a, b in itertools.pairwise(ready[:-1]))  # the encoder's backward adds no time to speak of


# ------------------------------------------------------------------ the network's CPU cost, by hand
def cpu_cluster(cores=None, gbs=0.5):
    return Cluster(2, Link("cpu", 8.0, 40.0, cpu_gbs=gbs), reduce_gbytes_s=FREE_SUMS, cores_per_node=cores)


def test_bytes_moved_while_computing_stretch_compute_by_bytes_over_the_rate():
    # a backward and an AdamW so long that every bucket moves while the rank computes (the last two during the
    # update), no waits: the step grows by rank 0's bytes sent + received / rate. Allreduce on 2 ranks sends n
    # and receives n per rank (Rabenseifner: n/2 each way twice; recursive doubling: n each way once)
    long = ComputeProfile(D2, 4, 64, forward_ms=40.0, backward_ms=1e6, update_ms=1e6, other_ms=2.0, call_us=0.0)
    free = predict_step(long, Target("allreduce", cluster(2), overlap=1.0))
    charged = predict_step(long, Target("allreduce", cpu_cluster(), overlap=1.0))
    assert free.components["wait"] == 0.0 and charged.components["wait"] == 0.0
    nbytes = 2 * 4 * sum(b.size for b in gradient_buckets(D2))
    assert charged.network_cpu_ms == pytest.approx(1e3 * nbytes / 0.5e9, rel=1e-6)
    assert charged.step_ms == pytest.approx(free.step_ms + 1e3 * nbytes / 0.5e9, rel=1e-6)
    assert charged.components["compute"] + charged.components["update"] == pytest.approx(
        free.components["compute"] + free.components["update"] + charged.network_cpu_ms, rel=1e-6)


def test_no_network_cpu_cost_with_a_spare_core_or_for_bytes_moved_during_waits():
    long = profile(backward_ms=1e6)
    free = predict_step(long, Target("allreduce", cluster(2), overlap=1.0)).step_ms
    assert predict_step(long, Target("allreduce", cpu_cluster(cores=2), overlap=1.0)).step_ms == pytest.approx(free)
    assert predict_step(long, Target("allreduce", cpu_cluster(cores=1), overlap=1.0)).step_ms > free
    # overlap 0: every byte moves while the rank waits, which costs nothing (a CPU rate of 4 GB/s sent + received
    # is above the link's 2: 8 Gbit/s each way)
    waits = predict_step(profile(), Target("allreduce", cluster(2), overlap=0.0))
    charged = predict_step(profile(), Target("allreduce", cpu_cluster(cores=1, gbs=4.0), overlap=0.0))
    assert charged.step_ms == pytest.approx(waits.step_ms) and charged.network_cpu_ms == 0.0
    with pytest.raises(ValueError, match="network_cpu_gbs"):
        Link("x", 1.0, 1.0, cpu_gbs=0.0)


def test_the_link_moves_no_more_than_the_cores_cpu_rate_allows_and_its_share_of_it_while_computing():
    # a job of 2 s at the link's full rate moving 4 GB sent + received (2 GB per second of link) on a core that
    # moves 1 GB/s: waited for, it takes 4 s; while the rank computes with its network on a quarter of the core,
    # 0.25 GB/s, the link moves 1/8 of its rate (an overlap of 1 allows more)
    link = _Link(cpu_bytes_s=1e9)
    job = link.start("MPI_Iallreduce", 2.0, 0.0, nbytes=4e9)
    moved, busy = link.advance(0.0, 1.0, 1.0, share=0.25)
    assert (moved, busy, job.seconds) == (pytest.approx(0.25e9), pytest.approx(1.0), pytest.approx(2.0 - 0.125))
    assert link.wait(job, 1.0) == pytest.approx(1.0 + (2.0 - 0.125) * 2)
    # without a share (no progress thread measured) or without a CPU rate, only the link and the overlap bound it
    unbounded = _Link()
    job = unbounded.start("MPI_Iallreduce", 2.0, 0.0, nbytes=4e9)
    assert unbounded.advance(0.0, 1.0, 0.5, share=0.25) == (pytest.approx(1e9), pytest.approx(1.0))
    assert unbounded.wait(job, 1.0) == pytest.approx(2.5)
    # a batch is bounded by its mix: 1 s moving 4 GB/s of link beside 1 s moving none is 2 GB/s, twice the CPU's
    # rate, so its 2 s of link take 4 s (2 s unbounded)
    batched = _BatchedLink(cpu_bytes_s=1e9)
    first = batched.start("MPI_Iallreduce", 1.0, 0.0, nbytes=4e9)
    batched.start("MPI_Iallreduce", 1.0, 0.0, nbytes=0.0)
    assert batched.wait(first, 0.0) == pytest.approx(4.0)


def test_the_progress_threads_tests_take_their_share_of_the_core_while_data_moves():
    # every bucket moves while the rank computes (a backward and an AdamW of 1e6 ms): the link is busy for the sum
    # of the buckets' times alone, and all that time the tests take `share` of the core, so compute loses
    # share x that. With a spare core, or with nothing in flight, they cost nothing.
    share = 0.2
    long = ComputeProfile(D2, 4, 64, forward_ms=40.0, backward_ms=1e6, update_ms=1e6, other_ms=2.0, call_us=0.0)
    busy = sum((2 if max(s.size for s in b.segments) * 4 > 2048 else 1) * ALPHA + 4 * b.size * BETA
               for b in gradient_buckets(D2))
    polled = Cluster(2, Link("cpu", 8.0, 40.0, poll_share=share), reduce_gbytes_s=FREE_SUMS)
    free = predict_step(long, Target("allreduce", cluster(2), overlap=1.0))
    charged = predict_step(long, Target("allreduce", polled, overlap=1.0))
    assert charged.components["wait"] == 0.0
    assert charged.step_ms == pytest.approx(free.step_ms + 1e3 * share * busy, rel=1e-6)
    spare = replace(polled, cores_per_node=2)
    assert predict_step(long, Target("allreduce", spare, overlap=1.0)).step_ms == pytest.approx(free.step_ms)
    one_rank = predict_step(long, Target("allreduce", replace(polled, ranks=1), overlap=1.0))
    assert one_rank.step_ms == pytest.approx(40.0 + 1e6 + 1e6 + 2.0)
    with pytest.raises(ValueError, match="network_poll_share"):
        Link("x", 1.0, 1.0, poll_share=1.0)


# ------------------------------------------------------------------ real runs
needs_mpi = pytest.mark.skipif(not MPIEXEC.exists() or available_cores() < 2,
                               reason=f"needs {MPIEXEC} (pip install mpich) and 2 cores for 2 ranks")
TRAIN = ["--model", "tiny", "-T", "16", "-B", "2", "--steps", "4", "--val-every", "0", "--sample-every", "0",
         "--no-progress", "--output", "", "--train-data", "tiny_train.bin", "--no-shuffle"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 1-process run and a 2-rank zero1 run (with its trace in the same folder) of the tiny model."""
    work = tmp_path_factory.mktemp("predict")
    write_shard(work / "tiny_train.bin", (np.arange(8000) % 97).astype(np.uint16))
    train = [sys.executable, "-m", "llmpy", "train", *TRAIN]
    subprocess.run([*train, "--mode", "sequential", "--metrics-dir", "one"], cwd=work, check=True,
                   capture_output=True, timeout=120)
    if MPIEXEC.exists() and available_cores() >= 2:
        subprocess.run([str(MPIEXEC), "-n", "2", *train, "--mode", "mpi", "--threads", "1", "--strategy", "zero1",
                        "--metrics-dir", "two", "--trace", "two"], cwd=work, check=True, capture_output=True,
                       timeout=120)
    return work


def _step(step, ms, forward, backward, update):
    return {"step": step, "ms": ms, "forward_ms": forward, "zero_grad_ms": 0.0, "backward_ms": backward,
            "update_ms": update}


def test_the_profile_of_a_run_is_its_median_step_not_moved_by_one_slow_step():
    # the namespace hosts' reference of 2026-12-03: a warm-up, then three ordinary steps and one slowed by the machine
    steps = [_step(1, 11942, 3219, 5600, 3123), _step(2, 2557, 860, 1594, 103), _step(3, 2815, 797, 1861, 157),
             _step(4, 3658, 1107, 2427, 123), _step(5, 2575, 860, 1592, 123)]
    phases = median_step_phases(steps, warmup_steps=1)
    # the two middle steps by time are 2575 and 2815 ms: their mean, phase by phase
    assert phases == pytest.approx({"step": 2695.0, "forward": 828.5, "zero_grad": 0.0, "backward": 1726.5,
                                    "update": 140.0})
    odd = median_step_phases(steps[:4], warmup_steps=1)  # 2557, 2815, 3658: the middle one
    assert odd == pytest.approx({"step": 2815.0, "forward": 797.0, "zero_grad": 0.0, "backward": 1861.0,
                                 "update": 157.0})
    assert median_step_phases(steps[:1], warmup_steps=1) == {}


def predict(args, capsys):
    code = main(["predict", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_run_predicts_its_own_step(runs, capsys):
    measured = json.loads((runs / "one" / "metrics.json").read_text())["summary"]["phases_ms"]["step"]
    code, _, _ = predict([runs / "one", "--output", runs / "p" / "prediction.json"], capsys)
    assert code == 0
    document = json.loads((runs / "p" / "prediction.json").read_text())
    assert document["step_ms"] == pytest.approx(measured, rel=0.2)
    assert set(document) >= {"target", "step_ms", "measured_step_ms", "components"}
    assert all(set(c) == {"name", "predicted_ms", "measured_ms"} for c in document["components"])


@needs_mpi
def test_validate_prints_every_component_against_the_measured_run(runs, capsys):
    code, out, err = predict([runs / "one", "--link", "shm", "--validate", runs / "two", "--overlap", "measured",
                              "--output", runs / "v" / "prediction.json"], capsys)
    assert code == 0, err
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    for name in ("compute", "update", "MPI_Ireduce_scatter (gradients)", "MPI_Iallgatherv (parameters)", "wait",
                 "communication", "other", "step"):
        assert name in lines, out
        assert lines[name].rstrip().split()[-1].endswith("%") or "on the link" in lines[name], lines[name]
    document = json.loads((runs / "v" / "prediction.json").read_text())
    assert document["target"]["ranks"] == 2 and document["target"]["strategy"] == "zero1"
    assert document["measured_step_ms"] == pytest.approx(  # the run's median step, as the prediction's
        json.loads((runs / "two" / "metrics.json").read_text())["summary"]["ms_per_step_median"])
    by_name = {c["name"]: c for c in document["components"]}
    assert by_name["MPI_Ireduce_scatter (gradients)"]["measured_ms"] is not None  # from the trace's waits


def test_sweep_prints_the_best_strategy_per_host_count(runs, capsys):
    code, out, _ = predict([runs / "one", "--model", "d12", "--sweep-nodes", "2,4", "--links", "1gbe,ib100",
                            "--link", "1gbe"], capsys)
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.startswith(("1gbe ", "ib100 "))]
    assert [(r[0], r[1]) for r in rows] == [("1gbe", "2"), ("1gbe", "4"), ("ib100", "2"), ("ib100", "4")]
    assert all(r[-1] in ("allreduce", "zero1", "server", "owners") for r in rows)


@pytest.mark.parametrize("args, flag", [
    (["--link", "nope", "--ranks", "2"], "--link"),
    (["--bandwidth", "0", "--ranks", "2"], "--bandwidth"),
    (["--ranks", "4", "--ranks-per-node", "3", "--link", "1gbe"], "--ranks-per-node"),
    (["--ranks", "2"], "--link"),
    (["--overlap", "2"], "--overlap"),
    (["--sweep-nodes", "2,x"], "--sweep-nodes"),
    (["--strategy", "ring"], "--strategy"),
    (["--model", "d99"], "--model"),
    (["--link", "veth", "--ranks", "2", "--network-cpu-gbs", "0"], "--network-cpu-gbs"),
    (["--bandwidth", "1", "--ranks", "2", "--network-cpu-gbs", "nan"], "--network-cpu-gbs"),
    (["--link", "veth", "--ranks", "2", "--cores-per-node", "0"], "--cores-per-node"),
])
def test_bad_options_are_refused_in_one_line(runs, capsys, args, flag):
    code, _, err = predict([runs / "one", *args], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"llmpy predict: error: {flag}"), err


def test_a_folder_without_metrics_is_named(tmp_path, capsys):
    code, _, err = predict([tmp_path], capsys)
    assert code == 2 and str(tmp_path) in err and len(err.strip().splitlines()) == 1
    (tmp_path / "metrics.json").write_text("{")
    code, _, err = predict([tmp_path], capsys)
    assert code == 2 and "metrics.json" in err and len(err.strip().splitlines()) == 1
    os.remove(tmp_path / "metrics.json")


# ------------------------------------------------------------------ the validation's references
def test_a_reference_far_from_the_ones_before_it_is_measured_again_once(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import predict_validation

    steps = iter([2300.0, 3300.0, 2350.0, 3400.0, 3500.0])  # the second is a slow minute; so are the last two

    def reference_run(hosts, args, work, name):
        folder = work / f"{name}0"
        folder.mkdir(exist_ok=True)
        step = next(steps)
        (folder / "metrics.json").write_text(json.dumps({"summary": {"phases_ms": {"forward": step / 3,
                                                                                   "step": step}}}))
        return folder

    monkeypatch.setattr(predict_validation, "reference_run", reference_run)
    earlier: list = []
    predict_validation.steady_reference(None, None, tmp_path, "allreduce", earlier)
    assert earlier == [2300.0]
    predict_validation.steady_reference(None, None, tmp_path, "zero1", earlier)
    assert earlier == [2300.0, 2350.0]  # 3300 is 43% off 2300: run again, the second kept
    assert "zero1: step 3300.0 ms is more than 15% off the median of the references before it (2300.0 ms)" \
        in capsys.readouterr().out
    predict_validation.steady_reference(None, None, tmp_path, "server", earlier)
    assert earlier == [2300.0, 2350.0, 3500.0]  # measured again once only: the second is kept whatever it is
