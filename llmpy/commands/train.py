"""`llmpy train`: llm.c's training loop (train_gpt2.c) on a chosen execution model."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from llmpy.core.config import (ATTENTION_KINDS, CLASSIFIER_ROWS, PRESETS, RECOMPUTE_LEVELS, ActivationOptions, GPT2Config,
                               preset)
from llmpy.execution.base import ExecutionModel
from llmpy.execution.factory import MODES, make_execution_model
from llmpy.execution.threads import THREADING_LAYERS, available_cores
from llmpy.execution.options import MPI_PROGRESS, RANK_MODES, RUNTIMES, GEMM_SPLITS, STRATEGIES, MpiOptions, TaskOptions
from llmpy.io.checkpoints import Checkpoint, checkpoint_steps, identity_mismatch, latest_checkpoint, new_run_id
from llmpy.io.checkpoints import save_checkpoint as write_checkpoint
from llmpy.io.formats import RunState, is_model_file, remove_stale_temporaries, write_model
from llmpy.io.huggingface import load_model_source
from llmpy.observe.llmc_log import MainLog
from llmpy.observe.metrics import (StepStats, format_kernel_table, kernel_summary, measured_steps,
                           phase_summary, step_flops, write_run_metrics)
from llmpy.observe.probes import measure_peak_gflops
from llmpy.observe.recorder import Recorder
from llmpy.core.model import GPT2
from llmpy.core.optim import AdamWConfig, LearningRateSchedule

DEFAULT_DATA_DIR = "data"
# A loss this many times ln(V) (a uniform guess over the vocabulary) means the run diverged: stop, save nothing.
DIVERGED = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default=os.environ.get("LLMPY_DATA_DIR", DEFAULT_DATA_DIR),
                      help="folder of prepared datasets (default: ./data, or $LLMPY_DATA_DIR); with no dataset "
                           "there, an offline corpus of Python standard-library docstrings is built first")
    data.add_argument("--train-data", help="glob pattern of training shards (overrides --data-dir)")
    data.add_argument("--val-data", help="glob pattern of validation shards (default: the training set's val split)")
    data.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                      help="llm.c's training order (default): each epoch, shards and the batches in each shard "
                           "permuted by mt19937 seeded --seed + rank, as llm.c's train_gpt2 with its seed 42; "
                           "--no-shuffle reads the files in order")

    model = parser.add_argument_group("model")
    model.add_argument("--init-from", metavar="MODEL",
                       help="start from an llm.c model checkpoint or a Hugging Face GPT-2 folder")
    model.add_argument("--model", default="d12", choices=sorted(PRESETS),
                       help="preset for random init when --init-from is not given (default d12 = GPT-2 124M)")
    model.add_argument("--seed", type=int, default=42, help="seed of the random init, shuffling and sampling")
    model.add_argument("--attention", default="flash", choices=ATTENTION_KINDS,
                       help="flash (default): tiled attention that stores one log-sum-exp per row; llmc: llm.c's, "
                            "storing the (T, T) scores and probabilities of every layer")
    model.add_argument("--recompute", type=int, default=0, choices=RECOMPUTE_LEVELS,
                       help="recompute in backward instead of keeping: 1 the GELU outputs, 2 also the layernorm "
                            "outputs (as llm.c's -r; default 0)")
    model.add_argument("--classifier-rows", type=int, default=CLASSIFIER_ROWS, metavar="R",
                       help="token rows per chunk of the classifier (lm_head, cross-entropy and their gradients on "
                            "one R x Vp buffer instead of B*T x Vp, to save memory; default 0: the whole batch); "
                            "backward recomputes the logits of every chunk but the last (slower, see bench/README.md)")

    run = parser.add_argument_group("run")
    run.add_argument("-B", "--batch-size", type=int, default=4, help="sequences per micro-batch (default 4)")
    run.add_argument("-T", "--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    run.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    run.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    run.add_argument("--mode", default="forkjoin", choices=MODES,
                     help="execution model (default forkjoin, as llm.c's OpenMP build; sequential = 1 thread)")
    run.add_argument("--threads", type=int,
                     help="threads for forkjoin, numba and BLAS alike (default: every available core)")
    run.add_argument("--threading-layer", default="omp", choices=THREADING_LAYERS,
                     help="numba threading layer for forkjoin (default omp)")
    run.add_argument("--workers", type=int, help="tasks: worker threads (default: --threads, else every core)")
    run.add_argument("--block-tokens", type=int, metavar="K",
                     help="tasks: tokens per block of a sequence; must divide -T (default: -T, whole sequences)")
    run.add_argument("--runtime", choices=RUNTIMES,
                     help="tasks: llmpy's own scheduler (native, default) or Dask's threaded scheduler")
    run.add_argument("--overlap-steps", action="store_true",
                     help="tasks: let a step's forward start while the previous step's updates run; mpi: "
                          "leave the parameter collectives (zero1, server, owners) in flight for the next "
                          "forward, which waits for each bucket where it first reads it")
    run.add_argument("--gemm-split", choices=GEMM_SPLITS,
                     help="tasks: cut the forward and input-gradient GEMMs per token block (rows, default), or per "
                          "block of output columns over all tokens for the lm_head only (lm_head) or every GEMM "
                          "(channels): each weight is read once per step instead of once per token block")
    run.add_argument("--strategy", choices=STRATEGIES,
                     help="mpi (run under mpiexec): how the ranks combine gradients and update: allreduce (default), "
                          "zero1 (sharded AdamW state), server (rank 0 updates), owners (round-robin blocks)")
    run.add_argument("--mpi-timeout", type=float, metavar="SECONDS",
                     help="mpi: how long a rank waits for the others before it stops the run, naming the ranks "
                          "that do not answer (default 600)")
    run.add_argument("--mpi-progress", choices=MPI_PROGRESS,
                     help="mpi: what moves the collectives' data while kernels run: thread (default; a thread "
                          "that tests them every 0.1 ms and sleeps, needs MPI_THREAD_MULTIPLE) or tests (an "
                          "MPI_Test after each kernel or task)")
    run.add_argument("--no-comm-overlap", dest="comm_overlap", action="store_false",
                     help="mpi: start every collective in the update, after backward (the no-overlap baseline)")
    run.add_argument("--rank-mode", choices=RANK_MODES,
                     help="mpi: execution model inside each rank, on --threads threads (default: the node's cores "
                          "/ its ranks; sequential when that is 1, else forkjoin)")

    opt = parser.add_argument_group("optimizer (AdamW; defaults are llm.c's)")
    opt.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    opt.add_argument("--beta1", type=float, default=0.9)
    opt.add_argument("--beta2", type=float, default=0.999)
    opt.add_argument("--eps", type=float, default=1e-8)
    opt.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (default 0)")
    opt.add_argument("--decay-matrices-only", action="store_true",
                     help="apply weight decay to 2-D weight matrices only (default: all parameters, as llm.c)")
    opt.add_argument("--grad-clip", type=float, default=0.0, help="clip the global gradient norm (0 = off)")
    opt.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"))
    opt.add_argument("--warmup-steps", type=int, default=0)
    opt.add_argument("--final-lr-fraction", type=float, default=0.0,
                     help="cosine schedule ends at lr * this (default 0)")

    report = parser.add_argument_group("reporting and output")
    report.add_argument("--val-every", type=int, default=10, help="validation every N steps (default 10; 0 = off)")
    report.add_argument("--val-batches", type=int, default=5, help="batches per validation (default 5)")
    report.add_argument("--sample-every", type=int, default=20, help="sample every N steps (default 20; 0 = off)")
    report.add_argument("--sample-length", type=int, default=64, help="tokens per sample (default 64)")
    report.add_argument("--eval-every", type=int, default=0,
                        help="HellaSwag accuracy every N steps and at the end, as llm.c's -h 1 (default 0 = off)")
    report.add_argument("--eval-file", help="llm.c eval file for --eval-every (default: DATA_DIR/hellaswag_val.bin, "
                                            "from `llmpy prepare hellaswag`)")
    report.add_argument("--log-dir", help="write llm.c's DIR/main.log (s:N trl/tel/eval lines; `llmpy plot log`)")
    report.add_argument("--peak-gflops", type=float,
                        help="peak GFLOP/s of one core; MFU counts it once per thread (default: the float32 GEMM "
                             "peak measured on the threads used, cached)")
    report.add_argument("--output", default=os.path.join("out", "model.bin"),
                        help="model checkpoint written at the end (default out/model.bin; '' = none)")
    report.add_argument("--force", action="store_true",
                        help="let --output replace a file that is not an llm.c model file")
    report.add_argument("--checkpoint-every", type=int, default=0,
                        help="every N steps write a resumable checkpoint (model + optimizer and data position) "
                             "to --checkpoint-dir (0 = off)")
    report.add_argument("--checkpoint-dir", default=os.path.join("out", "checkpoints"),
                        help="folder of model_STEP.bin / state_STEP.bin checkpoints (default out/checkpoints)")
    report.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept (default 2; 0 = all)")
    report.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --checkpoint-dir (same data, B, T)")
    report.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it is shown only when stderr is a terminal anyway)")
    report.add_argument("--metrics-dir", default="out",
                        help="where metrics.json, steps.csv and kernels.csv are written (default out; '' = none)")
    report.add_argument("--warmup-report-steps", type=int, default=1,
                        help="first steps left out of averages and tables (default 1)")
    report.add_argument("--trace", metavar="DIR",
                        help="record what every thread ran and write DIR/trace.json (Perfetto), DIR/trace.prv "
                             "(Paraver) and DIR/events.json (for llmpy analyze / llmpy plot)")


@dataclass
class TrainResult:
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, HellaSwag acc_norm)
    samples: list[str] = field(default_factory=list)
    steps: list[StepStats] = field(default_factory=list)
    kernels: list = field(default_factory=list)  # metrics.KernelSummary rows
    phases: dict = field(default_factory=dict)  # mean ms per phase
    trace_paths: dict = field(default_factory=dict)


def _load_data(args, vocab_size: int, B: int, T: int, say, execution: ExecutionModel | None = None):
    """Training and validation loaders; each rank of a data-parallel run reads its own windows."""
    from llmpy.data.loader import DataLoader
    from llmpy.data.prepare import find_dataset, prepare_default_corpus

    rank, world_size = (execution.rank, execution.world_size) if execution is not None else (0, 1)
    train_pattern, val_pattern = args.train_data, args.val_data
    if train_pattern is None:
        dataset = find_dataset(args.data_dir)
        if dataset is None and world_size > 1:  # rank 0 builds the corpus while the others wait for it
            if rank == 0:
                prepare_default_corpus(args.data_dir)
            execution.group.agree()
            dataset = find_dataset(args.data_dir)
        if dataset is None:
            start = time.perf_counter()
            dataset = prepare_default_corpus(args.data_dir)
            say(f"no prepared dataset in {args.data_dir}/: built the offline default corpus 'pydocs' (Python "
                f"standard-library docstrings, {dataset.num_train_tokens + dataset.num_val_tokens:,} GPT-2 tokens, "
                f"{time.perf_counter() - start:.1f} s); `llmpy prepare tinyshakespeare` for llm.c's default data")
        train_pattern = dataset.train_pattern
        val_pattern = val_pattern or dataset.val_pattern
        say(f"dataset: {dataset.name} ({dataset.num_train_tokens:,} train / {dataset.num_val_tokens:,} val tokens)")
    train = DataLoader(train_pattern, B, T, rank, world_size, shuffle=args.shuffle, seed=args.seed,
                       vocab_size=vocab_size)
    val = (DataLoader(val_pattern, B, T, rank, world_size, vocab_size=vocab_size)
           if val_pattern and args.val_every > 0 else None)
    return train, val


def build_model(args, execution: ExecutionModel, B: int, T: int, say) -> tuple[GPT2, Checkpoint | None]:
    """The model (from --init-from, the newest verified checkpoint with --resume, or random init) and the
    checkpoint it came from."""
    checkpoint = None
    if args.resume:
        checkpoint = latest_checkpoint(args.checkpoint_dir, say)
        if checkpoint is None:
            raise ValueError(f"--resume: no checkpoint (state_STEP.bin with its model_STEP.bin) in {args.checkpoint_dir}")
        config, params = checkpoint.config, checkpoint.params
    elif args.init_from:
        config, params = load_model_source(args.init_from)
    else:
        config, params = preset(args.model), None
    activations = ActivationOptions(args.attention, args.recompute, args.classifier_rows)
    _check_memory(config, B, T, args.grad_accum, activations)
    model = GPT2(config, B, T, execution.kernels, activations=activations)
    if params is None:
        model.init_random(args.seed)
    else:
        model.load_parameters(params)
    return model, checkpoint


def _check_memory(config: GPT2Config, B: int, T: int, grad_accum: int, options: ActivationOptions) -> None:
    """Refuse before allocating what the machine does not have: parameters, gradients and AdamW moments, and
    activations with one layer of their gradients (llmpy.core.layout)."""
    from llmpy.core.layout import activation_gradient_shapes, activation_shapes

    shapes = {**activation_shapes(config, B, T, options), **activation_gradient_shapes(config, B, T, options)}
    needed = 4 * (4 * config.num_parameters() + sum(int(np.prod(s)) for s in shapes.values()))
    available = _available_memory()
    if available is not None and needed > available:
        raise ValueError(f"-B {B} -T {T} needs about {needed / 2**30:.1f} GiB for parameters, AdamW state and "
                         f"activations; this machine has {available / 2**30:.1f} GiB available (lower -B or -T; "
                         f"--grad-accum {grad_accum} costs no memory)")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _model_shape(config: GPT2Config) -> list[int]:
    return [config.max_seq_len, config.vocab_size, config.num_layers, config.num_heads, config.channels]


def run_identity(args, config: GPT2Config, B: int, T: int, loader, world_size: int) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    return {"model": _model_shape(config),
            # without shuffling, the rows a step reads depend on B x world size only (llm.c's rank layout), so a
            # run resumes on another world size with the same sequences per step
            "sequences_per_step": B * world_size, **({"batch_size": B, "world_size": world_size} if args.shuffle else {}),
            "seq_len": T, "grad_accum": args.grad_accum, "seed": args.seed, "shuffle": bool(args.shuffle),
            "train_data": [[os.path.basename(f), os.path.getsize(f)] for f in loader.files]}


def _writable_folder(path: str, flag: str) -> None:
    """Create `path` if needed and check a file can be made there, before any step runs."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".llmpy-write-check-")
        os.close(fd)
        os.remove(probe)
    except FileExistsError:
        raise ValueError(f"{flag} {path}: exists and is not a folder") from None
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot write there ({error.strerror or error})") from None
    remove_stale_temporaries(path)


def _check_outputs(args) -> None:
    if args.output:
        if os.path.isdir(args.output):
            raise ValueError(f"--output {args.output}: is a folder; name the model file to write")
        if os.path.exists(args.output) and not args.force and not is_model_file(args.output):
            raise ValueError(f"--output {args.output}: exists and is not an llm.c model file; it is left alone "
                             "(--force replaces it)")
        _writable_folder(os.path.dirname(os.path.abspath(args.output)), "--output")
    for flag, folder in (("--metrics-dir", args.metrics_dir), ("--trace", args.trace), ("--log-dir", args.log_dir),
                         ("--checkpoint-dir", args.checkpoint_dir if args.checkpoint_every else None)):
        if folder:
            _writable_folder(folder, flag)


def _refuse_overwriting_checkpoints(args) -> None:
    """A fresh run never writes over another run's checkpoints in its folder."""
    taken = [step for step in checkpoint_steps(args.checkpoint_dir)
             if step <= args.steps and step % args.checkpoint_every == 0]
    if taken:
        raise ValueError(f"--checkpoint-dir {args.checkpoint_dir}: holds another run's checkpoints at steps "
                         f"{', '.join(map(str, sorted(taken)))}, which this run would overwrite; --resume that run, "
                         "or give another --checkpoint-dir")


def _agreement_fields(args, config: GPT2Config) -> dict:
    """What every rank of a data-parallel run must have been started with."""
    names = ("batch_size", "seq_len", "steps", "grad_accum", "strategy", "rank_mode", "lr", "beta1", "beta2", "eps",
             "weight_decay", "decay_matrices_only", "grad_clip", "lr_schedule", "warmup_steps", "final_lr_fraction",
             "seed", "shuffle", "val_every", "val_batches", "checkpoint_every", "block_tokens", "gemm_split", "mpi_progress",
             "comm_overlap", "overlap_steps")
    fields = {f"--{name.replace('_', '-')}": getattr(args, name) for name in names}
    fields["model"] = _model_shape(config)
    return fields


def _check_finite_state(step: int, model: GPT2, optimizer) -> None:
    """Before anything is saved: parameters and AdamW moments must be finite."""
    m, v = optimizer.flat_moments()
    for what, values in (("the parameters", model.params.flat), ("AdamW m", m), ("AdamW v", v)):
        if not np.isfinite(values).all():
            raise FloatingPointError(f"step {step}: {what} hold non-finite values after the update; nothing of this "
                                     "step is saved (the last checkpoint stays as it was); lower --lr or use "
                                     "--grad-clip")


def _hellaswag(args, model: GPT2):
    """The HellaSwag evaluation of --eval-every on the training model's parameters (None when off)."""
    from llmpy.commands.evaluate import TrainingEval

    return TrainingEval(_eval_file(args), model) if args.eval_every else None


def _eval_file(args) -> str:
    return args.eval_file or os.path.join(args.data_dir, "hellaswag_val.bin")


def _grad_norm(optimizer, model: GPT2, execution: ExecutionModel, grad_accum: int) -> float:
    """The step's global gradient norm for the log: the optimizer's when it clips, else computed here on one
    process (ranks hold gradients in their strategy's own way: nan)."""
    norm = getattr(optimizer, "last_grad_norm", None)
    if norm is not None:
        return norm
    if execution.world_size > 1:
        return float("nan")
    grads = model.grads.flat
    return math.sqrt(float(np.dot(grads, grads))) / grad_accum  # float32 BLAS dot: no copy of the gradients


def _check_args(args) -> None:
    for name in ("batch_size", "seq_len", "steps", "grad_accum", "val_batches", "sample_length"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**31:
        raise ValueError(f"--seed must be in [0, 2^31), got {args.seed}")
    if args.eval_every and not os.path.exists(_eval_file(args)):
        raise ValueError(f"--eval-file {_eval_file(args)}: not found; write it with `llmpy prepare hellaswag` "
                         "(llm.c's eval file)")
    if args.resume and args.init_from:
        raise ValueError("--resume continues from the checkpoint's own model; drop --init-from")
    for name in ("val_every", "eval_every", "sample_every", "checkpoint_every", "warmup_steps", "keep_checkpoints",
                 "warmup_report_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")


def execution_options(args, threads: int) -> tuple:
    """(threads, threading layer, TaskOptions | MpiOptions | None) for make_execution_model, from the flags;
    refuses flags that do not apply to --mode."""
    task_flags = {"--workers": args.workers is not None, "--block-tokens": args.block_tokens is not None,
                  "--runtime": args.runtime is not None,
                  "--overlap-steps": args.overlap_steps and args.mode != "mpi",  # mpi: the strategy's (below)
                  "--gemm-split": args.gemm_split is not None}
    tasks_inside_ranks = args.mode == "mpi" and args.rank_mode == "tasks"
    given = [flag for flag, set_ in task_flags.items() if set_]
    if args.mode != "tasks" and not tasks_inside_ranks and given:
        raise ValueError(f"{', '.join(given)} apply to --mode tasks (or --mode mpi --rank-mode tasks) only")
    mpi_flags = [flag for flag, set_ in (("--strategy", args.strategy), ("--rank-mode", args.rank_mode),
                                         ("--mpi-timeout", args.mpi_timeout),
                                         ("--mpi-progress", args.mpi_progress),
                                         ("--no-comm-overlap", not args.comm_overlap)) if set_]
    if args.mode != "mpi" and mpi_flags:
        raise ValueError(f"{', '.join(mpi_flags)} apply to --mode mpi only")
    if args.mode == "mpi":  # threads per rank; None: the node's cores shared by its ranks
        rank_threads = args.workers if tasks_inside_ranks and args.workers is not None else args.threads
        timeout = {} if args.mpi_timeout is None else {"timeout_s": args.mpi_timeout}
        return rank_threads, args.threading_layer, MpiOptions(args.strategy or "allreduce", args.rank_mode,
                                                              _task_options(args, overlap_steps=False), **timeout,
                                                              progress=args.mpi_progress or "thread",
                                                              overlap=args.comm_overlap,
                                                              overlap_steps=args.overlap_steps)
    if args.mode == "tasks":
        return args.workers or threads, args.threading_layer, _task_options(args)
    return threads, args.threading_layer, None


def _task_options(args, overlap_steps: bool | None = None) -> TaskOptions:
    overlap_steps = args.overlap_steps if overlap_steps is None else overlap_steps
    options = TaskOptions(args.block_tokens, args.runtime or "native", overlap_steps, args.gemm_split or "rows")
    options.tokens_per_block(args.seq_len)
    return options


def run_meta(args, config: GPT2Config, execution: ExecutionModel, peak: float, B: int, T: int) -> dict:
    """What a run was, for metrics files and traces."""
    meta = {"model": args.init_from or args.model, "num_parameters": config.num_parameters(),
            "num_layers": config.num_layers, "channels": config.channels, **execution.meta(), "B": B, "T": T,
            "grad_accum": args.grad_accum, "peak_gflops": peak, "warmup_steps": args.warmup_report_steps}
    if "block_tokens" in meta:
        meta["block_tokens"] = meta["block_tokens"] or T
    return meta


def step_row(stats: StepStats, record) -> dict:
    row = {"step": stats.step, "loss": stats.loss, "ms": stats.ms, "tokens_per_s": stats.tokens_per_second,
           "tokens_per_s_per_core": stats.tokens_per_second_per_core, "mfu": stats.mfu}
    for phase in ("forward", "zero_grad", "backward", "update"):
        span = record.phases.get(phase)
        row[f"{phase}_ms"] = 1e3 * (span[1] - span[0]) if span else 0.0
    return row


def save_checkpoint(args, step: int, model: GPT2, optimizer, loader, run_id: str, identity: dict,
                    execution: ExecutionModel) -> None:
    """A resumable checkpoint: one file of each kind, or (data-parallel ranks) the model and each rank's shard."""
    _check_finite_state(step, model, optimizer)
    state = RunState(step, args.seed, *loader.position(), *optimizer.flat_moments(), run_id, identity,
                     ranges=optimizer.moment_ranges())
    execution.save_checkpoint(args.checkpoint_dir, model.config, model.params.flat, state, args.keep_checkpoints)


def validation_loss(model: GPT2, loader, batches: int) -> float:
    loader.reset()
    total = 0.0
    for _ in range(batches):
        inputs, targets = loader.next_batch()
        total += model.forward(inputs, targets)
    return total / batches


def _resume(args, checkpoint: Checkpoint, identity: dict, optimizer, loader, say) -> int:
    """Continue the checkpoint's run: its AdamW state, step and data position. Returns the step it is at."""
    mismatch = identity_mismatch(checkpoint.state.identity, identity)
    if mismatch:
        raise ValueError(f"--resume: {checkpoint.state_path} is another run's checkpoint ({mismatch})")
    state = checkpoint.state
    optimizer.load_moments(state.m, state.v)  # this optimizer's part, whatever world size wrote them
    optimizer.step = state.step
    loader.seek(state.data_epoch, state.data_shard_position, state.data_sample_index)
    verified = "" if checkpoint.verified else " (a checkpoint from before checksums: not verified)"
    say(f"resumed from {checkpoint.state_path} after step {state.step}{verified}")
    if state.step > args.steps:
        raise ValueError(f"the checkpoint is at step {state.step}; ask for at least that many --steps")
    if state.step == args.steps:
        say("the checkpoint is the run's last step: finishing its final save")
    return state.step


def _report(args, result: TrainResult, recorder, execution, optimizer, meta: dict, say) -> None:
    """The run's summary: median step, per-kernel table, per-rank table, metrics files and the trace."""
    skip = args.warmup_report_steps
    measured = measured_steps(result.steps, skip)
    if not measured:
        return
    ms = np.median([s.ms for s in measured])
    say(f"median step {ms:.0f} ms, {np.median([s.tokens_per_second for s in measured]):,.0f} tok/s, "
        f"{np.median([s.tokens_per_second_per_core for s in measured]):,.0f} tok/s/core, "
        f"MFU {100 * np.median([s.mfu for s in measured]):.1f}% (median of {len(measured)} steps)")
    result.kernels = kernel_summary(recorder.kernel_totals, recorder.steps, skip)
    result.phases = phase_summary(recorder.steps, skip)
    say(format_kernel_table(result.kernels, result.phases))
    ranks = execution.group.rank_report(recorder, optimizer, skip)
    if ranks:
        from llmpy.execution.mpi.report import format_rank_report

        say(format_rank_report(ranks))
    if args.metrics_dir and execution.rank == 0:
        step_rows = [step_row(stats, record) for stats, record in zip(result.steps, recorder.steps)]
        summary = dict(meta, ms_per_step_median=float(ms), steps=len(result.steps), measured_steps=len(measured),
                       tokens_per_s=float(np.median([s.tokens_per_second for s in measured])),
                       mfu=float(np.median([s.mfu for s in measured])), phases_ms=result.phases,
                       **({"per_rank": ranks} if ranks else {}))
        paths = write_run_metrics(args.metrics_dir, summary, step_rows, result.kernels)
        say(f"wrote {paths['metrics.json']}, {paths['steps.csv']}, {paths['kernels.csv']}")
    if args.trace:
        from llmpy.observe.probes import measure_memory_bandwidth

        trace = execution.group.gather_trace(recorder, meta)  # every rank's, on rank 0
        if trace is not None:
            trace.meta["bandwidth_gbs"] = measure_memory_bandwidth(execution.threads)
            result.trace_paths = trace.save(args.trace)
            say(f"wrote trace to {args.trace}/ (trace.json for Perfetto, trace.prv for Paraver; "
                f"`llmpy analyze {args.trace}`)")


def run(args, out=None) -> TrainResult:
    out = out if out is not None else sys.stdout  # the stream of the call, not of the import
    from tqdm import tqdm

    from llmpy.commands.evaluate import describe as describe_eval
    from llmpy.commands.sample import generate, token_decoder

    _check_args(args)
    _check_outputs(args)
    B, T = args.batch_size, args.seq_len
    progress = None

    def say(line: str) -> None:
        if execution.rank != 0:  # data-parallel runs: rank 0 speaks for all
            return
        if progress is not None:
            progress.write(line, file=out)
        else:
            print(line, file=out, flush=True)

    threads = args.threads if args.threads is not None else (1 if args.mode == "sequential" else available_cores())
    threads, threading_layer, options = execution_options(args, threads)
    optimizer_config = AdamWConfig(args.beta1, args.beta2, args.eps, args.weight_decay, args.decay_matrices_only,
                                   args.grad_clip)
    schedule = LearningRateSchedule(args.lr, args.warmup_steps, args.steps, args.lr_schedule, args.final_lr_fraction)
    execution = make_execution_model(args.mode, threads, threading_layer, options)
    try:
        model, checkpoint = build_model(args, execution, B, T, say)
        config: GPT2Config = model.config
        train_loader, val_loader = _load_data(args, config.vocab_size, B, T, say, execution)
        hellaswag = _hellaswag(args, model)
        log = MainLog(args.log_dir, resume=checkpoint is not None) if args.log_dir and execution.rank == 0 else None
        optimizer = execution.make_optimizer(model, optimizer_config, args.grad_accum)
        peak = args.peak_gflops * execution.threads if args.peak_gflops else measure_peak_gflops(execution.threads)
        peak *= execution.world_size  # the rank's peak, once per rank
        decode = token_decoder(config.vocab_size)
        flops = step_flops(config, B, T) * args.grad_accum * execution.world_size
        say(f"model: {config.num_layers} layers, {config.num_heads} heads, {config.channels} channels, "
            f"{model.num_parameters:,} parameters; B={B}, T={T}, grad_accum={args.grad_accum}")
        say(f"execution: {execution.describe()}; MFU against {peak:.1f} GFLOP/s"
            f"{'' if args.peak_gflops else ' (measured float32 GEMM peak)'}")
        for line in execution.placement():
            say(line)
        identity = run_identity(args, config, B, T, train_loader, execution.world_size)
        first_step = 0 if checkpoint is None else _resume(args, checkpoint, identity, optimizer, train_loader, say)
        if checkpoint is None and args.checkpoint_every:
            _refuse_overwriting_checkpoints(args)
        run_id = (checkpoint.state.run_id if checkpoint is not None and checkpoint.verified
                  else new_run_id(identity, args.checkpoint_dir))
        execution.group.agree_on(dict(_agreement_fields(args, config), **{"the checkpoint's step": first_step}))
        execution.group.setup_done()
        result = TrainResult()
        recorder = Recorder(rank=execution.rank, per_thread=bool(args.trace), threads=execution.threads)
        model.observer = optimizer.observer = recorder
        progress = tqdm(total=args.steps, initial=first_step, unit="step", file=sys.stderr, leave=False,
                        dynamic_ncols=True, disable=True if args.no_progress or execution.rank else None)  # None: only on a terminal
        for step in range(first_step, args.steps + 1):
            last = step == args.steps
            recorder.enabled = False  # validation and samples are not part of the training step
            validate = val_loader is not None and (step % args.val_every == 0 or last)
            sample = args.sample_every > 0 and ((step > 0 and step % args.sample_every == 0) or last)
            evaluate = hellaswag is not None and ((step > 0 and step % args.eval_every == 0) or last)  # llm.c's -h
            if validate or sample or evaluate or last:
                execution.synchronize()  # --overlap-steps: the last step's update is done before reading parameters
            if validate:
                val_loss = execution.group.average(validation_loss(model, val_loader, args.val_batches))
                result.val_losses.append((step, val_loss))
                say(f"val loss {val_loss:.6f}")
                if log is not None:
                    log.val(step, val_loss)
            if evaluate:
                score = hellaswag.score()
                result.evals.append((step, score.accuracy_norm))
                say(describe_eval(score))
                if log is not None:
                    log.eval(step, score.accuracy_norm)
            if sample and execution.rank == 0:
                # seeded by step, so a resumed run samples what the uninterrupted one would
                tokens = generate(model, [], args.sample_length, rng=np.random.default_rng([args.seed, step]))
                text = decode(tokens)
                result.samples.append(text)
                say("generating:\n---\n" + text + "\n---")
            if last:
                break
            recorder.enabled = True
            start = time.perf_counter()
            batches = (train_loader.next_batch() for _ in range(args.grad_accum))
            loss = execution.train_step(model, optimizer, batches, schedule(step), recorder, step + 1)
            loss = execution.group.average(loss)
            elapsed = time.perf_counter() - start
            stats = StepStats(step + 1, loss, elapsed, B * T * args.grad_accum * execution.world_size, flops,
                              execution.cores, peak)
            result.steps.append(stats)
            result.train_losses.append(loss)
            if not np.isfinite(loss):
                raise FloatingPointError(f"step {step + 1}: loss is {loss}; lower --lr or enable --grad-clip")
            if loss > DIVERGED * np.log(config.vocab_size):
                raise FloatingPointError(f"step {step + 1}: loss {loss:.1f} is more than {DIVERGED}x that of a uniform "
                                         f"guess ({np.log(config.vocab_size):.1f}): the run diverged; nothing of this "
                                         "step is saved; lower --lr or enable --grad-clip")
            say(f"step {stats.step:4d}/{args.steps}: train loss {loss:.6f} ({stats.ms:.0f} ms, "
                f"{stats.tokens_per_second:,.0f} tok/s, {stats.tokens_per_second_per_core:,.0f} tok/s/core, "
                f"MFU {100 * stats.mfu:.1f}%)")
            progress.update(1)
            if log is not None:  # llm.c logs the step's own index (0-based)
                log.train(step, loss, schedule(step), _grad_norm(optimizer, model, execution, args.grad_accum))
            if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
                execution.synchronize()
                save_checkpoint(args, step + 1, model, optimizer, train_loader, run_id, identity, execution)
        progress.close()
        progress = None
        if args.output and execution.rank == 0:  # the model first: the reports come after it
            _check_finite_state(args.steps, model, optimizer)
            write_model(args.output, config, model.params.flat)
            say(f"wrote {args.output}")
        meta = run_meta(args, config, execution, peak / execution.world_size, B, T)  # the roof of one rank
        _report(args, result, recorder, execution, optimizer, meta, say)
        return result
    except BaseException as error:
        execution.group.fail(error)  # data-parallel runs: every rank stops (see llmpy.execution.mpi.strategies)
        raise
    finally:
        if progress is not None:
            progress.close()
        execution.close()
