"""`llmpy convert SOURCE DEST`: between llm.c model files and Hugging Face GPT-2 folders, fp32 or bf16.

SOURCE is an llm.c `.bin` or a Hugging Face folder (config.json + model.safetensors); DEST ending in `.bin`
is written as an llm.c model file, anything else as a Hugging Face folder.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="llm.c model .bin, or a Hugging Face GPT-2 folder")
    parser.add_argument("dest", help="DEST.bin: llm.c model file; any other name: Hugging Face folder")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="precision of what is written (default float32; bfloat16 rounds to nearest even)")


def run(args, out=None) -> None:
    out = out if out is not None else sys.stdout  # the stream of the call, not of the import
    from llmpy.io.formats import write_model
    from llmpy.io.huggingface import load_model_source, write_huggingface

    if os.path.abspath(args.source) == os.path.abspath(args.dest):
        raise ValueError(f"{args.dest}: is the source itself; name another destination")
    config, params = load_model_source(args.source)
    if args.dest.endswith(".bin"):
        if os.path.isdir(args.dest):
            raise ValueError(f"{args.dest}: is a folder; an llm.c model file was asked for (name ending in .bin)")
        write_model(args.dest, config, params, args.dtype)
        kind = "llm.c model file"
    else:
        if os.path.exists(args.dest) and not os.path.isdir(args.dest):
            raise ValueError(f"{args.dest}: exists and is not a folder (an llm.c file is named DEST.bin)")
        write_huggingface(args.dest, config, params, args.dtype)
        kind = "Hugging Face GPT-2 folder"
    print(f"wrote {args.dest} ({kind}, {args.dtype}; {config.num_layers} layers, {config.channels} channels, "
          f"vocabulary {config.vocab_size})", file=out)
