"""LayerNorm over channels: out = (x - mean) * rstd * weight + bias, eps = 1e-5.

float32 arithmetic throughout; the sums over a row's C channels run in the fixed lane order of
vector_math (16 lanes, combined by halving, then the C % 16 leftover channels), so they do not depend
on the CPU or the variant.
"""

import numpy as np
from numba import prange

from llmpy.kernels.compile import kernel
from llmpy.kernels.vector_math import LANES, lane_sum, lanes_fill, lanes_load, lanes_sum

EPS = 1e-5
CHANNEL_BLOCK = 64


@kernel
def layernorm_forward(out, mean, rstd, inp, weight, bias):
    """out (N, C), mean (N,), rstd (N,) from inp (N, C), weight (C,), bias (C,). Writes all three.

    mean = lane_sum(x) / C; rstd = 1 / sqrt(lane sum of (x - mean)^2 / C + eps)."""
    N, C = inp.shape
    channels = np.float32(C)
    full = C - C % LANES
    for n in prange(N):
        x = inp[n]
        m = lane_sum(x) / channels
        lanes_m = lanes_fill(m)
        acc = lanes_fill(np.float32(0.0))
        for k in range(C // LANES):
            d = lanes_load(x, k * LANES) - lanes_m
            acc += d * d
        variance = lanes_sum(acc)
        for c in range(full, C):
            d = x[c] - m
            variance += d * d
        variance /= channels
        s = np.float32(1.0) / np.sqrt(variance + np.float32(EPS))
        out_row = out[n]  # row views indexed from 0: no negative-index handling, so LLVM vectorises
        for c in range(C):
            out_row[c] = (x[c] - m) * s * weight[c] + bias[c]
        mean[n] = m
        rstd[n] = s


@kernel
def layernorm_backward_input(dinp, dout, inp, weight, mean, rstd, accumulate):
    """Input gradient of a block of rows: dinp (N, C) += or = f(dout (N, C), inp, weight (C,), mean, rstd).

    With dnorm = weight * dout and norm = (x - mean) * rstd: dinp = (dnorm - mean(dnorm) -
    norm * mean(dnorm * norm)) * rstd, the two means as lane sums / C.
    Accumulates into dinp if `accumulate` (the residual stream also receives the skip path), else writes.
    """
    N, C = inp.shape
    channels = np.float32(C)
    full = C - C % LANES
    for n in prange(N):
        m = mean[n]
        s = rstd[n]
        x, g_out, g_in = inp[n], dout[n], dinp[n]  # row views indexed from 0 (vectorise)
        lanes_m, lanes_s = lanes_fill(m), lanes_fill(s)
        acc_dnorm = lanes_fill(np.float32(0.0))
        acc_dnorm_norm = lanes_fill(np.float32(0.0))
        for k in range(C // LANES):
            dnorm = lanes_load(weight, k * LANES) * lanes_load(g_out, k * LANES)
            norm = (lanes_load(x, k * LANES) - lanes_m) * lanes_s
            acc_dnorm += dnorm
            acc_dnorm_norm += dnorm * norm
        dnorm_mean = lanes_sum(acc_dnorm)
        dnorm_norm_mean = lanes_sum(acc_dnorm_norm)
        for c in range(full, C):
            norm = (x[c] - m) * s
            dnorm = weight[c] * g_out[c]
            dnorm_mean += dnorm
            dnorm_norm_mean += dnorm * norm
        dnorm_mean /= channels
        dnorm_norm_mean /= channels
        for c in range(C):
            norm = (x[c] - m) * s
            dnorm = weight[c] * g_out[c]
            g = (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s
            if accumulate:
                g_in[c] += g
            else:
                g_in[c] = g


@kernel
def layernorm_backward_params(dweight, dbias, dout, inp, mean, rstd, c0, c1, accumulate):
    """Weight and bias gradients for channels [c0, c1): dweight (C,), dbias (C,) reduced over the N rows
    of dout (N, C), inp (N, C), mean (N,), rstd (N,). Accumulates if `accumulate`, else writes.
    Each channel block is owned by one thread; rows are summed in order (vectorised across channels, so no
    reordering is needed).
    """
    N = inp.shape[0]
    num_blocks = (c1 - c0 + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    for block in prange(num_blocks):
        start = c0 + block * CHANNEL_BLOCK
        stop = min(start + CHANNEL_BLOCK, c1)
        width = stop - start
        dw = np.zeros(width, dtype=np.float32)
        db = np.zeros(width, dtype=np.float32)
        for n in range(N):
            m = mean[n]
            s = rstd[n]
            g_row, x_row = dout[n, start:stop], inp[n, start:stop]  # views indexed from 0 (vectorise)
            for j in range(width):
                g = g_row[j]
                dw[j] += g * (x_row[j] - m) * s
                db[j] += g
        for j in range(width):
            if accumulate:
                dweight[start + j] += dw[j]
                dbias[start + j] += db[j]
            else:
                dweight[start + j] = dw[j]
                dbias[start + j] = db[j]
