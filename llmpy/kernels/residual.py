"""Residual connection: out = a + b."""

from numba import prange

from llmpy.kernels.compile import kernel

CHUNK = 4096


@kernel(fastmath=False)
def residual_forward(out, a, b):
    """out (N,) = a (N,) + b (N,), flat views. Writes."""
    N = out.shape[0]
    for chunk in prange((N + CHUNK - 1) // CHUNK):
        for i in range(chunk * CHUNK, min(N, (chunk + 1) * CHUNK)):
            out[i] = a[i] + b[i]


@kernel(fastmath=False)
def residual_backward(da, db, dout):
    """da (N,) = dout, db (N,) = dout (flat views). Writes both: the skip path is each one's first
    gradient; the layernorm that also reads `a` adds its part afterwards."""
    N = dout.shape[0]
    for chunk in prange((N + CHUNK - 1) // CHUNK):
        for i in range(chunk * CHUNK, min(N, (chunk + 1) * CHUNK)):
            g = dout[i]
            da[i] = g
            db[i] = g
