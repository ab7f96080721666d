"""Tokens/s of llmpy's KV-cache generation beside transformers' `generate` on the same random GPT-2 124M.

Both greedy from the same prompt, the same weights (a GPT2LMHeadModel built with a fixed seed, saved and read
by llmpy's Hugging Face import), on the same number of threads (torch.set_num_threads; llmpy fork-join with
numba and OpenBLAS on those threads). Rounds alternate the two, so drift on a shared machine hits both alike;
prints each round and the medians, and whether the two produced the same tokens.

    python bench/generate_vs_transformers.py --threads 2 --new 64 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1, help="prompts generated together")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch
    import transformers

    from llmpy.commands.sample import inference_execution
    from llmpy.core.generate import KVCacheModel, Sampling, generate, positions_needed
    from llmpy.core.layout import parameter_buffer
    from llmpy.io.huggingface import read_huggingface

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # GPT-2 124M, random weights
    hf.generation_config.eos_token_id = None
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        config, params = read_huggingface(folder)
    prompts = np.random.default_rng(0).integers(0, 50257, size=(args.batch, args.prompt_tokens)).tolist()
    execution = inference_execution(args.threads)
    weights = parameter_buffer(config, params)
    positions = positions_needed(prompts, args.new)
    rates = {"llmpy": [], "transformers": []}
    try:
        for round_ in range(args.rounds + 1):  # round 0 warms up (numba compilation, torch's first calls)
            model = KVCacheModel(config, weights, args.batch, positions, execution.kernels)
            start = time.perf_counter()
            with execution.activate():
                ours = generate(model, prompts, args.new, Sampling(temperature=0))
            llmpy_s = time.perf_counter() - start
            start = time.perf_counter()
            with torch.no_grad():
                theirs = hf.generate(torch.tensor(prompts), max_new_tokens=args.new, min_new_tokens=args.new,
                                     do_sample=False, pad_token_id=0)
            torch_s = time.perf_counter() - start
            same = ours == theirs[:, args.prompt_tokens:].tolist()
            tokens = args.batch * args.new
            if round_:
                rates["llmpy"].append(tokens / llmpy_s)
                rates["transformers"].append(tokens / torch_s)
            print(f"round {round_}{' (warm-up)' if not round_ else ''}: llmpy {tokens / llmpy_s:.1f} tok/s, "
                  f"transformers {tokens / torch_s:.1f} tok/s, same tokens: {same}", flush=True)
    finally:
        execution.close()
    ours, theirs = statistics.median(rates["llmpy"]), statistics.median(rates["transformers"])
    print(f"median over {args.rounds} rounds, GPT-2 124M, batch {args.batch}, {args.prompt_tokens}-token prompt, "
          f"{args.new} new tokens, {args.threads} threads: llmpy {ours:.1f} tok/s, transformers {theirs:.1f} tok/s "
          f"(llmpy / transformers = {ours / theirs:.2f})")


if __name__ == "__main__":
    main()
