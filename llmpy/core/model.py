"""GPT-2 as a fixed list of kernel calls over flat parameter and activation buffers (llm.c's gpt2_*).

`forward_calls` and `backward_calls` are the one description of the step: `forward`/`backward` run them in
order (sequential, fork-join), the task model splits them into a dataflow graph, data-parallel ranks start
their collectives at the `GradientsReady` points of the backward list.

The classifier of a training step (lm_head, softmax, cross-entropy) runs chunk by chunk on one buffer of token
rows (llmpy.core.layout.classifier_chunks), so no B*T x Vp array is kept: the forward computes each chunk's
logits and loss, the fused cross-entropy leaving their gradient in place; the backward takes the last chunk's
gradient from the buffer, recomputes every other chunk's (last to first), and from each one writes its rows of
d(lnf) and its part of g.wte (the first chunk writes or, accumulating, adds; the others add). A forward with
targets and no backward (validation) runs no gradient GEMM. With a single chunk (B*T <= classifier_rows) the
calls are llm.c's: the lm_head and the fused cross-entropy over every row, nothing recomputed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from llmpy.core.config import ActivationOptions, GPT2Config
from llmpy.core.layout import (FlatBuffer, activation_buffer, activation_gradient_buffer, activation_gradient_shapes,
                               activation_shapes, classifier_chunks, layer_view, parameter_buffer)
from llmpy.core.step import GradientsReady, KernelCall, KernelObserver, run_calls
from llmpy.kernels import KernelSet
from llmpy.kernels.specs import on_chunk

# gradients_ready(part) is called inside backward at each GradientsReady point of the backward list (see
# llmpy.core.step); data-parallel execution starts that group's collective there. It must not write the gradients.
GradientsReadyHook = Callable[[int], None]


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


@dataclass
class KVCache:
    """Every layer's q, k, v rows of the positions seen so far, for generation: qkv (L, b, maxlen, 3C) as the attention
    kernel reads them, lse (b, NH, maxlen) its scratch, `length` positions filled."""

    qkv: np.ndarray
    lse: np.ndarray
    length: int = 0


class GPT2:
    """Parameters, gradients, activations and their gradients for batches of up to B x T tokens.

    `forward`, `backward` and the optimizer run the same kernel calls whatever the execution model;
    the `kernels` set (serial or parallel variants) and the thread settings are the execution model's.
    """

    def __init__(self, config: GPT2Config, B: int, T: int, kernels: KernelSet | None = None, training: bool = True,
                 activations: ActivationOptions | None = None, params: FlatBuffer | None = None):
        if B <= 0 or T <= 0:
            raise ValueError(f"batch size B={B} and sequence length T={T} must be positive")
        if T > config.max_seq_len:
            raise ValueError(f"sequence length T={T} is larger than the model's max_seq_len={config.max_seq_len}")
        self.config = config
        self.B = B
        self.T = T
        self.kernels = kernels if kernels is not None else KernelSet(parallel=False)
        self.options = activations or ActivationOptions()
        if params is not None and params.shapes != parameter_buffer(config, params.flat).shapes:
            raise ValueError("the parameter buffer given does not have this config's tensor shapes")
        self.params = params if params is not None else parameter_buffer(config)
        # Inference (training=False) needs neither gradient buffer, and one layer of activations.
        self.training = training
        self.grads = parameter_buffer(config) if training else None
        self.acts = activation_buffer(config, B, T, self.options, inference=not training)
        self.grad_acts = activation_gradient_buffer(config, B, T, self.options) if training else None
        self.observer: KernelObserver | None = None
        self.gradients_ready: GradientsReadyHook | None = None
        self._views: dict[tuple[int, int], tuple[FlatBuffer, FlatBuffer]] = {(B, T): (self.acts, self.grad_acts)}
        # token ids of the current batch, (b*t,) at the front: the calls read them from here (llm.c's model->inputs)
        self.inputs = np.zeros(B * T, dtype=np.int32)
        self.targets = np.zeros(B * T, dtype=np.int32)
        self.batch_shape: tuple[int, int] | None = None  # (b, t) of the last batch loaded
        self.has_targets = False
        self.mean_loss: float | None = None
        self._calls: dict[tuple, list] = {}
        # a training model's (B*T*Vp) logits, allocated by its first forward without targets (the step keeps a chunk)
        self._all_logits: np.ndarray | None = None
        self._gradient_pending = False  # a forward with targets ran since the last backward (the chunk it left)

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
            size = lambda shapes: sum(math.prod(s) for s in shapes.values())
            config, options = self.config, self.options
            shapes = activation_shapes(config, b, t, options, inference=not self.training)
            acts = activation_buffer(config, b, t, options, self.acts.flat[:size(shapes)], inference=not self.training)
            grad_acts = None if self.grad_acts is None else activation_gradient_buffer(
                config, b, t, options, self.grad_acts.flat[:size(activation_gradient_shapes(config, b, t, options))])
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

    def load_batch(self, inputs: np.ndarray, targets: np.ndarray | None = None) -> tuple[int, int]:
        """Check the token ids (b, t) with b <= B, t <= T and copy them into the model's token buffers."""
        inputs = self._check_tokens("inputs", inputs)
        if targets is not None:
            targets = self._check_tokens("targets", targets)
            if targets.shape != inputs.shape:
                raise ValueError(f"targets shape {targets.shape} differs from inputs shape {inputs.shape}")
        b, t = inputs.shape
        self.inputs[:b * t] = inputs.reshape(-1)
        if targets is not None:
            self.targets[:b * t] = targets.reshape(-1)
        self.batch_shape, self.has_targets = (b, t), targets is not None
        return b, t

    def read_loss(self) -> float:
        """The mean loss of the batch whose forward ran last."""
        b, t = self.batch_shape
        acts, _ = self._buffers_for(b, t)
        self.mean_loss = float(np.mean(acts.losses, dtype=np.float64))
        return self.mean_loss

    # ------------------------------------------------------------------ the step as kernel calls
    def forward_calls(self, b: int, t: int, with_loss: bool = True, kernels: KernelSet | None = None) -> list[KernelCall]:
        """The forward pass over a (b, t) batch as kernel calls, with the cross-entropy loss when `with_loss`;
        the kernels are `kernels`' variants (default: the model's)."""
        return self._cached_calls(self._forward_calls, b, t, with_loss, kernels)

    def backward_calls(self, b: int, t: int, accumulate: bool = False, kernels: KernelSet | None = None) -> list:
        """The backward pass over a (b, t) batch as kernel calls and GradientsReady points (see `backward`)."""
        return self._cached_calls(self._backward_calls, b, t, accumulate, kernels)

    def _cached_calls(self, build, b: int, t: int, flag: bool, kernels: KernelSet | None) -> list:
        kernels = kernels or self.kernels
        key = (build.__name__, b, t, flag, id(kernels))
        if key not in self._calls:
            self._calls[key] = build(b, t, flag, kernels)
        return self._calls[key]

    @staticmethod
    def _call(kernels: KernelSet, kernel: str, label: str, layer: int, *args, phase: str = "forward") -> KernelCall:
        return KernelCall(kernel, label, layer, getattr(kernels, kernel), args, phase)

    def _forward_calls(self, b: int, t: int, with_loss: bool, kernels: KernelSet,
                       cache: KVCache | None = None) -> list[KernelCall]:
        cfg = self.config
        acts, _ = self._buffers_for(b, t)
        p, a = self.params, acts
        L = cfg.num_layers
        N = b * t
        rows = lambda x: x.reshape(N, -1)  # (b, t, X) -> (b*t, X)
        flat = lambda x: x.reshape(-1)
        at = layer_view  # a per-layer activation's layer, or the one shared layer of one not kept per layer
        call = partial(self._call, kernels)
        calls = self._encoder_calls(kernels, a, b, t, cache)
        for l in range(L):
            residual = a.encoded if l == 0 else at(a.residual3, l - 1)
            calls += [
                call("layernorm_forward", "ln1", l, rows(at(a.ln1, l)), flat(at(a.ln1_mean, l)),
                     flat(at(a.ln1_rstd, l)), rows(residual), p.ln1w[l], p.ln1b[l]),
                call("matmul_forward", "qkv", l, rows(at(a.qkv, l)), rows(at(a.ln1, l)), p.qkvw[l], p.qkvb[l]),
                self._attention_forward(kernels, a, l, b, t, cache),
                call("matmul_forward", "attproj", l, rows(a.attproj), rows(at(a.atty, l)), p.attprojw[l], p.attprojb[l]),
                call("residual_forward", "residual2", l, flat(at(a.residual2, l)), flat(residual), flat(a.attproj)),
                call("layernorm_forward", "ln2", l, rows(at(a.ln2, l)), flat(at(a.ln2_mean, l)),
                     flat(at(a.ln2_rstd, l)), rows(at(a.residual2, l)), p.ln2w[l], p.ln2b[l]),
                call("matmul_forward", "fc", l, rows(at(a.fch, l)), rows(at(a.ln2, l)), p.fcw[l], p.fcb[l]),
                call("gelu_forward", "", l, flat(at(a.fch_gelu, l)), flat(at(a.fch, l))),
                call("matmul_forward", "fcproj", l, rows(a.fcproj), rows(at(a.fch_gelu, l)), p.fcprojw[l], p.fcprojb[l]),
                call("residual_forward", "residual3", l, flat(at(a.residual3, l)), flat(at(a.residual2, l)),
                     flat(a.fcproj)),
            ]
        calls.append(call("layernorm_forward", "lnf", -1, rows(a.lnf), flat(a.lnf_mean), flat(a.lnf_rstd),
                          rows(at(a.residual3, L - 1)), p.lnfw, p.lnfb))
        return calls + self._classifier_forward(kernels, a, b, t, with_loss)

    # ------------------------------------------------------------------ the classifier
    def _classifier_forward(self, kernels: KernelSet, a: FlatBuffer, b: int, t: int,
                            with_loss: bool) -> list[KernelCall]:
        """logits = lnf @ wte.T and, with the loss, the fused cross-entropy. Training with the loss: chunk by
        chunk on the one (R, Vp) buffer (the last chunk's gradient stays there for backward); otherwise all rows
        into the full (b, t, Vp) logits."""
        if self.training and with_loss:
            chunks = classifier_chunks(b, t, self.options)
            return [call for r0, r1 in chunks
                    for call in self._chunk_logits(kernels, a, a.logits[:r1 - r0], r0, r1, len(chunks) == 1)]
        N = b * t
        calls = self._chunk_logits(kernels, a, self._logits_for(b, t).reshape(N, -1), 0, N, True)
        return calls if with_loss else calls[:1]

    def _chunk_logits(self, kernels: KernelSet, a: FlatBuffer, logits: np.ndarray, r0: int, r1: int, whole: bool,
                      recomputed: bool = False) -> list[KernelCall]:
        """The logits (r1-r0, Vp) of rows [r0, r1) = lnf[r0:r1] @ wte.T, then the fused cross-entropy on them (llm.c's
        fused classifier): losses[r0:r1], and the logits' gradient in their place. `recomputed`: in backward."""
        N, C = a.losses.size, self.config.channels
        label = "logits_recomputed" if recomputed else "logits"
        call = partial(self._classifier_call, kernels, r0=r0, whole=whole, phase="backward" if recomputed else "forward")
        return [call("matmul_forward", label, (logits, a.lnf.reshape(N, C)[r0:r1], self.params.wte, None)),
                call("crossentropy_forward_backward", "" if whole else label,  # the only one when whole
                     (logits, a.losses.reshape(-1)[r0:r1], self.targets[r0:r1], 1.0 / N, self.config.vocab_size))]

    def _classifier_backward(self, kernels: KernelSet, a: FlatBuffer, d: FlatBuffer, b: int, t: int,
                             accumulate: bool) -> list[KernelCall]:
        """d(lnf) into d.dln and the classifier's part of g.wte (written, or added to when `accumulate`), chunk
        by chunk from the last: its gradient is the one the forward left in the buffer; each earlier chunk's
        logits and gradient are recomputed first (the same kernels on the same inputs: the same values, its
        losses rewritten unchanged). After the first chunk g.wte is added to, in this order in every
        execution model."""
        chunks = classifier_chunks(b, t, self.options)
        N, C, Vp = b * t, self.config.channels, self.config.padded_vocab_size
        whole = len(chunks) == 1
        calls = []
        for i, (r0, r1) in enumerate(reversed(chunks)):
            dlogits = a.logits[:r1 - r0]
            if i > 0:
                calls += self._chunk_logits(kernels, a, dlogits, r0, r1, whole, recomputed=True)
            call = partial(self._classifier_call, kernels, r0=r0, whole=whole, phase="backward")
            calls += [call("matmul_backward_input", "logits", (d.dln.reshape(N, C)[r0:r1], dlogits, self.params.wte)),
                      call("matmul_backward_weight", "logits", (self.grads.wte, None, dlogits,
                                                                a.lnf.reshape(N, C)[r0:r1], accumulate or i > 0, 0, Vp))]
        return calls

    @staticmethod
    def _classifier_call(kernels: KernelSet, kernel: str, label: str, args: tuple, r0: int, whole: bool,
                         phase: str) -> KernelCall:
        """A classifier call on rows from r0: on the whole batch an ordinary call (the task graph cuts it by rows);
        on a chunk of it the kernel's `_chunk` name (llmpy.kernels.specs.on_chunk), labelled with its first row."""
        if whole:
            return KernelCall(kernel, label, -1, getattr(kernels, kernel), args, phase)
        return KernelCall(on_chunk(kernel), f"{label} r{r0}", -1, getattr(kernels, kernel), args, phase)

    def _logits_for(self, b: int, t: int) -> np.ndarray:
        """The (b, t, Vp) logits of a forward over every row (no targets, or a model for inference): the
        activations' for inference; a training model allocates them on its first such forward."""
        if not self.training:
            return self._buffers_for(b, t)[0].logits
        Vp = self.config.padded_vocab_size
        if self._all_logits is None:
            self._all_logits = np.zeros(self.B * self.T * Vp, dtype=np.float32)
        return self._all_logits[:b * t * Vp].reshape(b, t, Vp)

    def _encoder_calls(self, kernels: KernelSet, a: FlatBuffer, b: int, t: int, cache: KVCache | None) -> list:
        """Token and position embeddings: positions 0..t-1 of each sequence, or with a cache the positions after the
        cached ones (one call per sequence: the kernel's row offset is where its positions start)."""
        p, N, C = self.params, b * t, self.config.channels
        encoded = a.encoded.reshape(N, C)
        if cache is None:
            return [self._call(kernels, "encoder_forward", "", -1, encoded, self.inputs[:N], p.wte, p.wpe, t, 0)]
        return [self._call(kernels, "encoder_forward", "", -1, encoded[s * t:(s + 1) * t], self.inputs[s * t:(s + 1) * t],
                           p.wte, p.wpe, self.config.max_seq_len, cache.length) for s in range(b)]

    def _attention_forward(self, kernels: KernelSet, a: FlatBuffer, l: int, b: int, t: int,
                           cache: KVCache | None = None) -> KernelCall:
        NH, at = self.config.num_heads, layer_view
        if cache is not None:
            return self._call(kernels, "attention_cached_forward", "", l, at(a.atty, l), cache.qkv[l, :b],
                              cache.lse[:b], at(a.qkv, l), NH, cache.length)
        if self.options.attention == "llmc":
            return self._call(kernels, "attention_llmc_forward", "", l, at(a.atty, l), at(a.preatt, l), at(a.att, l),
                              at(a.qkv, l), NH, 0, b, 0, t)
        return self._call(kernels, "attention_forward", "", l, at(a.atty, l), at(a.att_lse, l), at(a.qkv, l), NH, 0,
                          b, 0, t)

    def _attention_backward(self, kernels: KernelSet, a: FlatBuffer, d: FlatBuffer, l: int, b: int, t: int) -> KernelCall:
        NH = self.config.num_heads
        if self.options.attention == "llmc":
            return self._call(kernels, "attention_llmc_backward", "", l, d.dqkv, d.dpreatt, d.datt, d.datty, a.qkv[l],
                              a.att[l], NH, 0, b, 0, t, False, phase="backward")
        return self._call(kernels, "attention_backward", "", l, d.dqkv, d.datty, a.qkv[l], a.atty[l], a.att_lse[l],
                          NH, 0, b, 0, t, False, phase="backward")

    def _backward_calls(self, b: int, t: int, accumulate: bool, kernels: KernelSet) -> list:
        cfg = self.config
        acts, grad_acts = self._buffers_for(b, t)
        p, g, a, d = self.params, self.grads, acts, grad_acts
        L, C = cfg.num_layers, cfg.channels
        N = b * t
        acc = accumulate
        rows = lambda x: x.reshape(N, -1)
        flat = lambda x: x.reshape(-1)
        at = layer_view

        def call(kernel, label, layer, *args):
            return self._call(kernels, kernel, label, layer, *args, phase="backward")

        def linear(label, l, dinp, dout, inp, weight, dweight, dbias, out_channels):
            return [call("matmul_backward_input", label, l, rows(dinp), rows(dout), weight),
                    call("matmul_backward_weight", label, l, dweight, dbias, rows(dout), rows(inp), acc, 0, out_channels)]

        def layernorm(label, l, dout, inp, weight, dweight, dbias, mean, rstd, accumulate_input):
            # the input gradient goes into the residual stream's gradient d.dresidual (added to, but for lnf)
            return [call("layernorm_backward_input", label, l, rows(d.dresidual), rows(dout), rows(inp), weight,
                         flat(mean), flat(rstd), accumulate_input),
                    call("layernorm_backward_params", label, l, dweight, dbias, rows(dout), rows(inp), flat(mean),
                         flat(rstd), 0, C, acc)]

        calls = self._classifier_backward(kernels, a, d, b, t, acc)
        calls += layernorm("lnf", -1, d.dln, a.residual3[L - 1], p.lnfw, g.lnfw, g.lnfb, a.lnf_mean, a.lnf_rstd, False)
        calls.append(GradientsReady(L))
        for l in reversed(range(L)):
            residual = a.encoded if l == 0 else a.residual3[l - 1]
            calls += self._recompute_calls(kernels, a, l, residual, rows, flat)
            calls += linear("fcproj", l, d.dfch_gelu, d.dresidual, at(a.fch_gelu, l), p.fcprojw[l], g.fcprojw[l],
                            g.fcprojb[l], C)
            calls.append(call("gelu_backward", "", l, flat(d.dfch), flat(a.fch[l]), flat(d.dfch_gelu)))
            calls += linear("fc", l, d.dln, d.dfch, at(a.ln2, l), p.fcw[l], g.fcw[l], g.fcb[l], 4 * C)
            calls += layernorm("ln2", l, d.dln, a.residual2[l], p.ln2w[l], g.ln2w[l], g.ln2b[l], a.ln2_mean[l],
                               a.ln2_rstd[l], True)
            calls += linear("attproj", l, d.datty, d.dresidual, a.atty[l], p.attprojw[l], g.attprojw[l],
                            g.attprojb[l], C)
            calls.append(self._attention_backward(kernels, a, d, l, b, t))
            calls += linear("qkv", l, d.dln, d.dqkv, at(a.ln1, l), p.qkvw[l], g.qkvw[l], g.qkvb[l], 3 * C)
            calls += layernorm("ln1", l, d.dln, residual, p.ln1w[l], g.ln1w[l], g.ln1b[l], a.ln1_mean[l],
                               a.ln1_rstd[l], True)
            calls.append(GradientsReady(l))
        calls.append(call("encoder_backward", "", -1, g.wte, g.wpe, rows(d.dresidual), self.inputs[:N], t, 0, C, acc))
        calls.append(GradientsReady(-1))
        return calls

    def _recompute_calls(self, kernels: KernelSet, a: FlatBuffer, l: int, residual, rows, flat) -> list[KernelCall]:
        """The forward calls whose outputs layer l's backward reads but the forward did not keep (`recompute`):
        the same kernels on the same inputs, so the same values (mean and rstd are rewritten unchanged)."""
        p, level = self.params, self.options.recompute
        call = lambda *args: self._call(kernels, *args, phase="backward")
        calls = []
        if level >= 2:
            calls += [call("layernorm_forward", "ln2_recomputed", l, rows(a.ln2[0]), flat(a.ln2_mean[l]),
                           flat(a.ln2_rstd[l]), rows(a.residual2[l]), p.ln2w[l], p.ln2b[l]),
                      call("layernorm_forward", "ln1_recomputed", l, rows(a.ln1[0]), flat(a.ln1_mean[l]),
                           flat(a.ln1_rstd[l]), rows(residual), p.ln1w[l], p.ln1b[l])]
        if level >= 1:
            calls.append(call("gelu_forward", "recomputed", l, flat(a.fch_gelu[0]), flat(a.fch[l])))
        return calls

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: np.ndarray, targets: np.ndarray | None = None) -> float | None:
        """inputs, targets (b, t) token ids with b <= B, t <= T. Fills the activations; returns the mean
        loss when targets are given (logits only otherwise, in `self.logits()`)."""
        b, t = self.load_batch(inputs, targets)
        run_calls(self.forward_calls(b, t, with_loss=targets is not None), self.observer)
        self._gradient_pending = targets is not None
        if targets is None:
            self.mean_loss = None
            return None
        return self.read_loss()

    # ------------------------------------------------------------------ generation with a KV cache
    def kv_cache(self, b: int, max_len: int) -> KVCache:
        """An empty cache of keys and values (with the queries) for b <= B sequences of up to max_len positions."""
        cfg = self.config
        if not (0 < b <= self.B and 0 < max_len <= cfg.max_seq_len):
            raise ValueError(f"a cache for {b} sequences of {max_len} positions: this model runs at most B={self.B} "
                             f"sequences of at most max_seq_len={cfg.max_seq_len} positions")
        return KVCache(np.zeros((cfg.num_layers, b, max_len, 3 * cfg.channels), np.float32),
                       np.zeros((b, cfg.num_heads, max_len), np.float32))

    def decode_calls(self, b: int, n: int, cache: KVCache, kernels: KernelSet | None = None) -> list[KernelCall]:
        """The forward over the n positions after the cached ones of b sequences, as kernel calls: the step's
        forward list, with the embeddings at those positions and the attention reading and extending the cache."""
        return self._forward_calls(b, n, False, kernels or self.kernels, cache)

    def decode(self, tokens: np.ndarray, cache: KVCache) -> np.ndarray:
        """tokens (b, n) at the positions after the cached ones: their forward, the cache extended by n positions,
        and the logits (b, V) of the last one (a copy)."""
        b, n = self.load_batch(tokens)
        if b != cache.qkv.shape[1] or cache.length + n > cache.qkv.shape[2]:
            raise ValueError(f"tokens of shape {tokens.shape} after {cache.length} cached positions: the cache holds "
                             f"{cache.qkv.shape[1]} sequences of {cache.qkv.shape[2]} positions")
        run_calls(self.decode_calls(b, n, cache), self.observer)
        cache.length += n
        return self.logits()[:, -1].copy()

    def logits(self) -> np.ndarray:
        """Logits (b, t, V) of the last forward, without the padded vocabulary columns (a view). A forward with
        targets replaces the logits by their gradient, so this needs a forward without targets."""
        if self.batch_shape is None:
            raise RuntimeError("logits() needs a forward pass first")
        if self.has_targets:
            raise RuntimeError("logits() needs a forward without targets (with targets the buffer holds their gradient)")
        return self._logits_for(*self.batch_shape)[:, :, : self.config.vocab_size]

    # ------------------------------------------------------------------ backward
    def zero_grad(self) -> None:
        """Zero every parameter gradient (llm.c's gpt2_zero_grad). Not needed before a backward that
        writes its gradients (`accumulate_gradients=False`)."""
        if self.grads is not None:
            self.grads.flat.fill(0.0)

    def backward(self, accumulate_gradients: bool = False) -> None:
        """Gradients of the mean loss of the last forward (which must have had targets), once per forward: the
        training classifier's buffer holds another chunk after it.

        With `accumulate_gradients=False` every parameter gradient is written, so no zero_grad pass is
        needed; with True they are added to (gradient accumulation micro-steps). Activation gradients
        are always written (see each kernel's docstring for how)."""
        if self.grads is None:
            raise RuntimeError("backward() on a model built with training=False")
        if self.batch_shape is None or not self.has_targets:
            raise RuntimeError("backward() needs a forward pass with targets first")
        if not self._gradient_pending:  # the classifier's buffer holds another chunk's gradient now
            raise RuntimeError("backward() needs its own forward pass with targets (one backward per forward)")
        self._gradient_pending = False
        run_calls(self.backward_calls(*self.batch_shape, accumulate_gradients), self.observer, self.gradients_ready)
