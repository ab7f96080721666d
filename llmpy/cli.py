"""The `llmpy` command: prepare, train, sample, verify."""

from __future__ import annotations

import argparse
import os
import sys

import llmpy  # noqa: F401  (sets the thread-pool environment before numpy loads)


def _prepare(args) -> int:
    from llmpy import data

    if args.dataset == "tinyshakespeare":
        prepared = data.prepare_tinyshakespeare(args.data_dir, args.input)
    elif args.dataset == "text":
        if not args.files:
            raise ValueError("llmpy prepare text needs at least one text file")
        prepared = data.prepare_text(args.data_dir, args.files, name=args.name)
    elif args.dataset == "default":
        prepared = data.prepare_default_corpus(args.data_dir)
    else:  # tokenizer
        from llmpy.tokenizer import write_gpt2_tokenizer_file

        write_gpt2_tokenizer_file(args.output)
        print(f"wrote {args.output} (llm.c tokenizer file, GPT-2 BPE, 50257 tokens)")
        return 0
    print(f"{prepared.name}: {prepared.num_train_tokens:,} training tokens -> {prepared.train_pattern}")
    print(f"{prepared.name}: {prepared.num_val_tokens:,} validation tokens -> {prepared.val_pattern}")
    return 0


def _train(args) -> int:
    from llmpy import train

    train.run(args)
    return 0


def _sample(args) -> int:
    from llmpy import sample

    sample.run(args)
    return 0


def _verify(args) -> int:
    from llmpy import verify

    return 0 if verify.run(args) else 1


def build_parser() -> argparse.ArgumentParser:
    from llmpy import sample, train, verify

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
    prepare.add_argument("dataset", choices=("tinyshakespeare", "text", "default", "tokenizer"),
                         help="tinyshakespeare (downloads unless --input), text FILES..., default (offline corpus "
                              "of Python docstrings), tokenizer (writes llm.c's gpt2_tokenizer.bin)")
    prepare.add_argument("files", nargs="*", help="text files, for `prepare text`")
    prepare.add_argument("--input", help="tinyshakespeare's input.txt already on disk (no download)")
    prepare.add_argument("--name", default="text", help="dataset name for `prepare text` (default text)")
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

    verify_parser = sub.add_parser("verify", help="check llmpy against llm.c's debug state (test_gpt2)",
                                   description=verify.__doc__)
    verify.add_arguments(verify_parser)
    verify_parser.set_defaults(handler=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from llmpy.data import DataError
    from llmpy.execution import ExecutionError
    from llmpy.formats import FormatError
    from llmpy.tokenizer import TokenizerError

    try:
        return args.handler(args)
    except (FormatError, DataError, ExecutionError, TokenizerError, ValueError, FloatingPointError) as error:
        if os.environ.get("LLMPY_DEBUG"):
            raise
        print(f"llmpy {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmpy {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
