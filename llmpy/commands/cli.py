"""The `llmpy` command: prepare, train, sample, eval, convert, verify, bench, analyze, plot, graph, predict,
report."""

from __future__ import annotations

import argparse
import os
import sys

import llmpy  # noqa: F401  (sets the thread-pool environment before numpy loads)


def _prepare(args) -> int:
    from llmpy.data import prepare as data

    if args.dataset == "tinyshakespeare":
        prepared = data.prepare_tinyshakespeare(args.data_dir, args.input)
    elif args.dataset == "text":
        if not args.files:
            raise ValueError("llmpy prepare text needs at least one text file or a folder")
        if len(args.files) == 1 and os.path.isdir(args.files[0]):
            size = data.DEFAULT_SHARD_TOKENS if args.shard_size is None else args.shard_size
            prepared = data.prepare_folder(args.data_dir, args.files[0], args.name, size)
        elif args.shard_size is not None:
            raise ValueError("--shard-size applies to `llmpy prepare text FOLDER` only")
        else:
            prepared = data.prepare_text(args.data_dir, args.files, name=args.name)
    elif args.dataset == "default":
        prepared = data.prepare_default_corpus(args.data_dir)
    elif args.dataset == "hellaswag":
        path, count = data.prepare_hellaswag(args.data_dir, args.input)
        print(f"hellaswag: {count:,} examples -> {path} (llm.c's eval file; `llmpy eval --file {path}`)")
        return 0
    else:  # tokenizer
        from llmpy.io.tokenizer import write_gpt2_tokenizer_file

        write_gpt2_tokenizer_file(args.output)
        print(f"wrote {args.output} (llm.c tokenizer file, GPT-2 BPE, 50257 tokens)")
        return 0
    print(f"{prepared.name}: {prepared.num_train_tokens:,} training tokens -> {prepared.train_pattern}")
    print(f"{prepared.name}: {prepared.num_val_tokens:,} validation tokens -> {prepared.val_pattern}")
    return 0


def _train(args) -> int:
    from llmpy.commands import train

    train.run(args)
    return 0


def _sample(args) -> int:
    from llmpy.commands import sample

    sample.run(args)
    return 0


def _eval(args) -> int:
    from llmpy.commands import evaluate

    evaluate.run(args)
    return 0


def _convert(args) -> int:
    from llmpy.commands import convert

    convert.run(args)
    return 0


def _predict(args) -> int:
    from llmpy.commands import predict

    predict.run(args)
    return 0


def _report(args) -> int:
    from llmpy.commands import report

    report.run(args)
    return 0


def _verify(args) -> int:
    from llmpy.commands import verify

    return 0 if verify.run(args) else 1


def _bench(args) -> int:
    from llmpy.commands import bench

    bench.run(args)
    return 0


def _analyze(args) -> int:
    from llmpy.observe.analysis import analyze
    from llmpy.observe.report import write_analysis

    print(analyze(args.trace_dir))
    paths = write_analysis(args.trace_dir)
    print("wrote " + ", ".join(paths.values()))
    return 0


def _plot(args) -> int:
    from llmpy.observe import plots

    if args.kind == "timeline":
        from llmpy.observe.trace import Trace

        steps = None
        if args.steps:
            first, _, last = args.steps.partition(":")
            steps = (int(first), int(last or first))
        output = args.output or os.path.join(args.source, "timeline.png")
        plots.timeline_png(Trace.load(args.source), output, steps=steps)
        print(f"wrote {output}")
    elif args.kind == "scaling":
        import json

        try:
            with open(args.source) as f:
                results = json.load(f)
        except (OSError, ValueError) as error:
            raise ValueError(f"{args.source}: cannot read benchmark results ({error}); write them with "
                             "`llmpy bench --json FILE`") from None
        paths = plots.scaling_pngs(results, args.output or os.path.dirname(os.path.abspath(args.source)))
        print("wrote " + ", ".join(paths))
    elif args.kind == "log":
        from llmpy.observe.llmc_log import read_main_log

        output = args.output or os.path.splitext(args.source)[0] + ".png"
        print(f"wrote {plots.loss_curves_png(read_main_log(args.source), output, os.path.basename(args.source))}")
    else:  # roofline
        from llmpy.observe.report import write_analysis

        print("wrote " + write_analysis(args.source)["roofline_png"])
    return 0


def _graph(args) -> int:
    from llmpy.core.config import preset
    from llmpy.core.model import GPT2
    from llmpy.core.optim import AdamW
    from llmpy.execution.options import TaskOptions
    from llmpy.execution.tasks.execution import build_step_graph

    model = GPT2(preset(args.model), args.batch_size, args.seq_len)  # buffers stay untouched (lazily zero pages)
    # --overlap-steps: a step of an overlapping run, the previous step's update at its head and none at its end
    step = build_step_graph(model, AdamW(model.params), with_update=not args.overlap_steps,
                            leading_update=args.overlap_steps, options=TaskOptions(args.block_tokens))
    graph = step.graph
    print(f"{args.model}, B={args.batch_size}, T={args.seq_len}, K={step.block_tokens}: {len(graph)} tasks, "
          f"{len(graph.edges())} edges, estimated critical path {1e3 * graph.critical_path():.1f} ms of "
          f"{1e3 * sum(t.cost for t in graph.tasks):.1f} ms of work")
    if args.output:
        print(f"wrote {graph.save(args.output)}")
    if args.png:
        from llmpy.execution.tasks.plot import task_graph_png

        print(f"wrote {task_graph_png(graph, args.layer, args.png)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from llmpy.commands import bench, convert, evaluate, predict, report, sample, train, verify
    from llmpy.core.config import PRESETS

    parser = argparse.ArgumentParser(
        prog="llmpy",
        description="GPT-2 training in Python, llm.c style: hand-written kernels, several execution models.",
    )
    parser.add_argument("--version", action="version", version=f"llmpy {llmpy.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    prepare = sub.add_parser("prepare", help="tokenize a dataset into llm.c shards (or write the tokenizer file)",
                             description="Tokenize text with GPT-2's BPE into llm.c data shards, llm.c's way: "
                                         "sections split on blank lines, <|endoftext|> before each, the first "
                                         "32,768 tokens for validation.")
    prepare.add_argument("dataset", choices=("tinyshakespeare", "text", "default", "hellaswag", "tokenizer"),
                         help="tinyshakespeare (downloads unless --input), text FILES... or FOLDER, default (offline "
                              "corpus of Python docstrings), hellaswag (llm.c's eval file from hellaswag_val.jsonl; "
                              "downloads unless --input), tokenizer (writes llm.c's gpt2_tokenizer.bin)")
    prepare.add_argument("files", nargs="*", help="text files, or one folder, for `prepare text`")
    prepare.add_argument("--input", help="tinyshakespeare's input.txt or hellaswag_val.jsonl already on disk "
                                         "(no download)")
    prepare.add_argument("--name", default="text", help="dataset name for `prepare text` (default text)")
    prepare.add_argument("--shard-size", type=int, metavar="TOKENS",
                         help="`prepare text FOLDER` (.txt, .jsonl with a text field, .parquet): tokens per shard, "
                              "the first shard for validation, as llm.c's fineweb.py (default 100,000,000)")
    prepare.add_argument("--data-dir", default=train.DEFAULT_DATA_DIR, help="output folder (default ./data)")
    prepare.add_argument("--output", default="gpt2_tokenizer.bin", help="file for `prepare tokenizer`")
    prepare.set_defaults(handler=_prepare)

    train_parser = sub.add_parser("train", help="train GPT-2 (llm.c's loop: B=4, T=64, 40 steps by default)",
                                  description="Train GPT-2 with llm.c's loop, printing loss, ms, tokens/s and MFU "
                                              "per step, validation loss and samples.")
    train.add_arguments(train_parser)
    train_parser.set_defaults(handler=_train)

    sample_parser = sub.add_parser("sample", help="generate text from a checkpoint",
                                   description="Generate text from an llm.c model checkpoint.")
    sample.add_arguments(sample_parser)
    sample_parser.set_defaults(handler=_sample)

    eval_parser = sub.add_parser("eval", help="HellaSwag accuracy on llm.c's eval file (acc_norm, acc)",
                                 description=evaluate.__doc__)
    evaluate.add_arguments(eval_parser)
    eval_parser.set_defaults(handler=_eval)

    convert_parser = sub.add_parser("convert", help="llm.c model file <-> Hugging Face GPT-2 folder (fp32 or bf16)",
                                    description=convert.__doc__)
    convert.add_arguments(convert_parser)
    convert_parser.set_defaults(handler=_convert)

    bench_parser = sub.add_parser("bench", help="time training steps over modes x threads x runtimes",
                                  description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(handler=_bench)

    analyze_parser = sub.add_parser("analyze", help="POP efficiency metrics and roofline of a trace",
                                    description="Print the POP efficiency metrics (load balance, serialization, "
                                                "parallel efficiency) per step and phase and the roofline table of "
                                                "a trace written with --trace; writes pop.csv, roofline.csv and "
                                                "roofline.png into the trace folder.")
    analyze_parser.add_argument("trace_dir", help="folder written by `llmpy train --trace DIR` or `llmpy bench --trace`")
    analyze_parser.set_defaults(handler=_analyze)

    plot_parser = sub.add_parser("plot", help="timeline, scaling, roofline or loss-curve pictures (PNG)",
                                 description="timeline TRACE_DIR: threads as rows, kernels as coloured bars; "
                                             "scaling RESULTS.json: runtime, speedup and efficiency against threads "
                                             "(from `llmpy bench --json`); roofline TRACE_DIR; log MAIN_LOG: "
                                             "train/val loss and HellaSwag accuracy of an llm.c main.log "
                                             "(`llmpy train --log-dir`).")
    plot_parser.add_argument("kind", choices=("timeline", "scaling", "roofline", "log"))
    plot_parser.add_argument("source", help="trace folder (timeline, roofline), bench results JSON (scaling) or "
                                            "main.log (log)")
    plot_parser.add_argument("--output", help="PNG file (timeline, log) or folder (scaling); default beside the source")
    plot_parser.add_argument("--steps", help="timeline: steps to show, N or FIRST:LAST (default all)")
    plot_parser.set_defaults(handler=_plot)

    graph_parser = sub.add_parser("graph", help="the task graph of one training step (--mode tasks): DOT/JSON, PNG",
                                  description="Build the task graph of one training step (forward, backward, AdamW "
                                              "on blocks of K tokens) and write it as DOT (.dot/.gv) or JSON, and a "
                                              "picture of one layer's tasks as PNG.")
    graph_parser.add_argument("--model", default="d12", choices=sorted(PRESETS), help="model preset (default d12)")
    graph_parser.add_argument("-B", "--batch-size", type=int, default=4, help="batch size (default 4)")
    graph_parser.add_argument("-T", "--seq-len", type=int, default=64, help="sequence length (default 64)")
    graph_parser.add_argument("--block-tokens", type=int, metavar="K", help="tokens per block (default: -T)")
    graph_parser.add_argument("--output", help="graph file: .dot/.gv for Graphviz DOT, else JSON")
    graph_parser.add_argument("--png", help="PNG picture of one layer's tasks")
    graph_parser.add_argument("--layer", type=int, default=0, help="layer drawn in the PNG (default 0; -1: outside)")
    graph_parser.add_argument("--overlap-steps", action="store_true",
                              help="the graph of a step of an --overlap-steps run (the previous step's update first)")
    graph_parser.set_defaults(handler=_graph)

    predict_parser = sub.add_parser("predict", help="step time of a measured run on other ranks, links and cores",
                                    description=predict.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_arguments(predict_parser)
    predict_parser.set_defaults(handler=_predict)

    report_parser = sub.add_parser("report", help="one self-contained HTML page of a run or a benchmark",
                                   description=report.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_arguments(report_parser)
    report_parser.set_defaults(handler=_report)

    verify_parser = sub.add_parser("verify", help="check llmpy against llm.c's debug state (test_gpt2)",
                                   description=verify.__doc__)
    verify.add_arguments(verify_parser)
    verify_parser.set_defaults(handler=_verify)
    return parser


def _describe(error: BaseException) -> str:
    """The error as the command line says it: an option by its flag."""
    from llmpy.core.errors import OptionError

    if isinstance(error, OptionError):
        value = "" if isinstance(error.value, bool) else f" {error.value}"
        return f"--{error.option.replace('_', '-')}{value} {error.problem}"
    return str(error)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from llmpy.data.loader import DataError
    from llmpy.execution.threads import ExecutionError
    from llmpy.io.formats import FormatError
    from llmpy.io.tokenizer import TokenizerError

    try:
        return args.handler(args)
    except (FormatError, DataError, ExecutionError, TokenizerError, ValueError, FloatingPointError,
            RuntimeError) as error:
        if os.environ.get("LLMPY_DEBUG"):
            raise
        print(f"llmpy {args.command}: error: {_describe(error)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`llmpy ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:
        if os.environ.get("LLMPY_DEBUG"):
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"llmpy {args.command}: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmpy {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
