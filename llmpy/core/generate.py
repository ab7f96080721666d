"""Generation with a KV cache: each forward computes the new positions only, reading cached keys and values.

The model describes that forward itself (`GPT2.decode_calls`): its forward list over the new positions, with the
embeddings at those positions and the attention kernel's cached form, which writes the new q, k, v rows into each
layer's cache and lets the new queries attend to every cached key (the tiled kernel's causal-prefix form). The
logits of each sequence's last new position are returned.

Sequences of a batch share their positions: prompts of different lengths are fed token by token past the
shortest one (no padding, so every sequence gets what it would get alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from llmpy.core.config import GPT2Config
from llmpy.core.errors import OptionError
from llmpy.core.layout import FlatBuffer
from llmpy.core.model import GPT2
from llmpy.kernels import KernelSet


class KVCacheModel:
    """GPT-2 (inference only: one layer of activations) and its cache, for `batch` sequences of up to `max_len`
    positions; the parameters are `params`' (not copied)."""

    def __init__(self, config: GPT2Config, params: FlatBuffer, batch: int, max_len: int, kernels: KernelSet):
        if not 0 < max_len <= config.max_seq_len:
            raise ValueError(f"{max_len} positions do not fit the model's max_seq_len of {config.max_seq_len}")
        self.config, self.batch, self.max_len = config, batch, max_len
        self.model = GPT2(config, batch, max_len, kernels, training=False, params=params)
        self.cache = self.model.kv_cache(batch, max_len)

    @property
    def length(self) -> int:
        """Positions in the cache."""
        return self.cache.length

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (batch, n) at positions [length, length + n): logits (batch, V) of the last one."""
        return self.model.decode(np.asarray(tokens), self.cache)


# ----------------------------------------------------------------------------
# choosing tokens


@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (the likeliest token); top_k 0 and top_p 1.0: no filtering."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise OptionError("temperature", self.temperature, "must be >= 0 (0: greedy)")
        if self.top_k < 0:
            raise OptionError("top_k", self.top_k, "must be >= 0 (0: no top-k filtering)")
        if not 0.0 < self.top_p <= 1.0:
            raise OptionError("top_p", self.top_p, "must be in (0, 1] (1: no nucleus filtering)")


def token_probabilities(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """Probabilities (V,) from one row of logits (V,) after temperature, top-k and top-p (nucleus) filtering."""
    scaled = logits.astype(np.float64) / max(sampling.temperature, 1e-8)
    if 0 < sampling.top_k < scaled.size:
        cutoff = np.partition(scaled, -sampling.top_k)[-sampling.top_k]
        scaled = np.where(scaled < cutoff, -np.inf, scaled)
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    if sampling.top_p < 1.0:  # the smallest set of likeliest tokens whose probability reaches top_p
        order = np.argsort(-probs, kind="stable")
        keep = np.searchsorted(np.cumsum(probs[order]), sampling.top_p) + 1
        filtered = np.zeros_like(probs)
        filtered[order[:keep]] = probs[order[:keep]]
        probs = filtered / filtered.sum()
    return probs


def choose_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    probs = token_probabilities(logits, sampling)
    return int(rng.choice(probs.size, p=probs))


def generate(model: KVCacheModel, prompts: list[list[int]], max_new: int, sampling: Sampling,
             seed: int | None = None, stop_token: int | None = None,
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Up to `max_new` new tokens after each prompt (non-empty), stopping a sequence after `stop_token`;
    on_token(sequence, token) as each one is chosen. Sequence s samples from its own generator seeded
    (seed, s), so it gets the tokens it would get alone. Returns the new tokens of each sequence."""
    if len(prompts) != model.batch or not all(prompts) or max_new < 1:
        raise ValueError(f"need {model.batch} non-empty prompts and max_new >= 1, got {[len(p) for p in prompts]}, "
                         f"{max_new}")
    rngs = [np.random.default_rng(None if seed is None else [seed, s]) for s in range(len(prompts))]
    shortest = min(len(p) for p in prompts)
    logits = model.forward(np.array([p[:shortest] for p in prompts]))  # the common prefill
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    while True:
        position, feed = model.length, []
        for s, prompt in enumerate(prompts):
            if position < len(prompt) or done[s]:  # still reading its prompt, or finished (its rows are unused)
                feed.append(prompt[position] if position < len(prompt) else new[s][-1])
                continue
            token = choose_token(logits[s], sampling, rngs[s])
            feed.append(token)
            new[s].append(token)
            if on_token is not None:
                on_token(s, token)
            done[s] = len(new[s]) == max_new or token == stop_token
        if all(done):
            return new
        logits = model.forward(np.array(feed)[:, None])


def positions_needed(prompts: list[list[int]], max_new: int) -> int:
    """Cache positions `generate` uses: the longest prompt and all but the last new token."""
    return max(len(p) for p in prompts) + max_new - 1
