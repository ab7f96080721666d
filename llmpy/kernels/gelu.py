"""GELU, tanh approximation: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))).

tanh is `tanh_float32` (vector_math): plain arithmetic, so each chunk's loop runs in SIMD lanes instead
of one libm call per element. Chunks are sliced so the inner loop indexes from 0, which lets numba drop
its negative-index handling and LLVM vectorise.
"""

import math

import numpy as np
from numba import prange

from llmpy.kernels.compile import kernel
from llmpy.kernels.vector_math import tanh_float32

GELU_SCALE = math.sqrt(2.0 / math.pi)
CHUNK = 4096


@kernel
def gelu_forward(out, inp):
    """out (N,) = gelu(inp (N,)), both flat views of the same shape. Writes."""
    N = inp.shape[0]
    s = np.float32(GELU_SCALE)
    k = np.float32(0.044715)
    half = np.float32(0.5)
    one = np.float32(1.0)
    for chunk in prange((N + CHUNK - 1) // CHUNK):
        start = chunk * CHUNK
        stop = min(N, start + CHUNK)
        x_chunk = inp[start:stop]
        out_chunk = out[start:stop]
        for i in range(stop - start):
            x = x_chunk[i]
            out_chunk[i] = half * x * (one + tanh_float32(s * (x + k * x * x * x)))


@kernel
def gelu_backward(dinp, inp, dout):
    """dinp (N,) = gelu'(inp (N,)) * dout (N,), flat views. Writes: the MLP's pre-activation has no other
    gradient, so no zeroing is needed."""
    N = inp.shape[0]
    s = np.float32(GELU_SCALE)
    k = np.float32(0.044715)
    half = np.float32(0.5)
    one = np.float32(1.0)
    three = np.float32(3.0)
    for chunk in prange((N + CHUNK - 1) // CHUNK):
        start = chunk * CHUNK
        stop = min(N, start + CHUNK)
        x_chunk = inp[start:stop]
        dout_chunk = dout[start:stop]
        dinp_chunk = dinp[start:stop]
        for i in range(stop - start):
            x = x_chunk[i]
            th = tanh_float32(s * (x + k * x * x * x))
            sech2 = one - th * th
            local = half * (one + th) + x * half * sech2 * s * (one + three * k * x * x)
            dinp_chunk[i] = local * dout_chunk[i]
