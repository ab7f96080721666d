"""Does getrusage see all the CPU that moving data over TCP costs? The ranks' own CPU against the machine's.

    sudo .venv/bin/python bench/network_cpu.py --rates unshaped,1gbit

2 ranks on 2 namespace hosts (tests/netns_hosts.py, TCP forced), each a rank of this script run with --worker:
8 Iallreduces of 2 MiB in flight, waited for as llmpy's strategies wait (the watchdog's polled waits), 20 times.
Each rank's user + system CPU (getrusage) is set against the machine's CPU over the same loop: user, system,
irq and softirq from /proc/stat. The kernel's TCP work that runs in softirq context outside the ranks' system
calls is in the second figure only. The two host namespaces share this machine, so its figures cover both ranks
and nothing else should run meanwhile. llmpy.predict's network CPU calibration charges the ranks' rusage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

PARTS, PART_BYTES, REPS = 8, 2 << 20, 20


def machine_cpu_s() -> dict[str, float]:
    """Seconds of the machine's CPU by kind since boot (/proc/stat's first line)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return {"user": (fields[0] + fields[1]) / tick, "system": fields[2] / tick, "irq": fields[5] / tick,
            "softirq": fields[6] / tick}


def worker() -> None:
    import numpy as np

    from llmpy.execution.mpi.transport import apply_network_defaults
    from llmpy.execution.mpi.watchdog import Watchdog

    apply_network_defaults()  # as `llmpy train --mode mpi` sets UCX up before MPI_Init
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    watchdog = Watchdog(comm.rank, [0] * comm.size, [""] * comm.size, 600.0)
    parts = np.array_split(np.ones(PARTS * PART_BYTES // 4, np.float32), PARTS)

    def round_trip() -> None:
        watchdog.wait_all(MPI, [comm.Iallreduce(MPI.IN_PLACE, p, MPI.SUM) for p in parts], "allreduce")

    round_trip()  # connections and buffers
    comm.Barrier()
    machine0, rank0, wall0 = machine_cpu_s(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(REPS):
        round_trip()
    comm.Barrier()
    machine1, rank1, wall1 = machine_cpu_s(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    mine = (rank1.ru_utime - rank0.ru_utime) + (rank1.ru_stime - rank0.ru_stime)
    ranks = comm.gather(mine, root=0)
    if comm.rank == 0:
        machine = {kind: machine1[kind] - machine0[kind] for kind in machine0}
        print(json.dumps({"wall_s": wall1 - wall0, "ranks_cpu_s": ranks, "machine_cpu_s": machine}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="unshaped,1gbit", help="link rates: unshaped or tc rates (1gbit, ...)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker()
        return 0
    import netns_hosts

    reason = netns_hosts.skip_reason()
    if reason:
        print(f"network_cpu: cannot run: {reason}", file=sys.stderr)
        return 1
    print(f"{'link':>9s} {'wall s':>7s} {'ranks CPU s':>12s} {'machine CPU s':>14s} {'softirq s':>10s} "
          f"{'ranks / machine':>16s}")
    with netns_hosts.NetnsHosts(2) as hosts:
        for rate in (r.strip() for r in args.rates.split(",") if r.strip()):
            hosts.shape(None if rate == "unshaped" else rate)
            result, _ = hosts.mpiexec(1, [sys.executable, str(Path(__file__).resolve()), "--worker"], 600,
                                      cwd="/tmp", env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
            if result.returncode != 0:
                print(f"network_cpu: the {rate} run exited {result.returncode}: {result.stderr[-500:]}",
                      file=sys.stderr)
                return 1
            row = json.loads(result.stdout.strip().splitlines()[-1])
            ranks, machine = sum(row["ranks_cpu_s"]), sum(row["machine_cpu_s"].values())
            print(f"{rate:>9s} {row['wall_s']:7.2f} {ranks:12.2f} {machine:14.2f} "
                  f"{row['machine_cpu_s']['softirq']:10.2f} {ranks / machine:16.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
