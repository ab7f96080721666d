"""llm.c's memory layout: 16 parameter tensors and 23 activation tensors, each kind in one flat buffer.

Names and order follow llm.c's `ParameterTensors` and `ActivationTensors` (train_gpt2.c) so that
model files and debug states map one to one:

parameters (L = layers, C = channels, Vp = padded vocab, maxT = max_seq_len):
    wte (Vp, C)  wpe (maxT, C)  ln1w (L, C)  ln1b (L, C)  qkvw (L, 3C, C)  qkvb (L, 3C)
    attprojw (L, C, C)  attprojb (L, C)  ln2w (L, C)  ln2b (L, C)  fcw (L, 4C, C)  fcb (L, 4C)
    fcprojw (L, C, 4C)  fcprojb (L, C)  lnfw (C)  lnfb (C)

activations (B = batch, T = sequence length, NH = heads):
    encoded (B, T, C)  ln1 (L, B, T, C)  ln1_mean (L, B, T)  ln1_rstd (L, B, T)  qkv (L, B, T, 3C)
    atty (L, B, T, C)  preatt (L, B, NH, T, T)  att (L, B, NH, T, T)  attproj (L, B, T, C)
    residual2 (L, B, T, C)  ln2 (L, B, T, C)  ln2_mean (L, B, T)  ln2_rstd (L, B, T)
    fch (L, B, T, 4C)  fch_gelu (L, B, T, 4C)  fcproj (L, B, T, C)  residual3 (L, B, T, C)
    lnf (B, T, C)  lnf_mean (B, T)  lnf_rstd (B, T)  logits (B, T, Vp)  probs (B, T, Vp)  losses (B, T)

The output layer shares `wte` (weight tying): logits = lnf @ wte.T.
"""

from __future__ import annotations

import math

import numpy as np

from llmpy.core.config import GPT2Config

PARAMETER_NAMES = (
    "wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
    "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb",
)

# Parameters that are weight matrices (2-D per layer); the others are biases and layernorm gains.
MATRIX_PARAMETERS = frozenset({"wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"})

ACTIVATION_NAMES = (
    "encoded", "ln1", "ln1_mean", "ln1_rstd", "qkv", "atty", "preatt", "att", "attproj",
    "residual2", "ln2", "ln2_mean", "ln2_rstd", "fch", "fch_gelu", "fcproj", "residual3",
    "lnf", "lnf_mean", "lnf_rstd", "logits", "probs", "losses",
)


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


def activation_shapes(config: GPT2Config, B: int, T: int) -> dict[str, tuple[int, ...]]:
    """The 23 activation shapes in llm.c's order, for batch B and sequence length T."""
    C, L, NH, Vp = config.channels, config.num_layers, config.num_heads, config.padded_vocab_size
    return {
        "encoded": (B, T, C),
        "ln1": (L, B, T, C),
        "ln1_mean": (L, B, T),
        "ln1_rstd": (L, B, T),
        "qkv": (L, B, T, 3 * C),
        "atty": (L, B, T, C),
        "preatt": (L, B, NH, T, T),
        "att": (L, B, NH, T, T),
        "attproj": (L, B, T, C),
        "residual2": (L, B, T, C),
        "ln2": (L, B, T, C),
        "ln2_mean": (L, B, T),
        "ln2_rstd": (L, B, T),
        "fch": (L, B, T, 4 * C),
        "fch_gelu": (L, B, T, 4 * C),
        "fcproj": (L, B, T, C),
        "residual3": (L, B, T, C),
        "lnf": (B, T, C),
        "lnf_mean": (B, T),
        "lnf_rstd": (B, T),
        "logits": (B, T, Vp),
        "probs": (B, T, Vp),
        "losses": (B, T),
    }


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


def activation_buffer(config: GPT2Config, B: int, T: int, flat: np.ndarray | None = None) -> FlatBuffer:
    return FlatBuffer(activation_shapes(config, B, T), flat)
