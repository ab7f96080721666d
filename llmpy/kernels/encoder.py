"""Token and position embedding: encoded = wte[token] + wpe[position]."""

from numba import prange

from llmpy.kernels.compile import kernel

CHANNEL_BLOCK = 64


@kernel
def encoder_forward(out, tokens, wte, wpe, T, row0):
    """out (N, C) = wte[tokens[n]] + wpe[(row0 + n) % T].

    tokens (N,) int32: a block of N token rows of the (B*T) batch starting at global row `row0`;
    wte (Vp, C); wpe (maxT, C). Writes `out`.
    """
    N, C = out.shape
    for n in prange(N):
        token = tokens[n]
        position = (row0 + n) % T
        for c in range(C):
            out[n, c] = wte[token, c] + wpe[position, c]


@kernel
def encoder_backward(dwte, dwpe, dout, tokens, T, c0, c1, accumulate_wpe):
    """Embedding gradients for output channels [c0, c1).

    dout (B*T, C); tokens (B*T,) int32; dwte (Vp, C) always accumulates (+=, it already holds the
    output layer's gradient through weight tying); dwpe (maxT, C) accumulates if `accumulate_wpe`,
    else is written (rows >= T set to zero). Each channel block is owned by one thread and rows are
    visited in order, so repeated tokens never race and results do not depend on thread count.
    """
    N = dout.shape[0]
    num_blocks = (c1 - c0 + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    for block in prange(num_blocks):
        start = c0 + block * CHANNEL_BLOCK
        stop = min(start + CHANNEL_BLOCK, c1)
        if not accumulate_wpe:
            for t in range(dwpe.shape[0]):
                for c in range(start, stop):
                    dwpe[t, c] = 0.0
        for n in range(N):
            token = tokens[n]
            position = n % T
            for c in range(start, stop):
                g = dout[n, c]
                dwte[token, c] += g
                dwpe[position, c] += g
