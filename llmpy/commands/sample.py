"""Text generation from a model: `llmpy sample` (KV-cache generation), and the samples printed during training."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import numpy as np

from llmpy.core.config import GPT2_EOT_TOKEN, GPT2_VOCAB_SIZE, end_of_text_token
from llmpy.core.generate import KVCacheModel, Sampling, choose_token
from llmpy.core.model import GPT2


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


def generate(model: GPT2, prompt: list[int], length: int, temperature: float = 1.0, top_k: int = 0,
             rng: np.random.Generator | None = None) -> list[int]:
    """`length` new tokens after `prompt` (<|endoftext|> if empty) with a KV cache over the training model's own
    parameters (the samples during training); past max_seq_len positions the cache restarts from the context's
    last half. Returns only the new tokens."""
    sampling = Sampling(temperature, top_k)
    rng = rng if rng is not None else np.random.default_rng()
    context = list(prompt) or [end_of_text_token(model.config.vocab_size)]
    window = model.config.max_seq_len

    def prefill(tokens: list[int]) -> tuple[KVCacheModel, np.ndarray]:
        cache = KVCacheModel(model.config, model.params, 1, min(window, len(tokens) + length), model.kernels)
        return cache, cache.forward(np.array([tokens]))[0]

    cache, logits = prefill(context[-window:])
    new: list[int] = []
    while True:
        token = choose_token(logits, sampling, rng)
        context.append(token)
        new.append(token)
        if len(new) == length:
            return new
        if cache.length == cache.max_len:
            cache, logits = prefill(context[-(window // 2):])
        else:
            logits = cache.forward(np.array([[token]]))[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODEL",
                        help="llm.c model checkpoint or Hugging Face GPT-2 folder")
    parser.add_argument("--prompt", action="append",
                        help="text to continue (default: start of a document); repeat for a batch of prompts")
    parser.add_argument("--length", type=int, default=64, help="most new tokens per prompt (default 64)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0; 0 = greedy)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample among the likeliest tokens whose probability reaches p (default 1.0 = all)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: unseeded)")
    parser.add_argument("--threads", type=int, default=1, help="threads for the kernels and BLAS (default 1)")
    parser.add_argument("--no-stream", action="store_true", help="print the text at the end, not token by token")


class _Stream:
    """Prints one sequence's text as its tokens come, holding back an incomplete UTF-8 character."""

    def __init__(self, decode, out):
        self.decode, self.out, self.tokens, self.printed = decode, out, [], 0

    def __call__(self, sequence: int, token: int) -> None:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        if not text.endswith("\ufffd"):
            print(text[self.printed:], end="", file=self.out, flush=True)
            self.printed = len(text)


def _prompts(args, vocab_size: int) -> list[tuple[str, list[int]]]:
    texts = args.prompt or [""]
    if any(texts) and vocab_size != GPT2_VOCAB_SIZE:
        raise ValueError(f"--prompt needs GPT-2's vocabulary ({GPT2_VOCAB_SIZE}); {args.model} has {vocab_size}")
    from llmpy.io.tokenizer import Tokenizer

    encode = Tokenizer.gpt2().encode if any(texts) else None
    return [(text, (encode(text) if text else []) or [end_of_text_token(vocab_size)]) for text in texts]


def run(args, out=None, err=None) -> list[str]:
    """Generate after each prompt with a KV cache; stream a single prompt's text; tokens/s on stderr."""
    out = out if out is not None else sys.stdout  # the stream of the call, not of the import
    err = err if err is not None else sys.stderr
    from llmpy.core.generate import positions_needed, generate as generate_kv
    from llmpy.core.layout import parameter_buffer
    from llmpy.io.huggingface import load_model_source

    if args.length <= 0:
        raise ValueError(f"--length must be positive, got {args.length}")
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    config, params = load_model_source(args.model)
    prompts = _prompts(args, config.vocab_size)
    ids = [tokens for _, tokens in prompts]
    positions = positions_needed(ids, args.length)
    if positions > config.max_seq_len:
        raise ValueError(f"--length {args.length}: the prompt and the new tokens need {positions} positions; "
                         f"{args.model} has {config.max_seq_len}")
    decode = token_decoder(config.vocab_size)
    stream = _Stream(decode, out) if len(prompts) == 1 and not args.no_stream else None
    stop = GPT2_EOT_TOKEN if config.vocab_size == GPT2_VOCAB_SIZE else None
    execution = inference_execution(args.threads)
    try:
        model = KVCacheModel(config, parameter_buffer(config, params), len(prompts), positions, execution.kernels)
        if stream is not None:
            print(prompts[0][0], end="", file=out, flush=True)
        start = time.perf_counter()
        with execution.activate():
            new = generate_kv(model, ids, args.length, sampling, args.seed, stop, stream)
        elapsed = time.perf_counter() - start
    finally:
        execution.close()
    texts = [decode(tokens) for tokens in new]
    if stream is not None:
        print(texts[0][stream.printed:], file=out)
    else:
        for (prompt, _), text in zip(prompts, texts):
            print(prompt + text, file=out)
    count = sum(map(len, new))
    print(f"{count} tokens in {elapsed:.2f} s: {count / elapsed:.1f} tok/s ({len(prompts)} sequence"
          f"{'s' if len(prompts) > 1 else ''}, {execution.threads} thread{'s' if execution.threads > 1 else ''}, "
          "KV cache)", file=err)
    return texts
