"""`llmpy predict RUN_DIR`: the step time of a measured run carried to other ranks, links, strategies and cores.

    llmpy predict out/ --ranks 9 --strategy server --link 1gbe            # 9 ranks, one per host, 1 Gbit/s
    llmpy predict out/ --ranks 16 --ranks-per-node 2 --bandwidth 25 --latency 5 --model d24 -B 8
    llmpy predict ref/ --link veth --validate measured/                 # against a measured run, per component
    llmpy predict out/ --sweep-nodes 2,4,8,16,32,64 --links 1gbe,10gbe,ib100   # the best strategy per size
    llmpy predict out/ --cores 1,2,4,8                                  # fork-join and tasks on N cores

RUN_DIR is what `llmpy train --metrics-dir` wrote (metrics.json; with `--trace` into the same folder, events.json
too). Compute per phase comes from it (scaled by llm.c's FLOP count to another model or batch), communication
from the collective cost models of llmpy.predict.network on the strategy's real buckets (llmpy.predict.step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, replace

from llmpy.core.config import preset
from llmpy.predict.measured import MeasuredRun, measured_components, rank_row, read_run
from llmpy.predict.network import ALGORITHM_CHOICES, LINK_PRESETS, Cluster, Link, link_preset
from llmpy.predict.step import (LINK_ORDERS, STRATEGY_NAMES, ComputeProfile, StepPrediction, Target,
                                calibrate_overlap, predict_step, profile_from_run, strategy_plan)

DEFAULT_SWEEP_LINKS = "1gbe,10gbe,ib100"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="metrics folder of a measured run (llmpy train --metrics-dir)")
    target = parser.add_argument_group("target (default: the measured run's, or --validate's)")
    target.add_argument("--ranks", type=int, help="data-parallel ranks in all")
    target.add_argument("--ranks-per-node", type=int, default=1, help="ranks sharing one host and its link")
    target.add_argument("--threads", type=int, help="threads per rank")
    target.add_argument("--cores-per-node", type=int,
                        help="cores of a host (default: the measured run's machine's); the network's CPU work "
                             "(--network-cpu-gbs) slows compute only where the ranks' threads fill them")
    target.add_argument("--strategy", help=f"one of {', '.join(STRATEGY_NAMES)}")
    target.add_argument("--model", help="model preset (d12, d24, ...)")
    target.add_argument("-B", "--batch-size", type=int, help="sequences per rank")
    target.add_argument("-T", "--seq-len", type=int, help="tokens per sequence")
    network = parser.add_argument_group("network")
    network.add_argument("--link", help=f"a named link: {', '.join(LINK_PRESETS)}")
    network.add_argument("--bandwidth", type=float, help="link bandwidth per direction, Gbit/s (instead of --link)")
    network.add_argument("--latency", type=float, help="MPI latency per message, us (with --bandwidth; default 20)")
    network.add_argument("--concurrent-gbit", type=float,
                         help="Gbit/s that several collectives in flight at once get while a rank polls for them "
                              "(MPI progressing only inside MPI calls; default: no cap)")
    network.add_argument("--network-cpu-gbs", type=float, metavar="GBS",
                         help="GB/s of bytes a rank sends + receives per second of its CPU (default: the link's, "
                              "if it has one, else free); bytes moved while the rank computes on a host with no "
                              "spare core stretch that compute by bytes / GBS")
    network.add_argument("--network-poll-share", type=float, metavar="SHARE",
                         help="share of a rank's core its progress thread's tests take while data moves (default: "
                              "the link's, if it has one, else 0; bench/polling_cost.py measures it); on a host "
                              "with no spare core it stretches compute by that share of the time data moves")
    network.add_argument("--algorithms", default="mpich", choices=ALGORITHM_CHOICES,
                         help="collective algorithms: the ones MPICH picks (default) or the cheapest")
    network.add_argument("--reduce-gbs", type=float,
                         help="GB/s at which a rank sums received data (default: the run's AdamW bandwidth / 3)")
    network.add_argument("--overlap", default="1",
                         help="share of the link's rate moving data while a rank computes: 0..1, or 'measured' "
                              "(calibrated to the hidden gradient bytes of --validate's run or RUN_DIR's); default 1")
    network.add_argument("--link-order", default="auto", choices=LINK_ORDERS,
                         help="how the link moves the collectives in flight: first come first served by rounds "
                              "(fifo), or in batches that move and complete together (batches: UCX's default "
                              "rendezvous protocol over TCP); auto (default): batches unless the link is an "
                              "InfiniBand preset (ib100, ib200)")
    network.add_argument("--params-behind-forward", action="store_true",
                         help="what-if: the parameter collectives hide behind the next forward")
    parser.add_argument("--validate", metavar="MEASURED_DIR", help="compare with this measured run, per component")
    parser.add_argument("--cores", help="also predict fork-join and tasks for one rank on these core counts: 1,2,4")
    parser.add_argument("--sweep-nodes", help="predict every strategy on these host counts: 2,4,8")
    parser.add_argument("--links", default=DEFAULT_SWEEP_LINKS, help=f"links of --sweep-nodes ({DEFAULT_SWEEP_LINKS})")
    parser.add_argument("--output", help="write the prediction as JSON here (e.g. DIR/prediction.json)")


def run(args, out=None) -> dict:
    out = out if out is not None else sys.stdout
    cores = _int_list(args.cores, "--cores") if args.cores else None  # every option checked before any output
    nodes = _int_list(args.sweep_nodes, "--sweep-nodes") if args.sweep_nodes else None
    links = _links(args.links) if nodes else None
    measured = read_run(args.run_dir)
    reference = read_run(args.validate) if args.validate else None
    target = _target_fields(args, measured, reference)
    profile = _profile(args, measured, target)
    cluster = _cluster(args, target, measured)
    overlap = _overlap(args, profile, target, cluster, reference or measured)
    step_target = Target(target["strategy"], cluster, overlap, args.params_behind_forward, args.link_order)
    prediction = predict_step(profile, step_target)
    plan = strategy_plan(target["strategy"], profile.config, cluster.ranks)
    measured_parts = (measured_components(reference, plan.gradient_kind if cluster.ranks > 1 else None,
                                          plan.parameter_kind if cluster.ranks > 1 else None)
                      if reference else None)
    print(_describe(target, cluster, overlap, measured), file=out)
    print(format_components(prediction, measured_parts, reference.step_median_ms if reference else None), file=out)
    timeline = (rank_row(reference) or {}).get("gradient_timeline") if reference and cluster.ranks > 1 else None
    if timeline and prediction.gradient_timeline and len(timeline["buckets"]) == len(plan.bucket_bytes):
        print(format_timeline(prediction.gradient_timeline, timeline), file=out)
    document = prediction_document(target, cluster, overlap, prediction, measured_parts,
                                   reference.step_median_ms if reference else None, timeline)
    if cores:
        document["cores"] = _cores(args.run_dir, cores, out)
    if nodes:
        rows = sweep(profile, nodes, links, cluster, step_target)
        print(format_sweep(rows), file=out)
        document["sweep"] = rows
    if args.output:
        _write_json(args.output, document)
        print(f"wrote {args.output}", file=out)
    return document


def _target_fields(args, measured: MeasuredRun, reference: MeasuredRun | None) -> dict:
    """The configuration to predict: the options given, else --validate's run, else the measured run's."""
    base = (reference or measured).target()
    given = {"model": args.model, "B": args.batch_size, "T": args.seq_len, "ranks": args.ranks,
             "threads": args.threads, "strategy": args.strategy}
    flags = {"model": "--model", "B": "-B", "T": "-T", "ranks": "--ranks", "threads": "--threads",
             "strategy": "--strategy"}
    target = dict(base)
    for key, value in given.items():
        if value is None:
            continue
        if reference is not None and base.get(key) is not None and value != base[key]:
            raise ValueError(f"{flags[key]} {value} differs from the run given to --validate ({args.validate} ran "
                             f"{key} {base[key]}); validate against a run of the same configuration")
        target[key] = value
    target["strategy"] = target.get("strategy") or "allreduce"
    for key in ("B", "T", "ranks", "threads"):
        if not isinstance(target[key], int) or target[key] < 1:
            raise ValueError(f"{flags[key]} {target[key]} must be a positive integer")
    if target["strategy"] not in STRATEGY_NAMES:
        raise ValueError(f"--strategy {target['strategy']!r} is not one of {', '.join(STRATEGY_NAMES)}")
    return target


def _profile(args, measured: MeasuredRun, target: dict) -> ComputeProfile:
    profile = profile_from_run(measured)
    if target["threads"] != measured.threads:
        profile = _profile_on_threads(args.run_dir, measured, profile, target["threads"])
    config = measured.config if target["model"] == measured.model else _preset(target["model"])
    if (config, target["B"], target["T"]) != (measured.config, measured.B, measured.T):
        profile = profile.scaled(config, target["B"], target["T"])
    return profile


def _preset(name: str):
    try:
        return preset(name)
    except ValueError as error:
        raise ValueError(f"--model: {error}") from None


def _profile_on_threads(run_dir: str, measured: MeasuredRun, profile: ComputeProfile, threads: int):
    """Compute on another thread count, from the cores model (llmpy.predict.cores)."""
    try:
        from llmpy.predict.cores import predict_cores
    except ImportError:
        raise ValueError(f"--threads {threads}: the run used {measured.threads}; another thread count needs "
                         f"llmpy.predict.cores, which is not available") from None
    mode = "forkjoin" if (measured.rank_mode or measured.mode) != "tasks" else "tasks"
    found = predict_cores(run_dir, [threads], modes=(mode,))
    if not found:
        raise ValueError(f"--threads {threads}: llmpy.predict.cores predicted nothing for {mode}")
    phases = found[0]["phases_ms"]
    return replace(profile, forward_ms=float(phases["forward"]), backward_ms=float(phases["backward"]),
                   update_ms=float(phases.get("update", profile.update_ms)))


def _link(args) -> Link | None:
    if args.link and args.bandwidth is not None:
        raise ValueError("--link and --bandwidth: give one of them")
    cpu = args.network_cpu_gbs
    if cpu is not None and not (math.isfinite(cpu) and cpu > 0):
        raise ValueError(f"--network-cpu-gbs {cpu} must be a positive rate in GB/s")
    poll = args.network_poll_share
    if poll is not None and not (math.isfinite(poll) and 0.0 <= poll < 1.0):
        raise ValueError(f"--network-poll-share {poll} must be a share of a core, 0 <= share < 1")
    if args.link:
        link = link_preset(args.link)
        link = link if cpu is None else replace(link, cpu_gbs=cpu)
        return link if poll is None else replace(link, poll_share=poll)
    if args.bandwidth is not None:
        return Link("custom", args.bandwidth, 20.0 if args.latency is None else args.latency, cpu, poll)
    if args.latency is not None:
        raise ValueError("--latency goes with --bandwidth")
    return None


def _cores_per_node(args, measured: MeasuredRun) -> int:
    """--cores-per-node, else the cores of the machine the measured run ran on (its metrics, else this one's)."""
    if args.cores_per_node is not None:
        if args.cores_per_node < 1:
            raise ValueError(f"--cores-per-node {args.cores_per_node} must be a positive number of cores")
        return args.cores_per_node
    if measured.cores:
        return measured.cores
    from llmpy.execution.threads import available_cores

    return available_cores()


def _reduce_rate(args, measured: MeasuredRun) -> float:
    """--reduce-gbs, else a third of the AdamW kernel's measured GB/s (a sum moves 3 bytes per byte summed)."""
    if args.reduce_gbs is not None:
        if not (math.isfinite(args.reduce_gbs) and args.reduce_gbs > 0):
            raise ValueError(f"--reduce-gbs {args.reduce_gbs} must be a positive rate in GB/s")
        return args.reduce_gbs
    adamw = measured.kernels_gbytes.get("adamw_update", 0.0)
    return adamw / 3 if adamw > 0 else 4.0


def _cluster(args, target: dict, measured: MeasuredRun) -> Cluster:
    link = _link(args)
    if link is None:
        if target["ranks"] > 1:
            raise ValueError(f"--link or --bandwidth: needed to predict {target['ranks']} ranks")
        link = LINK_PRESETS["shm"]
    return Cluster(target["ranks"], link, args.ranks_per_node, reduce_gbytes_s=_reduce_rate(args, measured),
                   algorithms=args.algorithms, concurrent_gbit=args.concurrent_gbit,
                   cores_per_node=_cores_per_node(args, measured), threads_per_rank=target["threads"])


def _overlap(args, profile: ComputeProfile, target: dict, cluster: Cluster, source: MeasuredRun) -> float:
    if args.overlap != "measured":
        try:
            value = float(args.overlap)
        except ValueError:
            raise ValueError(f"--overlap {args.overlap!r} must be a share between 0 and 1, or 'measured'") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--overlap {value} must be a share between 0 and 1, or 'measured'")
        return value
    row = rank_row(source) if source.is_distributed else None
    if row is None or row.get("grad_hidden") is None:
        raise ValueError(f"--overlap measured: {source.path} is not a run of several ranks (no hidden share to "
                         f"calibrate to); give --validate a measured mpi run or a number")
    return calibrate_overlap(profile, Target(target["strategy"], cluster, 0.0, link_order=args.link_order),
                             float(row["grad_hidden"]))


def _describe(target: dict, cluster: Cluster, overlap: float, measured: MeasuredRun) -> str:
    per_node = f", {cluster.ranks_per_node} per host" if cluster.ranks_per_node > 1 else ""
    link = cluster.link
    capped = f", {cluster.concurrent_gbit:g} Gbit/s for several in flight" if cluster.concurrent_gbit else ""
    network = (f"link {link.name} ({link.bandwidth_gbit:.3g} Gbit/s, {link.latency_us:.3g} us{capped}), "
               f"{cluster.algorithms} algorithms, overlap {overlap:.2f}; {_network_cpu(cluster)}"
               if cluster.ranks > 1 else "one rank, no communication")
    phases, which = measured.profile_phases()
    return (f"predicted: {target['model']}, B={target['B']}, T={target['T']} per rank, {cluster.ranks} "
            f"rank{'s' if cluster.ranks > 1 else ''}{per_node} x {target['threads']} thread"
            f"{'s' if target['threads'] > 1 else ''}, strategy {target['strategy']}; {network}\n"
            f"from {measured.path}: {measured.model}, B={measured.B}, T={measured.T}, {measured.mode} "
            f"({measured.ranks} rank{'s' if measured.ranks > 1 else ''} x {measured.threads} thread"
            f"{'s' if measured.threads > 1 else ''}): {which} step {phases['step']:.1f} ms (forward "
            f"{phases['forward']:.1f}, backward {phases['backward']:.1f}, update {phases['update']:.1f})")


def _network_cpu(cluster: Cluster) -> str:
    cores = (f"{cluster.ranks_per_node} x {cluster.threads_per_rank} thread(s) on {cluster.cores_per_node} "
             f"core{'s' if cluster.cores_per_node != 1 else ''} per host")
    polls = f", tests {cluster.link.poll_share:.0%} of a core while data moves" if cluster.link.poll_share else ""
    if cluster.link.cpu_gbs is None and not polls:
        return "network CPU free (no --network-cpu-gbs)"
    rate = f"{cluster.link.cpu_gbs:.3g} GB/s" if cluster.link.cpu_gbs is not None else "free per byte"
    if cluster.spare_core:
        return f"network CPU {rate}{polls} on a spare core ({cores}): free"
    return f"network CPU {rate}{polls} taken from compute ({cores})"


def _error(predicted: float, measured: float | None) -> str:
    if measured is None:
        return f"{'-':>10s} {'':>7s}"
    error = f"{100 * (predicted - measured) / measured:+6.1f}%" if abs(measured) > 1e-9 else "     -"
    return f"{measured:10.1f} {error:>7s}"


def format_components(prediction: StepPrediction, measured: dict | None, measured_step: float | None) -> str:
    """The breakdown table: ms per step predicted (and measured, with the error, under --validate)."""
    head = f"{'component':32s} {'predicted':>10s}" + (f" {'measured':>10s} {'error':>7s}" if measured else "")
    lines = [head + "   (ms per step, rank 0)"]
    rows = list(prediction.components.items()) + [("step", prediction.step_ms)]
    for name, value in rows:
        line = f"{name:32s} {value:10.1f}"
        if measured is not None:
            line += " " + _error(value, measured_step if name == "step" else measured.get(name))
        kind = name.split(" ")[0]
        if kind in prediction.link_ms:
            line += f"   (on the link {prediction.link_ms[kind]:.1f} ms)"
        lines.append(line)
    if not prediction.link_ms:
        return "\n".join(lines)
    hidden = f"hidden gradient bytes {100 * prediction.grad_hidden:.0f}%"
    if prediction.network_cpu_ms:
        hidden = f"network CPU stretching compute and update {prediction.network_cpu_ms:.1f} ms; " + hidden
    if prediction.param_hidden is not None:
        hidden += f", parameter bytes {100 * prediction.param_hidden:.0f}%"
    return "\n".join(lines + [hidden])


def prediction_document(target: dict, cluster: Cluster, overlap: float, prediction: StepPrediction,
                        measured: dict | None, measured_step: float | None, measured_timeline: dict | None = None
                        ) -> dict:
    """prediction.json: {"target", "step_ms", "measured_step_ms", "components": [{name, predicted_ms,
    measured_ms}], ...details}."""
    return {
        "target": {**target, "ranks_per_node": cluster.ranks_per_node, "link": asdict(cluster.link),
                   "algorithms": cluster.algorithms, "overlap": overlap, "reduce_gbytes_s": cluster.reduce_gbytes_s,
                   "concurrent_gbit": cluster.concurrent_gbit, "cores_per_node": cluster.cores_per_node,
                   "network_cpu_gbs": cluster.link.cpu_gbs, "network_cpu_charged": cluster.network_cpu_per_byte > 0,
                   "network_poll_share": cluster.network_poll_share},
        "step_ms": prediction.step_ms,
        "measured_step_ms": measured_step,
        "components": [{"name": name, "predicted_ms": value,
                        "measured_ms": None if measured is None else measured.get(name)}
                       for name, value in prediction.components.items()],
        "link_ms": prediction.link_ms,
        "grad_hidden": prediction.grad_hidden,
        "param_hidden": prediction.param_hidden,
        "network_cpu_ms": prediction.network_cpu_ms,
        "gradient_timeline": {"predicted": prediction.gradient_timeline, "measured": measured_timeline},
    }


def format_timeline(predicted: dict, measured: dict) -> str:
    """Per bucket (backward's order), predicted / measured: when its gradient collectives started and completed,
    in ms from the first one's start; the update's start last."""
    def pair(a, b):
        return f"{a:8.0f} {b:8.0f}" if a is not None and b is not None else f"{'-':>8s} {'-':>8s}"

    lines = [f"{'gradients of':14s} {'MB':>6s}   {'started':>17s}   {'completed':>17s}   (ms from the first one's "
             f"start, predicted / measured, rank 0)"]
    for index, (p, m) in enumerate(zip(predicted["buckets"], measured["buckets"])):
        name = "final layernorm" if index == 0 else ("encoder" if p["part"] == -1 else f"block {p['part']}")
        lines.append(f"{name:14s} {p['bytes'] / 1e6:6.1f}   {pair(p['start_ms'], m['start_ms'])}   "
                     f"{pair(p['done_ms'], m['done_ms'])}")
    lines.append(f"{'update started':14s} {'':6s}   {pair(predicted['update_start_ms'], measured['update_start_ms'])}")
    return "\n".join(lines)


def sweep(profile: ComputeProfile, nodes: list[int], links: list[Link], cluster: Cluster, target: Target) -> list[dict]:
    """Every strategy on every host count and link (ranks per host, algorithms, overlap as in `cluster` and
    `target`): [{nodes, ranks, link, strategy, step_ms, communication_ms}]."""
    rows = []
    for link in links:
        for count in nodes:
            hosts = replace(cluster, ranks=count * cluster.ranks_per_node, link=link)
            for strategy in STRATEGY_NAMES:
                found = predict_step(profile, replace(target, strategy=strategy, cluster=hosts))
                rows.append({"nodes": count, "ranks": hosts.ranks, "link": link.name, "strategy": strategy,
                             "step_ms": found.step_ms, "communication_ms": found.components["communication"]})
    return rows


def format_sweep(rows: list[dict]) -> str:
    """ms per step of each strategy per host count and link, and the best one."""
    lines = [f"{'link':8s} {'nodes':>5s} " + " ".join(f"{s:>10s}" for s in STRATEGY_NAMES) + "   best"]
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["link"], row["nodes"]), {})[row["strategy"]] = row["step_ms"]
    for (link, count), by_strategy in groups.items():
        best = min(by_strategy, key=by_strategy.get)
        lines.append(f"{link:8s} {count:5d} " + " ".join(f"{by_strategy[s]:10.1f}" for s in STRATEGY_NAMES)
                     + f"   {best}")
    return "\n".join(lines)


def _cores(run_dir: str, cores: list[int], out) -> list[dict]:
    try:
        from llmpy.predict.cores import predict_cores
    except ImportError:
        raise ValueError("--cores: llmpy.predict.cores (the cores model) is not available") from None
    rows = predict_cores(run_dir, cores)
    print(f"{'mode':10s} {'cores':>5s} {'step ms':>9s}  limit", file=out)
    for row in rows:
        print(f"{row['mode']:10s} {row['cores']:5d} {row['step_ms']:9.1f}  {row.get('limit', '')}", file=out)
    return rows


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{option} {text!r} must be a comma-separated list of positive integers") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{option} {text!r} must be a comma-separated list of positive integers")
    return values


def _links(text: str) -> list[Link]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise ValueError(f"--links {text!r} names no link; choose from {', '.join(LINK_PRESETS)}")
    return [link_preset(name) for name in names]


def _write_json(path: str, document: dict) -> None:
    from llmpy.io.formats import atomic_write_bytes

    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--output {path}: {folder} is not a folder")
    os.makedirs(folder, exist_ok=True)
    atomic_write_bytes(path, json.dumps(document, indent=1).encode())
