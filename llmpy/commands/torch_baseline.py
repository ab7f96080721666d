"""GPT-2 in PyTorch eager, the baseline `llmpy bench --vs torch` runs beside llmpy.

Only the benchmark imports this module, and only when asked (torch is an optional extra: `pip install
-e .[torch]`); nothing else in llmpy needs torch. The model is written the way a PyTorch user writes
GPT-2 for speed in eager mode (nanoGPT's style): `F.linear`, fused scaled-dot-product attention with the
causal flag, tanh GELU, `F.cross_entropy`, and AdamW with `fused=True`. It starts from llmpy's own
parameters (same init) and keeps llm.c's padded vocabulary in `wte`, taking the loss over the real
vocabulary only, so its losses are llmpy's within float tolerance.
"""

from __future__ import annotations

import numpy as np

from llmpy.core.config import GPT2Config
from llmpy.core.layout import FlatBuffer


class TorchUnavailable(RuntimeError):
    pass


def import_torch():
    try:
        import torch
    except ImportError:
        raise TorchUnavailable(
            "--vs torch needs PyTorch, an optional extra of llmpy: pip install torch==2.13.0 "
            "(or pip install -e .[torch] in a checkout)"
        ) from None
    return torch


class TorchGPT2Baseline:
    """Parameters (torch tensors over an llmpy parameter buffer), one training step, fused AdamW."""

    def __init__(self, config: GPT2Config, params: FlatBuffer, learning_rate: float = 1e-4,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0):
        torch = import_torch()
        self.torch = torch
        self.config = config
        # the tensors share llmpy's buffer (no copy): the baseline holds one set of parameters, as llmpy does
        self.params = {name: torch.nn.Parameter(torch.from_numpy(params[name])) for name in params}
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=learning_rate, betas=(beta1, beta2),
                                           eps=eps, weight_decay=weight_decay, fused=True)

    def loss(self, inputs: np.ndarray, targets: np.ndarray):
        """Mean cross-entropy of (B, T) token ids, as a scalar tensor with its graph."""
        torch = self.torch
        F = torch.nn.functional
        cfg, p = self.config, self.params
        idx = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.int64))
        tgt = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64))
        B, T = idx.shape
        C, NH = cfg.channels, cfg.num_heads
        x = F.embedding(idx, p["wte"]) + p["wpe"][:T]
        for layer in range(cfg.num_layers):
            h = F.layer_norm(x, (C,), p["ln1w"][layer], p["ln1b"][layer], eps=1e-5)
            q, k, v = F.linear(h, p["qkvw"][layer], p["qkvb"][layer]).split(C, dim=2)
            q, k, v = (t.view(B, T, NH, C // NH).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).reshape(B, T, C)
            x = x + F.linear(y, p["attprojw"][layer], p["attprojb"][layer])
            h = F.layer_norm(x, (C,), p["ln2w"][layer], p["ln2b"][layer], eps=1e-5)
            h = F.gelu(F.linear(h, p["fcw"][layer], p["fcb"][layer]), approximate="tanh")
            x = x + F.linear(h, p["fcprojw"][layer], p["fcprojb"][layer])
        x = F.layer_norm(x, (C,), p["lnfw"], p["lnfb"], eps=1e-5)
        logits = F.linear(x, p["wte"])
        V = cfg.vocab_size
        return F.cross_entropy(logits[:, :, :V].reshape(-1, V), tgt.reshape(-1))

    def train_step(self, inputs: np.ndarray, targets: np.ndarray) -> float:
        """Forward, backward and one fused AdamW step; returns the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(inputs, targets)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())
