"""The tiled attention kernel (llmpy.kernels.attention) against torch's scaled_dot_product_attention in float64,
and against llm.c's stored-scores kernel (llmpy.kernels.attention_llmc): values, log-sum-exps and gradients,
sequence lengths across the tile grid (1, 7, 64, 257 with 128-row tiles), query blocks cut anywhere (the task
model's blocks and a one-row call at the end, the causal-prefix form a KV cache uses), other head sizes,
accumulation, and serial = parallel bitwise.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from llmpy.kernels import attention, attention_llmc

ATOL, RTOL = 2e-5, 1e-4  # float32 kernels against float64 torch, values of order 1
UNIT_ROUNDOFF = 2.0**-24  # float32, round to nearest


def random_qkv(rng, b, t, c, scale=1.0):
    return (rng.standard_normal((b, t, 3 * c)) * scale).astype(np.float32)


def sdpa_reference(qkv, num_heads, dout=None):
    """out (B, T, C), lse (B, NH, T) and, given dout, dqkv: float64 torch with SDPA's own causal mask."""
    b, t, c3 = qkv.shape
    c = c3 // 3
    x = torch.tensor(qkv, dtype=torch.float64, requires_grad=True)
    q, k, v = (y.view(b, t, num_heads, c // num_heads).transpose(1, 2) for y in x.split(c, dim=2))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(c // num_heads)
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    grad = None
    if dout is not None:
        out.backward(torch.tensor(dout, dtype=torch.float64))
        grad = x.grad.numpy()
    return out.detach().numpy(), lse.detach().numpy(), grad


def forward(qkv, num_heads, parallel=False, blocks=None):
    b, t, c3 = qkv.shape
    out = np.full((b, t, c3 // 3), np.nan, np.float32)
    lse = np.full((b, num_heads, t), np.nan, np.float32)
    for b0, b1, t0, t1 in blocks or [(0, b, 0, t)]:
        attention.attention_forward(out, lse, qkv, num_heads, b0, b1, t0, t1, parallel=parallel)
    return out, lse


def backward(qkv, out, lse, dout, num_heads, parallel=False, blocks=None, dqkv=None, accumulate=False):
    dqkv = np.full(qkv.shape, np.nan, np.float32) if dqkv is None else dqkv
    for i, (b0, b1, t0, t1) in enumerate(blocks or [(0, qkv.shape[0], 0, qkv.shape[1])]):
        first_of_sequence = t0 == 0
        attention.attention_backward(dqkv, dout, qkv, out, lse, num_heads, b0, b1, t0, t1,
                                     accumulate or not first_of_sequence, parallel=parallel)
    return dqkv


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("t", [1, 7, 64, 257])
def test_values_and_gradients_match_sdpa(t, parallel):
    rng = np.random.default_rng(t)
    b, c, nh = 2, 128, 2  # head size 64, GPT-2's
    qkv, dout = random_qkv(rng, b, t, c, scale=1.5), rng.standard_normal((b, t, c)).astype(np.float32)
    out, lse = forward(qkv, nh, parallel)
    ref_out, ref_lse, ref_grad = sdpa_reference(qkv, nh, dout)
    np.testing.assert_allclose(out, ref_out, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(lse, ref_lse, atol=ATOL, rtol=RTOL)
    dqkv = backward(qkv, out, lse, dout, nh, parallel)
    np.testing.assert_allclose(dqkv, ref_grad, atol=ATOL, rtol=RTOL)
    assert np.abs(ref_grad).max() > 0.1  # the check compares real gradients, not zeros


@pytest.mark.parametrize("head_size", [8, 48])
def test_other_head_sizes_match_sdpa(head_size):
    rng = np.random.default_rng(head_size)
    b, t, nh = 1, 150, 3
    qkv = random_qkv(rng, b, t, nh * head_size)
    dout = rng.standard_normal((b, t, nh * head_size)).astype(np.float32)
    out, lse = forward(qkv, nh)
    ref_out, ref_lse, ref_grad = sdpa_reference(qkv, nh, dout)
    np.testing.assert_allclose(out, ref_out, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(backward(qkv, out, lse, dout, nh), ref_grad, atol=ATOL, rtol=RTOL)


def test_large_scores_stay_finite():
    """Scores of order 100 (a sharp softmax) over two key tiles: the online maximum keeps every exponential in
    range, and the first tile's sum and output are rescaled when the second tile raises the maximum."""
    rng = np.random.default_rng(3)
    t = attention.KEY_TILE + 100
    qkv = random_qkv(rng, 1, t, 64, scale=6.0)
    out, lse = forward(qkv, 1)
    ref_out, ref_lse, _ = sdpa_reference(qkv, 1)
    assert np.abs(ref_lse).max() > 88  # exp of the scores themselves would overflow float32
    score_error, pv_magnitude = softmax_rounding(qkv)
    assert (np.abs(lse - ref_lse) <= score_error[:, None, :] + 16 * UNIT_ROUNDOFF * np.abs(ref_lse)).all()
    assert score_error.max() < 0.01  # where exp(2 x) - 1 < 3 x
    out_bound = (3 * score_error + (t + 16) * UNIT_ROUNDOFF)[:, :, None] * pv_magnitude
    assert (np.abs(out - ref_out) <= out_bound).all()
    assert out_bound.max() < 0.02 * np.abs(ref_out).max()  # the bound still tells a rescaling slip from rounding


def softmax_rounding(qkv):
    """For one head, (B, T) and (B, T, hs): each row's bound on its scores' float32 error (the q.k GEMM in any
    order: (hs + 2) u scale |q| |k|, Higham 3.5; its largest over the row's keys), and sum_j p_ij |v_j| (exact),
    the size of the output's change when the probabilities change relatively by at most exp(2 x that) - 1, which
    is below 3 x that here (that < 0.01).
    Scores of order 100 carry errors of order 1e-3 whatever the kernel, so the test is held to this bound
    rather than to a fixed tolerance (a fixed 1e-4 passed on AVX2 and failed on an AVX-512 machine)."""
    b, t, c3 = qkv.shape
    x = torch.tensor(qkv, dtype=torch.float64)
    q, k, v = x.split(c3 // 3, dim=2)
    hs, scale = c3 // 3, 1 / math.sqrt(c3 // 3)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    error = ((hs + 2) * UNIT_ROUNDOFF * scale * (q.abs() @ k.abs().transpose(1, 2))).masked_fill(~causal, 0)
    probs = torch.softmax((scale * q @ k.transpose(1, 2)).masked_fill(~causal, float("-inf")), dim=-1)
    return error.amax(dim=-1).numpy(), (probs @ v.abs()).numpy()


def test_equals_llmc_attention():
    """The two kernels compute the same attention: out within float32 rounding, dqkv too."""
    rng = np.random.default_rng(11)
    b, t, c, nh = 2, 130, 128, 2
    qkv, dout = random_qkv(rng, b, t, c), rng.standard_normal((b, t, c)).astype(np.float32)
    out, lse = forward(qkv, nh)
    dqkv = backward(qkv, out, lse, dout, nh)
    llmc_out = np.zeros_like(out)
    preatt, att = np.zeros((b, nh, t, t), np.float32), np.zeros((b, nh, t, t), np.float32)
    attention_llmc.attention_llmc_forward.serial(llmc_out, preatt, att, qkv, nh, 0, b, 0, t)
    llmc_dqkv = np.zeros_like(qkv)
    attention_llmc.attention_llmc_backward.serial(llmc_dqkv, np.zeros_like(preatt), np.zeros_like(att), dout, qkv, att,
                                                  nh, 0, b, 0, t, False)
    np.testing.assert_allclose(out, llmc_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dqkv, llmc_dqkv, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cuts", [[0, 1, 100, 128, 129, 200], [0, 64, 128, 192], [0, 199]],
                         ids=["uneven", "task-blocks", "last-row"])
def test_query_blocks_equal_the_whole_call(cuts):
    """Blocks of query rows (per sequence, in order) give the whole call's values to float rounding, and each
    block writes only its own rows; a one-row block at the end reads the keys of all earlier rows."""
    rng = np.random.default_rng(5)
    b, t, c, nh = 2, 200, 64, 1
    qkv, dout = random_qkv(rng, b, t, c), rng.standard_normal((b, t, c)).astype(np.float32)
    out, lse = forward(qkv, nh)
    bounds = cuts + [t]
    blocks = [(s, s + 1, t0, t1) for s in range(b) for t0, t1 in zip(bounds[:-1], bounds[1:])]
    blocked_out, blocked_lse = forward(qkv, nh, blocks=blocks)
    np.testing.assert_allclose(blocked_out, out, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(blocked_lse, lse, atol=1e-6, rtol=1e-6)
    dqkv = backward(qkv, out, lse, dout, nh)
    np.testing.assert_allclose(backward(qkv, out, lse, dout, nh, blocks=blocks), dqkv, atol=1e-5, rtol=1e-5)
    # one block alone: its rows only
    partial_out, partial_lse = forward(qkv, nh, blocks=[(1, 2, 150, 160)])
    assert np.isnan(partial_out[0]).all() and np.isnan(partial_out[1, :150]).all() and np.isnan(partial_out[1, 160:]).all()
    np.testing.assert_allclose(partial_out[1, 150:160], out[1, 150:160], atol=1e-6, rtol=1e-6)


def test_accumulate_adds_to_dqkv():
    rng = np.random.default_rng(8)
    b, t, c, nh = 1, 140, 64, 1
    qkv, dout = random_qkv(rng, b, t, c), rng.standard_normal((b, t, c)).astype(np.float32)
    out, lse = forward(qkv, nh)
    start = rng.standard_normal(qkv.shape).astype(np.float32)
    added = backward(qkv, out, lse, dout, nh, dqkv=start.copy(), accumulate=True)
    written = backward(qkv, out, lse, dout, nh, dqkv=start.copy())  # accumulate=False overwrites the garbage
    np.testing.assert_allclose(added, start + written, atol=1e-5, rtol=1e-5)


def test_serial_and_parallel_are_bitwise_equal():
    """Parallel runs groups of heads side by side, OpenBLAS on one thread in each; the serial variant runs as the
    sequential model and task workers run it, OpenBLAS on one thread (OpenBLAS picks its small-matrix kernels by
    its thread count, so its sums depend on that count): each head's arithmetic is then the same."""
    rng = np.random.default_rng(13)
    b, t, c, nh = 2, 260, 256, 4
    qkv, dout = random_qkv(rng, b, t, c), rng.standard_normal((b, t, c)).astype(np.float32)
    with threadpool_limits(limits=1, user_api="blas"):
        serial_out, serial_lse = forward(qkv, nh, parallel=False)
        serial_grad = backward(qkv, serial_out, serial_lse, dout, nh)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        parallel_out, parallel_lse = forward(qkv, nh, parallel=True)
        parallel_grad = backward(qkv, parallel_out, parallel_lse, dout, nh, parallel=True)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(parallel_out, serial_out)
    np.testing.assert_array_equal(parallel_lse, serial_lse)
    np.testing.assert_array_equal(parallel_grad, serial_grad)
