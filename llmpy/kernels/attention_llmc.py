"""llm.c's causal multi-head self-attention (train_gpt2.c): preatt and att (B, NH, T, T) stored for backward.

qkv (B, T, 3C) holds q, k, v side by side; head h uses channels [h*hs, (h+1)*hs) of each, hs = C/NH.
Query row t attends to key rows 0..t only, so a block of query rows [t0, t1) needs k, v of rows < t1.

Arithmetic is float32 in a fixed order (no fast math, see compile.py): the q.k and v.dout dot products
and the softmax sums run in the lane order of vector_math (`lane_dot`, `lane_sum`); the sums over keys
(out = att @ v, dq = dpreatt @ k) add the keys in order 0..t for each channel. For GPT-2's head size
(hs = HEAD = 64, four Lanes) the query and the per-channel sums are held in registers across the keys;
other head sizes take the general loops, with the same order and results.
"""

import math

import numpy as np
from numba import prange

from llmpy.kernels.compile import kernel
from llmpy.kernels.vector_math import (LANES, exp_nonpositive, lane_dot, lane_sum, lanes_fill, lanes_load,
                                       lanes_store, lanes_sum)

HEAD = 4 * LANES  # channels handled as one register block: GPT-2's head size


@kernel
def attention_llmc_forward(out, preatt, att, qkv, num_heads, b0, b1, t0, t1):
    """Attention for sequences [b0, b1) and query rows [t0, t1).

    out (B, T, C); preatt, att (B, NH, T, T); qkv (B, T, 3C). Writes out rows and preatt/att rows
    (preatt = q.k / sqrt(hs) for keys <= t; att = softmax of it, zero for keys > t, as llm.c stores them).
    q.k is `lane_dot` times the scale; the softmax divides by `lane_sum` of the exponentials; out adds
    att[t2] * v[t2] over keys t2 = 0..t in order, from 0.
    """
    C = out.shape[2]
    T = att.shape[3]
    hs = C // num_heads
    scale = np.float32(1.0 / math.sqrt(hs))
    rows = t1 - t0
    work = (b1 - b0) * num_heads * rows
    for item in prange(work):
        zero = lanes_fill(np.float32(0.0))  # Lanes stay inside the parallel body (never gufunc arguments)
        b = b0 + item // (num_heads * rows)
        h = (item // rows) % num_heads
        t = t0 + item % rows
        k0, v0 = C + h * hs, 2 * C + h * hs
        # 1-D views indexed from 0 in the inner loops: numba drops negative-index handling, LLVM vectorises
        query = qkv[b, t, h * hs:(h + 1) * hs]
        preatt_row = preatt[b, h, t]
        att_row = att[b, h, t]
        maxval = np.float32(-3.4e38)
        if hs == HEAD:  # lane_dot with the query's four Lanes kept in registers (same order, same result)
            q_0, q_1 = lanes_load(query, 0), lanes_load(query, LANES)
            q_2, q_3 = lanes_load(query, 2 * LANES), lanes_load(query, 3 * LANES)
            for t2 in range(t + 1):
                key = qkv[b, t2, k0:k0 + HEAD]
                acc = zero + q_0 * lanes_load(key, 0)
                acc += q_1 * lanes_load(key, LANES)
                acc += q_2 * lanes_load(key, 2 * LANES)
                acc += q_3 * lanes_load(key, 3 * LANES)
                dot = lanes_sum(acc) * scale
                preatt_row[t2] = dot
                if dot > maxval:
                    maxval = dot
        else:
            for t2 in range(t + 1):
                dot = lane_dot(query, qkv[b, t2, k0:k0 + hs]) * scale
                preatt_row[t2] = dot
                if dot > maxval:
                    maxval = dot
        for t2 in range(t + 1):  # element-wise (vectorises), then the sum in lane order
            att_row[t2] = exp_nonpositive(preatt_row[t2] - maxval)
        inv = np.float32(1.0) / lane_sum(att_row[:t + 1])
        for t2 in range(t + 1):
            att_row[t2] *= inv
        for t2 in range(t + 1, T):
            att_row[t2] = 0.0
        out_row = out[b, t, h * hs:(h + 1) * hs]
        c = 0
        while c + HEAD <= hs:  # blocks of 64 channels summed over the keys in registers
            o_0, o_1, o_2, o_3 = zero, zero, zero, zero
            for t2 in range(t + 1):
                a = lanes_fill(att_row[t2])
                value = qkv[b, t2, v0 + c:v0 + c + HEAD]
                o_0 += a * lanes_load(value, 0)
                o_1 += a * lanes_load(value, LANES)
                o_2 += a * lanes_load(value, 2 * LANES)
                o_3 += a * lanes_load(value, 3 * LANES)
            lanes_store(out_row, c, o_0)
            lanes_store(out_row, c + LANES, o_1)
            lanes_store(out_row, c + 2 * LANES, o_2)
            lanes_store(out_row, c + 3 * LANES, o_3)
            c += HEAD
        if c < hs:  # the remaining channels, same order
            rest = out_row[c:]
            for i in range(hs - c):
                rest[i] = 0.0
            for t2 in range(t + 1):
                a = att_row[t2]
                value = qkv[b, t2, v0 + c:v0 + hs]
                for i in range(hs - c):
                    rest[i] += a * value[i]


@kernel
def attention_llmc_backward(dqkv, dpreatt, datt, dout, qkv, att, num_heads, b0, b1, t0, t1, accumulate):
    """Gradients for sequences [b0, b1) and query rows [t0, t1).

    dout (B, T, C); qkv (B, T, 3C); att (B, NH, T, T). dqkv (B, T, 3C) accumulates: a key/value row
    gets a share from every later query row. With `accumulate=False` the kernel first zeroes all T rows
    of dqkv for the (sequence, head) pairs it owns, so no separate zeroing pass is needed; when a
    sequence is split into query blocks, that call must come first for each (sequence, head).
    datt, dpreatt (B, NH, T, T) are written for the query rows (scratch, kept for llm.c's layout).
    One (sequence, head) pair per parallel item: heads own disjoint channels of dqkv, so no races.
    datt = v.dout and sum(att * datt) run in lane order; dq adds dpreatt * scale * k over keys 0..t in
    order; each dk, dv element gets one add per query row, query rows in order.
    """
    C = dout.shape[2]
    hs = C // num_heads
    scale = np.float32(1.0 / math.sqrt(hs))
    work = (b1 - b0) * num_heads
    full = hs - hs % LANES
    for item in prange(work):
        zero = lanes_fill(np.float32(0.0))  # Lanes stay inside the parallel body (never gufunc arguments)
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
            # through out = att @ v: datt = v . dout (lane_dot's order), dv += att * dout, in one pass
            for t2 in range(t + 1):
                a = att_row[t2]
                value, dvalue = qkv[b, t2, v0:v0 + hs], dqkv[b, t2, v0:v0 + hs]
                lanes_a = lanes_fill(a)
                acc = zero
                for i in range(0, full, LANES):
                    g = lanes_load(dout_row, i)
                    acc += lanes_load(value, i) * g
                    lanes_store(dvalue, i, lanes_load(dvalue, i) + lanes_a * g)
                dot = lanes_sum(acc)
                for i in range(full, hs):
                    g = dout_row[i]
                    dot += value[i] * g
                    dvalue[i] += a * g
                datt_row[t2] = dot
            # through the softmax: dpreatt = att * (datt - sum(att * datt))
            weighted = lane_dot(att_row[:t + 1], datt_row[:t + 1])
            for t2 in range(t + 1):
                dpreatt_row[t2] = att_row[t2] * (datt_row[t2] - weighted)
            # through preatt = q.k * scale: dq += d * k over the keys (in registers per 64-channel block),
            # dk += d * q
            query, dquery = qkv[b, t, q0:q0 + hs], dqkv[b, t, q0:q0 + hs]
            c = 0
            while c + HEAD <= hs:
                q_0, q_1 = lanes_load(query, c), lanes_load(query, c + LANES)
                q_2, q_3 = lanes_load(query, c + 2 * LANES), lanes_load(query, c + 3 * LANES)
                dq_0, dq_1 = lanes_load(dquery, c), lanes_load(dquery, c + LANES)
                dq_2, dq_3 = lanes_load(dquery, c + 2 * LANES), lanes_load(dquery, c + 3 * LANES)
                for t2 in range(t + 1):
                    d = lanes_fill(dpreatt_row[t2] * scale)
                    key, dkey = qkv[b, t2, k0 + c:k0 + c + HEAD], dqkv[b, t2, k0 + c:k0 + c + HEAD]
                    dq_0 += d * lanes_load(key, 0)
                    dq_1 += d * lanes_load(key, LANES)
                    dq_2 += d * lanes_load(key, 2 * LANES)
                    dq_3 += d * lanes_load(key, 3 * LANES)
                    lanes_store(dkey, 0, lanes_load(dkey, 0) + d * q_0)
                    lanes_store(dkey, LANES, lanes_load(dkey, LANES) + d * q_1)
                    lanes_store(dkey, 2 * LANES, lanes_load(dkey, 2 * LANES) + d * q_2)
                    lanes_store(dkey, 3 * LANES, lanes_load(dkey, 3 * LANES) + d * q_3)
                lanes_store(dquery, c, dq_0)
                lanes_store(dquery, c + LANES, dq_1)
                lanes_store(dquery, c + 2 * LANES, dq_2)
                lanes_store(dquery, c + 3 * LANES, dq_3)
                c += HEAD
            if c < hs:  # the remaining channels, same order
                query_rest, dquery_rest = query[c:], dquery[c:]
                for t2 in range(t + 1):
                    d = dpreatt_row[t2] * scale
                    key, dkey = qkv[b, t2, k0 + c:k0 + hs], dqkv[b, t2, k0 + c:k0 + hs]
                    for i in range(hs - c):
                        dquery_rest[i] += d * key[i]
                        dkey[i] += d * query_rest[i]
