"""`llmpy eval`: multiple-choice accuracy (HellaSwag) on llm.c's eval file, as llm.c's `-h 1` and hellaswag.py count it."""

from __future__ import annotations

import argparse
import sys
import time

from llmpy.core.model import GPT2
from llmpy.data.evaluation import EvalScore, check_examples_fit, eval_batches, score_batch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODEL",
                        help="llm.c model checkpoint or Hugging Face GPT-2 folder")
    parser.add_argument("--file", required=True, metavar="EVAL_BIN",
                        help="llm.c eval file (magic 20240522), e.g. from `llmpy prepare hellaswag`")
    parser.add_argument("-B", "--batch-size", type=int, default=16,
                        help="rows per forward pass, 4 per example (default 16: 4 examples)")
    parser.add_argument("--threads", type=int, default=1, help="threads for the kernels and BLAS (default 1)")
    parser.add_argument("--limit", type=int, help="evaluate the first N examples only")


def eval_seq_len(examples, config) -> int:
    """The shortest T that holds every row (context + completion + 1), a multiple of 16, at most maxT."""
    needed = max(example.longest for example in examples) + 1
    return min(config.max_seq_len, -(-needed // 16) * 16)


def evaluate(model: GPT2, examples, where: str) -> EvalScore:
    """Score every example with full (B, T) forward passes (so `model.acts.losses` is the batch's losses)."""
    check_examples_fit(examples, model.B, model.T, where)
    score = EvalScore()
    for batch in eval_batches(examples, model.B, model.T):
        model.forward(batch.inputs, batch.targets)
        score_batch(score, batch, model.acts.losses)
    return score


def describe(score: EvalScore) -> str:
    """llm.c's line (acc_norm), then hellaswag.py's unnormalised accuracy."""
    return (f"HellaSwag: {score.correct_norm}/{score.total} = {score.accuracy_norm:.6f} (acc_norm); "
            f"acc {score.correct}/{score.total} = {score.accuracy:.6f}")


def run(args, out=None) -> EvalScore:
    out = out if out is not None else sys.stdout  # the stream of the call, not of the import
    from llmpy.commands.sample import inference_execution
    from llmpy.io.evalfile import read_eval_file
    from llmpy.io.huggingface import load_model_source

    if args.batch_size < 4 or args.batch_size % 4:
        raise ValueError(f"--batch-size {args.batch_size}: must be a positive multiple of 4 (4 rows per example)")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit {args.limit}: must be positive")
    examples = read_eval_file(args.file)[:args.limit]
    config, params = load_model_source(args.model)
    execution = inference_execution(args.threads)
    try:
        model = GPT2(config, args.batch_size, eval_seq_len(examples, config), execution.kernels, training=False)
        model.load_parameters(params)
        start = time.perf_counter()
        with execution.activate():
            score = evaluate(model, examples, args.file)
        elapsed = time.perf_counter() - start
    finally:
        execution.close()
    print(f"{describe(score)} ({elapsed:.1f} s, {score.total / elapsed:.1f} examples/s)", file=out)
    return score


class TrainingEval:
    """HellaSwag during training (`train --eval-every`): its own inference model of 4 * (B // 4) rows (at least
    4) over the examples' length, on the training model's parameters (shared, not copied)."""

    def __init__(self, path: str, model: GPT2):
        from llmpy.io.evalfile import read_eval_file

        self.path = path
        self.examples = read_eval_file(path)
        config = model.config
        self.model = GPT2(config, 4 * max(1, model.B // 4), eval_seq_len(self.examples, config), model.kernels,
                          training=False, params=model.params)
        check_examples_fit(self.examples, self.model.B, self.model.T, path)

    def score(self) -> EvalScore:
        return evaluate(self.model, self.examples, self.path)
