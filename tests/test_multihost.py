"""Ranks on hosts that are really separate: network namespaces joined by (shaped) veth links, one mpiexec across
them, the gradients over TCP (tests/netns_hosts.py). Root only; skipped with the reason otherwise.

The reference is test_distributed's: one sequential process with batch 2B. The veth byte counters prove that
the gradients crossed the link: every host sends at least the bytes of one gradient per step (a lower bound
from the model's size, whatever the strategy: each rank's gradient must leave its host to be summed)."""

import json
import sys

import numpy as np
import pytest

import netns_hosts
from llmpy.core.config import PRESETS
from llmpy.io.formats import read_model
from test_cli import train_losses
from test_distributed import B, COMMON, PLAIN, STEPS, STRATEGIES, data_dir, llmpy_train  # noqa: F401 (fixture)

REASON = netns_hosts.skip_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"multi-host harness: {REASON}")
GRADIENT_BYTES = 4 * PRESETS["tiny"].num_parameters()
TIMEOUT = 120
EXPECTED_CALLS = {"allreduce": ["MPI_Iallreduce"], "zero1": ["MPI_Ireduce_scatter", "MPI_Iallgatherv"],
                  "server": ["MPI_Ireduce", "MPI_Ibcast"], "owners": ["MPI_Ireduce", "MPI_Ibcast"]}


@pytest.fixture(scope="module")
def hosts():
    with netns_hosts.NetnsHosts(2) as made:
        yield made
    assert not [n for n in netns_hosts._namespaces() if n.startswith(netns_hosts.PREFIX)], "namespaces left"


@pytest.fixture(scope="module")
def reference(data_dir):  # noqa: F811
    result = llmpy_train([*COMMON, *PLAIN, "--mode", "sequential", "-B", 2 * B, "--output", "ref2b/model.bin",
                          "--metrics-dir", "ref2b"], data_dir)
    return train_losses(result.stdout), read_model(data_dir / "ref2b" / "model.bin")[1]


def train_on_hosts(hosts, args, cwd, env=None, check=True):
    """`llmpy train` as one rank per namespace host (1 thread each: the hosts share this machine's cores)."""
    command = [sys.executable, "-m", "llmpy", "train", *COMMON, *args, "--mode", "mpi", "--threads", "1"]
    result, sent = hosts.mpiexec(1, command, TIMEOUT, cwd=cwd, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result, sent


def test_the_harness_moves_bytes_over_the_veth_link_only_when_tcp_is_forced(hosts, tmp_path):
    probe = tmp_path / "allreduce.py"
    probe.write_text("from mpi4py import MPI\nimport numpy as np\na = np.ones(1 << 20, dtype=np.float32)\n"
                     "MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, a)\nassert a[0] == 2\n")
    forced, sent_tcp = hosts.mpiexec(1, [sys.executable, probe], TIMEOUT)
    unforced, sent_default = hosts.mpiexec(1, [sys.executable, probe], TIMEOUT, network={})
    assert forced.returncode == 0 and unforced.returncode == 0, forced.stderr + unforced.stderr
    assert min(sent_tcp) >= 4 << 20  # each host sent its 4 MiB
    assert max(sent_default) < 1 << 20  # UCX left alone: shared memory, only the bootstrap crossed the link


def best_gbit(hosts, tries: int = 3) -> float:
    """The fastest of a few 64 MiB sends: a pause of the sender (2 cores, a busy host) only ever slows one."""
    return max(8 * (64 << 20) / netns_hosts.send_bytes(hosts, 64 << 20) / 1e9 for _ in range(tries))


@pytest.mark.parametrize("rate, expected_gbit", [("1gbit", 1.0), ("2gbit", 2.0)])
def test_tbf_shapes_the_link(hosts, rate, expected_gbit):
    unshaped = best_gbit(hosts)
    if unshaped < 1.2 * expected_gbit:
        pytest.skip(f"TCP over veth moves only {unshaped:.2f} Gbit/s unshaped here: a {rate} cap would not show")
    hosts.shape(rate)
    try:
        achieved = best_gbit(hosts)
    finally:
        hosts.shape(None)
    assert 0.75 * expected_gbit < achieved < 1.05 * expected_gbit, (achieved, unshaped)


@pytest.mark.parametrize("strategy, rate", [("allreduce", "1gbit"), ("zero1", "2gbit"), ("server", "1gbit"),
                                            ("owners", "2gbit")])
def test_two_hosts_over_shaped_tcp_match_one_process_with_twice_the_batch(strategy, rate, hosts, data_dir, reference):  # noqa: F811
    hosts.shape(rate)
    try:
        out = f"hosts-{strategy}"
        result, sent = train_on_hosts(hosts, [*PLAIN, "--strategy", strategy, "-B", B, "--output",
                                              f"{out}/model.bin", "--metrics-dir", out], data_dir)
    finally:
        hosts.shape(None)
    losses, params = train_losses(result.stdout), read_model(data_dir / out / "model.bin")[1]
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    np.testing.assert_allclose(params, reference[1], rtol=0, atol=1e-4)
    assert min(sent) >= STEPS * GRADIENT_BYTES, (sent, STEPS * GRADIENT_BYTES)
    # The per-rank table's network bytes (what the collectives must move at least) against the veth counters:
    # the link carried them plus TCP/IP headers and acknowledgements and the small messages outside the strategy
    # (setup, loss averages), never less. MPICH's reduce on 2 ranks is a reduce-scatter and a gather, so the root
    # also sends half of each large buffer: up to 1.5x the minimum there.
    per_rank = json.loads((data_dir / out / "metrics.json").read_text())["summary"]["per_rank"]
    gbit = float(rate[0])
    for row, on_link in zip(per_rank, sent):
        counted = STEPS * row["sent_bytes"]
        slack = 1.65 if strategy in ("server", "owners") and row["rank"] == 0 else 1.15
        assert counted <= on_link <= slack * counted, (strategy, row["rank"], counted, on_link)
        assert 0 < row["sent_gbits"] <= 1.1 * gbit  # what the shaped link can carry
        assert set(row["bytes_by_call"]) == set(EXPECTED_CALLS[strategy])
    # each rank names its own host and the transport its MPI was told to use
    for rank, host in enumerate(hosts.hosts):
        assert f"rank {rank}: host {host.hostname}, " in result.stdout
    assert result.stdout.count("UCX_TLS=tcp,self") == 2


def test_communication_tasks_inside_ranks_over_shaped_tcp_match_one_process(hosts, data_dir, reference):  # noqa: F811
    hosts.shape("1gbit")
    try:
        result, sent = train_on_hosts(hosts, [*PLAIN, "--strategy", "zero1", "--rank-mode", "tasks", "--block-tokens",
                                              "8", "-B", B, "--output", "tasks/model.bin", "--metrics-dir", "tasks"],
                                      data_dir)
    finally:
        hosts.shape(None)
    np.testing.assert_allclose(train_losses(result.stdout), reference[0], rtol=1e-5)
    np.testing.assert_allclose(read_model(data_dir / "tasks" / "model.bin")[1], reference[1], rtol=0, atol=1e-4)
    assert min(sent) >= STEPS * GRADIENT_BYTES
    per_rank = json.loads((data_dir / "tasks" / "metrics.json").read_text())["summary"]["per_rank"]
    assert all("MPI_Istart_bucket" in r["communication_by_call_ms"] for r in per_rank)
