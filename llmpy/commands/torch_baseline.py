"""GPT-2 in PyTorch eager, the baseline `llmpy bench --vs torch` runs beside llmpy.

Only the benchmark imports this module, and only when asked (torch is an optional extra: `pip install
-e .[torch]`); nothing else in llmpy needs torch. The model is written the way a PyTorch user writes GPT-2
(nanoGPT's `model.py`): one `nn.Module` per block with its own `nn.LayerNorm` and `nn.Linear` parameters,
fused scaled-dot-product attention with the causal flag, tanh GELU, the lm_head tied to `wte`,
`F.cross_entropy`, and AdamW with `fused=True`. Its parameters are copies of llmpy's (same init), so its
losses are llmpy's within float tolerance; llm.c's padded vocabulary stays in `wte` and the loss is taken over
the real vocabulary only, as llmpy takes it.
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


def _modules(torch, config: GPT2Config):
    """nanoGPT's Block and GPT, as module classes."""
    nn, F = torch.nn, torch.nn.functional
    C, NH = config.channels, config.num_heads

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, NH, C // NH).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + self.attn_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(config.padded_vocab_size, C)
            self.wpe = nn.Embedding(config.max_seq_len, C)
            self.h = nn.ModuleList(Block() for _ in range(config.num_layers))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, targets):
            T = idx.shape[1]
            x = self.wte(idx) + self.wpe.weight[:T]
            for block in self.h:
                x = block(x)
            V = config.vocab_size  # the lm_head tied to wte's real rows: contiguous logits, no slice to copy
            logits = F.linear(self.ln_f(x), self.wte.weight[:V])
            return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))

    return GPT


def _copy_parameters(torch, model, params: FlatBuffer) -> None:
    """llmpy's parameters (llm.c's layout) into the modules' own tensors."""
    def put(tensor, array):
        tensor.data.copy_(torch.from_numpy(np.ascontiguousarray(array)))

    put(model.wte.weight, params["wte"])
    put(model.wpe.weight, params["wpe"])
    for l, block in enumerate(model.h):
        for module, weight, bias in ((block.ln_1, "ln1w", "ln1b"), (block.c_attn, "qkvw", "qkvb"),
                                     (block.attn_proj, "attprojw", "attprojb"), (block.ln_2, "ln2w", "ln2b"),
                                     (block.c_fc, "fcw", "fcb"), (block.mlp_proj, "fcprojw", "fcprojb")):
            put(module.weight, params[weight][l])
            put(module.bias, params[bias][l])
    put(model.ln_f.weight, params["lnfw"])
    put(model.ln_f.bias, params["lnfb"])


class TorchGPT2Baseline:
    """nanoGPT-style modules with a copy of llmpy's parameters, one training step, fused AdamW."""

    def __init__(self, config: GPT2Config, params: FlatBuffer, learning_rate: float = 1e-4,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0):
        torch = import_torch()
        self.torch = torch
        self.config = config
        self.model = _modules(torch, config)()
        with torch.no_grad():
            _copy_parameters(torch, self.model, params)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=learning_rate, betas=(beta1, beta2),
                                           eps=eps, weight_decay=weight_decay, fused=True)

    def loss(self, inputs: np.ndarray, targets: np.ndarray):
        """Mean cross-entropy of (B, T) token ids, as a scalar tensor with its graph."""
        torch = self.torch
        idx = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.int64))
        tgt = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64))
        return self.model(idx, tgt)

    def train_step(self, inputs: np.ndarray, targets: np.ndarray) -> float:
        """Forward, backward and one fused AdamW step; returns the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(inputs, targets)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())
