"""`llmpy predict` against measured runs: every strategy x {unshaped, 2 Gbit/s, 1 Gbit/s} at 2 ranks on 2
network-namespace hosts (bench/multihost.py's hosts and links; root only), predicted from a 1-rank run.

    sudo .venv/bin/python bench/predict_validation.py --model d12 -T 64 -B 4 --steps 3 --json validation.json

What it does (the reference of step 1 runs inside step 3, before each strategy's runs):
1. per strategy, just before its runs (step 3), a 1-rank reference run (`--mode sequential`, 1 thread, the same
   model and batch per rank) on each host at once (the hosts share this machine's cores): the compute that
   strategy's predictions start from (the host's speed moves over the half hour: one reference taken at a slow
   moment, 3.5 s a step against 2.3-2.7 s, put all twelve predictions 4-63% over);
2. each link, unshaped and shaped by tc tbf, calibrated once with MPI itself, independently of the training
   runs: alpha from an 8-byte exchange, bandwidth from the slope over 1-64 MiB of blocking Sendrecv exchanges
   (both directions at once, as a collective's round sends: the network) and of 8 Iallreduces in flight waited
   for as llmpy's strategies wait (MPI_Testall with sleeps: `polled`); each rank's CPU seconds in them
   (process_time, getrusage's user and system) give the network's CPU rate, bytes sent + received per CPU
   second, the polled one's system time (the kernel's TCP work; its user time is mostly the tests, charged as
   the poll share below) passed as `--network-cpu-gbs` (the hosts share this machine's cores, so a host has
   no spare core: `--cores-per-node` cores / 2); and 8 Ireduces in flight, roots alternating (owners' pattern),
   moved by llmpy's progress thread as the runs' collectives are (`progressed`), from whose 16 MiB time the
   `--concurrent-gbit` cap of the "capped" predictions is fitted in the model's own units (`progressed_cap`);
   the same 16 MiB while both ranks compute (1-thread GEMMs): the model's price of it on the fitted network
   over the time it then took is the share of the link's rate a computing rank's progress thread gets, the
   predictions' `--overlap` (`calibrated_overlap`; unshaped, the idle progress thread itself moves a quarter of
   what the network does, and that counts too);
   and, without the network, the share of a core the progress thread's tests take beside compute on one core
   (bench/polling_cost.py), passed as `--network-poll-share`;
3. every strategy over every link, measured as bench/multihost.py measures it (one rank per host, 1 thread, TCP
   forced), with the trace written beside metrics.json so the waits split by collective;
4. `llmpy predict REFERENCE --bandwidth FIT --latency FIT --validate RUN --overlap CALIBRATED` for each
   (`--overlap 1` is what the strategy structurally allows, the link at its full rate while the ranks compute;
   `--overlap measured` fits it to the validated run's own hidden bytes instead, which is not a prediction),
   and the step once more with `--concurrent-gbit POLLED` ("capped").
Prints predicted vs measured step time (target: within 15%) and each communication component (the waits for
each collective, all waiting, all MPI time: within 25%), and writes everything as JSON.

    sudo .venv/bin/python bench/predict_validation.py --runs /tmp/mh/tasks [--reference REF|strategy] [--fits FILE]

checks runs measured before (bench/multihost.py --keep: folders STRATEGY-RATE-...) instead: each one predicted
from REF, from its strategy's reference kept beside it by this script's --keep (`strategy`), or from its own
compute (the communication model alone), on links calibrated now (root) or taken from an earlier --json of this
script (--fits). `--link-order` is passed to every prediction (default auto: batches on these TCP links).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import multihost

from llmpy.execution.threads import available_cores
from llmpy.predict.step import LINK_ORDERS

netns_hosts = multihost.netns_hosts
STEP_TARGET, COMMUNICATION_TARGET = 0.15, 0.25
# up to 64 MiB: over 1-16 MiB alone the polled collectives' slope is their tests' rounds more than their bytes
# (unshaped 1.3-1.9 Gbit/s and 1.1-1.4 GB/s of TCP work per CPU second; with 64 MiB 7.5-11.3 and 2.3-3.4, as the
# runs' buckets of 28-154 MB move), and one slow exchange of 16 MiB moved the unshaped fit from 8.8 to 3.2 Gbit/s
EXCHANGE_SIZES = (8, 1 << 20, 4 << 20, 16 << 20, 64 << 20)
PROGRESSED_BYTES = 16 << 20  # the progressed calibration's size behind the cap and the overlap
CONCURRENT = 8  # collectives in flight at once in the polled calibration (a d12 bucket starts 12)
COMPUTE_OVER_IDLE = 8  # the computing calibration's compute, in times the collectives' idle time
COMMUNICATION = ("(gradients)", "(parameters)", "(norm)", "wait", "communication")


def exchange_worker() -> None:
    """Run by mpiexec on the two hosts; rank 0 prints, per size, the median seconds of (1) a blocking Sendrecv
    exchange, what the network does, and (2) CONCURRENT Iallreduces of a 1/CONCURRENT share each waited for as
    llmpy's strategies wait (llmpy.execution.mpi.watchdog: MPI_Testall with sleeps of up to 0.1 ms), what llmpy
    gets of it: MPI moves data only inside MPI calls, so several collectives in flight between sleeps move at a
    rate of their own, whatever the link."""
    import numpy as np

    from llmpy.execution.deferred import Completion
    from llmpy.execution.mpi.progress import ProgressThread
    from llmpy.execution.mpi.transport import apply_network_defaults
    from llmpy.execution.mpi.watchdog import Watchdog

    apply_network_defaults()  # the link as `llmpy train --mode mpi` sets it up before MPI_Init
    from mpi4py import MPI

    def _progressed(MPI, comm, progress, parts):
        """CONCURRENT reduces in flight, roots alternating (owners' pattern), moved by llmpy's progress thread
        as a run's collectives are, waited for on its Completion."""
        done = Completion()
        progress.watch([comm.Ireduce(MPI.IN_PLACE if comm.rank == i % 2 else p, p if comm.rank == i % 2 else None,
                                     MPI.SUM, i % 2) for i, p in enumerate(parts)], done)
        done.wait()

    comm = MPI.COMM_WORLD
    rank, peer = comm.Get_rank(), 1 - comm.Get_rank()
    watchdog = Watchdog(rank, [0, 0], ["", ""], 600.0)
    found: dict = {"exchange": {}, "polled": {}, "progressed": {},
                   "cpu": {"exchange": {}, "polled": {}, "progressed": {}}}
    progress = ProgressThread(MPI, threading.RLock())
    for nbytes in EXCHANGE_SIZES:
        send = np.ones(max(1, nbytes // 4), np.float32)
        received = np.empty_like(send)
        pieces = np.array_split(received, CONCURRENT)
        calls = {"exchange": lambda s=send, r=received: comm.Sendrecv(s, peer, 0, r, peer, 0),
                 "polled": lambda parts=pieces: watchdog.wait_all(
                     MPI, [comm.Iallreduce(MPI.IN_PLACE, p, MPI.SUM) for p in parts], "calibration"),
                 "progressed": lambda parts=pieces: _progressed(MPI, comm, progress, parts)}
        for name, call in calls.items():
            found[name][nbytes], cpu = _median_seconds(comm, call)
            found["cpu"][name][nbytes] = comm.gather(cpu, root=0)
    found["computing"] = _computing(MPI, comm, progress, float(found["progressed"][PROGRESSED_BYTES]))
    progress.close()
    if rank == 0:
        print(json.dumps(found))


def _computing(MPI, comm, progress, idle_s: float, repeats: int = 5) -> dict:
    """The progressed calibration's largest size again, while both ranks compute (1-thread GEMMs of d12's MLP
    shape, for COMPUTE_OVER_IDLE times its idle time): when the collectives completed, from their start (the
    median over repeats), from which calibrated_overlap takes the share of the link's rate a computing rank's
    progress thread gets."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from llmpy.execution.deferred import Completion

    a, w = np.ones((256, 768), np.float32), np.ones((768, 3072), np.float32)
    out = np.empty((256, 3072), np.float32)
    parts = np.array_split(np.ones(PROGRESSED_BYTES // 4, np.float32), CONCURRENT)
    compute_s, took = max(0.2, COMPUTE_OVER_IDLE * idle_s), []
    with threadpool_limits(limits=1, user_api="blas"):
        for _ in range(repeats):
            comm.Barrier()
            done, start = Completion(), time.perf_counter()
            progress.watch([comm.Ireduce(MPI.IN_PLACE if comm.rank == i % 2 else p, p if comm.rank == i % 2
                                         else None, MPI.SUM, i % 2) for i, p in enumerate(parts)], done)
            while time.perf_counter() - start < compute_s:
                np.matmul(a, w, out=out)
            done.wait()
            took.append(done.completed_at - start)
    return {"idle_s": idle_s, "computing_s": statistics.median(took), "compute_s": compute_s}


def _median_seconds(comm, fn, repeats: int = 7) -> tuple[float, list]:
    """Median wall seconds of `fn` and this rank's median CPU seconds in it: [process_time (every thread,
    user + system), getrusage's user, its system]."""
    times, cpu = [], []
    for _ in range(repeats):
        comm.Barrier()
        usage, process, start = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append([time.process_time() - process, after.ru_utime - usage.ru_utime, after.ru_stime - usage.ru_stime])
    return statistics.median(times[1:]), [statistics.median(c[i] for c in cpu[1:]) for i in range(3)]


def calibrate(hosts, rate: str, timeout: float) -> dict:
    """The link shaped to `rate`, from MPI between the hosts: alpha (us) from the 8-byte exchange, bandwidth
    (Gbit/s) from the slope over 1-64 MiB of the blocking exchange (`exchange`: the network) and of the polled
    collectives (`polled`: an allreduce of n bytes sends n per host on 2 ranks, as an exchange does)."""
    hosts.shape(multihost.RATES[rate])
    try:
        result, _ = hosts.mpiexec(1, [sys.executable, __file__, "--exchange-worker"], timeout)
    finally:
        hosts.shape(None)
    if result.returncode != 0:
        raise RuntimeError(f"link calibration over {rate} failed:\n{result.stderr[-2000:]}")
    found = json.loads(result.stdout.strip().splitlines()[-1])
    large = [n for n in EXCHANGE_SIZES if n >= 1 << 20]
    fits = {}
    for name in ("exchange", "polled", "progressed"):
        times = {int(k): v for k, v in found[name].items()}
        slope = statistics.linear_regression(large, [times[n] for n in large]).slope
        fits[name] = {"latency_us": 1e6 * times[8], "bandwidth_gbit": 8 / max(slope, 1e-15) / 1e9}
    fits["network_cpu"] = network_cpu_fit(found["cpu"], large)
    fits["progressed_cap"] = progressed_cap(network_fit(fits), float(found["progressed"][str(PROGRESSED_BYTES)]),
                                            PROGRESSED_BYTES)
    fits["overlap"] = found["computing"]  # its times; the predictions' share is calibrated_overlap
    fits["seconds"] = {name: found[name] for name in ("exchange", "polled", "progressed")}  # per size, for refits
    return fits


def network_fit(fits: dict) -> dict:
    """The link the predictions price: the exchange's latency, and the highest bandwidth of the exchange and the
    polled collectives. Each is a rate the link carried, so the link carries at least the higher one; the
    blocking exchange, both directions at once into a tbf queue, sometimes lost packets and got less (0.68 where
    the polled collectives got 0.95 Gbit/s on the 1 Gbit/s link)."""
    exchange, polled = fits["exchange"], fits["polled"]
    return {"latency_us": exchange["latency_us"],
            "bandwidth_gbit": max(exchange["bandwidth_gbit"], polled["bandwidth_gbit"])}


def priced_calibration(network: dict, nbytes: int, cap: float | None = None) -> float:
    """Seconds llmpy.predict.network gives the progressed calibration's collectives (CONCURRENT Ireduces of
    nbytes / CONCURRENT, roots alternating) on the fitted network, with `cap` as --concurrent-gbit."""
    from llmpy.predict.network import Cluster, Link, concurrent_seconds

    link = Link("calibrated", network["bandwidth_gbit"], network["latency_us"])
    items = [("MPI_Ireduce", nbytes / CONCURRENT, i % 2) for i in range(CONCURRENT)]
    return concurrent_seconds(items, Cluster(2, link, concurrent_gbit=cap))


def progressed_cap(network: dict, seconds: float, nbytes: int) -> dict:
    """The --concurrent-gbit that makes llmpy.predict.network price the `progressed` calibration (CONCURRENT
    Ireduces of nbytes / CONCURRENT, roots alternating, on the measured network) at the `seconds` it took:
    what several collectives in flight get when the progress thread moves them, in the model's own units."""
    from llmpy.predict.network import rate_for

    price = lambda cap: priced_calibration(network, nbytes, cap)
    if price(None) >= seconds:
        return {"gbit": None, "seconds": seconds}  # no slower than the network itself: no cap
    return {"gbit": rate_for(price, seconds, 1e-3, network["bandwidth_gbit"]), "seconds": seconds}


def network_cpu_fit(cpu: dict, large: list) -> dict:
    """GB/s of bytes sent + received per CPU second of a rank (the mean over both), from the slope of its CPU
    seconds over 1-64 MiB: each rank sends n and receives n in an exchange of n bytes, and in an Iallreduce of n
    on 2 ranks (recursive doubling or Rabenseifner; the latter also sums n/2, counted in). `gbs`: the polled
    one's, what llmpy's waits and progress thread spend; the blocking exchange spins in MPI (its CPU is ~its
    wall time), an upper bound on the cost."""
    fit: dict = {}
    for name, sizes in cpu.items():
        per_size = {int(n): [statistics.fmean(rank[i] for rank in ranks) for i in range(3)] for n, ranks in sizes.items()}
        rates = {}
        for i, key in enumerate(("gbs", "user_gbs", "system_gbs")):
            slope = statistics.linear_regression([2 * n for n in large], [per_size[n][i] for n in large]).slope
            rates[key] = 1 / slope / 1e9 if slope > 0 else None
        fit[name] = rates
    fit["gbs"] = fit["polled"]["gbs"]
    return fit


def link_line(rate: str, fits: dict) -> str:
    line = f"link {rate}: " + "; ".join(f"{name} {fits[name]['bandwidth_gbit']:.2f} Gbit/s, alpha "
                                        f"{fits[name]['latency_us']:.0f} us" for name in ("exchange", "polled",
                                                                                           "progressed"))
    cap = fits.get("progressed_cap", {}).get("gbit")
    line += f"; cap for several in flight (progress thread) {cap:.2f} Gbit/s" if cap else ""
    cpu = fits.get("network_cpu")
    if cpu:
        line += "; network CPU " + ", ".join(
            f"{name} {cpu[name]['gbs'] or math.inf:.2f} GB/s (user {cpu[name]['user_gbs'] or math.inf:.2f}, "
            f"system {cpu[name]['system_gbs'] or math.inf:.2f})" for name in ("exchange", "polled"))
    if fits.get("poll_share") is not None:
        line += f"; the progress thread's tests {fits['poll_share']:.1%} of a core"
    if fits.get("overlap"):
        line += (f"; while computing {1e3 * fits['overlap']['computing_s']:.0f} ms against "
                 f"{1e3 * fits['overlap']['idle_s']:.0f} ms idle: overlap {calibrated_overlap(fits):.2f}")
    return line


def train_command(args, out: Path, extra: list) -> list:
    return [sys.executable, "-m", "llmpy", "train", "--model", args.model, "-T", args.seq_len, "-B",
            args.batch_size, "--steps", args.steps + 1, "--val-every", "0", "--sample-every", "0", "--no-progress",
            "--output", "", "--metrics-dir", out, "--threads", "1",
            *(["--train-data", args.train_data] if args.train_data else ["--data-dir", args.data_dir]), *extra]


def reference_run(hosts, args, work: Path, name: str) -> Path:
    """The 1-rank reference, run on both hosts at once (folders NAME0 and NAME1): the namespace hosts share this
    machine's cores and memory, so a rank computes as fast as in the 2-rank runs only while the other host
    computes too. Returns host 0's."""
    runs = []
    for index in range(2):
        command = train_command(args, work / f"{name}{index}", ["--mode", "sequential"])
        full = ["ip", "netns", "exec", hosts.hosts[index].namespace, *map(str, command)]
        runs.append(subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for run in runs:
        _, stderr = run.communicate(timeout=args.timeout)
        if run.returncode != 0:
            raise RuntimeError(f"the reference run failed (exit {run.returncode}):\n{stderr[-2000:]}")
    return work / f"{name}0"


def measured_run(hosts, strategy: str, rate: str, args, work: Path) -> Path:
    out = work / f"{strategy}-{rate}"
    command = train_command(args, out, ["--mode", "mpi", "--strategy", strategy, "--rank-mode", args.rank_mode,
                                        "--trace", out])
    multihost.run_shaped(hosts, rate, command, args.timeout, f"{strategy} over {rate}")
    return out


def predict(reference: Path, run: Path, fits: dict, capped: bool = False, out: Path | None = None) -> dict:
    """`llmpy predict` of `run`'s configuration from `reference` on the calibrated link (the network's alpha and
    bandwidth; `capped`: also the cap fitted to the progressed calibration for several collectives in flight),
    validated against `run`; the
    prediction goes to `out` (default: `run`)."""
    from llmpy.commands import cli
    from llmpy.commands import predict as command

    network = network_fit(fits)
    cap_gbit = fits.get("progressed_cap", {}).get("gbit")
    cap = ["--concurrent-gbit", f"{cap_gbit:.6g}"] if capped and cap_gbit else []
    # the kernel's TCP work per byte: the system time of the polled calibration (its user time is mostly the tests,
    # charged apart as the poll share); the hosts share this machine's cores: a share each
    cpu = fits.get("network_cpu", {}).get("polled", {}).get("system_gbs")
    cpu = ["--network-cpu-gbs", f"{cpu:.6g}", "--cores-per-node", str(HOST_CORES)] if cpu else []
    if cpu and fits.get("poll_share") is not None:
        cpu += ["--network-poll-share", f"{fits['poll_share']:.6g}"]
    argv = ["predict", str(reference), "--bandwidth", f"{network['bandwidth_gbit']:.6g}", "--latency",
            f"{network['latency_us']:.6g}", *cap, *cpu, "--validate", str(run), "--overlap", overlap_of(fits),
            "--link-order", LINK_ORDER[0],
            "--output", str((out or run) / ("prediction-capped.json" if capped else "prediction.json"))]
    text = io.StringIO()
    document = command.run(cli.build_parser().parse_args(argv), out=text)
    document["printed"] = text.getvalue()
    return document


def poll_share() -> float:
    """bench/polling_cost.py's share of a core that the progress thread's tests take beside compute (its own
    process: it pins itself to one core)."""
    with tempfile.TemporaryDirectory(prefix="llmpy-polling-") as scratch:
        out = Path(scratch) / "polling.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "polling_cost.py"), "--json", str(out)],
                       check=True, timeout=300)
        return json.loads(out.read_text())["poll_share"]


HOST_CORES = max(1, available_cores() // 2)  # the 2 namespace hosts share this machine's cores
OVERLAP = ["calibrated"]  # --overlap of every prediction (main sets it): calibrated or given, not fitted to the run
LINK_ORDER = ["auto"]  # --link-order of every prediction (main sets it)


def overlap_of(fits: dict) -> str:
    """--overlap of the predictions: `calibrated` (the default) is `calibrated_overlap`, 1 where the fits have no
    computing calibration (an earlier version's); else OVERLAP as given."""
    if OVERLAP[0] != "calibrated":
        return OVERLAP[0]
    return "1" if not fits.get("overlap") else f"{calibrated_overlap(fits):.6g}"


def calibrated_overlap(fits: dict) -> float:
    """The share of the model's link rate that a computing rank's progress thread gets: the computing
    calibration's CONCURRENT Ireduces as llmpy.predict.network prices them on the fitted network, over the time
    they took while both ranks computed (at most 1). In the model's units, not the progress thread's idle rate:
    where the idle progress thread itself moves less than the network (unshaped here), that shows too."""
    priced = priced_calibration(network_fit(fits), PROGRESSED_BYTES)
    return min(1.0, priced / max(fits["overlap"]["computing_s"], 1e-9))


def error(predicted: float, measured: float | None) -> float | None:
    return None if not measured else (predicted - measured) / measured


def checked(document: dict) -> dict:
    """The step and each communication component with its error and whether it is within the target."""
    rows = [{"name": "step", "predicted_ms": document["step_ms"], "measured_ms": document["measured_step_ms"],
             "target": STEP_TARGET}]
    for component in document["components"]:
        if any(component["name"].endswith(word) for word in COMMUNICATION):
            rows.append(dict(component, target=COMMUNICATION_TARGET))
    for row in rows:  # a component the run did not measure (no trace: no waits by collective) is not judged
        row["error"] = error(row["predicted_ms"], row["measured_ms"])
        row["within"] = None if row["error"] is None else abs(row["error"]) <= row["target"]
    return {"rows": rows, "overlap": document["target"]["overlap"]}


def format_results(results: list[dict]) -> str:
    lines = [("link fits: Gbit/s of the network (Sendrecv exchanges) / of several collectives in flight, polled; "
              "alpha of the network"),
             (f"{'run':28s} {'Gbit/s':>11s} {'alpha us':>8s} {'component':32s} {'predicted':>10s} "
              f"{'measured':>10s} {'error':>8s}  target")]
    for r in results:
        for i, row in enumerate(r["check"]["rows"]):
            fits = r["fits"]
            rates = f"{fits['exchange']['bandwidth_gbit']:.2f}/{fits['polled']['bandwidth_gbit']:.2f}"
            label = r.get("run") or f"{r['strategy']} over {r['link']}"
            head = f"{label:28s} {rates:>11s} {fits['exchange']['latency_us']:8.0f}" if i == 0 else " " * 49
            measured = f"{row['measured_ms']:10.1f}" if row["measured_ms"] is not None else f"{'-':>10s}"
            err = f"{100 * row['error']:+7.1f}%" if row["error"] is not None else f"{'-':>8s}"
            mark = {True: "ok", False: "MISSED", None: "not measured"}[row["within"]] + f" ({100 * row['target']:.0f}%)"
            if row["name"] == "step":
                capped = r["capped_step_ms"]
                mark += f"   capped: {capped:.1f} ({100 * error(capped, row['measured_ms']):+.1f}%)"
            lines.append(f"{head} {row['name']:32s} {row['predicted_ms']:10.1f} {measured} {err}  {mark}")
    steps = [row for r in results for row in r["check"]["rows"] if row["name"] == "step"]
    parts = [row for r in results for row in r["check"]["rows"] if row["name"] != "step"]
    judged = [r for r in parts if r["within"] is not None]
    lines.append(f"step within {100 * STEP_TARGET:.0f}%: {sum(bool(r['within']) for r in steps)} of {len(steps)}; "
                 f"communication components within {100 * COMMUNICATION_TARGET:.0f}%: "
                 f"{sum(r['within'] for r in judged)} of {len(judged)} measured")
    return "\n".join(lines)


def main(argv=None) -> None:
    if argv is None and sys.argv[1:] == ["--exchange-worker"]:
        return exchange_worker()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    multihost.add_run_arguments(parser, steps=3)
    parser.add_argument("--runs", help="check the runs kept in this folder instead of measuring new ones")
    parser.add_argument("--overlap", default="calibrated",
                        help="--overlap of the predictions: 'calibrated' (default: the share of the link a computing "
                             "rank's progress thread got in the calibration, 1 in fits without it), a share, or "
                             "'measured' (fitted to each validated run: not a prediction)")
    parser.add_argument("--link-order", default="auto", choices=LINK_ORDERS,
                        help="--link-order of the predictions (llmpy predict --help)")
    parser.add_argument("--reference", help="with --runs: the 1-rank run to predict from, or 'strategy' (each run from "
                                            "its strategy's reference-STRATEGY-0 beside it; default: each run itself)")
    parser.add_argument("--fits", help="with --runs: links fitted before (an earlier --json of this script)")
    parser.add_argument("--keep", help="keep the runs in this folder (default: a temporary one)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    OVERLAP[0], LINK_ORDER[0] = args.overlap, args.link_order
    reason = netns_hosts.skip_reason()
    if reason and not (args.runs and args.fits):
        parser.exit(2, f"bench/predict_validation.py: {reason}\n")
    rates = args.rates.split(",")
    for rate in rates:
        if rate not in multihost.RATES:
            parser.error(f"--rates: {rate!r} is not one of {', '.join(multihost.RATES)}")
    if args.runs:
        results = predict_kept_runs(args, rates)
    else:
        with tempfile.TemporaryDirectory(prefix="llmpy-predict-") as scratch:
            work = Path(args.keep or scratch)
            work.mkdir(parents=True, exist_ok=True)
            results = measure_and_predict(args, work, rates)
    print(format_results(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def measure_and_predict(args, work: Path, rates: list[str]) -> list[dict]:
    results = []
    with netns_hosts.NetnsHosts(2) as hosts:
        links = {rate: calibrate(hosts, rate, args.timeout) for rate in rates}
        share = poll_share()
        for rate, fits in links.items():
            fits["poll_share"] = share
            print(link_line(rate, fits), flush=True)
        earlier: list[float] = []  # the references' steps so far
        for strategy in args.strategies.split(","):
            reference = steady_reference(hosts, args, work, strategy, earlier)
            for rate in rates:
                run = measured_run(hosts, strategy, rate, args, work)
                document = predict(reference, run, links[rate])
                capped = predict(reference, run, links[rate], capped=True)
                results.append({"strategy": strategy, "link": rate, "reference": str(reference),
                                "fits": links[rate], "check": checked(document),
                                "prediction": document, "capped_step_ms": capped["step_ms"]})
                step = results[-1]["check"]["rows"][0]
                print(f"{strategy} over {rate}: predicted {step['predicted_ms']:.1f} ms, measured "
                      f"{step['measured_ms']:.1f} ms", flush=True)
    return results


# Every strategy's reference is the same command; one whose step is further than this from the median of those
# before it ran in one of the shared machine's slow minutes (pv44: 3274 ms against 2325-2352) and is run again
REFERENCE_SPREAD = 0.15


def steady_reference(hosts, args, work: Path, strategy: str, earlier: list) -> Path:
    """`strategy`'s reference run (folders without a rate in their names: --runs skips them), run once more where
    its step is more than REFERENCE_SPREAD off the median of the `earlier` ones (the second is kept); its step is
    appended to `earlier`."""
    def measure() -> tuple[Path, dict]:
        reference = reference_run(hosts, args, work, reference_prefix(strategy))
        phases = json.loads((reference / "metrics.json").read_text())["summary"]["phases_ms"]
        print(f"reference for {strategy} (1 rank per host, both at once): "
              + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()), flush=True)
        return reference, phases

    reference, phases = measure()
    typical = statistics.median(earlier) if earlier else phases["step"]
    if abs(phases["step"] / typical - 1) > REFERENCE_SPREAD:
        print(f"reference for {strategy}: step {phases['step']:.1f} ms is more than {REFERENCE_SPREAD:.0%} off "
              f"the median of the references before it ({typical:.1f} ms): measured again", flush=True)
        reference, phases = measure()
    earlier.append(phases["step"])
    return reference


def reference_prefix(strategy: str) -> str:
    """The folders of a strategy's reference run in --keep, before the host's index."""
    return f"reference-{strategy}-"


def kept_reference(choice: str | None, run: Path) -> Path:
    """The run `run` is predicted from: itself (None), the reference its strategy's runs had ('strategy': the
    folder reference-STRATEGY-0 beside it), or the folder `choice`."""
    if choice is None:
        return run
    if choice == "strategy":
        reference = run.parent / f"{reference_prefix(run.name.split('-')[0])}0"
        if not (reference / "metrics.json").is_file():
            raise SystemExit(f"bench/predict_validation.py: --reference strategy: {reference} has no metrics.json")
        return reference
    return Path(choice)


def predict_kept_runs(args, rates: list[str]) -> list[dict]:
    """The runs in --runs (folders named STRATEGY-RATE-...), predicted from --reference or from themselves."""
    runs = []
    for folder in sorted(Path(args.runs).iterdir()):
        rate = next((part for part in folder.name.split("-") if part in rates), None)
        if (folder / "metrics.json").is_file() and rate is not None:
            runs.append((folder, rate))
    if not runs:
        raise SystemExit(f"bench/predict_validation.py: no STRATEGY-RATE-... folders with metrics.json in {args.runs}")
    if args.fits:
        links = {r["link"]: r["fits"] for r in json.loads(Path(args.fits).read_text())}
        for fits in links.values():  # the cap in this version's units (network_fit) from the time it measured
            fits["progressed_cap"] = progressed_cap(network_fit(fits), fits["progressed_cap"]["seconds"],
                                                    PROGRESSED_BYTES)
    else:
        with netns_hosts.NetnsHosts(2) as hosts:
            links = {rate: calibrate(hosts, rate, args.timeout) for rate in sorted({r for _, r in runs})}
    share = None if all("poll_share" in fits for fits in links.values()) else poll_share()
    for rate, fits in links.items():
        fits.setdefault("poll_share", share)  # fits of a version that did not measure it: measured now
        print(link_line(rate, fits), flush=True)
    results, scratch = [], Path(tempfile.mkdtemp(prefix="llmpy-predict-"))  # predictions out of the runs' folders
    for folder, rate in runs:
        reference = kept_reference(args.reference, folder)
        out = Path(args.keep or scratch) / folder.name
        document = predict(reference, folder, links[rate], out=out)
        capped = predict(reference, folder, links[rate], capped=True, out=out)
        strategy = document["target"]["strategy"]
        results.append({"strategy": strategy, "link": rate, "run": folder.name, "fits": links[rate],
                        "check": checked(document), "prediction": document, "capped_step_ms": capped["step_ms"]})
    return results


if __name__ == "__main__":
    main()
