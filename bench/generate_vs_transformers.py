"""Tokens/s of llmpy's KV-cache generation beside transformers' `generate` on the same random GPT-2 124M.

Both greedy from the same prompts and the same weights, on the same number of threads: transformers runs in a
worker process of its own, with the environment it would have without llmpy (llmpy sets OMP_WAIT_POLICY=PASSIVE
for its own thread pools; torch's are left as torch has them), builds a GPT2LMHeadModel with a fixed seed and
saves it; llmpy reads that folder through its Hugging Face import. The two take turns round by round (only one
computes at a time, so drift on a shared machine hits both alike); prints each round, the medians and whether
the two produced the same tokens.

    python bench/generate_vs_transformers.py --threads 2 --new 64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ORIGINAL_ENVIRONMENT = dict(os.environ)  # before llmpy is imported and sets its thread-pool variables


def transformers_worker(args) -> None:
    """Build and save the model, then one greedy generate per line read from stdin ('quit' ends)."""
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # GPT-2 124M, random weights
    model.save_pretrained(args.folder)
    prompts = torch.tensor(json.loads(args.prompts))
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            return
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompts, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "tokens": out[:, prompts.shape[1]:].tolist()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1, help="prompts generated together")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return transformers_worker(args)

    import llmpy  # noqa: F401  (its thread-pool environment, before numpy loads)
    import numpy as np

    prompts = np.random.default_rng(0).integers(0, 50257, size=(args.batch, args.prompt_tokens)).tolist()
    with tempfile.TemporaryDirectory() as folder:
        worker = subprocess.Popen(
            [sys.executable, __file__, "--worker", "--folder", folder, "--prompts", json.dumps(prompts),
             "--threads", str(args.threads), "--new", str(args.new)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ORIGINAL_ENVIRONMENT)
        try:
            if worker.stdout.readline().strip() != "ready":
                raise SystemExit("the transformers worker did not start")
            compare(args, prompts, folder, worker)
        finally:
            if worker.poll() is None:
                worker.stdin.write("quit\n")
                worker.stdin.close()
            worker.wait()


def compare(args, prompts, folder: str, worker) -> None:
    from llmpy.commands.sample import inference_execution
    from llmpy.core.generate import KVCacheModel, Sampling, generate, positions_needed
    from llmpy.core.layout import parameter_buffer
    from llmpy.io.huggingface import read_huggingface

    config, params = read_huggingface(folder)
    weights = parameter_buffer(config, params)
    execution = inference_execution(args.threads)
    tokens = args.batch * args.new
    rates = {"llmpy": [], "transformers": []}
    try:
        for round_ in range(args.rounds + 1):  # round 0 warms up (numba's cached kernels, torch's first calls)
            model = KVCacheModel(config, weights, args.batch, positions_needed(prompts, args.new), execution.kernels)
            start = time.perf_counter()
            with execution.activate():
                ours = generate(model, prompts, args.new, Sampling(temperature=0))
            llmpy_s = time.perf_counter() - start
            worker.stdin.write("go\n")
            worker.stdin.flush()
            theirs = json.loads(worker.stdout.readline())
            if round_:
                rates["llmpy"].append(tokens / llmpy_s)
                rates["transformers"].append(tokens / theirs["seconds"])
            print(f"round {round_}{' (warm-up)' if not round_ else ''}: llmpy {tokens / llmpy_s:.1f} tok/s, "
                  f"transformers {tokens / theirs['seconds']:.1f} tok/s, same tokens: {ours == theirs['tokens']}",
                  flush=True)
    finally:
        execution.close()
    ours, theirs = statistics.median(rates["llmpy"]), statistics.median(rates["transformers"])
    print(f"median over {args.rounds} rounds, GPT-2 124M, batch {args.batch}, {args.prompt_tokens}-token prompt, "
          f"{args.new} new tokens, {args.threads} threads: llmpy {ours:.1f} tok/s, transformers {theirs:.1f} tok/s "
          f"(llmpy / transformers = {ours / theirs:.2f})")


if __name__ == "__main__":
    main()
