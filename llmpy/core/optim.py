"""AdamW over the flat parameter buffer, and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llmpy.core.errors import OptionError
from llmpy.core.layout import MATRIX_PARAMETERS, FlatBuffer, packed_ranges
from llmpy.core.step import KernelCall, run_calls
from llmpy.kernels import KernelSet


@dataclass
class AdamWConfig:
    """llm.c's defaults (train_gpt2.c): decay applies to every parameter; no clipping."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_matrices_only: bool = False  # decay only the 2-D weight matrices (GPT-2 / nanoGPT practice)
    grad_clip: float = 0.0  # clip the global gradient norm to this value; 0 disables

    def __post_init__(self) -> None:
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value < 1.0):
                raise OptionError(name, value, "must be in [0, 1)")
        if not (math.isfinite(self.eps) and self.eps > 0.0):
            raise OptionError("eps", self.eps, "must be a positive number")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise OptionError(name, value, "must be a number >= 0")


@dataclass
class AdamWScalars:
    """One optimizer step's numbers, computed once in `AdamWRule.next_step` and read by every update call."""

    learning_rate: float = 0.0
    bias_correction1: float = 1.0
    bias_correction2: float = 1.0
    grad_scale: float = 1.0  # 1 / (micro-steps x ranks), before clipping


class AdamWRule:
    """AdamW's arithmetic, whoever holds the moments: the step counter, each step's scalars, the clip scale and
    the decay rule, applied by one kernel to any slices (whole buffers, task blocks, a rank's shard)."""

    def __init__(self, config: AdamWConfig | None = None, kernels: KernelSet | None = None):
        self.config = config or AdamWConfig()
        self.kernels = kernels if kernels is not None else KernelSet(parallel=False)
        self.step = 0
        self.scalars = AdamWScalars()  # the step the update calls apply when they run
        self.grad_norm_sq = np.zeros(1, dtype=np.float64)  # sum of squares of the step's gradient (clipping)
        self.last_grad_norm: float | None = None
        self.observer = None  # as GPT2.observer: observer(name, layer, kernel, args) runs and measures a call

    @property
    def clips(self) -> bool:
        return self.config.grad_clip > 0.0

    def next_step(self, learning_rate: float, grad_scale: float = 1.0) -> AdamWScalars:
        """Count one more step (from 1, as llm.c's gpt2_update) and return its scalars."""
        cfg = self.config
        self.step += 1
        return AdamWScalars(learning_rate, 1.0 - cfg.beta1 ** self.step, 1.0 - cfg.beta2 ** self.step, grad_scale)

    def grad_norm(self, scalars: AdamWScalars) -> float:
        """The global norm of the scaled gradient whose sum of squares is in grad_norm_sq."""
        return math.sqrt(float(self.grad_norm_sq[0])) * scalars.grad_scale

    def clipped_scale(self, scalars: AdamWScalars) -> float:
        """The gradient scale after clipping the global norm to config.grad_clip."""
        if not self.clips:
            return scalars.grad_scale
        norm = self.grad_norm(scalars)
        return scalars.grad_scale * (self.config.grad_clip / norm if norm > self.config.grad_clip else 1.0)

    def weight_decay(self, name: str) -> float:
        """The decay of parameter tensor `name` (every tensor, or the weight matrices only)."""
        cfg = self.config
        return cfg.weight_decay if not cfg.decay_matrices_only or name in MATRIX_PARAMETERS else 0.0

    def apply(self, params, grads, m, v, weight_decay: float, *reads) -> None:
        """The AdamW kernel on one slice with the current scalars. `reads`: grad_norm_sq when clipping (so that
        a task graph orders the update after the norm)."""
        s, cfg = self.scalars, self.config
        self.kernels.adamw_update(params, grads, m, v, s.learning_rate, cfg.beta1, cfg.beta2, cfg.eps, weight_decay,
                                  s.bias_correction1, s.bias_correction2, self.clipped_scale(s))

    def store_sum_of_squares(self, grads, into) -> None:
        into[0] = self.kernels.sum_of_squares(grads)

    def update_call(self, params, grads, m, v, weight_decay: float, label: str = "") -> KernelCall:
        reads = (self.grad_norm_sq,) if self.clips else ()
        return KernelCall("adamw_update", label, -1, self.apply, (params, grads, m, v, weight_decay) + reads, "update")

    def flat_moments(self) -> tuple:
        """The flat m and v this optimizer holds (the moments of moment_ranges(), one after the other)."""
        return self.m.flat, self.v.flat

    def moment_ranges(self) -> list[tuple[int, int]]:
        """The [start, stop) parameter ranges whose moments this optimizer holds, in their order in m and v
        (one process: all parameters; a data-parallel strategy: what this rank updates)."""
        return [(0, int(self.flat_moments()[0].size))]

    def load_moments(self, m, v) -> None:
        """Take this optimizer's ranges of the whole m and v (a checkpoint's, of any world size or strategy)."""
        own_m, own_v = self.flat_moments()
        for packed, whole in packed_ranges(self.moment_ranges()):
            own_m[packed], own_v[packed] = m[whole], v[whole]

    def grad_norm_call(self, grads) -> KernelCall:
        """The sum of squares of `grads` into grad_norm_sq."""
        return KernelCall("sum_of_squares", "grads", -1, self.store_sum_of_squares, (grads, self.grad_norm_sq),
                          "update")


class AdamW(AdamWRule):
    """AdamW with first/second moments in flat buffers shaped like the parameters."""

    def __init__(self, params: FlatBuffer, config: AdamWConfig | None = None, kernels: KernelSet | None = None):
        super().__init__(config, kernels)
        self.m = FlatBuffer(params.shapes)
        self.v = FlatBuffer(params.shapes)

    def update_calls(self, params: FlatBuffer, grads: FlatBuffer) -> list[KernelCall]:
        """The update as kernel calls: one over the whole buffers, or one per tensor where decay differs."""
        if not self.config.decay_matrices_only or self.config.weight_decay == 0.0:
            return [self.update_call(params.flat, grads.flat, self.m.flat, self.v.flat, self.config.weight_decay)]
        return [self.update_call(params[name].reshape(-1), grads[name].reshape(-1), self.m[name].reshape(-1),
                                 self.v[name].reshape(-1), self.weight_decay(name), name) for name in params]

    def update(self, params: FlatBuffer, grads: FlatBuffer, learning_rate: float, grad_scale: float = 1.0) -> None:
        """One AdamW step in place on `params` (llm.c's gpt2_update; step counts from 1).

        The gradient used is grads * grad_scale (1/micro-steps under gradient accumulation), further
        scaled down when its global norm exceeds `grad_clip`."""
        self.scalars = self.next_step(learning_rate, grad_scale)
        calls = ([self.grad_norm_call(grads.flat)] if self.clips else []) + self.update_calls(params, grads)
        run_calls(calls, self.observer)
        if self.clips:
            self.last_grad_norm = self.grad_norm(self.scalars)


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
            raise OptionError("lr_schedule", self.kind, "must be 'constant' or 'cosine'")
        if not (math.isfinite(self.base) and self.base >= 0):
            raise OptionError("lr", self.base, "must be a number >= 0")
        if self.warmup_steps < 0:
            raise OptionError("warmup_steps", self.warmup_steps, "must be >= 0")
        if not (math.isfinite(self.final_fraction) and 0.0 <= self.final_fraction <= 1.0):
            raise OptionError("final_lr_fraction", self.final_fraction, "must be in [0, 1]")

    def __call__(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.base * (step + 1) / self.warmup_steps
        if self.kind == "constant" or self.total_steps <= self.warmup_steps:
            return self.base
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        final = self.base * self.final_fraction
        return final + 0.5 * (self.base - final) * (1.0 + math.cos(math.pi * progress))
