"""GELU, tanh approximation: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))."""

import math

import numpy as np
from numba import prange

from llmpy.kernels.compile import kernel

GELU_SCALE = math.sqrt(2.0 / math.pi)
CHUNK = 4096


@kernel(fastmath=False)
def gelu_forward(out, inp):
    """out (N,) = gelu(inp (N,)), both flat views of the same shape. Writes."""
    N = inp.shape[0]
    s = np.float32(GELU_SCALE)
    k = np.float32(0.044715)
    half = np.float32(0.5)
    one = np.float32(1.0)
    for chunk in prange((N + CHUNK - 1) // CHUNK):
        for i in range(chunk * CHUNK, min(N, (chunk + 1) * CHUNK)):
            x = inp[i]
            out[i] = half * x * (one + np.tanh(s * (x + k * x * x * x)))


@kernel(fastmath=False)
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
        for i in range(chunk * CHUNK, min(N, (chunk + 1) * CHUNK)):
            x = inp[i]
            u = s * (x + k * x * x * x)
            th = np.tanh(u)
            sech2 = one - th * th
            local = half * (one + th) + x * half * sech2 * s * (one + three * k * x * x)
            dinp[i] = local * dout[i]
