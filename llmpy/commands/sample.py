"""Text generation from a model: `llmpy sample`, and the samples printed during training."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import numpy as np

from llmpy.core.config import GPT2_EOT_TOKEN, GPT2_VOCAB_SIZE
from llmpy.core.model import GPT2


def start_token(vocab_size: int) -> int:
    """Generation starts from <|endoftext|> for GPT-2's vocabulary (as llm.c does), else the last id."""
    return GPT2_EOT_TOKEN if vocab_size == GPT2_VOCAB_SIZE else vocab_size - 1


def token_decoder(vocab_size: int) -> Callable[[list[int]], str]:
    """GPT-2 BPE decoding for GPT-2's vocabulary; token ids as text for any other vocabulary."""
    if vocab_size == GPT2_VOCAB_SIZE:
        from llmpy.io.tokenizer import Tokenizer

        tokenizer = Tokenizer.gpt2()
        return lambda ids: tokenizer.decode([i for i in ids if i != GPT2_EOT_TOKEN])
    return lambda ids: " ".join(str(i) for i in ids)


def inference_execution(threads: int):
    """The execution model for sampling and evaluation: sequential on one thread, else fork-join on `threads`."""
    from llmpy.execution.factory import make_execution_model

    if threads is None or threads < 1:
        raise ValueError(f"--threads {threads}: must be at least 1")
    return make_execution_model("sequential" if threads == 1 else "forkjoin", threads)


def next_token_distribution(logits: np.ndarray, temperature: float, top_k: int) -> np.ndarray:
    """Probabilities (V,) from one row of logits (V,), after temperature and top-k filtering."""
    scaled = logits.astype(np.float64) / max(temperature, 1e-8)
    if 0 < top_k < scaled.size:
        cutoff = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled < cutoff, -np.inf, scaled)
    scaled -= scaled.max()
    probs = np.exp(scaled)
    return probs / probs.sum()


def generate(model: GPT2, prompt: list[int], length: int, temperature: float = 1.0, top_k: int = 0,
             rng: np.random.Generator | None = None) -> list[int]:
    """`length` new tokens after `prompt` (<|endoftext|> if empty), one forward per token over the last
    (at most model.T) tokens; returns only the new tokens."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    rng = rng if rng is not None else np.random.default_rng()
    context = list(prompt) or [start_token(model.config.vocab_size)]
    new: list[int] = []
    for _ in range(length):
        window = np.array(context[-model.T:], dtype=np.int32)[None, :]
        model.forward(window)
        probs = next_token_distribution(model.logits()[0, -1], temperature, top_k)
        token = int(rng.choice(probs.size, p=probs))
        context.append(token)
        new.append(token)
    return new


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODEL",
                        help="llm.c model checkpoint or Hugging Face GPT-2 folder")
    parser.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    parser.add_argument("--length", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: unseeded)")


def run(args, out=sys.stdout) -> str:
    from llmpy.io.huggingface import load_model_source
    from llmpy.kernels import KernelSet

    if args.length <= 0:
        raise ValueError(f"--length must be positive, got {args.length}")
    config, params = load_model_source(args.model)
    prompt: list[int] = []
    if args.prompt:
        if config.vocab_size != GPT2_VOCAB_SIZE:
            raise ValueError(f"--prompt needs GPT-2's vocabulary ({GPT2_VOCAB_SIZE}); {args.model} has {config.vocab_size}")
        from llmpy.io.tokenizer import Tokenizer

        prompt = Tokenizer.gpt2().encode(args.prompt)
    T = min(config.max_seq_len, max(1, len(prompt)) + args.length)
    model = GPT2(config, 1, T, KernelSet(parallel=False), training=False)
    model.load_parameters(params)
    tokens = generate(model, prompt, args.length, args.temperature, args.top_k, np.random.default_rng(args.seed))
    text = token_decoder(config.vocab_size)(tokens)
    print(args.prompt + text, file=out)
    return text
