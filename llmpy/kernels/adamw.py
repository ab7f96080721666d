"""AdamW with decoupled weight decay (llm.c's `gpt2_update`), plus the global gradient norm."""

import numpy as np
from numba import prange

from llmpy.kernels.compile import kernel
from llmpy.kernels.vector_math import LANES, fma, lanes_fill, lanes_float64, lanes_load, lanes_sum

CHUNK = 16384


@kernel
def adamw_update(params, grads, m, v, learning_rate, beta1, beta2, eps, weight_decay,
                 bias_correction1, bias_correction2, grad_scale):
    """One AdamW step over flat (N,) float32 arrays, in place on params, m, v.

    g = grads * grad_scale (gradient clipping); m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    params -= lr * (m / bias_correction1 / (sqrt(v / bias_correction2) + eps) + weight_decay * params).
    bias_correction_k = 1 - beta_k^step, computed by the caller.
    """
    N = params.shape[0]
    b1 = np.float32(beta1)
    b2 = np.float32(beta2)
    one = np.float32(1.0)
    lr = np.float32(learning_rate)
    wd = np.float32(weight_decay)
    e = np.float32(eps)
    c1 = np.float32(1.0 / bias_correction1)
    c2 = np.float32(1.0 / bias_correction2)
    gs = np.float32(grad_scale)
    for chunk in prange((N + CHUNK - 1) // CHUNK):
        # sliced so the inner loop indexes from 0: numba then drops negative-index handling and LLVM vectorises
        start = chunk * CHUNK
        stop = min(N, start + CHUNK)
        p_chunk, g_chunk, m_chunk, v_chunk = params[start:stop], grads[start:stop], m[start:stop], v[start:stop]
        for i in range(stop - start):
            g = g_chunk[i] * gs
            mi = b1 * m_chunk[i] + (one - b1) * g
            vi = b2 * v_chunk[i] + (one - b2) * g * g
            m_chunk[i] = mi
            v_chunk[i] = vi
            p = p_chunk[i]
            p_chunk[i] = p - lr * ((mi * c1) / (np.sqrt(vi * c2) + e) + wd * p)


@kernel
def sum_of_squares(x):
    """Sum of x (N,)^2 accumulated in float64 (for the global gradient norm).

    Each chunk of CHUNK elements is summed in the lane order of vector_math (16 float64 lanes of exact
    squares, combined by halving, then the leftover elements); the chunk sums are then added in order
    from 0. The result does not depend on the CPU, the variant or the thread count. (A float32 value's
    square is exact in float64, so the fused `fma(v, v, acc)` equals acc + v * v: one instruction
    instead of two, same result.)"""
    N = x.shape[0]
    num_chunks = (N + CHUNK - 1) // CHUNK
    partial = np.zeros(num_chunks, dtype=np.float64)
    for chunk in prange(num_chunks):
        x_chunk = x[chunk * CHUNK:min(N, (chunk + 1) * CHUNK)]
        n = x_chunk.shape[0]
        acc = lanes_fill(np.float64(0.0))
        for k in range(n // LANES):
            v = lanes_float64(lanes_load(x_chunk, k * LANES))
            acc = fma(v, v, acc)
        total = lanes_sum(acc)
        for i in range(n - n % LANES, n):
            total += np.float64(x_chunk[i]) * np.float64(x_chunk[i])
        partial[chunk] = total
    total = 0.0
    for chunk in range(num_chunks):
        total += partial[chunk]
    return total
