"""Residual connection: out = a + b."""

from numba import prange

from llmpy.kernels.compile import kernel

CHUNK = 4096


@kernel
def residual_forward(out, a, b):
    """out (N,) = a (N,) + b (N,), flat views. Writes."""
    N = out.shape[0]
    for chunk in prange((N + CHUNK - 1) // CHUNK):
        start = chunk * CHUNK
        stop = min(N, start + CHUNK)
        out_chunk, a_chunk, b_chunk = out[start:stop], a[start:stop], b[start:stop]
        for i in range(stop - start):  # from 0: vectorises (see gelu.py)
            out_chunk[i] = a_chunk[i] + b_chunk[i]


@kernel
def residual_backward(da, db, dout):
    """da (N,) = dout, db (N,) = dout (flat views). Writes both: the skip path is each one's first
    gradient; the layernorm that also reads `a` adds its part afterwards."""
    N = dout.shape[0]
    for chunk in prange((N + CHUNK - 1) // CHUNK):
        start = chunk * CHUNK
        stop = min(N, start + CHUNK)
        da_chunk, db_chunk, dout_chunk = da[start:stop], db[start:stop], dout[start:stop]
        for i in range(stop - start):
            g = dout_chunk[i]
            da_chunk[i] = g
            db_chunk[i] = g
