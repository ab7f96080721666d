"""Causal multi-head self-attention over the packed qkv activations.

qkv (B, T, 3C) holds q, k, v side by side; head h uses channels [h*hs, (h+1)*hs) of each, hs = C/NH.
Query row t attends to key rows 0..t only, so a block of query rows [t0, t1) needs k, v of rows < t1.
"""

import math

import numpy as np
from numba import prange

from llmpy.kernels.compile import kernel


@kernel
def attention_forward(out, preatt, att, qkv, num_heads, b0, b1, t0, t1):
    """Attention for sequences [b0, b1) and query rows [t0, t1).

    out (B, T, C); preatt, att (B, NH, T, T); qkv (B, T, 3C). Writes out rows and preatt/att rows
    (preatt = q.k / sqrt(hs) for keys <= t; att = softmax of it, zero for keys > t, as llm.c stores them).
    """
    C = out.shape[2]
    hs = C // num_heads
    scale = np.float32(1.0 / math.sqrt(hs))
    rows = t1 - t0
    work = (b1 - b0) * num_heads * rows
    for item in prange(work):
        b = b0 + item // (num_heads * rows)
        h = (item // rows) % num_heads
        t = t0 + item % rows
        q_off = h * hs
        k_off = C + h * hs
        v_off = 2 * C + h * hs
        maxval = np.float32(-3.4e38)
        for t2 in range(t + 1):
            dot = np.float32(0.0)
            for i in range(hs):
                dot += qkv[b, t, q_off + i] * qkv[b, t2, k_off + i]
            dot *= scale
            preatt[b, h, t, t2] = dot
            if dot > maxval:
                maxval = dot
        total = np.float32(0.0)
        for t2 in range(t + 1):
            e = np.exp(preatt[b, h, t, t2] - maxval)
            att[b, h, t, t2] = e
            total += e
        inv = np.float32(1.0) / total
        for t2 in range(t + 1):
            att[b, h, t, t2] *= inv
        for t2 in range(t + 1, att.shape[3]):
            att[b, h, t, t2] = 0.0
        for i in range(hs):
            out[b, t, q_off + i] = 0.0
        for t2 in range(t + 1):
            a = att[b, h, t, t2]
            for i in range(hs):
                out[b, t, q_off + i] += a * qkv[b, t2, v_off + i]


@kernel
def attention_backward(dqkv, dpreatt, datt, dout, qkv, att, num_heads, b0, b1, t0, t1, accumulate):
    """Gradients for sequences [b0, b1) and query rows [t0, t1).

    dout (B, T, C); qkv (B, T, 3C); att (B, NH, T, T). dqkv (B, T, 3C) accumulates: a key/value row
    gets a share from every later query row. With `accumulate=False` the kernel first zeroes all T rows
    of dqkv for the (sequence, head) pairs it owns, so no separate zeroing pass is needed; when a
    sequence is split into query blocks, that call must come first for each (sequence, head).
    datt, dpreatt (B, NH, T, T) are written for the query rows (scratch, kept for llm.c's layout).
    One (sequence, head) pair per parallel item: heads own disjoint channels of dqkv, so no races.
    """
    C = dout.shape[2]
    hs = C // num_heads
    scale = np.float32(1.0 / math.sqrt(hs))
    work = (b1 - b0) * num_heads
    for item in prange(work):
        b = b0 + item // num_heads
        h = item % num_heads
        q_off = h * hs
        k_off = C + h * hs
        v_off = 2 * C + h * hs
        if not accumulate:
            for t in range(dqkv.shape[1]):
                for i in range(hs):
                    dqkv[b, t, q_off + i] = 0.0
                    dqkv[b, t, k_off + i] = 0.0
                    dqkv[b, t, v_off + i] = 0.0
        for t in range(t0, t1):
            # through out = att @ v
            for t2 in range(t + 1):
                a = att[b, h, t, t2]
                dot = np.float32(0.0)
                for i in range(hs):
                    g = dout[b, t, q_off + i]
                    dot += qkv[b, t2, v_off + i] * g
                    dqkv[b, t2, v_off + i] += a * g
                datt[b, h, t, t2] = dot
            # through the softmax: dpreatt = att * (datt - sum(att * datt))
            weighted = np.float32(0.0)
            for t2 in range(t + 1):
                weighted += att[b, h, t, t2] * datt[b, h, t, t2]
            for t2 in range(t + 1):
                dpreatt[b, h, t, t2] = att[b, h, t, t2] * (datt[b, h, t, t2] - weighted)
            # through preatt = q.k * scale
            for t2 in range(t + 1):
                d = dpreatt[b, h, t, t2] * scale
                for i in range(hs):
                    dqkv[b, t, q_off + i] += d * qkv[b, t2, k_off + i]
                    dqkv[b, t2, k_off + i] += d * qkv[b, t, q_off + i]
