"""Causal multi-head self-attention in tiles (FlashAttention's scheme), the default for training.

qkv (B, T, 3C) holds q, k, v side by side; head h uses channels [h*hs, (h+1)*hs) of each, hs = C/NH.
Query row t attends to key rows 0..t only, so a block of query rows [t0, t1) needs k, v of rows < t1.

Positions are cut into tiles on one grid: query tile i holds rows [i*QUERY_TILE, (i+1)*QUERY_TILE), key
tile j rows [j*KEY_TILE, (j+1)*KEY_TILE), each clipped to the call's query rows and, for keys, to the query
tile's last row (so keys above the diagonal are never computed, but for the diagonal tile's upper half).
  - forward, for each query tile: for each key tile at or left of the diagonal (tiles above it are skipped),
    the scores S = q k^T go through OpenBLAS (one GEMM per head); an online softmax keeps each row's running
    maximum m and sum l and rescales the unnormalised output o, to which the GEMM P v is added; only the
    log-sum-exp m + log(l) of each row is stored (lse (B, NH, T)), not the (T, T) scores;
  - backward, for each key tile of BACKWARD_KEY_TILE rows (FlashAttention-2's order): against all the call's
    query rows that see it (from the tile's first row on), the probabilities are recomputed from S and lse;
    dv += P^T dout, dP = dout v^T, dS = P (dP - D) / sqrt(hs) with D = rowsum(dout * out), dk += dS^T q,
    dq += dS k (five GEMMs). dk, dv get one add per key tile and dq one per call (a contiguous accumulator),
    not one strided add per pair of tiles.
Sequences and heads go through the tiles in blocks (_over_units): one sequence and a few heads at T = 1024,
whole batches at short T. Extra memory: one block of scores in flight (TILE_BUDGET floats, or one head's tile
where that is larger: (t1 - t0) x BACKWARD_KEY_TILE, beyond T = 2048; scratch reused by each thread), the dq
accumulator, and lse.

Order: the numba parts (scaling, masking, exponentials, row sums) run in a fixed order (vector_math's lanes);
each GEMM's sums are OpenBLAS's, whose order depends on the shape, the CPU and OpenBLAS's own thread count
(it picks small-matrix kernels by it). Every GEMM here runs on one OpenBLAS thread (the parallel variant
limits it; the sequential model and task workers run with one), so a call's result depends on its query rows
[t0, t1) (the clipping of the tiles) but not on the number of threads.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np
from numba import prange

from concurrent.futures import ThreadPoolExecutor

import numba
from threadpoolctl import ThreadpoolController

from llmpy.kernels.compile import helper, kernel
from llmpy.kernels.vector_math import (LANES, exp_nonpositive, lane_dot, lane_max, lanes_fill, lanes_head,
                                       lanes_load, lanes_store, lanes_sum)

QUERY_TILE = 128  # query rows per tile
KEY_TILE = 256  # key rows per forward tile (at most: a query tile's last key tile ends at its last row)
BACKWARD_KEY_TILE = 128  # key rows per backward tile, against all the call's query rows that see them
TILE_BUDGET = 1 << 18  # floats of one score tile over a block of sequences x heads (1 MiB)

_scratch = threading.local()  # per thread (task workers run attention calls side by side)


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, "llmpy-attention")


@functools.cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


def _over_head_groups(work, num_heads: int, parallel: bool) -> None:
    """work(h0, h1) for groups of heads: all heads on this thread, or (parallel) one contiguous group per
    numba thread, each on its own thread with OpenBLAS on one thread, then wait for all (a fork and a join).
    Small per-head GEMMs scale across heads; inside OpenBLAS they would not."""
    threads = min(numba.get_num_threads(), num_heads) if parallel else 1
    if threads == 1:
        work(0, num_heads)
        return
    bounds = [num_heads * i // threads for i in range(threads + 1)]
    with _blas().limit(limits=1, user_api="blas"):
        futures = [_pool(threads).submit(work, h0, h1) for h0, h1 in zip(bounds[:-1], bounds[1:])]
        for future in futures:
            future.result()


def _over_units(unit, n: int, h0: int, h1: int, tile_floats: int) -> None:
    """unit(s0, s1, g0, g1) over blocks of sequences [0, n) x heads [h0, h1) whose score tiles (tile_floats
    per head and sequence) fill at most TILE_BUDGET floats: one sequence and a few heads at a time at long T
    (the tiles stay in cache), several sequences at short T (fewer, larger calls). Each head's GEMMs have
    the same shapes however the blocks fall, so the results do not depend on them."""
    tile_floats = max(1, tile_floats)  # an empty block of query rows
    heads = max(1, min(h1 - h0, TILE_BUDGET // tile_floats))
    sequences = max(1, min(n, TILE_BUDGET // (tile_floats * (h1 - h0)))) if heads == h1 - h0 else 1
    for s0 in range(0, n, sequences):
        for g0 in range(h0, h1, heads):
            unit(s0, min(n, s0 + sequences), g0, min(h1, g0 + heads))


def _buffer(slot: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 scratch array of `shape` for this thread, reused across calls (no allocation per tile)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    size = math.prod(shape)
    buffer = buffers.get(slot)
    if buffer is None or buffer.size < size:
        buffer = buffers[slot] = np.empty(size, dtype=np.float32)
    return buffer[:size].reshape(shape)


def _heads(qkv: np.ndarray, num_heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k, v of (n, T, 3C) as (n, NH, T, hs) views."""
    n, T, C3 = qkv.shape
    split = qkv.reshape(n, T, 3, num_heads, C3 // 3 // num_heads)
    return tuple(split[:, :, i].transpose(0, 2, 1, 3) for i in range(3))


def _tiles(lo: int, hi: int, size: int) -> list[tuple[int, int]]:
    """The grid's tiles of `size` rows clipped to rows [lo, hi)."""
    return [(max(lo, start), min(hi, start + size)) for start in range(lo - lo % size, hi, size)]


@helper
def exp_row(row, valid, scale, shift):
    """row[j] = exp(row[j] * scale - shift) for j < valid, 0 after (row 1-D, C-contiguous); returns the
    row's sum in lane order (vector_math). 16 at a time through Lanes: one AVX-512 vector, where LLVM's
    own vectorising of the loop takes 8, and the sum reads the exponentials from registers, not back from
    a store it would have to wait for."""
    n = row.shape[0]
    groups, valid_groups = n // LANES, max(0, min(n, valid)) // LANES
    scales, shifts = lanes_fill(scale), lanes_fill(shift)
    acc = lanes_fill(np.float32(0.0))
    for k in range(valid_groups):
        e = exp_nonpositive(lanes_load(row, k * LANES) * scales - shifts)
        lanes_store(row, k * LANES, e)
        acc += e
    zero_from = valid_groups
    if valid_groups < groups and valid > valid_groups * LANES:  # a partly valid group
        e = exp_nonpositive(lanes_load(row, valid_groups * LANES) * scales - shifts)
        e = lanes_head(e, valid - valid_groups * LANES)
        lanes_store(row, valid_groups * LANES, e)
        acc += e
        zero_from += 1
    for k in range(zero_from, groups):  # adding their zeros would change no sum
        lanes_store(row, k * LANES, lanes_fill(np.float32(0.0)))
    total = lanes_sum(acc)
    for j in range(groups * LANES, n):
        row[j] = exp_nonpositive(row[j] * scale - shift) if j < valid else np.float32(0.0)
        total += row[j]
    return total


@kernel
def online_softmax_tile(scores, row_max, row_sum, out_acc, r0, c0, scale, first):
    """One key tile of the online softmax, in place, for query rows r0.. and key rows c0.. of the tile.

    scores (n, nh, tq, tk): q.k on entry, exp(q.k * scale - m_new) on exit (0 for keys after the query row).
    row_max, row_sum (n, nh, tq): the running maximum and sum over the tiles so far (set when `first`).
    out_acc (n, nh, tq, hs): the running unnormalised output, rescaled by exp(m_old - m_new) unless `first`.
    """
    n, heads, tq, tk = scores.shape
    for pair in prange(n * heads):  # one division per (sequence, head), none per row
        s, h = pair // heads, pair % heads
        for i in range(tq):
            row = scores[s, h, i]
            valid = min(tk, r0 + i - c0 + 1)  # keys c0 .. r0 + i
            # scale > 0 and rounding is monotonic: max(x) * scale is exactly max(x * scale)
            tile_max = lane_max(row[:valid], np.float32(-3.4e38)) * scale
            new_max = tile_max if first else max(row_max[s, h, i], tile_max)
            total = exp_row(row, valid, scale, new_max)
            if first:
                row_sum[s, h, i] = total
            else:
                alpha = exp_nonpositive(row_max[s, h, i] - new_max)
                row_sum[s, h, i] = row_sum[s, h, i] * alpha + total
                acc = out_acc[s, h, i]
                for c in range(acc.shape[0]):
                    acc[c] *= alpha
            row_max[s, h, i] = new_max


@kernel
def attention_tile_finish(out, lse, out_acc, row_max, row_sum, b0, h0, r0):
    """out (B, T, C) rows r0.. of sequences b0.., heads h0.. = out_acc (n, nh, tq, hs) / row_sum;
    lse (B, NH, T) = row_max + log(row_sum)."""
    n, heads, tq, hs = out_acc.shape
    for pair in prange(n * heads):  # one division per (sequence, head), none per row
        s, h = pair // heads, pair % heads
        for i in range(tq):
            inv = np.float32(1.0) / row_sum[s, h, i]
            c = (h0 + h) * hs
            target, acc = out[b0 + s, r0 + i, c:c + hs], out_acc[s, h, i]
            for j in range(hs):
                target[j] = acc[j] * inv
            lse[b0 + s, h0 + h, r0 + i] = row_max[s, h, i] + np.float32(math.log(row_sum[s, h, i]))


def attention_forward(out, lse, qkv, num_heads, b0, b1, t0, t1, parallel=False):
    """Attention for sequences [b0, b1) and query rows [t0, t1).

    out (B, T, C); lse (B, NH, T); qkv (B, T, 3C). Writes the out rows and their log-sum-exp lse; reads the
    q rows [t0, t1) and the k, v rows < t1. `parallel`: groups of heads side by side.
    """
    n, hs = b1 - b0, qkv.shape[2] // 3 // num_heads
    scale = np.float32(1.0 / math.sqrt(hs))
    q, k, v = _heads(qkv[b0:b1], num_heads)

    def unit(s0, s1, h0, h1):
        shape = (s1 - s0, h1 - h0)
        for r0, r1 in _tiles(t0, t1, QUERY_TILE):
            tq = r1 - r0
            row_max, row_sum = _buffer("max", shape + (tq,)), _buffer("sum", shape + (tq,))
            out_acc = _buffer("out", shape + (tq, hs))
            for c0, c1 in _tiles(0, r1, KEY_TILE):
                scores = _buffer("scores", shape + (tq, c1 - c0))
                np.matmul(q[s0:s1, h0:h1, r0:r1], k[s0:s1, h0:h1, c0:c1].swapaxes(2, 3), out=scores)
                first = c0 == 0
                online_softmax_tile.serial(scores, row_max, row_sum, out_acc, r0, c0, scale, first)
                values = v[s0:s1, h0:h1, c0:c1]
                if first:
                    np.matmul(scores, values, out=out_acc)
                else:
                    out_acc += np.matmul(scores, values, out=_buffer("pv", out_acc.shape))
            attention_tile_finish.serial(out, lse, out_acc, row_max, row_sum, b0 + s0, h0, r0)

    tile_floats = min(QUERY_TILE, t1 - t0) * min(KEY_TILE, t1)
    _over_head_groups(lambda h0, h1: _over_units(unit, n, h0, h1, tile_floats), num_heads, parallel)


@kernel
def attention_row_dots(dots, dout, out, b0, h0, r0, hs):
    """dots (n, nh, tq) = sum over the hs channels of head h0 + h of dout * out, both (B, T, C), for rows
    r0.. of sequences b0.. (the softmax backward's D = rowsum(dP * P) = rowsum(dout * out)), in lane order.
    A head's channels of one row are a contiguous slice, which lane_dot reads as whole vectors."""
    n, heads, tq = dots.shape
    for pair in prange(n * heads):  # one division per (sequence, head), none per row
        s, h = pair // heads, pair % heads
        for i in range(tq):
            c = (h0 + h) * hs
            dots[s, h, i] = lane_dot(dout[b0 + s, r0 + i, c:c + hs], out[b0 + s, r0 + i, c:c + hs])


@kernel
def softmax_tile_recompute(scores, lse, b0, h0, r0, c0, scale):
    """scores (n, nh, tq, tk): q.k on entry, the probabilities exp(q.k * scale - lse) on exit, 0 for keys after
    the query row; lse (B, NH, T) from the forward, rows r0.. of sequences b0.., heads h0..; key rows c0.."""
    n, heads, tq, tk = scores.shape
    for pair in prange(n * heads):  # one division per (sequence, head), none per row
        s, h = pair // heads, pair % heads
        for i in range(tq):
            row = scores[s, h, i]
            valid = min(tk, r0 + i - c0 + 1)
            exp_row(row, valid, scale, lse[b0 + s, h0 + h, r0 + i])


@kernel
def softmax_tile_backward(dprobs, probs, dots, scale):
    """dprobs (n, nh, tq, tk): dP on entry, dS = P (dP - D) * scale on exit; probs P (same shape); dots D
    (n, nh, tq). Masked keys have P = 0, so dS = 0 there."""
    n, heads, tq, tk = dprobs.shape
    for pair in prange(n * heads):  # one division per (sequence, head), none per row
        s, h = pair // heads, pair % heads
        for i in range(tq):
            drow, prow, d = dprobs[s, h, i], probs[s, h, i], dots[s, h, i]
            for j in range(tk):
                drow[j] = prow[j] * (drow[j] - d) * scale


def attention_backward(dqkv, dout, qkv, out, lse, num_heads, b0, b1, t0, t1, accumulate, parallel=False):
    """Gradients for sequences [b0, b1) and query rows [t0, t1).

    dout, out (B, T, C) (the forward's output); qkv (B, T, 3C); lse (B, NH, T). dqkv (B, T, 3C) accumulates:
    a key/value row gets a share from every later query block. With `accumulate=False` the call first zeroes
    all T rows of dqkv for its sequences; when a sequence is split into query blocks, that call must come
    first, and the blocks must run in order (each adds to dk, dv of the rows before it).
    """
    n, hs = b1 - b0, qkv.shape[2] // 3 // num_heads
    scale = np.float32(1.0 / math.sqrt(hs))
    if not accumulate:
        dqkv[b0:b1] = 0.0
    q, k, v = _heads(qkv[b0:b1], num_heads)
    dq, dk, dv = _heads(dqkv[b0:b1], num_heads)
    dout_heads = dout[b0:b1].reshape(n, dout.shape[1], num_heads, hs).transpose(0, 2, 1, 3)
    rows = t1 - t0

    def unit(s0, s1, h0, h1):
        shape = (s1 - s0, h1 - h0)
        part = lambda x, r0, r1: x[s0:s1, h0:h1, r0:r1]
        dots = _buffer("dots", shape + (rows,))
        attention_row_dots.serial(dots, dout, out, b0 + s0, h0, t0, hs)
        dq_rows = _buffer("dq", shape + (rows, hs))
        for c0, c1 in _tiles(0, t1, BACKWARD_KEY_TILE):
            r0 = max(t0, c0)  # query rows before c0 do not see these keys
            tile = shape + (t1 - r0, c1 - c0)
            probs, dprobs = _buffer("scores", tile), _buffer("dscores", tile)
            kv_rows = _buffer("kv", shape + (c1 - c0, hs))
            queries, g, keys, values = part(q, r0, t1), part(dout_heads, r0, t1), part(k, c0, c1), part(v, c0, c1)
            np.matmul(queries, keys.swapaxes(2, 3), out=probs)
            softmax_tile_recompute.serial(probs, lse, b0 + s0, h0, r0, c0, scale)
            part(dv, c0, c1)[...] += np.matmul(probs.swapaxes(2, 3), g, out=kv_rows)
            np.matmul(g, values.swapaxes(2, 3), out=dprobs)
            softmax_tile_backward.serial(dprobs, probs, dots[:, :, r0 - t0:], scale)
            part(dk, c0, c1)[...] += np.matmul(dprobs.swapaxes(2, 3), queries, out=kv_rows)
            if c0 == 0:  # every query row sees the first key tile
                np.matmul(dprobs, keys, out=dq_rows)
            else:
                dq_rows[:, :, r0 - t0:] += np.matmul(dprobs, keys, out=_buffer("dq_part", tile[:3] + (hs,)))
        part(dq, t0, t1)[...] += dq_rows

    tile_floats = rows * min(BACKWARD_KEY_TILE, t1)
    _over_head_groups(lambda h0, h1: _over_units(unit, n, h0, h1, tile_floats), num_heads, parallel)


def attention_cached_forward(out, cache, lse, qkv, num_heads, t0, parallel=False):
    """Attention for n new positions [t0, t0 + n) of b sequences with the earlier ones cached (generation).

    out (b, n, C); qkv (b, n, 3C) the new positions' q, k, v; cache (b, maxT, 3C) holds rows < t0 and gets the
    new rows at [t0, t0 + n); lse (b, NH, maxT) scratch. The new queries attend to cache rows 0..t, through
    `attention_forward`'s causal-prefix form (query rows [t0, t0 + n))."""
    b, n, C3 = qkv.shape
    t1 = t0 + n
    cache[:, t0:t1] = qkv
    full = _buffer("cached_out", (b, t1, C3 // 3))  # rows [t0, t1) written
    attention_forward(full, lse, cache[:, :t1], num_heads, 0, b, t0, t1, parallel)
    out[...] = full[:, t0:t1]
