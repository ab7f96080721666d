"""llm.c's memory layout: 16 parameter tensors in one flat buffer; the activations a step keeps, in another.

Parameter names and order follow llm.c's `ParameterTensors` (train_gpt2.c), so model files map one to one
(L = layers, C = channels, Vp = padded vocab, maxT = max_seq_len):
    wte (Vp, C)  wpe (maxT, C)  ln1w (L, C)  ln1b (L, C)  qkvw (L, 3C, C)  qkvb (L, 3C)
    attprojw (L, C, C)  attprojb (L, C)  ln2w (L, C)  ln2b (L, C)  fcw (L, 4C, C)  fcb (L, 4C)
    fcprojw (L, C, 4C)  fcprojb (L, C)  lnfw (C)  lnfb (C)

Activations keep llm.c's names (B = batch, T = sequence length, NH = heads), but, as llm.c's CUDA trainer
does, only what the backward pass reads is stored per layer:
    encoded (B, T, C)  ln1 (L, B, T, C)  ln1_mean, ln1_rstd (L, B, T)  qkv (L, B, T, 3C)  atty (L, B, T, C)
    attention: att_lse (L, B, NH, T) (tiled attention), or llm.c's preatt, att (L, B, NH, T, T) (`llmc`)
    attproj (B, T, C)  residual2 (L, B, T, C)  ln2 (L, B, T, C)  ln2_mean, ln2_rstd (L, B, T)
    fch (L, B, T, 4C)  fch_gelu (L, B, T, 4C)  fcproj (B, T, C)  residual3 (L, B, T, C)
    lnf (B, T, C)  lnf_mean, lnf_rstd (B, T)  logits (R, Vp)  losses (B, T)
attproj and fcproj only feed the residual adds, so one (B, T, C) buffer each serves every layer. With
recomputation, fch_gelu (recompute >= 1) and ln1, ln2 (recompute = 2) keep one layer (leading dimension 1)
and are recomputed in backward, as llm.c's `-r 1` and `-r 2`. A model for inference only (no backward) keeps
one layer of every activation. The logits buffer holds the logits, then (after the fused cross-entropy) their
gradient, in place: no separate probabilities or dlogits. Training keeps one chunk of R token rows of them
(`classifier_chunks`: at most `classifier_rows`, whole sequences or a part of one), reused by every chunk; a
model for inference keeps all of them, logits (B, T, Vp).

Activation gradients are needed for one layer at a time, so one layer's worth is reused by every layer:
    dresidual (B, T, C) (the residual stream's gradient, added to in place; d(encoded) at the end)
    dln (B, T, C)  dfch_gelu, dfch (B, T, 4C)  datty (B, T, C)  dqkv (B, T, 3C)
    and for `llmc` attention its scratch dpreatt, datt (B, NH, T, T)

The output layer shares `wte` (weight tying): logits = lnf @ wte.T.
"""

from __future__ import annotations

import math

import numpy as np

from llmpy.core.config import ActivationOptions, GPT2Config

PARAMETER_NAMES = (
    "wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
    "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb",
)

# Parameters that are weight matrices (2-D per layer); the others are biases and layernorm gains.
MATRIX_PARAMETERS = frozenset({"wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"})

def parameter_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """The 16 parameter shapes in llm.c's order."""
    Vp, C, L, maxT = config.padded_vocab_size, config.channels, config.num_layers, config.max_seq_len
    return {
        "wte": (Vp, C),
        "wpe": (maxT, C),
        "ln1w": (L, C),
        "ln1b": (L, C),
        "qkvw": (L, 3 * C, C),
        "qkvb": (L, 3 * C),
        "attprojw": (L, C, C),
        "attprojb": (L, C),
        "ln2w": (L, C),
        "ln2b": (L, C),
        "fcw": (L, 4 * C, C),
        "fcb": (L, 4 * C),
        "fcprojw": (L, C, 4 * C),
        "fcprojb": (L, C),
        "lnfw": (C,),
        "lnfb": (C,),
    }


def activation_shapes(config: GPT2Config, B: int, T: int, options: ActivationOptions = ActivationOptions(),
                      inference: bool = False) -> dict[str, tuple[int, ...]]:
    """The stored activations for batch B and sequence length T (see the module docstring); for `inference`
    (no backward) one layer of each."""
    C, NH, Vp = config.channels, config.num_heads, config.padded_vocab_size
    L = 1 if inference else config.num_layers
    kept = lambda level: 1 if options.recompute >= level else L  # layers kept of a tensor recomputed at that level
    scores = {"att_lse": (L, B, NH, T)} if options.attention == "flash" else {"preatt": (L, B, NH, T, T),
                                                                      "att": (L, B, NH, T, T)}
    logits = (B, T, Vp) if inference else (max(r1 - r0 for r0, r1 in classifier_chunks(B, T, options)), Vp)
    return {
        "encoded": (B, T, C),
        "ln1": (kept(2), B, T, C),
        "ln1_mean": (L, B, T),
        "ln1_rstd": (L, B, T),
        "qkv": (L, B, T, 3 * C),
        "atty": (L, B, T, C),
        **scores,
        "attproj": (B, T, C),
        "residual2": (L, B, T, C),
        "ln2": (kept(2), B, T, C),
        "ln2_mean": (L, B, T),
        "ln2_rstd": (L, B, T),
        "fch": (L, B, T, 4 * C),
        "fch_gelu": (kept(1), B, T, 4 * C),
        "fcproj": (B, T, C),
        "residual3": (L, B, T, C),
        "lnf": (B, T, C),
        "lnf_mean": (B, T),
        "lnf_rstd": (B, T),
        "logits": logits,
        "losses": (B, T),
    }


def classifier_chunks(B: int, T: int, options: ActivationOptions = ActivationOptions()) -> list[tuple[int, int]]:
    """The token rows [r0, r1) of each chunk of the training classifier, in order: pieces of at most
    `classifier_rows` rows of each sequence, or runs of as many whole sequences as fit in that many. So a chunk's
    rows of any (B, T, ...) activation are a box of it (a view the task graph can place), and the last chunk of a
    sequence or of the batch may be shorter. classifier_rows 0: one chunk of all the rows."""
    R, N = options.classifier_rows, B * T
    if R == 0 or R >= N:
        return [(0, N)]
    if T >= R:
        return [(s * T + j, s * T + min(j + R, T)) for s in range(B) for j in range(0, T, R)]
    rows = (R // T) * T
    return [(r0, min(r0 + rows, N)) for r0 in range(0, N, rows)]


def activation_gradient_shapes(config: GPT2Config, B: int, T: int,
                               options: ActivationOptions = ActivationOptions()) -> dict[str, tuple[int, ...]]:
    """One layer's activation gradients, reused by every layer (see the module docstring)."""
    C, NH = config.channels, config.num_heads
    scratch = {} if options.attention == "flash" else {"dpreatt": (B, NH, T, T), "datt": (B, NH, T, T)}
    return {"dresidual": (B, T, C), "dln": (B, T, C), "dfch_gelu": (B, T, 4 * C), "dfch": (B, T, 4 * C),
            "datty": (B, T, C), "dqkv": (B, T, 3 * C), **scratch}


def layer_view(tensor: np.ndarray, layer: int) -> np.ndarray:
    """Layer `layer` of a per-layer activation, or the one shared layer of a recomputed one."""
    return tensor[layer % tensor.shape[0]]


class FlatBuffer:
    """One contiguous float32 buffer holding several named tensors back to back.

    `buffer.flat` is the whole 1-D array; `buffer["name"]` (or `buffer.name`) is a view of one tensor.
    Writing through a view writes the flat buffer, so whole-model operations (zeroing, the optimizer,
    collectives) run on `flat` in one call.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], flat: np.ndarray | None = None):
        self.shapes = dict(shapes)
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, shape in self.shapes.items():
            self.offsets[name] = offset
            offset += math.prod(shape)
        self.size = offset
        if flat is None:
            flat = np.zeros(offset, dtype=np.float32)
        if flat.dtype != np.float32 or flat.ndim != 1 or flat.size != offset:
            raise ValueError(f"flat buffer must be float32 of size {offset}, got {flat.dtype} {flat.shape}")
        self.flat = flat
        self.views: dict[str, np.ndarray] = {
            name: flat[self.offsets[name]: self.offsets[name] + math.prod(shape)].reshape(shape)
            for name, shape in self.shapes.items()
        }

    def __getitem__(self, name: str) -> np.ndarray:
        return self.views[name]

    def __getattr__(self, name: str) -> np.ndarray:
        views = self.__dict__.get("views")
        if views is not None and name in views:
            return views[name]
        raise AttributeError(name)

    def __iter__(self):
        return iter(self.views)

    def items(self):
        return self.views.items()

    @property
    def nbytes(self) -> int:
        return self.flat.nbytes


def parameter_buffer(config: GPT2Config, flat: np.ndarray | None = None) -> FlatBuffer:
    return FlatBuffer(parameter_shapes(config), flat)


def activation_buffer(config: GPT2Config, B: int, T: int, options: ActivationOptions = ActivationOptions(),
                      flat: np.ndarray | None = None, inference: bool = False) -> FlatBuffer:
    return FlatBuffer(activation_shapes(config, B, T, options, inference), flat)


def activation_gradient_buffer(config: GPT2Config, B: int, T: int, options: ActivationOptions = ActivationOptions(),
                               flat: np.ndarray | None = None) -> FlatBuffer:
    return FlatBuffer(activation_gradient_shapes(config, B, T, options), flat)


def packed_ranges(ranges) -> list[tuple[slice, slice]]:
    """For [start, stop) ranges of the whole parameters held one after the other in a packed array: (slice of the
    packed array, slice of the whole) of each."""
    out, offset = [], 0
    for start, stop in ranges:
        out.append((slice(offset, offset + stop - start), slice(start, stop)))
        offset += stop - start
    return out
