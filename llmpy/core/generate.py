"""Generation with a KV cache: each forward computes the new positions only, reading cached keys and values.

The cache is each layer's qkv rows (b, maxT, 3C) as the attention kernel reads them: the new positions'
q, k, v are written into rows [t0, t1) and the kernel's causal-prefix form (query rows [t0, t1) attend to
keys 0..t) gives their attention outputs. Every other kernel is token-wise and runs on the new rows only;
the logits are computed for each sequence's last new position only.

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
from llmpy.kernels import KernelSet


class KVCacheModel:
    """GPT-2's forward over new positions of `batch` sequences of up to `max_len` positions."""

    def __init__(self, config: GPT2Config, params: FlatBuffer, batch: int, max_len: int, kernels: KernelSet):
        if not 0 < max_len <= config.max_seq_len:
            raise ValueError(f"{max_len} positions do not fit the model's max_seq_len of {config.max_seq_len}")
        self.config, self.params, self.kernels = config, params, kernels
        self.batch, self.max_len = batch, max_len
        C, L, NH = config.channels, config.num_layers, config.num_heads
        self.qkv = np.zeros((L, batch, max_len, 3 * C), np.float32)  # the cache: k, v (and q) of every position
        self.atty = np.zeros((batch, max_len, C), np.float32)
        self.attention_scratch = attention_scratch(batch, NH, max_len)
        rows = batch * max_len  # per-row activations, for up to every position at once (the prefill)
        shapes = {"x": C, "ln": C, "qkv_new": 3 * C, "atty_rows": C, "attproj": C, "residual2": C, "fch": 4 * C,
                  "fch_gelu": 4 * C, "fcproj": C}
        self.rows = {name: np.zeros((rows, width), np.float32) for name, width in shapes.items()}
        self.mean, self.rstd = np.zeros(rows, np.float32), np.zeros(rows, np.float32)
        self.length = 0  # positions in the cache

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (batch, n) at positions [length, length + n): logits (batch, V) of the last one."""
        b, n = tokens.shape
        t0, t1 = self.length, self.length + n
        if b != self.batch or n < 1 or t1 > self.max_len:
            raise ValueError(f"tokens {tokens.shape} at position {t0}: the cache holds {self.batch} sequences of "
                             f"{self.max_len} positions")
        k, p, N = self.kernels, self.params, b * n
        r = {name: buffer[:N] for name, buffer in self.rows.items()}
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        for s in range(b):  # positions t0.. of each sequence (the kernel's row0 offset, modulo maxT)
            k.encoder_forward(r["x"][s * n:(s + 1) * n], tokens[s], p.wte, p.wpe, self.config.max_seq_len, t0)
        for l in range(self.config.num_layers):
            self._layer(l, r, b, n, t0, t1)
        self.length = t1
        return self._logits(r["x"].reshape(b, n, -1)[:, -1])

    def _layer(self, l: int, r: dict, b: int, n: int, t0: int, t1: int) -> None:
        """One transformer block on the new rows; its output replaces r["x"]."""
        k, p, N = self.kernels, self.params, b * n
        mean, rstd = self.mean[:N], self.rstd[:N]
        k.layernorm_forward(r["ln"], mean, rstd, r["x"], p.ln1w[l], p.ln1b[l])
        k.matmul_forward(r["qkv_new"], r["ln"], p.qkvw[l], p.qkvb[l])
        cache = self.qkv[l]
        cache[:, t0:t1] = r["qkv_new"].reshape(b, n, -1)
        attend(k, self.atty, self.attention_scratch, cache, self.config.num_heads, b, t0, t1)
        r["atty_rows"][...] = self.atty[:, t0:t1].reshape(N, -1)
        k.matmul_forward(r["attproj"], r["atty_rows"], p.attprojw[l], p.attprojb[l])
        k.residual_forward(r["residual2"].reshape(-1), r["x"].reshape(-1), r["attproj"].reshape(-1))
        k.layernorm_forward(r["ln"], mean, rstd, r["residual2"], p.ln2w[l], p.ln2b[l])
        k.matmul_forward(r["fch"], r["ln"], p.fcw[l], p.fcb[l])
        k.gelu_forward(r["fch_gelu"].reshape(-1), r["fch"].reshape(-1))
        k.matmul_forward(r["fcproj"], r["fch_gelu"], p.fcprojw[l], p.fcprojb[l])
        k.residual_forward(r["x"].reshape(-1), r["residual2"].reshape(-1), r["fcproj"].reshape(-1))

    def _logits(self, last: np.ndarray) -> np.ndarray:
        b, C = last.shape
        x = np.ascontiguousarray(last)
        lnf = np.empty_like(x)
        self.kernels.layernorm_forward(lnf, self.mean[:b], self.rstd[:b], x, self.params.lnfw, self.params.lnfb)
        logits = np.empty((b, self.config.padded_vocab_size), np.float32)
        self.kernels.matmul_forward(logits, lnf, self.params.wte, None)
        return logits[:, :self.config.vocab_size]


# The attention kernel's causal-prefix form, in one place: switching kernels is a change here only.
def attention_scratch(batch: int, num_heads: int, max_len: int) -> tuple[np.ndarray, ...]:
    """What the attention kernel writes besides its output: the tiled kernel's per-row log-sum-exp (B, NH, T)."""
    return (np.zeros((batch, num_heads, max_len), np.float32),)


def attend(kernels: KernelSet, out, scratch, qkv, num_heads: int, b: int, t0: int, t1: int) -> None:
    """out rows [t0, t1) of sequences [0, b): query rows [t0, t1) of qkv (b, T, 3C) attending to keys 0..t."""
    kernels.attention_forward(out, *scratch, qkv, num_heads, 0, b, t0, t1)


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
