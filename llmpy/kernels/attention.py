"""Causal multi-head self-attention over the packed qkv activations.

qkv (B, T, 3C) holds q, k, v side by side; head h uses channels [h*hs, (h+1)*hs) of each, hs = C/NH.
Query row t attends to key rows 0..t only, so a block of query rows [t0, t1) needs k, v of rows < t1.
"""

import math

import numpy as np
from numba import prange

from llmpy.kernels.compile import kernel
from llmpy.kernels.vector_math import exp_nonpositive


@kernel
def attention_forward(out, preatt, att, qkv, num_heads, b0, b1, t0, t1):
    """Attention for sequences [b0, b1) and query rows [t0, t1).

    out (B, T, C); preatt, att (B, NH, T, T); qkv (B, T, 3C). Writes out rows and preatt/att rows
    (preatt = q.k / sqrt(hs) for keys <= t; att = softmax of it, zero for keys > t, as llm.c stores them).
    """
    C = out.shape[2]
    T = att.shape[3]
    hs = C // num_heads
    scale = np.float32(1.0 / math.sqrt(hs))
    rows = t1 - t0
    work = (b1 - b0) * num_heads * rows
    for item in prange(work):
        b = b0 + item // (num_heads * rows)
        h = (item // rows) % num_heads
        t = t0 + item % rows
        # 1-D views indexed from 0 in the inner loops: numba drops negative-index handling, LLVM vectorises
        query = qkv[b, t, h * hs:(h + 1) * hs]
        preatt_row = preatt[b, h, t]
        att_row = att[b, h, t]
        maxval = np.float32(-3.4e38)
        for t2 in range(t + 1):
            key = qkv[b, t2, C + h * hs:C + (h + 1) * hs]
            dot = np.float32(0.0)
            for i in range(hs):
                dot += query[i] * key[i]
            dot *= scale
            preatt_row[t2] = dot
            if dot > maxval:
                maxval = dot
        total = np.float32(0.0)
        for t2 in range(t + 1):
            e = exp_nonpositive(preatt_row[t2] - maxval)
            att_row[t2] = e
            total += e
        inv = np.float32(1.0) / total
        for t2 in range(t + 1):
            att_row[t2] *= inv
        for t2 in range(t + 1, T):
            att_row[t2] = 0.0
        out_row = out[b, t, h * hs:(h + 1) * hs]
        for i in range(hs):
            out_row[i] = 0.0
        for t2 in range(t + 1):
            a = att_row[t2]
            value = qkv[b, t2, 2 * C + h * hs:2 * C + (h + 1) * hs]
            for i in range(hs):
                out_row[i] += a * value[i]


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
        q0, k0, v0 = h * hs, C + h * hs, 2 * C + h * hs
        if not accumulate:
            for t in range(dqkv.shape[1]):
                dq_row, dk_row, dv_row = dqkv[b, t, q0:q0 + hs], dqkv[b, t, k0:k0 + hs], dqkv[b, t, v0:v0 + hs]
                for i in range(hs):
                    dq_row[i] = 0.0
                    dk_row[i] = 0.0
                    dv_row[i] = 0.0
        for t in range(t0, t1):
            att_row, datt_row, dpreatt_row = att[b, h, t], datt[b, h, t], dpreatt[b, h, t]
            dout_row = dout[b, t, q0:q0 + hs]
            # through out = att @ v
            for t2 in range(t + 1):
                a = att_row[t2]
                value, dvalue = qkv[b, t2, v0:v0 + hs], dqkv[b, t2, v0:v0 + hs]
                dot = np.float32(0.0)
                for i in range(hs):
                    g = dout_row[i]
                    dot += value[i] * g
                    dvalue[i] += a * g
                datt_row[t2] = dot
            # through the softmax: dpreatt = att * (datt - sum(att * datt))
            weighted = np.float32(0.0)
            for t2 in range(t + 1):
                weighted += att_row[t2] * datt_row[t2]
            for t2 in range(t + 1):
                dpreatt_row[t2] = att_row[t2] * (datt_row[t2] - weighted)
            # through preatt = q.k * scale
            query, dquery = qkv[b, t, q0:q0 + hs], dqkv[b, t, q0:q0 + hs]
            for t2 in range(t + 1):
                d = dpreatt_row[t2] * scale
                key, dkey = qkv[b, t2, k0:k0 + hs], dqkv[b, t2, k0:k0 + hs]
                for i in range(hs):
                    dquery[i] += d * key[i]
                    dkey[i] += d * query[i]
