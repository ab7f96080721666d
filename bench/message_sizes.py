"""How fast MPI moves collectives of each message size between two namespace hosts when they are waited for as
llmpy waits (MPI_Testall, sleeping up to 0.1 ms between tests: llmpy.execution.mpi.watchdog); root only.

    sudo .venv/bin/python bench/message_sizes.py [--rate unshaped] [--repeats 5] [--json FILE]
    sudo UCX_RNDV_THRESH=auto .venv/bin/python bench/message_sizes.py     (UCX's own threshold, not llmpy's)

For each pattern and piece size, 8 collectives of one piece each are posted at once and waited for; the table
gives the median ms (after one warm-up) and the Gbit/s of the bytes each rank sends per direction:
- `allreduce`: Iallreduce (2 ranks: half of a piece out in its reduce-scatter, half in its allgather);
- `reduce`: Ireduce, roots alternating (owners' gradients; MPICH's reduce-scatter + gather: 3/4 of a piece);
- `bcast`: Ibcast, roots alternating (owners' parameters: half of the pieces out);
- `p2p`: each rank Isends half of each piece to the other.
UCX over TCP sends a message below its rendezvous threshold eagerly, in fragments that each test pushes a few of,
so those move at a rate set by the tests, not the link; above it the kernel takes the whole buffer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multihost  # noqa: E402

PIECES_KIB = (256, 512, 1024, 2048, 3072, 4096, 6144, 8192, 16384)
IN_FLIGHT = 8
SENT_SHARE = {"allreduce": 1.0, "reduce": 0.75, "bcast": 0.5, "p2p": 0.5}  # of a piece, per rank and direction


def _post(MPI, comm, pattern: str, parts: list) -> list:
    rank, peer = comm.rank, 1 - comm.rank
    if pattern == "allreduce":
        return [comm.Iallreduce(MPI.IN_PLACE, p, MPI.SUM) for p in parts]
    if pattern == "reduce":
        return [comm.Ireduce(MPI.IN_PLACE if rank == i % 2 else p, p if rank == i % 2 else None, MPI.SUM, i % 2)
                for i, p in enumerate(parts)]
    if pattern == "bcast":
        return [comm.Ibcast(p, i % 2) for i, p in enumerate(parts)]
    half = len(parts[0]) // 2
    return ([comm.Isend(p[:half], peer, i) for i, p in enumerate(parts)]
            + [comm.Irecv(p[half:], peer, i) for i, p in enumerate(parts)])


def worker(repeats: int, out: Path) -> None:
    """Run by mpiexec on the two hosts; rank 0 writes {pattern: {KiB: median seconds}} to `out`."""
    import numpy as np

    from llmpy.execution.mpi.transport import apply_network_defaults
    from llmpy.execution.mpi.watchdog import Watchdog

    apply_network_defaults()  # what `llmpy train --mode mpi` sets before MPI_Init
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    watchdog = Watchdog(comm.rank, [0, 0], ["", ""], 600.0)
    found: dict = {}
    for pattern in SENT_SHARE:
        for kib in PIECES_KIB:
            parts = [np.ones(kib * 256, np.float32) for _ in range(IN_FLIGHT)]
            times = []
            for _ in range(repeats + 1):
                comm.Barrier()
                start = time.perf_counter()
                watchdog.wait_all(MPI, _post(MPI, comm, pattern, parts), "the message-size probe")
                times.append(time.perf_counter() - start)
            found.setdefault(pattern, {})[kib] = statistics.median(times[1:])
    if comm.rank == 0:
        out.write_text(json.dumps(found))


def format_table(found: dict) -> str:
    header = f"{'piece':>9s}" + "".join(f"{p:>17s}" for p in found)
    lines = [header, f"{'':9s}" + "".join(f"{'ms  Gbit/s':>17s}" for _ in found)]
    for kib in PIECES_KIB:
        row = f"{kib / 1024:7.2f}Mi"
        for pattern, times in found.items():
            seconds = times[str(kib)]
            gbit = 8 * IN_FLIGHT * kib * 1024 * SENT_SHARE[pattern] / seconds / 1e9
            row += f"{1e3 * seconds:11.1f} {gbit:5.1f}"
        lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    multihost.add_probe_arguments(parser, rate="unshaped", repeats=5, saved="medians")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.repeats, Path(args.worker))
    found = multihost.run_probe(__file__, parser, args, "the message-size probe")
    print(f"{IN_FLIGHT} collectives in flight, waited for as llmpy waits; link {args.rate}; median of {args.repeats}")
    print(format_table(found))
    if args.json:
        Path(args.json).write_text(json.dumps({"rate": args.rate, "seconds": found}, indent=1))


if __name__ == "__main__":
    main()
