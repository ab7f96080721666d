"""GPT-2 as a fixed list of kernel calls over flat parameter and activation buffers (llm.c's gpt2_*)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from llmpy.config import GPT2Config
from llmpy.kernels import KernelSet
from llmpy.layout import FlatBuffer, activation_buffer, activation_shapes, parameter_buffer

# observer(kernel_name, layer, kernel, args) runs kernel(*args) and returns its result, measuring it on the
# way (llmpy.recorder.Recorder); layer is -1 outside the transformer blocks.
KernelObserver = Callable[[str, int, Callable, tuple], object]

# gradients_ready(part) is called inside backward as soon as a group of parameter gradients is final for that
# backward: part = L (num_layers) after the final layernorm (lnfw, lnfb), part = l after transformer block l
# (the [l] slices of its 12 tensors), part = -1 after the encoder (wte, wpe). Data-parallel execution starts
# each group's collective there (llmpy.execution.distributed); it must not write the gradients.
GradientsReady = Callable[[int], None]


def init_parameters(params: FlatBuffer, config: GPT2Config, seed: int = 42) -> None:
    """llm.c's train_gpt2.py init, in place: N(0, 0.02) weights and embeddings, residual projections scaled
    by 1/sqrt(2L), zero biases, unit layernorm gains; the padded vocabulary rows stay zero."""
    rng = np.random.default_rng(seed)
    p = params
    p.flat.fill(0.0)
    std = 0.02
    residual_std = std / math.sqrt(2 * config.num_layers)
    V = config.vocab_size
    p.wte[:V] = rng.standard_normal(p.wte[:V].shape, dtype=np.float32) * std
    p.wpe[...] = rng.standard_normal(p.wpe.shape, dtype=np.float32) * std
    p.qkvw[...] = rng.standard_normal(p.qkvw.shape, dtype=np.float32) * std
    p.attprojw[...] = rng.standard_normal(p.attprojw.shape, dtype=np.float32) * residual_std
    p.fcw[...] = rng.standard_normal(p.fcw.shape, dtype=np.float32) * std
    p.fcprojw[...] = rng.standard_normal(p.fcprojw.shape, dtype=np.float32) * residual_std
    for gain in (p.ln1w, p.ln2w, p.lnfw):
        gain.fill(1.0)


class GPT2:
    """Parameters, gradients, activations and their gradients for batches of up to B x T tokens.

    `forward`, `backward` and the optimizer run the same kernel calls whatever the execution model;
    the `kernels` set (serial or parallel variants) and the thread settings are the execution model's.
    """

    def __init__(self, config: GPT2Config, B: int, T: int, kernels: KernelSet | None = None, training: bool = True):
        if B <= 0 or T <= 0:
            raise ValueError(f"batch size B={B} and sequence length T={T} must be positive")
        if T > config.max_seq_len:
            raise ValueError(f"sequence length T={T} is larger than the model's max_seq_len={config.max_seq_len}")
        self.config = config
        self.B = B
        self.T = T
        self.kernels = kernels if kernels is not None else KernelSet(parallel=False)
        self.params = parameter_buffer(config)
        # Inference (training=False) needs neither gradient buffer.
        self.grads = parameter_buffer(config) if training else None
        self.acts = activation_buffer(config, B, T)
        self.grad_acts = activation_buffer(config, B, T) if training else None
        self.observer: KernelObserver | None = None
        self.gradients_ready: GradientsReady | None = None
        self._views: dict[tuple[int, int], tuple[FlatBuffer, FlatBuffer]] = {(B, T): (self.acts, self.grad_acts)}
        self._inputs: np.ndarray | None = None
        self._targets: np.ndarray | None = None
        self.mean_loss: float | None = None

    @property
    def num_parameters(self) -> int:
        return self.params.size

    # ------------------------------------------------------------------ initialisation
    def init_random(self, seed: int = 42) -> None:
        """llm.c's train_gpt2.py init (see `init_parameters`)."""
        init_parameters(self.params, self.config, seed)

    def load_parameters(self, flat: np.ndarray) -> None:
        if flat.shape != self.params.flat.shape:
            raise ValueError(f"parameter array has {flat.size} values, the model needs {self.params.size}")
        self.params.flat[...] = flat

    # ------------------------------------------------------------------ helpers
    def _buffers_for(self, b: int, t: int) -> tuple[FlatBuffer, FlatBuffer]:
        """Activation views for a smaller batch, laid over the front of the allocated buffers."""
        if (b, t) not in self._views:
            size = sum(math.prod(s) for s in activation_shapes(self.config, b, t).values())
            acts = activation_buffer(self.config, b, t, self.acts.flat[:size])
            grad_acts = None if self.grad_acts is None else activation_buffer(self.config, b, t, self.grad_acts.flat[:size])
            self._views[(b, t)] = (acts, grad_acts)
        return self._views[(b, t)]

    def _check_tokens(self, name: str, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"{name} must have shape (B, T), got shape {tokens.shape}")
        b, t = tokens.shape
        if b > self.B or t > self.T or b == 0 or t == 0:
            raise ValueError(
                f"{name} has shape ({b}, {t}); this model was allocated for at most B={self.B}, T={self.T}"
                f" (max_seq_len={self.config.max_seq_len})"
            )
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {self.config.vocab_size})")
        return np.ascontiguousarray(tokens, dtype=np.int32)

    def _run(self, name: str, layer: int, fn: Callable, *args):
        if self.observer is None:
            return fn(*args)
        return self.observer(name, layer, fn, args)

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: np.ndarray, targets: np.ndarray | None = None) -> float | None:
        """inputs, targets (b, t) token ids with b <= B, t <= T. Fills the activations; returns the mean
        loss when targets are given (logits only otherwise, in `self.logits(b, t)`)."""
        inputs = self._check_tokens("inputs", inputs)
        if targets is not None:
            targets = self._check_tokens("targets", targets)
            if targets.shape != inputs.shape:
                raise ValueError(f"targets shape {targets.shape} differs from inputs shape {inputs.shape}")
        b, t = inputs.shape
        cfg = self.config
        k = self.kernels
        acts, _ = self._buffers_for(b, t)
        p = self.params
        L, NH = cfg.num_layers, cfg.num_heads
        N = b * t
        rows = lambda x: x.reshape(N, -1)  # (b, t, X) -> (b*t, X)
        flat = lambda x: x.reshape(-1)

        self._run("encoder_forward", -1, k.encoder_forward, rows(acts.encoded), inputs.reshape(-1), p.wte, p.wpe, t, 0)
        for l in range(L):
            residual = acts.encoded if l == 0 else acts.residual3[l - 1]
            self._run("layernorm_forward", l, k.layernorm_forward, rows(acts.ln1[l]), acts.ln1_mean[l].reshape(-1),
                      acts.ln1_rstd[l].reshape(-1), rows(residual), p.ln1w[l], p.ln1b[l])
            self._run("matmul_forward", l, k.matmul_forward, rows(acts.qkv[l]), rows(acts.ln1[l]), p.qkvw[l], p.qkvb[l])
            self._run("attention_forward", l, k.attention_forward, acts.atty[l], acts.preatt[l], acts.att[l],
                      acts.qkv[l], NH, 0, b, 0, t)
            self._run("matmul_forward", l, k.matmul_forward, rows(acts.attproj[l]), rows(acts.atty[l]),
                      p.attprojw[l], p.attprojb[l])
            self._run("residual_forward", l, k.residual_forward, flat(acts.residual2[l]), flat(residual),
                      flat(acts.attproj[l]))
            self._run("layernorm_forward", l, k.layernorm_forward, rows(acts.ln2[l]), acts.ln2_mean[l].reshape(-1),
                      acts.ln2_rstd[l].reshape(-1), rows(acts.residual2[l]), p.ln2w[l], p.ln2b[l])
            self._run("matmul_forward", l, k.matmul_forward, rows(acts.fch[l]), rows(acts.ln2[l]), p.fcw[l], p.fcb[l])
            self._run("gelu_forward", l, k.gelu_forward, flat(acts.fch_gelu[l]), flat(acts.fch[l]))
            self._run("matmul_forward", l, k.matmul_forward, rows(acts.fcproj[l]), rows(acts.fch_gelu[l]),
                      p.fcprojw[l], p.fcprojb[l])
            self._run("residual_forward", l, k.residual_forward, flat(acts.residual3[l]), flat(acts.residual2[l]),
                      flat(acts.fcproj[l]))
        self._run("layernorm_forward", -1, k.layernorm_forward, rows(acts.lnf), acts.lnf_mean.reshape(-1),
                  acts.lnf_rstd.reshape(-1), rows(acts.residual3[L - 1]), p.lnfw, p.lnfb)
        self._run("matmul_forward", -1, k.matmul_forward, rows(acts.logits), rows(acts.lnf), p.wte, None)

        self._inputs = inputs
        self._targets = targets
        if targets is None:
            self.mean_loss = None
            return None
        self._run("crossentropy_forward", -1, k.crossentropy_forward, rows(acts.probs), acts.losses.reshape(-1),
                  rows(acts.logits), targets.reshape(-1), cfg.vocab_size)
        self.mean_loss = float(np.mean(acts.losses, dtype=np.float64))
        return self.mean_loss

    def logits(self) -> np.ndarray:
        """Logits (b, t, V) of the last forward, without the padded vocabulary columns (a view)."""
        if self._inputs is None:
            raise RuntimeError("logits() needs a forward pass first")
        b, t = self._inputs.shape
        acts, _ = self._buffers_for(b, t)
        return acts.logits[:, :, : self.config.vocab_size]

    # ------------------------------------------------------------------ backward
    def zero_grad(self) -> None:
        """Zero every parameter gradient (llm.c's gpt2_zero_grad). Not needed before a backward that
        writes its gradients (`accumulate_gradients=False`)."""
        if self.grads is not None:
            self.grads.flat.fill(0.0)

    def backward(self, accumulate_gradients: bool = False) -> None:
        """Gradients of the mean loss of the last forward (which must have had targets).

        With `accumulate_gradients=False` every parameter gradient is written, so no zero_grad pass is
        needed; with True they are added to (gradient accumulation micro-steps). Activation gradients
        are always written (see each kernel's docstring for how)."""
        if self.grads is None:
            raise RuntimeError("backward() on a model built with training=False")
        if self._targets is None or self._inputs is None:
            raise RuntimeError("backward() needs a forward pass with targets first")
        inputs, targets = self._inputs, self._targets
        b, t = inputs.shape
        cfg = self.config
        k = self.kernels
        acts, grads_acts = self._buffers_for(b, t)
        p, g, a, d = self.params, self.grads, acts, grads_acts
        L, NH, C = cfg.num_layers, cfg.num_heads, cfg.channels
        N = b * t
        acc = accumulate_gradients
        rows = lambda x: x.reshape(N, -1)
        flat = lambda x: x.reshape(-1)

        self._run("crossentropy_backward", -1, k.crossentropy_backward, rows(d.logits), rows(a.probs),
                  targets.reshape(-1), 1.0 / N, cfg.vocab_size)
        self._run("matmul_backward_input", -1, k.matmul_backward_input, rows(d.lnf), rows(d.logits), p.wte)
        self._run("matmul_backward_weight", -1, k.matmul_backward_weight, g.wte, None, rows(d.logits), rows(a.lnf), acc)
        self._run("layernorm_backward_input", -1, k.layernorm_backward_input, rows(d.residual3[L - 1]), rows(d.lnf),
                  rows(a.residual3[L - 1]), p.lnfw, a.lnf_mean.reshape(-1), a.lnf_rstd.reshape(-1), False)
        self._run("layernorm_backward_params", -1, k.layernorm_backward_params, g.lnfw, g.lnfb, rows(d.lnf),
                  rows(a.residual3[L - 1]), a.lnf_mean.reshape(-1), a.lnf_rstd.reshape(-1), 0, C, acc)
        if self.gradients_ready is not None:
            self.gradients_ready(L)
        for l in reversed(range(L)):
            residual = a.encoded if l == 0 else a.residual3[l - 1]
            dresidual = d.encoded if l == 0 else d.residual3[l - 1]
            ln2_mean, ln2_rstd = a.ln2_mean[l].reshape(-1), a.ln2_rstd[l].reshape(-1)
            ln1_mean, ln1_rstd = a.ln1_mean[l].reshape(-1), a.ln1_rstd[l].reshape(-1)
            self._run("residual_backward", l, k.residual_backward, flat(d.residual2[l]), flat(d.fcproj[l]),
                      flat(d.residual3[l]))
            self._run("matmul_backward_input", l, k.matmul_backward_input, rows(d.fch_gelu[l]), rows(d.fcproj[l]),
                      p.fcprojw[l])
            self._run("matmul_backward_weight", l, k.matmul_backward_weight, g.fcprojw[l], g.fcprojb[l],
                      rows(d.fcproj[l]), rows(a.fch_gelu[l]), acc)
            self._run("gelu_backward", l, k.gelu_backward, flat(d.fch[l]), flat(a.fch[l]), flat(d.fch_gelu[l]))
            self._run("matmul_backward_input", l, k.matmul_backward_input, rows(d.ln2[l]), rows(d.fch[l]), p.fcw[l])
            self._run("matmul_backward_weight", l, k.matmul_backward_weight, g.fcw[l], g.fcb[l], rows(d.fch[l]),
                      rows(a.ln2[l]), acc)
            self._run("layernorm_backward_input", l, k.layernorm_backward_input, rows(d.residual2[l]), rows(d.ln2[l]),
                      rows(a.residual2[l]), p.ln2w[l], ln2_mean, ln2_rstd, True)
            self._run("layernorm_backward_params", l, k.layernorm_backward_params, g.ln2w[l], g.ln2b[l],
                      rows(d.ln2[l]), rows(a.residual2[l]), ln2_mean, ln2_rstd, 0, C, acc)
            self._run("residual_backward", l, k.residual_backward, flat(dresidual), flat(d.attproj[l]),
                      flat(d.residual2[l]))
            self._run("matmul_backward_input", l, k.matmul_backward_input, rows(d.atty[l]), rows(d.attproj[l]),
                      p.attprojw[l])
            self._run("matmul_backward_weight", l, k.matmul_backward_weight, g.attprojw[l], g.attprojb[l],
                      rows(d.attproj[l]), rows(a.atty[l]), acc)
            self._run("attention_backward", l, k.attention_backward, d.qkv[l], d.preatt[l], d.att[l], d.atty[l],
                      a.qkv[l], a.att[l], NH, 0, b, 0, t, False)
            self._run("matmul_backward_input", l, k.matmul_backward_input, rows(d.ln1[l]), rows(d.qkv[l]), p.qkvw[l])
            self._run("matmul_backward_weight", l, k.matmul_backward_weight, g.qkvw[l], g.qkvb[l], rows(d.qkv[l]),
                      rows(a.ln1[l]), acc)
            self._run("layernorm_backward_input", l, k.layernorm_backward_input, rows(dresidual), rows(d.ln1[l]),
                      rows(residual), p.ln1w[l], ln1_mean, ln1_rstd, True)
            self._run("layernorm_backward_params", l, k.layernorm_backward_params, g.ln1w[l], g.ln1b[l],
                      rows(d.ln1[l]), rows(residual), ln1_mean, ln1_rstd, 0, C, acc)
            if self.gradients_ready is not None:
                self.gradients_ready(l)
        self._run("encoder_backward", -1, k.encoder_backward, g.wte, g.wpe, rows(d.encoded), inputs.reshape(-1), t,
                  0, C, acc)
        if self.gradients_ready is not None:
            self.gradients_ready(-1)
