"""AdamW over the flat parameter buffer, and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmpy.kernels import KernelSet
from llmpy.layout import MATRIX_PARAMETERS, FlatBuffer


@dataclass
class AdamWConfig:
    """llm.c's defaults (train_gpt2.c): decay applies to every parameter; no clipping."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_matrices_only: bool = False  # decay only the 2-D weight matrices (GPT-2 / nanoGPT practice)
    grad_clip: float = 0.0  # clip the global gradient norm to this value; 0 disables


class AdamW:
    """AdamW with first/second moments in flat buffers shaped like the parameters."""

    def __init__(self, params: FlatBuffer, config: AdamWConfig | None = None, kernels: KernelSet | None = None):
        self.config = config or AdamWConfig()
        self.kernels = kernels if kernels is not None else KernelSet(parallel=False)
        self.m = FlatBuffer(params.shapes)
        self.v = FlatBuffer(params.shapes)
        self.step = 0
        self.last_grad_norm: float | None = None
        self.observer = None  # as GPT2.observer: observer(name, layer, kernel, args) runs and measures a call

    def _run(self, name: str, fn, *args):
        if self.observer is None:
            return fn(*args)
        return self.observer(name, -1, fn, args)

    def grad_norm(self, grads: FlatBuffer) -> float:
        return math.sqrt(self._run("sum_of_squares", self.kernels.sum_of_squares, grads.flat))

    def update(self, params: FlatBuffer, grads: FlatBuffer, learning_rate: float, grad_scale: float = 1.0) -> None:
        """One AdamW step in place on `params` (llm.c's gpt2_update; step counts from 1).

        The gradient used is grads * grad_scale (1/micro-steps under gradient accumulation), further
        scaled down when its global norm exceeds `grad_clip`."""
        cfg = self.config
        self.step += 1
        bias_correction1 = 1.0 - cfg.beta1 ** self.step
        bias_correction2 = 1.0 - cfg.beta2 ** self.step
        if cfg.grad_clip > 0.0:
            norm = self.grad_norm(grads) * grad_scale
            self.last_grad_norm = norm
            if norm > cfg.grad_clip:
                grad_scale *= cfg.grad_clip / norm
        update = self.kernels.adamw_update
        if not cfg.decay_matrices_only or cfg.weight_decay == 0.0:
            self._run("adamw_update", update, params.flat, grads.flat, self.m.flat, self.v.flat, learning_rate,
                      cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, bias_correction1, bias_correction2, grad_scale)
            return
        for name in params:
            decay = cfg.weight_decay if name in MATRIX_PARAMETERS else 0.0
            self._run("adamw_update", update, params[name].reshape(-1), grads[name].reshape(-1),
                      self.m[name].reshape(-1), self.v[name].reshape(-1), learning_rate, cfg.beta1, cfg.beta2,
                      cfg.eps, decay, bias_correction1, bias_correction2, grad_scale)


@dataclass
class LearningRateSchedule:
    """Linear warmup to `base` over `warmup_steps`, then constant or cosine decay to base*final_fraction
    at `total_steps`."""

    base: float = 1e-4
    warmup_steps: int = 0
    total_steps: int = 0
    kind: str = "constant"  # or "cosine"
    final_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "cosine"):
            raise ValueError(f"learning-rate schedule must be 'constant' or 'cosine', got {self.kind!r}")
        if self.base < 0 or self.warmup_steps < 0 or not 0.0 <= self.final_fraction <= 1.0:
            raise ValueError("learning rate and warmup must be >= 0 and final_fraction in [0, 1]")

    def __call__(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.base * (step + 1) / self.warmup_steps
        if self.kind == "constant" or self.total_steps <= self.warmup_steps:
            return self.base
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        final = self.base * self.final_fraction
        return final + 0.5 * (self.base - final) * (1.0 + math.cos(math.pi * progress))
