"""An independent GPT-2 in PyTorch, used by the tests as an oracle (the product never imports torch).

Written from the GPT-2 definition (nanoGPT / llm.c's train_gpt2.py style): pre-norm blocks, tanh GELU,
causal softmax attention, tied output layer. Parameters are plain tensors keyed by llm.c's names so
values and gradients can be compared tensor by tensor.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from llmpy.core.config import GPT2Config
from llmpy.core.layout import parameter_shapes


class TorchGPT2:
    def __init__(self, config: GPT2Config, params: dict[str, np.ndarray]):
        self.config = config
        self.params = {
            name: torch.tensor(np.array(params[name], dtype=np.float32), requires_grad=True)
            for name in parameter_shapes(config)
        }

    def logits(self, inputs: np.ndarray) -> torch.Tensor:
        """(B, T) int tokens -> (B, T, Vp) logits."""
        cfg, p = self.config, self.params
        idx = torch.as_tensor(np.asarray(inputs, dtype=np.int64))
        B, T = idx.shape
        C, NH = cfg.channels, cfg.num_heads
        hs = C // NH
        x = p["wte"][idx] + p["wpe"][:T]
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
        for l in range(cfg.num_layers):
            h = F.layer_norm(x, (C,), p["ln1w"][l], p["ln1b"][l], eps=1e-5)
            qkv = h @ p["qkvw"][l].T + p["qkvb"][l]
            q, k, v = qkv.split(C, dim=2)
            q = q.view(B, T, NH, hs).transpose(1, 2)
            k = k.view(B, T, NH, hs).transpose(1, 2)
            v = v.view(B, T, NH, hs).transpose(1, 2)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
            scores = scores.masked_fill(~mask, float("-inf"))
            y = torch.softmax(scores, dim=-1) @ v
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            x = x + (y @ p["attprojw"][l].T + p["attprojb"][l])
            h = F.layer_norm(x, (C,), p["ln2w"][l], p["ln2b"][l], eps=1e-5)
            h = F.gelu(h @ p["fcw"][l].T + p["fcb"][l], approximate="tanh")
            x = x + (h @ p["fcprojw"][l].T + p["fcprojb"][l])
        x = F.layer_norm(x, (C,), p["lnfw"], p["lnfb"], eps=1e-5)
        return x @ p["wte"].T

    def loss(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over the real vocabulary (padded columns excluded) and the logits."""
        logits = self.logits(inputs)
        V = self.config.vocab_size
        tgt = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        loss = F.cross_entropy(logits[:, :, :V].reshape(-1, V), tgt.reshape(-1))
        return loss, logits

    def zero_grad(self) -> None:
        for t in self.params.values():
            t.grad = None

    def gradients(self) -> dict[str, np.ndarray]:
        return {name: t.grad.detach().numpy().copy() for name, t in self.params.items()}

    def adamw(self, lr: float, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0) -> torch.optim.Optimizer:
        return torch.optim.AdamW(list(self.params.values()), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
