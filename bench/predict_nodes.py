"""The seed study's configuration predicted, and the best strategy for 2-64 nodes at 1, 10 and 100 Gbit/s.

    python bench/predict_nodes.py --json nodes.json --png nodes.png

The study this project follows trained GPT-2 124M (d12) with B=4, T=64 per rank on 9 ranks of MareNostrum 5
(server strategy: reduce to one rank, update, broadcast) at about 1 Gb/s and published, per step: reduce ~500 ms,
broadcast ~115 ms, forward+backward ~100 ms, ~720 ms in all. Its compute comes from that published figure
(forward+backward 100 ms, split 1:2 as llm.c's FLOP count splits it), not from this 2-core machine (~3.5 s for the
same step); AdamW over the 124 M parameters streams 7 floats each (3.5 GB): --update-ms 12 assumes ~300 GB/s, a
two-socket node's memory bandwidth. The communication is llmpy.predict's: MPICH's algorithms on the strategies'
real buckets (llmpy.predict.network, llmpy.predict.step), one rank per node.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from llmpy.core.config import preset
from llmpy.predict.network import Cluster, Link, link_preset, rate_for
from llmpy.predict.step import STRATEGY_NAMES, ComputeProfile, Target, predict_step

PUBLISHED = {"MPI_Ireduce (gradients)": 500.0, "MPI_Ibcast (parameters)": 115.0, "compute": 100.0, "step": 720.0}
NODES = (2, 4, 8, 16, 32, 64)
LINKS = ("1gbe", "10gbe", "ib100")


def seed_profile(compute_ms: float, update_ms: float) -> ComputeProfile:
    return ComputeProfile(preset("d12"), 4, 64, forward_ms=compute_ms / 3, backward_ms=2 * compute_ms / 3,
                          update_ms=update_ms, call_us=15.0)


def seed_table(profile: ComputeProfile, link: Link, overlaps: tuple[float, ...]) -> tuple[str, dict]:
    """The study's 9 ranks, server strategy, beside the published figures, for each overlap."""
    found = {o: predict_step(profile, Target("server", Cluster(9, link), o)) for o in overlaps}
    head = f"{'component':28s} {'published':>10s} " + " ".join(f"{f'overlap {o:g}':>11s}" for o in overlaps)
    lines = [(f"d12, B=4, T=64 per rank, 9 ranks (1 per node), server, {link.bandwidth_gbit:g} Gbit/s, "
              f"{link.latency_us:g} us; ms per step"), head]
    for name in ("compute", "update", "MPI_Ireduce (gradients)", "MPI_Ibcast (parameters)", "communication", "step"):
        published = f"{PUBLISHED[name]:10.0f}" if name in PUBLISHED else f"{'-':>10s}"
        values = [p.step_ms if name == "step" else p.components[name] for p in found.values()]
        lines.append(f"{name:28s} {published} " + " ".join(f"{v:11.0f}" for v in values))
    return "\n".join(lines), {o: {"step_ms": p.step_ms, **p.components} for o, p in found.items()}


def implied_bandwidth(profile: ComputeProfile, reduce_ms: float, latency_us: float) -> float:
    """The link bandwidth (Gbit/s) at which the model's reduce wait of the seed configuration is `reduce_ms`."""
    def reduce_wait_ms(gbit: float) -> float:
        waited = predict_step(profile, Target("server", Cluster(9, Link("x", gbit, latency_us)), 0.0))
        return waited.components["MPI_Ireduce (gradients)"]

    return rate_for(reduce_wait_ms, reduce_ms, 0.01, 10000.0)


def node_sweep(profile: ComputeProfile, overlaps: tuple[float, ...]) -> list[dict]:
    rows = []
    for name in LINKS:
        link = link_preset(name)
        for nodes in NODES:
            for overlap in overlaps:
                for strategy in STRATEGY_NAMES:
                    found = predict_step(profile, Target(strategy, Cluster(nodes, link), overlap))
                    rows.append({"link": name, "gbit": link.bandwidth_gbit, "nodes": nodes, "overlap": overlap,
                                 "strategy": strategy, "step_ms": found.step_ms,
                                 "communication_ms": found.components["communication"]})
    return rows


def best(rows: list[dict], link: str, nodes: int, overlap: float) -> dict:
    return min((r for r in rows if (r["link"], r["nodes"], r["overlap"]) == (link, nodes, overlap)),
               key=lambda r: r["step_ms"])


def sweep_table(rows: list[dict], overlap: float) -> str:
    """Per node count and link: the best strategy and its ms per step, then every strategy's ms."""
    lines = [(f"best strategy per node count, overlap {overlap:g} (1 rank per node, d12, B=4, T=64 per rank; ms "
              f"per step of {', '.join(STRATEGY_NAMES)})"),
             f"{'nodes':>5s} " + " ".join(f"{f'{link_preset(n).bandwidth_gbit:g} Gbit/s':>44s}" for n in LINKS)]
    for nodes in NODES:
        cells = []
        for name in LINKS:
            b = best(rows, name, nodes, overlap)
            every = "/".join(f"{r['step_ms']:.0f}" for r in rows
                             if (r["link"], r["nodes"], r["overlap"]) == (name, nodes, overlap))
            cells.append(f"{b['strategy']:>9s} ({every})".rjust(44))
        lines.append(f"{nodes:5d} " + " ".join(cells))
    return "\n".join(lines)


def plot(rows: list[dict], path: str, overlap: float) -> str:
    from llmpy.observe.plots import _save, plt

    fig, axes = plt.subplots(1, len(LINKS), figsize=(4.2 * len(LINKS), 3.8), sharey=True)
    for ax, name in zip(axes, LINKS):
        for strategy in STRATEGY_NAMES:
            picked = [r for r in rows if r["link"] == name and r["strategy"] == strategy and r["overlap"] == overlap]
            ax.plot([r["nodes"] for r in picked], [r["step_ms"] for r in picked], marker="o", label=strategy)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(NODES, [str(n) for n in NODES])
        ax.set_title(f"{link_preset(name).bandwidth_gbit:g} Gbit/s ({name})")
        ax.set_xlabel("nodes (1 rank each)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("predicted ms per step")
    axes[0].legend()
    fig.suptitle(f"d12, B=4, T=64 per rank, compute 100 ms/step (the study's), overlap {overlap:g}")
    fig.tight_layout()
    return _save(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compute-ms", type=float, default=100.0, help="forward+backward per step (published)")
    parser.add_argument("--update-ms", type=float, default=12.0, help="AdamW over d12 on one node (assumed)")
    parser.add_argument("--latency-us", type=float, default=50.0, help="latency of the study's 1 Gb/s link")
    parser.add_argument("--json", help="write the tables' numbers here")
    parser.add_argument("--png", help="write the 2-64 node plot here")
    args = parser.parse_args(argv)
    profile = seed_profile(args.compute_ms, args.update_ms)
    overlaps = (0.0, 1.0)
    table, seed = seed_table(profile, Link("1 Gb/s", 1.0, args.latency_us), overlaps)
    print(table)
    implied = implied_bandwidth(profile, PUBLISHED["MPI_Ireduce (gradients)"], args.latency_us)
    print(f"the published reduce (500 ms) is what this model gives at {implied:.1f} Gbit/s")
    at_implied, _ = seed_table(profile, Link("implied", implied, args.latency_us), overlaps)
    print(at_implied)
    rows = node_sweep(replace(profile), overlaps)
    for overlap in overlaps:
        print(sweep_table(rows, overlap))
    if args.png:
        print(f"wrote {plot(rows, args.png, 1.0)}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"seed": seed, "implied_gbit": implied, "sweep": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
