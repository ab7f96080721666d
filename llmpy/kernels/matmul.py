"""Linear layer: out (N, OC) = inp (N, C) @ weight (OC, C).T + bias (OC,).

The GEMMs go to numpy's OpenBLAS (`np.matmul(..., out=)` into preallocated buffers; its thread count
is the execution model's business, set with threadpoolctl). Bias passes are numba kernels.
"""

import numpy as np
from numba import prange

from llmpy.kernels.compile import kernel

CHANNEL_BLOCK = 64
ACCUMULATE_CHANNELS = 4096  # output channels per product a weight-gradient add goes through (12.6 MB at C = 768)


@kernel
def bias_add(out, bias):
    """out (N, OC) += bias (OC,) on every row."""
    N, OC = out.shape
    for n in prange(N):
        out_row = out[n]  # a row view indexed from 0: no negative-index handling, so LLVM vectorises
        for o in range(OC):
            out_row[o] += bias[o]


@kernel
def bias_backward(dbias, dout, o0, o1, accumulate):
    """dbias[o0:o1] (+)= sum over rows of dout (N, OC)[:, o0:o1]. One thread owns each channel block and
    sums rows in order, so the result does not depend on the thread count."""
    N = dout.shape[0]
    num_blocks = (o1 - o0 + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    for block in prange(num_blocks):
        start = o0 + block * CHANNEL_BLOCK
        stop = min(start + CHANNEL_BLOCK, o1)
        width = stop - start
        acc = np.zeros(width, dtype=np.float32)
        for n in range(N):
            dout_row = dout[n, start:stop]
            for j in range(width):
                acc[j] += dout_row[j]
        for j in range(width):
            if accumulate:
                dbias[start + j] += acc[j]
            else:
                dbias[start + j] = acc[j]


def matmul_forward(out, inp, weight, bias, parallel=False):
    """out (N, OC) = inp (N, C) @ weight (OC, C).T (+ bias (OC,) unless None). Writes `out`."""
    np.matmul(inp, weight.T, out=out)
    if bias is not None:
        bias_add.variant(parallel)(out, bias)


def matmul_backward_input(dinp, dout, weight):
    """dinp (N, C) = dout (N, OC) @ weight (OC, C). Writes: in GPT-2 every matmul input has this as its
    only gradient, so no zeroing is needed."""
    np.matmul(dout, weight, out=dinp)


def matmul_backward_weight(dweight, dbias, dout, inp, accumulate, o0=0, o1=None, scratch=None, parallel=False):
    """Weight and bias gradients for output channels [o0, o1):
    dweight (OC, C)[o0:o1] (+)= dout[:, o0:o1].T @ inp (N, C); dbias (OC,)[o0:o1] (+)= dout[:, o0:o1] summed
    over rows (skipped when dbias is None). Writes unless `accumulate` (gradient accumulation, the classifier's
    later chunks), which adds the product ACCUMULATE_CHANNELS output channels at a time through `scratch` (a
    float32 buffer of at least min(o1-o0, ACCUMULATE_CHANNELS)*C elements; allocated if None).
    """
    if o1 is None:
        o1 = dweight.shape[0]
    if accumulate:
        _add_weight_product(dweight, dout, inp, o0, o1, scratch)
    else:
        np.matmul(dout[:, o0:o1].T, inp, out=dweight[o0:o1])
    if dbias is not None:
        bias_backward.variant(parallel)(dbias, dout, o0, o1, accumulate)


def _add_weight_product(dweight, dout, inp, o0, o1, scratch):
    """dweight[o0:o1] += dout[:, o0:o1].T @ inp, by blocks of output channels: the whole product of the
    classifier's weight gradient is the size of wte (154 MB for GPT-2), a fresh allocation (and its page faults)
    for every chunk."""
    C = inp.shape[1]
    width = max(1, min(o1 - o0, ACCUMULATE_CHANNELS))
    if scratch is None:
        scratch = np.empty(width * C, dtype=np.float32)
    for b0 in range(o0, o1, width):
        b1 = min(o1, b0 + width)
        product = scratch[: (b1 - b0) * C].reshape(b1 - b0, C)
        np.matmul(dout[:, b0:b1].T, inp, out=product)
        dweight[b0:b1] += product
