"""GPT-2's kernels: one forward/backward pair per layer type, pure functions on float32 arrays.

Token-wise kernels take any block of token rows; attention (tiled, or llm.c's) takes sequences and a range
of query rows; weight-gradient kernels take a block of output channels. `KernelSet(parallel)` hands the model the
variant an execution model asks for: numba kernels compiled with `prange` spread over threads
(fork-join) or run serially on the calling thread (sequential, task workers).
"""

from __future__ import annotations

from functools import partial

from llmpy.kernels import adamw, attention, attention_llmc, crossentropy, encoder, gelu, layernorm, matmul, residual
from llmpy.kernels.compile import KernelVariants

NUMBA_KERNELS: tuple[KernelVariants, ...] = (
    encoder.encoder_forward,
    encoder.encoder_backward,
    layernorm.layernorm_forward,
    layernorm.layernorm_backward_input,
    layernorm.layernorm_backward_params,
    matmul.bias_add,
    matmul.bias_backward,
    attention_llmc.attention_llmc_forward,
    attention_llmc.attention_llmc_backward,
    gelu.gelu_forward,
    gelu.gelu_backward,
    residual.residual_forward,
    residual.residual_backward,
    crossentropy.crossentropy_forward_backward,
    adamw.adamw_update,
    adamw.sum_of_squares,
)


class KernelSet:
    """Every kernel as one callable attribute, in the variant chosen by `parallel`."""

    def __init__(self, parallel: bool):
        self.parallel = parallel
        for variants in NUMBA_KERNELS:
            setattr(self, variants.name, variants.variant(parallel))
        self.matmul_forward = partial(matmul.matmul_forward, parallel=parallel)
        self.matmul_backward_input = matmul.matmul_backward_input
        self.matmul_backward_weight = partial(matmul.matmul_backward_weight, parallel=parallel)
        self.attention_forward = partial(attention.attention_forward, parallel=parallel)
        self.attention_backward = partial(attention.attention_backward, parallel=parallel)
        self.attention_cached_forward = partial(attention.attention_cached_forward, parallel=parallel)
