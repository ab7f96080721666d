"""In what order MPI completes messages and collectives posted in a known order between two namespace hosts
(bench/multihost.py's hosts, TCP forced; root only): the link discipline llmpy.predict.step assumes.

    sudo .venv/bin/python bench/completion_order.py [--rate 2gbit] [--repeats 3] [--json FILE]
    sudo UCX_RNDV_THRESH=inf .venv/bin/python bench/completion_order.py ...   (UCX's eager protocol only)

UCX is set up as `llmpy train --mode mpi` sets it (UCX_RNDV_THRESH=64k where unset: llmpy.execution.mpi.transport);
the tables of 2026-12-03 in bench/README.md were measured before llmpy set it, with UCX's own threshold (~4 MiB).

Each pattern posts, at one moment, the groups of zero1's update in its order: a d12 block's 12 slices (A), the
encoder's wte (one slice), then six more blocks (B0..B5), each slice one request. Rank 0 polls every request
(MPI_Testsome, sleeping 0.1 ms between tests, as llmpy's progress thread does) and notes when each group has
completed, in ms from the post:
- `p2p-one-way`: rank 1 sends half of each slice to rank 0, which has posted the receives;
- `p2p-both-ways`: each rank sends half of each slice to the other at once;
- `reduce-scatter`: Ireduce_scatter of every slice (zero1's gradients);
- `reduce-scatter-then-allgather`: A and wte reduce-scattered, the blocks allgathered on a second communicator.
First come first served, A completes first and each block about 14 MB / the link's rate after the one before;
when a pattern's groups complete together, the first-posted waits for everything posted with it.
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

from llmpy.core.config import PRESETS  # noqa: E402
from llmpy.execution.mpi.strategies import gradient_buckets  # noqa: E402

_BUCKETS = gradient_buckets(PRESETS["d12"])  # the final layernorm, the blocks from the last, the encoder
BLOCK = tuple(segment.size for segment in _BUCKETS[1].segments)
WTE = max(segment.size for segment in _BUCKETS[-1].segments)
GROUPS = [("A", BLOCK), ("wte", (WTE,))] + [(f"B{i}", BLOCK) for i in range(6)]
PATTERNS = ("p2p-one-way", "p2p-both-ways", "reduce-scatter", "reduce-scatter-then-allgather")


def _post(MPI, comms, pattern: str, group: int, n: int, tag: int, keep: list) -> list:
    """The requests of one slice of n floats in `pattern` (its buffers appended to `keep`)."""
    import numpy as np

    comm, rank = comms[0], comms[0].rank
    halves = [n - n // 2, n // 2]
    if pattern.startswith("p2p"):
        send, receive = np.ones(n // 2, np.float32), np.empty(n // 2, np.float32)
        keep += [send, receive]
        if pattern == "p2p-one-way":
            return [comm.Irecv(receive, 1, tag) if rank == 0 else comm.Isend(send, 0, tag)]
        return [comm.Isend(send, 1 - rank, tag), comm.Irecv(receive, 1 - rank, tag)]
    data = np.ones(n, np.float32)
    keep.append(data)
    if pattern == "reduce-scatter" or group < 2:
        shard = np.empty(halves[rank], np.float32)
        keep.append(shard)
        return [comm.Ireduce_scatter(data, shard, halves, MPI.SUM)]
    return [comms[1].Iallgatherv(MPI.IN_PLACE, [data, (halves, [0, halves[0]]), MPI.FLOAT])]


def _completions(MPI, comms, pattern: str) -> dict:
    """ms from the post until each group's requests have all completed (rank 0's view)."""
    keep, requests, owners = [], [], []
    comms[0].Barrier()
    start = time.perf_counter()
    for g, (name, sizes) in enumerate(GROUPS):
        for j, n in enumerate(sizes):
            posted = _post(MPI, comms, pattern, g, n, 100 * g + j, keep)
            requests += posted
            owners += [name] * len(posted)
    done: dict = {}
    pending = set(range(len(requests)))
    while pending:
        for index in MPI.Request.Testsome(requests) or []:
            if index in pending:
                pending.discard(index)
                done[owners[index]] = time.perf_counter() - start
        time.sleep(1e-4)
    return {name: round(1e3 * done[name]) for name, _ in GROUPS}


def worker(repeats: int, out: Path) -> None:
    """Run by mpiexec on the two hosts; rank 0 writes every pattern's completions to `out`, a dict per repeat."""
    from llmpy.execution.mpi.transport import apply_network_defaults

    apply_network_defaults()  # as `llmpy train --mode mpi` sets UCX up before MPI_Init
    from mpi4py import MPI

    comms = [MPI.COMM_WORLD, MPI.COMM_WORLD.Dup()]
    found = {pattern: [_completions(MPI, comms, pattern) for _ in range(repeats)] for pattern in PATTERNS}
    if comms[0].rank == 0:
        out.write_text(json.dumps(found))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    multihost.add_probe_arguments(parser, rate="2gbit", repeats=3, saved="completions")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.repeats, Path(args.worker))
    found = multihost.run_probe(__file__, parser, args, "the completion-order probe")
    names = [name for name, _ in GROUPS]
    print(f"ms from the post until each group completed, rank 0, link {args.rate} (median of {args.repeats}; "
          f"every repeat in brackets)")
    print(f"{'pattern':31s}" + "".join(f"{n:>8s}" for n in names))
    for pattern, repeats in found.items():
        print(f"{pattern:31s}" + "".join(f"{statistics.median(r[n] for r in repeats):8.0f}" for n in names))
        print(f"{'':31s}" + "".join(f"{'[' + '/'.join(str(r[n]) for r in repeats) + ']':>8s}" for n in names))
    if args.json:
        Path(args.json).write_text(json.dumps({"rate": args.rate, "completions": found}, indent=1))


if __name__ == "__main__":
    main()
