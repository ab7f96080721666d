"""Is `llmpy bench --vs torch`'s PyTorch baseline what a PyTorch user would write? Its step time beside a plain
nanoGPT-style GPT-2 written here independently (its own classes and init, weights tied by sharing the Parameter,
the loss over all padded logits), and beside the previous baseline that indexed layers out of stacked (L, ...)
tensors, run alternately (A B C A B C ...) in one process on the same batch and thread count.

    python bench/torch_baseline_check.py --model d12 -B 4 -T 64 --threads 2 --rounds 6
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmpy.commands.torch_baseline import TorchGPT2Baseline
from llmpy.core.config import preset
from llmpy.core.layout import parameter_buffer
from llmpy.core.model import init_parameters


class CausalSelfAttention(nn.Module):
    def __init__(self, C, NH):
        super().__init__()
        self.c_attn, self.c_proj, self.n_head = nn.Linear(C, 3 * C), nn.Linear(C, C), NH

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class PlainBlock(nn.Module):
    def __init__(self, C, NH):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(C), CausalSelfAttention(C, NH), nn.LayerNorm(C), MLP(C)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PlainGPT(nn.Module):
    """nanoGPT's GPT: embeddings, blocks, final layernorm, lm_head tied to wte."""

    def __init__(self, vocab, block_size, L, NH, C):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, C), nn.Embedding(block_size, C)
        self.h = nn.ModuleList([PlainBlock(C, NH) for _ in range(L)])
        self.ln_f = nn.LayerNorm(C)
        self.lm_head = nn.Linear(C, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * L) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


class StackedBaseline:
    """The previous baseline: parameters as torch views of llmpy's stacked (L, ...) tensors, indexed per layer."""

    def __init__(self, config, params):
        self.config = config
        self.p = {name: nn.Parameter(torch.from_numpy(params[name].copy())) for name in params}
        self.optimizer = torch.optim.AdamW(list(self.p.values()), lr=1e-4, fused=True)

    def step(self, idx, tgt):
        cfg, p = self.config, self.p
        C, NH = cfg.channels, cfg.num_heads
        B, T = idx.shape
        self.optimizer.zero_grad(set_to_none=True)
        x = F.embedding(idx, p["wte"]) + p["wpe"][:T]
        for l in range(cfg.num_layers):
            h = F.layer_norm(x, (C,), p["ln1w"][l], p["ln1b"][l], eps=1e-5)
            q, k, v = F.linear(h, p["qkvw"][l], p["qkvb"][l]).split(C, dim=2)
            q, k, v = (t.view(B, T, NH, C // NH).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + F.linear(y, p["attprojw"][l], p["attprojb"][l])
            h = F.layer_norm(x, (C,), p["ln2w"][l], p["ln2b"][l], eps=1e-5)
            x = x + F.linear(F.gelu(F.linear(h, p["fcw"][l], p["fcb"][l]), approximate="tanh"), p["fcprojw"][l],
                             p["fcprojb"][l])
        logits = F.linear(F.layer_norm(x, (C,), p["lnfw"], p["lnfb"], eps=1e-5), p["wte"])
        loss = F.cross_entropy(logits[:, :, :cfg.vocab_size].reshape(-1, cfg.vocab_size), tgt.reshape(-1))
        loss.backward()
        self.optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="d12")
    parser.add_argument("-B", type=int, default=4)
    parser.add_argument("-T", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--no-stacked", action="store_true", help="leave the previous baseline out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = preset(args.model)
    params = parameter_buffer(config)
    init_parameters(params, config, 0)
    rng = np.random.default_rng(0)
    idx = torch.from_numpy(rng.integers(0, config.vocab_size, (args.B, args.T)))
    tgt = torch.from_numpy(rng.integers(0, config.vocab_size, (args.B, args.T)))
    baseline = TorchGPT2Baseline(config, params)
    plain = PlainGPT(config.padded_vocab_size, config.max_seq_len, config.num_layers, config.num_heads,
                     config.channels)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, fused=True)

    def plain_step():
        plain_opt.zero_grad(set_to_none=True)
        plain(idx, tgt).backward()
        plain_opt.step()

    runs = {"baseline (llmpy bench --vs torch)": lambda: baseline.train_step(idx.numpy(), tgt.numpy()),
            "plain nanoGPT-style": plain_step}
    if not args.no_stacked:
        stacked = StackedBaseline(config, params)
        runs["previous baseline (stacked)"] = lambda: stacked.step(idx, tgt)
    times = {name: [] for name in runs}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for name, step in runs.items():
            start = time.perf_counter()
            step()
            if round_index:
                times[name].append(1e3 * (time.perf_counter() - start))
    plain_ms = times["plain nanoGPT-style"]
    print(f"{args.model} B={args.B} T={args.T}, {args.threads} threads, torch {torch.__version__}, "
          f"{args.rounds} rounds")
    for name, ms in times.items():
        ratio = statistics.median(a / b for a, b in zip(ms, plain_ms))
        print(f"{name:36s} median {statistics.median(ms):8.0f} ms  min {min(ms):8.0f}  max {max(ms):8.0f}  "
              f"vs plain (paired median) {ratio:.3f}")


if __name__ == "__main__":
    main()
