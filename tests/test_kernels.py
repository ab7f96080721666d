"""Every kernel in llmpy/kernels against an independent reference, and the block interfaces the execution
models rely on.

1. Values: each forward against torch (float64, so the reference is exact to far below float32 rounding)
   and each backward against torch autograd; AdamW against torch.optim.AdamW; sum_of_squares against
   numpy float64.
2. Blocks: token-wise kernels on row blocks, attention on query-row and sequence blocks, weight-gradient
   kernels on output-channel blocks equal the whole-range call. Where a block keeps every element's
   reduction order (rows, channels, sequences, in-order query blocks) they are bitwise equal; the GEMMs
   (OpenBLAS) choose their own blocking, so those get a tolerance of a few float32 ulps. Block calls must
   not touch anything outside their block (checked with NaN sentinels).
3. The `.serial` and `.parallel` variants agree bitwise: every parallel item (row, channel block, chunk,
   (sequence, head)) runs the same code in the same order in both. Exceptions (fastmath contraction, see
   NOT_BITWISE_ACROSS_VARIANTS, now empty).

Tolerances: inputs are float32 values of order 1-10 and every reduction is over at most 64 terms, so a
kernel's float32 result differs from the exact value by a few ulps of its partial sums: a few 1e-7 absolute.
Each constant below notes the measured maximum and leaves a >= 2x margin, staying at or below the 1e-5 that
float32 at these sizes makes "plenty". The GEMMs against torch are held to the rounding bound instead
(`gemm_close`): OpenBLAS sums in an order of its own per CPU, and a fixed tolerance passed on AVX2 but not on
an AVX-512 machine (one element of 384 at 2.5e-6).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numba import njit

from llmpy.kernels import KernelSet, adamw, attention_llmc, crossentropy, encoder, gelu, layernorm, matmul, residual
from llmpy.kernels import vector_math

B, T, C, NH, V, VP, MAXT = 2, 12, 16, 4, 50, 64, 16
N = B * T
CW = 200  # channel count for channel-block tests: > CHANNEL_BLOCK (64) and not a multiple of it

# Measured maxima are from this machine (x86-64 with FMA, OpenBLAS).
ATOL = 2e-6  # values of order 1-10 vs exact (float64) torch: measured <= 8e-7 (gelu backward, |values| < 4)
RTOL = 1e-6  # ... plus ~8 ulp relative for the larger sums (layernorm dweight, matmul ~ 10-25)
GEMM_ATOL = 1e-5  # a GEMM on a row/channel sub-block vs the whole GEMM: OpenBLAS may pick other kernels and
#                   blockings for other shapes; values up to ~25 (ulp 1.9e-6), measured <= 2.9e-6 (1.5 ulp)
UNIT_ROUNDOFF = 2.0**-24  # float32, round to nearest
ADAM_ATOL = 1e-6  # float32 AdamW vs float32 torch AdamW, params ~1 moving ~1e-2 per step; measured 1.8e-7

ROW_BLOCKS = [(0, 5), (5, 17), (17, N)]  # uneven, the middle one crosses the sequence boundary at T
CHANNEL_BLOCKINGS = [
    [(0, 70), (70, 200)],
    [(0, 64), (64, 128), (128, 200)],
    [(0, 1), (1, 199), (199, 200)],
    [(130, 200), (0, 13), (13, 130)],  # out of order
]
SENTINEL_BLOCK = (70, 133)  # a block neither aligned to 64 nor touching either end

VARIANTS = pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])


# ----------------------------------------------------------------------------------------------- helpers


def rand(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def t64(x, grad=False):
    t = torch.tensor(np.asarray(x), dtype=torch.float64)
    return t.requires_grad_(grad)


def close(actual, expected, atol=ATOL, rtol=RTOL, err_msg=""):
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().numpy()
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=err_msg)


def gemm_close(actual, expected, magnitude, terms):
    """A float32 GEMM's result against the exact one, to the bound that holds whatever order its sums take
    (OpenBLAS picks its kernels, and with them the order, by CPU: AVX2 and AVX-512 machines differ):
    |computed - exact| <= terms * u * magnitude, magnitude = |A| @ |B| (plus |C| for an added C), with `terms`
    the products and adds per element (Higham, Accuracy and Stability, 3.5), and u for the final rounding."""
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    bound = (terms + 1) * UNIT_ROUNDOFF * magnitude
    excess = np.abs(actual.astype(np.float64) - expected) - bound
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert (excess <= 0).all(), (f"{(excess > 0).sum()} of {excess.size} beyond the rounding bound; at {worst}: "
                                 f"{actual[worst]} vs {expected[worst]}, bound {bound[worst]:.3g}")


def make_tokens(rng, n=N, vocab=V):
    tokens = rng.integers(0, vocab, n).astype(np.int32)
    tokens[::3] = 7  # one id repeated in both sequences and at many positions
    tokens[1] = tokens[T + 1] = 13  # same id, same position, different sequences
    return tokens


def ln_stats(x):
    """float32 mean and rstd as layernorm_forward computes them (inputs for the backward kernels)."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=1)
    rstd = 1.0 / np.sqrt(x64.var(axis=1) + layernorm.EPS)
    return mean.astype(np.float32), rstd.astype(np.float32)


def causal_qkv_torch(qkv64):
    """q, k, v as (B, NH, T, hs) views of a (B, T, 3C) tensor."""
    b, t, c3 = qkv64.shape
    c = c3 // 3
    q, k, v = qkv64.split(c, dim=2)
    heads = lambda x: x.view(b, t, NH, c // NH).transpose(1, 2)
    return heads(q), heads(k), heads(v)


def attention_torch(qkv64):
    """preatt (masked with -inf), att, out (B, T, C) in float64."""
    b, t, c3 = qkv64.shape
    q, k, v = causal_qkv_torch(qkv64)
    preatt = q @ k.transpose(-1, -2) / math.sqrt(c3 // 3 // NH)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    att = preatt.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    out = (att @ v).transpose(1, 2).reshape(b, t, c3 // 3)
    return preatt, att, out


# --------------------------------------------------------------------------------------------- encoder


@VARIANTS
def test_encoder_forward(parallel):
    rng = np.random.default_rng(0)
    wte, wpe, tokens = rand(rng, VP, C), rand(rng, MAXT, C), make_tokens(rng)
    out = np.full((N, C), np.nan, np.float32)
    encoder.encoder_forward.variant(parallel)(out, tokens, wte, wpe, T, 0)
    positions = torch.arange(N) % T
    expected = torch.from_numpy(wte)[torch.from_numpy(tokens).long()] + torch.from_numpy(wpe)[positions]
    np.testing.assert_array_equal(out, expected.numpy())  # one correctly rounded float32 add on both sides


def encoder_grads_torch(dout, tokens):
    c = dout.shape[1]
    wte, wpe = t64(np.zeros((VP, c)), grad=True), t64(np.zeros((MAXT, c)), grad=True)
    out = wte[torch.from_numpy(tokens).long()] + wpe[torch.arange(len(tokens)) % T]
    out.backward(t64(dout))
    return wte.grad, wpe.grad


@VARIANTS
@pytest.mark.parametrize("accumulate_wpe", [False, True])
def test_encoder_backward(parallel, accumulate_wpe):
    rng = np.random.default_rng(1)
    dout, tokens = rand(rng, N, C), make_tokens(rng)
    dwte0, dwpe0 = rand(rng, VP, C), rand(rng, MAXT, C)
    dwte, dwpe = dwte0.copy(), dwpe0.copy()
    encoder.encoder_backward.variant(parallel)(dwte, dwpe, dout, tokens, T, 0, C, accumulate_wpe)
    gte, gpe = encoder_grads_torch(dout, tokens)
    # dwte always accumulates on top of what it holds (the tied output layer's gradient)
    close(dwte, t64(dwte0) + gte)
    assert len(set(tokens.tolist())) < N  # repeated tokens were exercised ...
    assert np.abs(gte[7].numpy()).sum() > 0  # ... and id 7 summed 8 rows
    unused = np.setdiff1d(np.arange(VP), tokens)
    np.testing.assert_array_equal(dwte[unused], dwte0[unused])  # rows of absent tokens untouched
    if accumulate_wpe:
        close(dwpe, t64(dwpe0) + gpe)
    else:
        close(dwpe[:T], gpe[:T])
        np.testing.assert_array_equal(dwpe[T:], 0.0)  # written: rows past T zeroed, not left as they were


# ------------------------------------------------------------------------------------------- layernorm


@VARIANTS
def test_layernorm_forward(parallel):
    rng = np.random.default_rng(2)
    x = rand(rng, N, C, scale=2.0) + np.float32(0.5)
    w, b = rand(rng, C), rand(rng, C)
    out = np.full((N, C), np.nan, np.float32)
    mean, rstd = np.full(N, np.nan, np.float32), np.full(N, np.nan, np.float32)
    layernorm.layernorm_forward.variant(parallel)(out, mean, rstd, x, w, b)
    x64 = t64(x)
    close(out, F.layer_norm(x64, (C,), t64(w), t64(b), eps=1e-5))
    close(mean, x64.mean(dim=1))
    close(rstd, 1.0 / torch.sqrt(x64.var(dim=1, unbiased=False) + 1e-5))


def layernorm_grads_torch(x, w, b, dout):
    x64, w64, b64 = t64(x, True), t64(w, True), t64(b, True)
    F.layer_norm(x64, (x.shape[1],), w64, b64, eps=1e-5).backward(t64(dout))
    return x64.grad, w64.grad, b64.grad


@VARIANTS
@pytest.mark.parametrize("accumulate", [False, True])
def test_layernorm_backward_input(parallel, accumulate):
    rng = np.random.default_rng(3)
    x, w, b, dout = rand(rng, N, C) + np.float32(0.5), rand(rng, C), rand(rng, C), rand(rng, N, C)
    mean, rstd = ln_stats(x)
    dinp0 = rand(rng, N, C)
    dinp = dinp0.copy()
    layernorm.layernorm_backward_input.variant(parallel)(dinp, dout, x, w, mean, rstd, accumulate)
    dx, _, _ = layernorm_grads_torch(x, w, b, dout)
    close(dinp, t64(dinp0) + dx if accumulate else dx)


@VARIANTS
@pytest.mark.parametrize("accumulate", [False, True])
def test_layernorm_backward_params(parallel, accumulate):
    rng = np.random.default_rng(4)
    x, w, b, dout = rand(rng, N, C) + np.float32(0.5), rand(rng, C), rand(rng, C), rand(rng, N, C)
    mean, rstd = ln_stats(x)
    dw0, db0 = rand(rng, C), rand(rng, C)
    dw, db = dw0.copy(), db0.copy()
    layernorm.layernorm_backward_params.variant(parallel)(dw, db, dout, x, mean, rstd, 0, C, accumulate)
    _, gw, gb = layernorm_grads_torch(x, w, b, dout)
    close(dw, t64(dw0) + gw if accumulate else gw)
    close(db, t64(db0) + gb if accumulate else gb)


# ---------------------------------------------------------------------------------------------- matmul


@VARIANTS
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_forward(parallel, with_bias):
    rng = np.random.default_rng(5)
    x, w, bias = rand(rng, N, C), rand(rng, 3 * C, C), rand(rng, 3 * C)
    out = np.full((N, 3 * C), np.nan, np.float32)
    matmul.matmul_forward(out, x, w, bias if with_bias else None, parallel=parallel)
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(w.T) + (np.abs(bias) if with_bias else 0.0)
    gemm_close(out, F.linear(t64(x), t64(w), t64(bias) if with_bias else None), magnitude, C + int(with_bias))


def test_matmul_backward_input():
    rng = np.random.default_rng(6)
    x, w, dout = rand(rng, N, C), rand(rng, 3 * C, C), rand(rng, N, 3 * C)
    dinp = np.full((N, C), np.nan, np.float32)
    matmul.matmul_backward_input(dinp, dout, w)
    x64 = t64(x, True)
    F.linear(x64, t64(w)).backward(t64(dout))
    gemm_close(dinp, x64.grad, np.abs(dout.astype(np.float64)) @ np.abs(w), 3 * C)


def matmul_weight_grads_torch(x, w, bias, dout):
    w64, b64 = t64(w, True), t64(bias, True)
    F.linear(t64(x), w64, b64).backward(t64(dout))
    return w64.grad, b64.grad


@VARIANTS
@pytest.mark.parametrize("accumulate,scratch", [(False, False), (True, False), (True, True)],
                         ids=["write", "accumulate", "accumulate-scratch"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_backward_weight(parallel, accumulate, scratch, with_bias):
    rng = np.random.default_rng(7)
    oc = 3 * C
    x, w, bias, dout = rand(rng, N, C), rand(rng, oc, C), rand(rng, oc), rand(rng, N, oc)
    dw0, db0 = rand(rng, oc, C), rand(rng, oc)
    dw, db = dw0.copy(), db0.copy()
    scratch_buf = np.full(oc * C + 7, np.nan, np.float32) if scratch else None  # larger than needed
    matmul.matmul_backward_weight(dw, db if with_bias else None, dout, x, accumulate, parallel=parallel,
                                  scratch=scratch_buf)
    gw, gb = matmul_weight_grads_torch(x, w, bias, dout)
    magnitude = np.abs(dout.T.astype(np.float64)) @ np.abs(x) + (np.abs(dw0) if accumulate else 0.0)
    gemm_close(dw, t64(dw0) + gw if accumulate else gw, magnitude, N + int(accumulate))
    if with_bias:
        close(db, t64(db0) + gb if accumulate else gb)
    else:
        np.testing.assert_array_equal(db, db0)
    if scratch:
        assert np.isnan(scratch_buf[oc * C:]).all()  # only the first (o1-o0)*C elements are used


@VARIANTS
def test_matmul_backward_weight_scratch_matches_no_scratch(parallel):
    rng = np.random.default_rng(8)
    x, dout, dw0, db0 = rand(rng, N, C), rand(rng, N, CW), rand(rng, CW, C), rand(rng, CW)
    results = []
    for scratch in (None, np.empty(CW * C, np.float32)):
        dw, db = dw0.copy(), db0.copy()
        for o0, o1 in [(0, 70), (70, CW)]:
            matmul.matmul_backward_weight(dw, db, dout, x, True, parallel=parallel, o0=o0, o1=o1, scratch=scratch)
        results.append((dw, db))
    close(results[0][0], results[1][0], atol=GEMM_ATOL, rtol=RTOL)
    np.testing.assert_array_equal(results[0][1], results[1][1])


@pytest.mark.parametrize("scratch", [False, True])
def test_matmul_backward_weight_adds_by_blocks_of_output_channels(monkeypatch, scratch):
    """Adding goes through a product of ACCUMULATE_CHANNELS output channels at a time (here 64, so channels
    [10, 190) take 3 blocks, the last one shorter): the same sums, and nothing outside [o0, o1) touched."""
    monkeypatch.setattr(matmul, "ACCUMULATE_CHANNELS", 64)
    rng = np.random.default_rng(9)
    x, dout, dw0, db0 = rand(rng, N, C), rand(rng, N, CW), rand(rng, CW, C), rand(rng, CW)
    dw, db = dw0.copy(), db0.copy()
    buffer = np.full(64 * C, np.nan, np.float32) if scratch else None  # one block's worth is enough
    matmul.matmul_backward_weight(dw, db, dout, x, True, o0=10, o1=190, scratch=buffer)
    gw, gb = matmul_weight_grads_torch(x, rand(rng, CW, C), rand(rng, CW), dout)
    magnitude = np.abs(dout.T.astype(np.float64)) @ np.abs(x) + np.abs(dw0)
    gemm_close(dw[10:190], t64(dw0[10:190]) + gw[10:190], magnitude[10:190], N + 1)
    close(db[10:190], t64(db0[10:190]) + gb[10:190])
    for got, before in ((dw, dw0), (db, db0)):
        np.testing.assert_array_equal(got[:10], before[:10])
        np.testing.assert_array_equal(got[190:], before[190:])


# ------------------------------------------------------------------------------------------- attention


def random_qkv(rng, b=B, t=T, c=C):
    return rand(rng, b, t, 3 * c)


def attention_forward_buffers(b=B, t=T, c=C):
    return (np.full((b, t, c), np.nan, np.float32), np.full((b, NH, t, t), np.nan, np.float32),
            np.full((b, NH, t, t), np.nan, np.float32))


@VARIANTS
def test_attention_forward(parallel):
    rng = np.random.default_rng(9)
    qkv = random_qkv(rng)
    out, preatt, att = attention_forward_buffers()
    attention_llmc.attention_llmc_forward.variant(parallel)(out, preatt, att, qkv, NH, 0, B, 0, T)
    ref_preatt, ref_att, ref_out = (r.numpy() for r in attention_torch(t64(qkv)))
    close(out, ref_out)
    lower = np.tril(np.ones((T, T), bool))
    close(att[..., lower], ref_att[..., lower])
    close(preatt[..., lower], ref_preatt[..., lower])
    np.testing.assert_array_equal(att[..., ~lower], 0.0)  # causal: exactly zero above the diagonal
    close(att.sum(axis=-1), np.ones((B, NH, T)))


def attention_backward_ref(qkv, dout):
    qkv64 = t64(qkv, True)
    _, _, out = attention_torch(qkv64)
    out.backward(t64(dout))
    return qkv64.grad


def attention_inputs(seed, b=B, t=T, c=C):
    rng = np.random.default_rng(seed)
    qkv, dout = random_qkv(rng, b, t, c), rand(rng, b, t, c)
    out, preatt, att = attention_forward_buffers(b, t, c)
    attention_llmc.attention_llmc_forward.serial(out, preatt, att, qkv, NH, 0, b, 0, t)
    return rng, qkv, dout, att


def attention_backward_scratch(b=B, t=T):
    return np.zeros((b, NH, t, t), np.float32), np.zeros((b, NH, t, t), np.float32)


@VARIANTS
@pytest.mark.parametrize("accumulate", [False, True])
def test_attention_backward(parallel, accumulate):
    rng, qkv, dout, att = attention_inputs(10)
    dqkv0 = rand(rng, B, T, 3 * C)  # garbage: accumulate=False must zero it first
    dqkv = dqkv0.copy()
    dpreatt, datt = attention_backward_scratch()
    attention_llmc.attention_llmc_backward.variant(parallel)(dqkv, dpreatt, datt, dout, qkv, att, NH, 0, B, 0, T, accumulate)
    expected = attention_backward_ref(qkv, dout)
    close(dqkv, t64(dqkv0) + expected if accumulate else expected)


# ------------------------------------------------------------------------------------------ gelu, residual


def gelu_input(rng, n):
    x = rand(rng, n, scale=2.0)
    x[:4] = [0.0, -0.0, 5.0, -5.0]
    return x


@VARIANTS
def test_gelu_forward(parallel):
    x = gelu_input(np.random.default_rng(11), N * 4 * C)
    out = np.full_like(x, np.nan)
    gelu.gelu_forward.variant(parallel)(out, x)
    close(out, F.gelu(t64(x), approximate="tanh"))


@VARIANTS
def test_gelu_backward(parallel):
    rng = np.random.default_rng(12)
    x, dout = gelu_input(rng, N * 4 * C), rand(rng, N * 4 * C)
    dinp = np.full_like(x, np.nan)
    gelu.gelu_backward.variant(parallel)(dinp, x, dout)
    x64 = t64(x, True)
    F.gelu(x64, approximate="tanh").backward(t64(dout))
    close(dinp, x64.grad)


@VARIANTS
def test_residual(parallel):
    rng = np.random.default_rng(13)
    a, b, dout = rand(rng, N * C), rand(rng, N * C), rand(rng, N * C)
    out = np.full_like(a, np.nan)
    residual.residual_forward.variant(parallel)(out, a, b)
    np.testing.assert_array_equal(out, (torch.from_numpy(a) + torch.from_numpy(b)).numpy())  # one float32 add
    da, db = np.full_like(a, np.nan), np.full_like(a, np.nan)
    residual.residual_backward.variant(parallel)(da, db, dout)
    a64, b64 = t64(a, True), t64(b, True)
    (a64 + b64).backward(t64(dout))
    np.testing.assert_array_equal(da, a64.grad.numpy().astype(np.float32))  # a copy: exact
    np.testing.assert_array_equal(db, b64.grad.numpy().astype(np.float32))


# ------------------------------------------------------------------------------------------ crossentropy


def logits_and_targets(rng, n=N):
    logits = rand(rng, n, VP, scale=3.0)
    logits[:, V:] = 100.0  # padded columns would dominate any softmax that looked at them
    targets = rng.integers(0, V, n).astype(np.int32)
    targets[0], targets[1] = 0, V - 1
    return logits, targets


@VARIANTS
def test_crossentropy_forward_backward(parallel):
    logits, targets = logits_and_targets(np.random.default_rng(14))
    grads, losses = logits.copy(), np.full(N, np.nan, np.float32)
    crossentropy.crossentropy_forward_backward.variant(parallel)(grads, losses, targets, 1.0 / N, V)
    real = t64(logits[:, :V], True)
    expected_losses = F.cross_entropy(real, torch.from_numpy(targets).long(), reduction="none")
    close(losses, expected_losses)
    expected_losses.mean().backward()  # the gradient of the mean over the N rows
    close(grads[:, :V], real.grad)
    np.testing.assert_array_equal(grads[:, V:], 0.0)  # the padded columns (100.0 on entry) get none
    # and literally (softmax - onehot) / N: a float32 multiply and subtract of the probabilities
    onehot = np.zeros((N, V)); onehot[np.arange(N), targets] = 1.0
    close(grads[:, :V], (real.detach().softmax(dim=1).numpy() - onehot) / N, atol=1e-8, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- adamw


ADAM_SIZE = 20000  # > adamw.CHUNK, so the parallel variant splits the work


@VARIANTS
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("weight_decay,grad_scale", [(0.0, 1.0), (0.1, 1.0), (0.1, 0.37)])
def test_adamw_matches_torch(parallel, steps, weight_decay, grad_scale):
    rng = np.random.default_rng(16)
    lr, beta1, beta2, eps = 1e-2, 0.9, 0.95, 1e-8
    params0 = rand(rng, ADAM_SIZE)
    grads = [rand(rng, ADAM_SIZE, scale=0.1 * (s + 1)) for s in range(steps)]
    params, m, v = params0.copy(), np.zeros(ADAM_SIZE, np.float32), np.zeros(ADAM_SIZE, np.float32)
    update = adamw.adamw_update.variant(parallel)
    for step, g in enumerate(grads, start=1):
        update(params, g, m, v, lr, beta1, beta2, eps, weight_decay, 1.0 - beta1**step, 1.0 - beta2**step, grad_scale)

    p = torch.nn.Parameter(torch.from_numpy(params0.copy()))
    opt = torch.optim.AdamW([p], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
    for g in grads:
        p.grad = torch.from_numpy(g * np.float32(grad_scale))  # grad_scale: gradients are scaled first
        opt.step()
    state = opt.state[p]
    close(params, p.detach(), atol=ADAM_ATOL, rtol=0)
    close(m, state["exp_avg"], atol=ADAM_ATOL, rtol=0)
    close(v, state["exp_avg_sq"], atol=ADAM_ATOL, rtol=0)
    assert np.abs(params - params0).max() > 1e-3  # the step did move the parameters


@VARIANTS
@pytest.mark.parametrize("n", [0, 1, 1000, 2 * adamw.CHUNK + 5])
def test_sum_of_squares(parallel, n):
    x = rand(np.random.default_rng(17), n, scale=3.0)
    total = adamw.sum_of_squares.variant(parallel)(x)
    # both sides sum float64 squares of the same float32 values, in different orders: ~n * 1e-16 relative
    np.testing.assert_allclose(total, np.sum(x.astype(np.float64) ** 2), rtol=1e-12, atol=0)


# =============================================================================================
# Block interfaces: a block call (or a sequence of them) equals the whole-range call
# =============================================================================================

# ---------------------------------------------------------------------- token-wise kernels on row blocks
# Each case: make(rng) -> dict of arrays; run(arrays, parallel, r0, r1) runs the kernel on rows [r0, r1);
# outputs: the arrays it writes; exact: whether block results must be bitwise equal (numba kernels) or
# within GEMM_ATOL (OpenBLAS).


def _ln_inputs(rng, width=C):
    x = rand(rng, N, width) + np.float32(0.5)
    mean, rstd = ln_stats(x)
    return dict(x=x, w=rand(rng, width), b=rand(rng, width), mean=mean, rstd=rstd, dout=rand(rng, N, width))


def _flat_rows(a, r0, r1):
    return a[r0:r1].reshape(-1)


ROW_CASES = {
    "encoder_forward": (
        lambda rng: dict(out=np.full((N, C), np.nan, np.float32), tokens=make_tokens(rng), wte=rand(rng, VP, C),
                         wpe=rand(rng, MAXT, C)),
        lambda a, p, r0, r1: encoder.encoder_forward.variant(p)(a["out"][r0:r1], a["tokens"][r0:r1], a["wte"],
                                                                a["wpe"], T, r0),
        ["out"], True),
    "layernorm_forward": (
        lambda rng: dict(_ln_inputs(rng), out=np.full((N, C), np.nan, np.float32),
                         m=np.full(N, np.nan, np.float32), s=np.full(N, np.nan, np.float32)),
        lambda a, p, r0, r1: layernorm.layernorm_forward.variant(p)(
            a["out"][r0:r1], a["m"][r0:r1], a["s"][r0:r1], a["x"][r0:r1], a["w"], a["b"]),
        ["out", "m", "s"], True),
    "layernorm_backward_input-write": (
        lambda rng: dict(_ln_inputs(rng), dinp=rand(rng, N, C)),
        lambda a, p, r0, r1: layernorm.layernorm_backward_input.variant(p)(
            a["dinp"][r0:r1], a["dout"][r0:r1], a["x"][r0:r1], a["w"], a["mean"][r0:r1], a["rstd"][r0:r1], False),
        ["dinp"], True),
    "layernorm_backward_input-accumulate": (
        lambda rng: dict(_ln_inputs(rng), dinp=rand(rng, N, C)),
        lambda a, p, r0, r1: layernorm.layernorm_backward_input.variant(p)(
            a["dinp"][r0:r1], a["dout"][r0:r1], a["x"][r0:r1], a["w"], a["mean"][r0:r1], a["rstd"][r0:r1], True),
        ["dinp"], True),
    "bias_add": (
        lambda rng: dict(out=rand(rng, N, 3 * C), bias=rand(rng, 3 * C)),
        lambda a, p, r0, r1: matmul.bias_add.variant(p)(a["out"][r0:r1], a["bias"]),
        ["out"], True),
    "matmul_forward": (
        lambda rng: dict(out=np.full((N, 3 * C), np.nan, np.float32), x=rand(rng, N, C), w=rand(rng, 3 * C, C),
                         bias=rand(rng, 3 * C)),
        lambda a, p, r0, r1: matmul.matmul_forward(a["out"][r0:r1], a["x"][r0:r1], a["w"], a["bias"], parallel=p),
        ["out"], False),
    "matmul_backward_input": (
        lambda rng: dict(dinp=np.full((N, C), np.nan, np.float32), dout=rand(rng, N, 3 * C), w=rand(rng, 3 * C, C)),
        lambda a, p, r0, r1: matmul.matmul_backward_input(a["dinp"][r0:r1], a["dout"][r0:r1], a["w"]),
        ["dinp"], False),
    "gelu_forward": (
        lambda rng: dict(out=np.full((N, 4 * C), np.nan, np.float32), x=rand(rng, N, 4 * C, scale=2.0)),
        lambda a, p, r0, r1: gelu.gelu_forward.variant(p)(_flat_rows(a["out"], r0, r1), _flat_rows(a["x"], r0, r1)),
        ["out"], True),
    "gelu_backward": (
        lambda rng: dict(dinp=np.full((N, 4 * C), np.nan, np.float32), x=rand(rng, N, 4 * C, scale=2.0),
                         dout=rand(rng, N, 4 * C)),
        lambda a, p, r0, r1: gelu.gelu_backward.variant(p)(
            _flat_rows(a["dinp"], r0, r1), _flat_rows(a["x"], r0, r1), _flat_rows(a["dout"], r0, r1)),
        ["dinp"], True),
    "residual_forward": (
        lambda rng: dict(out=np.full((N, C), np.nan, np.float32), a=rand(rng, N, C), b=rand(rng, N, C)),
        lambda a, p, r0, r1: residual.residual_forward.variant(p)(
            _flat_rows(a["out"], r0, r1), _flat_rows(a["a"], r0, r1), _flat_rows(a["b"], r0, r1)),
        ["out"], True),
    "residual_backward": (
        lambda rng: dict(da=np.full((N, C), np.nan, np.float32), db=np.full((N, C), np.nan, np.float32),
                         dout=rand(rng, N, C)),
        lambda a, p, r0, r1: residual.residual_backward.variant(p)(
            _flat_rows(a["da"], r0, r1), _flat_rows(a["db"], r0, r1), _flat_rows(a["dout"], r0, r1)),
        ["da", "db"], True),
    "crossentropy_forward_backward": (
        lambda rng: dict(zip(("logits", "targets"), logits_and_targets(rng)), losses=np.full(N, np.nan, np.float32)),
        lambda a, p, r0, r1: crossentropy.crossentropy_forward_backward.variant(p)(
            a["logits"][r0:r1], a["losses"][r0:r1], a["targets"][r0:r1], 1.0 / N, V),
        ["logits", "losses"], True),
    "adamw_update": (
        lambda rng: dict(params=rand(rng, N, C), grads=rand(rng, N, C), m=rand(rng, N, C, scale=0.1),
                         v=np.abs(rand(rng, N, C, scale=0.1))),
        lambda a, p, r0, r1: adamw.adamw_update.variant(p)(
            _flat_rows(a["params"], r0, r1), _flat_rows(a["grads"], r0, r1), _flat_rows(a["m"], r0, r1),
            _flat_rows(a["v"], r0, r1), 1e-3, 0.9, 0.95, 1e-8, 0.1, 1 - 0.9**3, 1 - 0.95**3, 0.5),
        ["params", "m", "v"], True),
}


def _fresh(make, seed):
    return make(np.random.default_rng(seed))


def _assert_same(actual, expected, exact, name):
    if exact:
        np.testing.assert_array_equal(actual, expected, err_msg=name)
    else:
        close(actual, expected, atol=GEMM_ATOL, rtol=RTOL, err_msg=name)


@VARIANTS
@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_row_blocks_equal_whole(case, parallel):
    make, run, outputs, exact = ROW_CASES[case]
    whole = _fresh(make, 20)
    run(whole, parallel, 0, N)
    for blocks in (ROW_BLOCKS, ROW_BLOCKS[::-1], [(r, r + 1) for r in range(N)]):
        blocked = _fresh(make, 20)
        for r0, r1 in blocks:
            run(blocked, parallel, r0, r1)
        for name in outputs:
            assert not np.isnan(whole[name]).any(), name
            _assert_same(blocked[name], whole[name], exact, name)


@VARIANTS
@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_row_block_touches_only_its_rows(case, parallel):
    make, run, outputs, exact = ROW_CASES[case]
    whole = _fresh(make, 21)
    run(whole, parallel, 0, N)
    block = _fresh(make, 21)
    before = {name: block[name].copy() for name in outputs}
    r0, r1 = ROW_BLOCKS[1]
    run(block, parallel, r0, r1)
    for name in outputs:
        _assert_same(block[name][r0:r1], whole[name][r0:r1], exact, name)
        np.testing.assert_array_equal(block[name][:r0], before[name][:r0], err_msg=name)
        np.testing.assert_array_equal(block[name][r1:], before[name][r1:], err_msg=name)


# ------------------------------------------------------------------ weight-gradient kernels on channel blocks
# Each case: make(rng) -> dict; run(arrays, parallel, c0, c1); outputs: {name: channel axis}; exact.


def _enc_make(rng):
    return dict(dwte=rand(rng, VP, CW), dwpe=rand(rng, MAXT, CW), dout=rand(rng, N, CW), tokens=make_tokens(rng))


def _lnp_make(rng):
    return dict(_ln_inputs(rng, CW), dw=rand(rng, CW), db=rand(rng, CW))


def _mmw_make(rng):
    return dict(dw=rand(rng, CW, C), db=rand(rng, CW), dout=rand(rng, N, CW), x=rand(rng, N, C),
                scratch=np.full(CW * C, np.nan, np.float32))


CHANNEL_CASES = {}
for _acc in (False, True):
    _tag = "accumulate" if _acc else "write"
    CHANNEL_CASES[f"encoder_backward-wpe-{_tag}"] = (
        _enc_make,
        lambda a, p, c0, c1, acc=_acc: encoder.encoder_backward.variant(p)(
            a["dwte"], a["dwpe"], a["dout"], a["tokens"], T, c0, c1, acc),
        {"dwte": 1, "dwpe": 1}, True)
    CHANNEL_CASES[f"layernorm_backward_params-{_tag}"] = (
        _lnp_make,
        lambda a, p, c0, c1, acc=_acc: layernorm.layernorm_backward_params.variant(p)(
            a["dw"], a["db"], a["dout"], a["x"], a["mean"], a["rstd"], c0, c1, acc),
        {"dw": 0, "db": 0}, True)
    CHANNEL_CASES[f"bias_backward-{_tag}"] = (
        _mmw_make,
        lambda a, p, c0, c1, acc=_acc: matmul.bias_backward.variant(p)(a["db"], a["dout"], c0, c1, acc),
        {"db": 0}, True)
    CHANNEL_CASES[f"matmul_backward_weight-{_tag}"] = (
        _mmw_make,
        lambda a, p, c0, c1, acc=_acc: matmul.matmul_backward_weight(
            a["dw"], a["db"], a["dout"], a["x"], acc, parallel=p, o0=c0, o1=c1),
        {"dw": 0, "db": 0}, False)
CHANNEL_CASES["matmul_backward_weight-accumulate-scratch"] = (
    _mmw_make,
    lambda a, p, c0, c1: matmul.matmul_backward_weight(
        a["dw"], a["db"], a["dout"], a["x"], True, parallel=p, o0=c0, o1=c1, scratch=a["scratch"]),
    {"dw": 0, "db": 0}, False)


def _channel_exact(case, name):
    # the bias of matmul_backward_weight is the numba bias_backward kernel: bitwise even there
    return CHANNEL_CASES[case][3] or name == "db"


@VARIANTS
@pytest.mark.parametrize("blocking", CHANNEL_BLOCKINGS, ids=lambda b: "-".join(f"{c0}:{c1}" for c0, c1 in b))
@pytest.mark.parametrize("case", sorted(CHANNEL_CASES))
def test_channel_blocks_equal_whole(case, blocking, parallel):
    make, run, outputs, _ = CHANNEL_CASES[case]
    whole = _fresh(make, 30)
    run(whole, parallel, 0, CW)
    blocked = _fresh(make, 30)
    for c0, c1 in blocking:
        run(blocked, parallel, c0, c1)
    for name in outputs:
        _assert_same(blocked[name], whole[name], _channel_exact(case, name), name)


@VARIANTS
@pytest.mark.parametrize("case", sorted(CHANNEL_CASES))
def test_channel_block_touches_only_its_channels(case, parallel):
    make, run, outputs, _ = CHANNEL_CASES[case]
    c0, c1 = SENTINEL_BLOCK
    whole = _fresh(make, 31)
    run(whole, parallel, 0, CW)
    block = _fresh(make, 31)
    for name, axis in outputs.items():
        outside = np.ones(CW, bool)
        outside[c0:c1] = False
        np.moveaxis(block[name], axis, 0)[outside] = np.nan
    run(block, parallel, c0, c1)
    for name, axis in outputs.items():
        inside = np.moveaxis(block[name], axis, 0)
        assert np.isnan(inside[:c0]).all() and np.isnan(inside[c1:]).all(), f"{name} written outside [{c0},{c1})"
        _assert_same(inside[c0:c1], np.moveaxis(whole[name], axis, 0)[c0:c1], _channel_exact(case, name), name)


# ----------------------------------------------------------------------------------- attention blocks

QUERY_BLOCKS = [(0, 4), (4, 8), (8, 12)]


@VARIANTS
def test_attention_forward_blocks_equal_whole(parallel):
    fwd = attention_llmc.attention_llmc_forward.variant(parallel)
    qkv = random_qkv(np.random.default_rng(40))
    whole = attention_forward_buffers()
    fwd(*whole, qkv, NH, 0, B, 0, T)
    lower = np.tril(np.ones((T, T), bool))
    for blocks in ([(0, B, t0, t1) for t0, t1 in QUERY_BLOCKS],
                   [(0, B, t0, t1) for t0, t1 in QUERY_BLOCKS[::-1]],
                   [(b, b + 1, 0, T) for b in range(B)],
                   [(b, b + 1, t0, t1) for b in range(B) for t0, t1 in QUERY_BLOCKS]):
        blocked = attention_forward_buffers()
        for b0, b1, t0, t1 in blocks:
            fwd(*blocked, qkv, NH, b0, b1, t0, t1)
        np.testing.assert_array_equal(blocked[0], whole[0])  # out
        np.testing.assert_array_equal(blocked[2], whole[2])  # att, zeros above the diagonal included
        np.testing.assert_array_equal(blocked[1][..., lower], whole[1][..., lower])  # preatt (keys <= t only)


@VARIANTS
def test_attention_forward_block_touches_only_its_rows(parallel):
    qkv = random_qkv(np.random.default_rng(41))
    out, preatt, att = attention_forward_buffers()
    attention_llmc.attention_llmc_forward.variant(parallel)(out, preatt, att, qkv, NH, 1, 2, 4, 8)
    assert not np.isnan(out[1, 4:8]).any() and not np.isnan(att[1, :, 4:8]).any()
    out[1, 4:8] = np.nan
    att[1, :, 4:8] = np.nan
    preatt[1, :, 4:8] = np.nan
    assert np.isnan(out).all() and np.isnan(att).all() and np.isnan(preatt).all()


def _attention_backward_run(parallel, dqkv, qkv, dout, att, blocks):
    bwd = attention_llmc.attention_llmc_backward.variant(parallel)
    dpreatt, datt = attention_backward_scratch()
    for b0, b1, t0, t1, acc in blocks:
        bwd(dqkv, dpreatt, datt, dout, qkv, att, NH, b0, b1, t0, t1, acc)
    return dqkv


@VARIANTS
def test_attention_backward_blocks_equal_whole(parallel):
    rng, qkv, dout, att = attention_inputs(42)
    garbage = rand(rng, B, T, 3 * C)
    whole = _attention_backward_run(parallel, garbage.copy(), qkv, dout, att, [(0, B, 0, T, False)])
    close(whole, attention_backward_ref(qkv, dout))

    # one sequence at a time, each zeroing its own rows: same per-element order, bitwise
    per_seq = _attention_backward_run(parallel, garbage.copy(), qkv, dout, att,
                                      [(b, b + 1, 0, T, False) for b in range(B)])
    np.testing.assert_array_equal(per_seq, whole)

    # query blocks in order, the first [0, 4) with accumulate=False: same per-element order, bitwise.
    # The first block zeroes only rows [0, 4) (as documented), so rows >= 4 start out zero here.
    start = garbage.copy()
    start[:, 4:] = 0.0
    in_order = [(0, B, 0, 4, False), (0, B, 4, 8, True), (0, B, 8, 12, True)]
    np.testing.assert_array_equal(_attention_backward_run(parallel, start.copy(), qkv, dout, att, in_order), whole)
    # ... and sequence x query blocks
    seq_blocks = [(b, b + 1, t0, t1, t0 > 0) for b in range(B) for t0, t1 in QUERY_BLOCKS]
    np.testing.assert_array_equal(_attention_backward_run(parallel, start.copy(), qkv, dout, att, seq_blocks), whole)

    # later blocks first, all accumulating into a pre-zeroed dqkv: same sums in another order
    for order in ([(8, 12), (4, 8), (0, 4)], [(4, 8), (0, 4), (8, 12)]):
        blocks = [(0, B, t0, t1, True) for t0, t1 in order]
        out_of_order = _attention_backward_run(parallel, np.zeros_like(garbage), qkv, dout, att, blocks)
        close(out_of_order, whole, atol=ATOL, rtol=0)


@VARIANTS
def test_attention_backward_block_touches_only_rows_below_t1(parallel):
    # query rows [t0, t1) of sequence b reach k, v rows < t1 and q rows [t0, t1) of sequence b only
    rng, qkv, dout, att = attention_inputs(43)
    dqkv = np.full((B, T, 3 * C), np.nan, np.float32)
    dqkv[1, :8] = 0.0
    _attention_backward_run(parallel, dqkv, qkv, dout, att, [(1, 2, 4, 8, True)])
    assert np.isnan(dqkv[0]).all() and np.isnan(dqkv[1, 8:]).all()
    assert not np.isnan(dqkv[1, :8]).any()
    np.testing.assert_array_equal(dqkv[1, :4, :C], 0.0)  # q rows before t0 receive nothing
    # accumulate=False zeroes all T rows of the sequences it owns first (stale gradients of the
    # previous step must not survive in rows a later query block adds to), and nothing else
    dqkv = np.full((B, T, 3 * C), np.nan, np.float32)
    _attention_backward_run(parallel, dqkv, qkv, dout, att, [(1, 2, 0, 4, False)])
    assert np.isnan(dqkv[0]).all()
    assert not np.isnan(dqkv[1]).any()
    np.testing.assert_array_equal(dqkv[1, 4:], 0.0)  # rows past t1 were zeroed and got nothing yet


# =============================================================================================
# Serial and parallel variants agree bitwise
# =============================================================================================


# adamw_update and gelu_backward once differed between the variants (fastmath `contract` formed different
# FMAs in the two compiled copies); elementwise kernels are now compiled with IEEE arithmetic, and these
# are checked bitwise like every other kernel, with a large input below as a regression test.
NOT_BITWISE_ACROSS_VARIANTS: set[str] = set()
VARIANT_ATOL = 2e-6  # values up to ~10 (ulp 1e-6); measured 2.4e-7 (adamw), 5e-7 (gelu_backward)


def _assert_serial_parallel(parallel_result, serial_result, name, bitwise=True):
    if bitwise:
        np.testing.assert_array_equal(parallel_result, serial_result, err_msg=name)
    else:
        close(parallel_result, serial_result, atol=VARIANT_ATOL, rtol=RTOL, err_msg=name)


@pytest.mark.parametrize("table, case", [("rows", c) for c in sorted(ROW_CASES)]
                         + [("channels", c) for c in sorted(CHANNEL_CASES)])
def test_row_and_channel_kernels_serial_equals_parallel(table, case):
    cases, seed, extent = (ROW_CASES, 50, N) if table == "rows" else (CHANNEL_CASES, 51, CW)
    make, run, outputs, _ = cases[case]
    results = []
    for parallel in (False, True):
        arrays = _fresh(make, seed)
        run(arrays, parallel, 0, extent)
        results.append(arrays)
    for name in outputs:
        _assert_serial_parallel(results[1][name], results[0][name], name, case not in NOT_BITWISE_ACROSS_VARIANTS)


def test_attention_serial_equals_parallel():
    qkv = random_qkv(np.random.default_rng(52))
    fwd = [attention_forward_buffers() for _ in range(2)]
    attention_llmc.attention_llmc_forward.serial(*fwd[0], qkv, NH, 0, B, 0, T)
    attention_llmc.attention_llmc_forward.parallel(*fwd[1], qkv, NH, 0, B, 0, T)
    for s, p in zip(*fwd):
        np.testing.assert_array_equal(p, s)
    rng, qkv, dout, att = attention_inputs(53)
    garbage = rand(rng, B, T, 3 * C)
    serial = _attention_backward_run(False, garbage.copy(), qkv, dout, att, [(0, B, 0, T, False)])
    parallel = _attention_backward_run(True, garbage.copy(), qkv, dout, att, [(0, B, 0, T, False)])
    np.testing.assert_array_equal(parallel, serial)


LARGE = 3 * 16384 + 123  # several chunks of every chunked kernel (gelu/residual 4096, adamw 16384)


def test_chunked_kernels_serial_equals_parallel():
    rng = np.random.default_rng(54)
    x, y, g = rand(rng, LARGE, scale=2.0), rand(rng, LARGE), rand(rng, LARGE)
    for kv, make_args, outs in [
        (gelu.gelu_forward, lambda: [np.empty_like(x), x], [0]),
        (gelu.gelu_backward, lambda: [np.empty_like(x), x, y], [0]),
        (residual.residual_forward, lambda: [np.empty_like(x), x, y], [0]),
        (residual.residual_backward, lambda: [np.empty_like(x), np.empty_like(x), y], [0, 1]),
        (adamw.adamw_update, lambda: [x.copy(), g, y.copy(), np.abs(y), 1e-3, 0.9, 0.95, 1e-8, 0.1,
                                      1 - 0.9**2, 1 - 0.95**2, 0.5], [0, 2, 3]),
    ]:
        serial_args, parallel_args = make_args(), make_args()
        kv.serial(*serial_args)
        kv.parallel(*parallel_args)
        for i in outs:
            _assert_serial_parallel(parallel_args[i], serial_args[i], kv.name,
                                    kv.name not in NOT_BITWISE_ACROSS_VARIANTS)
    assert adamw.sum_of_squares.parallel(x) == adamw.sum_of_squares.serial(x)


@pytest.mark.parametrize("name", ["adamw_update", "gelu_backward"])
def test_elementwise_kernels_serial_equals_parallel_bitwise(name):
    rng = np.random.default_rng(55)
    x, g, m = rand(rng, LARGE, scale=2.0), rand(rng, LARGE), rand(rng, LARGE, scale=0.1)
    results = []
    for variant in ("serial", "parallel"):
        if name == "adamw_update":
            args = [x.copy(), g, m.copy(), np.abs(m), 1e-3, 0.9, 0.95, 1e-8, 0.1, 1 - 0.9**2, 1 - 0.95**2, 1.0]
            getattr(adamw.adamw_update, variant)(*args)
            results.append(np.concatenate([args[0], args[2], args[3]]))
        else:
            dinp = np.empty_like(x)
            getattr(gelu.gelu_backward, variant)(dinp, x, g)
            results.append(dinp)
    np.testing.assert_array_equal(results[1], results[0])


def test_kernel_set_picks_the_variant():
    for parallel in (False, True):
        ks = KernelSet(parallel)
        assert ks.attention_llmc_forward is attention_llmc.attention_llmc_forward.variant(parallel)
        assert ks.attention_forward.keywords == {"parallel": parallel}
        assert ks.layernorm_backward_params is layernorm.layernorm_backward_params.variant(parallel)
        assert ks.matmul_forward.keywords == {"parallel": parallel}


# =============================================================================================
# Fixed-order reductions: kernels are compiled without fast math and sum in the lane order of
# vector_math, so results depend neither on the variant, the thread count nor the CPU's vector width
# =============================================================================================
# Shapes here reach the lane code: C = 87 is five full groups of 16 plus 7 leftovers; head sizes 64
# (attention's register path), 37 (two groups + 5) and 100 (a 64-channel block + 36, six groups + 4).

LANE_C = 87
HEAD_SIZES = [64, 37, 100]
HEAD_COUNT = {64: 2, 37: 3, 100: 2}
LB, LT = 2, 9  # attention batch and sequence length for these tests
# Against torch these shapes stay within ATOL/RTOL: measured <= 7.5e-7 (attention dqkv, hs = 37, values
# up to ~4) and 1.1e-6 (layernorm out at C = 87, values up to ~7).


def lane_order_sum(terms):
    """Independent reference of vector_math's documented order, in numpy arithmetic of terms' dtype:
    lane j (of 16) adds terms j, j + 16, j + 32, ... of the full groups of 16 left to right starting from 0;
    the lanes are combined by halving (j += j + 8, then j + 4, j + 2, j + 1); the leftovers are added last,
    left to right."""
    terms = np.asarray(terms)
    full = len(terms) - len(terms) % 16
    lanes = np.zeros(16, terms.dtype)
    for k in range(0, full, 16):
        lanes = lanes + terms[k:k + 16]
    width = 16
    while width > 1:
        width //= 2
        lanes = lanes[:width] + lanes[width:2 * width]
    total = lanes[0]
    for term in terms[full:]:
        total = total + term
    assert total.dtype == terms.dtype
    return total


@njit(error_model="numpy")
def _lane_reductions(x, y):
    return (vector_math.lane_sum(x), vector_math.lane_dot(x, y),
            vector_math.lane_max(x, np.float32(-3.4e38)))


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 64, 100, 1007])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_lane_reductions_follow_the_documented_order(n, strided):
    assert vector_math.LANES == 16
    rng = np.random.default_rng(60 + n)
    x, y = rand(rng, 2 * n, scale=3.0), rand(rng, 2 * n)
    x, y = (x[::2], y[::2]) if strided else (x[:n], y[:n])  # strided: numba's non-contiguous layout
    total, dot, largest = _lane_reductions(x, y)
    assert np.float32(total) == lane_order_sum(x)
    assert np.float32(dot) == lane_order_sum(x * y)  # products rounded to float32 first: no FMA
    assert np.float32(largest) == (max(np.float32(-3.4e38), x.max()) if n else np.float32(-3.4e38))


def test_lane_max_skips_nan_like_max():
    x = np.arange(40, dtype=np.float32)
    x[[3, 20, 39]] = np.nan
    assert _lane_reductions(x, x)[2] == 38.0


@VARIANTS
@pytest.mark.parametrize("n", [1000, 3 * adamw.CHUNK + 123])
def test_sum_of_squares_is_the_lane_order_sum(parallel, n):
    x = rand(np.random.default_rng(61), n, scale=3.0)
    expected = 0.0
    for start in range(0, n, adamw.CHUNK):  # chunk sums added in order, each one in lane order
        expected = expected + lane_order_sum(x[start:start + adamw.CHUNK].astype(np.float64) ** 2)
    assert adamw.sum_of_squares.variant(parallel)(x) == expected


def _layernorm_forward_lane_order(x, w, b):
    C = x.shape[1]
    out, mean, rstd = np.empty_like(x), np.empty(len(x), np.float32), np.empty(len(x), np.float32)
    for n, row in enumerate(x):
        m = lane_order_sum(row) / np.float32(C)
        d = row - m
        s = np.float32(1.0) / np.sqrt(lane_order_sum(d * d) / np.float32(C) + np.float32(layernorm.EPS))
        out[n], mean[n], rstd[n] = (row - m) * s * w + b, m, s
    return out, mean, rstd


@VARIANTS
@pytest.mark.parametrize("width", [C, LANE_C])
def test_layernorm_forward_is_the_lane_order(parallel, width):
    rng = np.random.default_rng(62)
    x, w, b = rand(rng, N, width, scale=2.0) + np.float32(0.5), rand(rng, width), rand(rng, width)
    out, mean, rstd = np.empty_like(x), np.empty(N, np.float32), np.empty(N, np.float32)
    layernorm.layernorm_forward.variant(parallel)(out, mean, rstd, x, w, b)
    for actual, expected in zip((out, mean, rstd), _layernorm_forward_lane_order(x, w, b)):
        np.testing.assert_array_equal(actual, expected)


@VARIANTS
@pytest.mark.parametrize("accumulate", [False, True])
def test_layernorm_backward_input_is_the_lane_order(parallel, accumulate):
    rng = np.random.default_rng(63)
    inputs = _ln_inputs(rng, LANE_C)
    x, w, mean, rstd, dout = (inputs[k] for k in ("x", "w", "mean", "rstd", "dout"))
    dinp0 = rand(rng, N, LANE_C)
    dinp = dinp0.copy()
    layernorm.layernorm_backward_input.variant(parallel)(dinp, dout, x, w, mean, rstd, accumulate)
    channels = np.float32(LANE_C)
    for n in range(N):
        norm = (x[n] - mean[n]) * rstd[n]
        dnorm = w * dout[n]
        dnorm_mean = lane_order_sum(dnorm) / channels
        dnorm_norm_mean = lane_order_sum(dnorm * norm) / channels
        g = (dnorm - dnorm_mean - norm * dnorm_norm_mean) * rstd[n]
        np.testing.assert_array_equal(dinp[n], dinp0[n] + g if accumulate else g)


def _heads(qkv, hs, nh):
    """q, k, v of a (B, T, 3C) array as (B, NH, T, hs) float32 arrays."""
    b, t, _ = qkv.shape
    return [qkv[:, :, i * nh * hs:(i + 1) * nh * hs].reshape(b, t, nh, hs).transpose(0, 2, 1, 3) for i in range(3)]


def _lane_attention_inputs(seed, hs):
    nh = HEAD_COUNT[hs]
    rng = np.random.default_rng(seed)
    qkv, dout = rand(rng, LB, LT, 3 * nh * hs), rand(rng, LB, LT, nh * hs)
    out, preatt, att = (np.full((LB, LT, nh * hs), np.nan, np.float32), np.full((LB, nh, LT, LT), np.nan, np.float32),
                        np.full((LB, nh, LT, LT), np.nan, np.float32))
    return nh, qkv, dout, out, preatt, att


@VARIANTS
@pytest.mark.parametrize("hs", HEAD_SIZES)
def test_attention_forward_is_the_lane_order(parallel, hs):
    nh, qkv, _, out, preatt, att = _lane_attention_inputs(64, hs)
    attention_llmc.attention_llmc_forward.variant(parallel)(out, preatt, att, qkv, nh, 0, LB, 0, LT)
    q, k, v = _heads(qkv, hs, nh)
    scale = np.float32(1.0 / math.sqrt(hs))
    for b in range(LB):
        for h in range(nh):
            for t in range(LT):
                for t2 in range(t + 1):  # q.k in lane order, then scaled
                    assert preatt[b, h, t, t2] == lane_order_sum(q[b, h, t] * k[b, h, t2]) * scale, (b, h, t, t2)
                expected = np.zeros(hs, np.float32)
                for t2 in range(t + 1):  # out adds att * v over the keys in order, from 0
                    expected = expected + att[b, h, t, t2] * v[b, h, t2]
                np.testing.assert_array_equal(out[b, t, h * hs:(h + 1) * hs], expected)


@VARIANTS
@pytest.mark.parametrize("hs", HEAD_SIZES)
def test_attention_backward_is_the_lane_order(parallel, hs):
    nh, qkv, dout, out, preatt, att = _lane_attention_inputs(65, hs)
    attention_llmc.attention_llmc_forward.serial(out, preatt, att, qkv, nh, 0, LB, 0, LT)
    dqkv, dpreatt, datt = np.zeros_like(qkv), np.zeros((LB, nh, LT, LT), np.float32), np.zeros((LB, nh, LT, LT), np.float32)
    attention_llmc.attention_llmc_backward.variant(parallel)(dqkv, dpreatt, datt, dout, qkv, att, nh, 0, LB, 0, LT, False)
    q, k, v = _heads(qkv, hs, nh)
    dq, dk, dv = (np.zeros_like(a) for a in (q, k, v))
    g_out = dout.reshape(LB, LT, nh, hs).transpose(0, 2, 1, 3)
    scale = np.float32(1.0 / math.sqrt(hs))
    for b in range(LB):
        for h in range(nh):
            for t in range(LT):  # the kernel's loop order, in numpy float32
                a = att[b, h, t, :t + 1]
                d_att = np.array([lane_order_sum(v[b, h, t2] * g_out[b, h, t]) for t2 in range(t + 1)], np.float32)
                for t2 in range(t + 1):
                    dv[b, h, t2] = dv[b, h, t2] + a[t2] * g_out[b, h, t]
                d_pre = a * (d_att - lane_order_sum(a * d_att))
                np.testing.assert_array_equal(datt[b, h, t, :t + 1], d_att)
                np.testing.assert_array_equal(dpreatt[b, h, t, :t + 1], d_pre)
                for t2 in range(t + 1):
                    d = d_pre[t2] * scale
                    dq[b, h, t] = dq[b, h, t] + d * k[b, h, t2]
                    dk[b, h, t2] = dk[b, h, t2] + d * q[b, h, t]
    for expected, actual in zip((dq, dk, dv), _heads(dqkv, hs, nh)):
        np.testing.assert_array_equal(actual, expected)


@VARIANTS
@pytest.mark.parametrize("hs", HEAD_SIZES)
def test_attention_at_lane_head_sizes_matches_torch(parallel, hs):
    nh, qkv, dout, out, preatt, att = _lane_attention_inputs(66, hs)
    attention_llmc.attention_llmc_forward.variant(parallel)(out, preatt, att, qkv, nh, 0, LB, 0, LT)
    qkv64 = t64(qkv, True)
    b, t, c3 = qkv64.shape
    heads = [x.view(b, t, nh, hs).transpose(1, 2) for x in qkv64.split(c3 // 3, dim=2)]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    ref_att = (heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(hs)).masked_fill(~mask, float("-inf")).softmax(-1)
    ref_out = (ref_att @ heads[2]).transpose(1, 2).reshape(b, t, c3 // 3)
    close(out, ref_out)
    close(att, ref_att)
    ref_out.backward(t64(dout))
    dqkv, dpreatt, datt = np.zeros_like(qkv), np.zeros((LB, nh, LT, LT), np.float32), np.zeros((LB, nh, LT, LT), np.float32)
    attention_llmc.attention_llmc_backward.variant(parallel)(dqkv, dpreatt, datt, dout, qkv, att, nh, 0, LB, 0, LT, False)
    close(dqkv, qkv64.grad)


@VARIANTS
def test_layernorm_at_lane_width_matches_torch(parallel):
    rng = np.random.default_rng(67)
    x, w, b, dout = rand(rng, N, LANE_C, scale=2.0) + np.float32(0.5), rand(rng, LANE_C), rand(rng, LANE_C), rand(rng, N, LANE_C)
    out, mean, rstd = np.empty_like(x), np.empty(N, np.float32), np.empty(N, np.float32)
    layernorm.layernorm_forward.variant(parallel)(out, mean, rstd, x, w, b)
    close(out, F.layer_norm(t64(x), (LANE_C,), t64(w), t64(b), eps=1e-5))
    dinp = np.empty_like(x)
    layernorm.layernorm_backward_input.variant(parallel)(dinp, dout, x, w, mean, rstd, False)
    close(dinp, layernorm_grads_torch(x, w, b, dout)[0])


def _reduction_kernel_runs():
    """(name, run(variant) -> outputs) for every kernel with a reduction, at lane-reaching shapes."""
    rng = np.random.default_rng(68)
    ln = _ln_inputs(rng, LANE_C)
    logits, targets = logits_and_targets(rng)
    big = rand(rng, 3 * adamw.CHUNK + 123, scale=3.0)
    mmw = _mmw_make(rng)
    enc = _enc_make(rng)

    def ln_forward(f):
        out, m, s = np.empty_like(ln["x"]), np.empty(N, np.float32), np.empty(N, np.float32)
        f(out, m, s, ln["x"], ln["w"], ln["b"])
        return out, m, s

    def ln_backward_input(f):
        dinp = ln["dout"].copy()
        f(dinp, ln["dout"], ln["x"], ln["w"], ln["mean"], ln["rstd"], True)
        return (dinp,)

    def ln_backward_params(f):
        dw, db = np.zeros(LANE_C, np.float32), np.zeros(LANE_C, np.float32)
        f(dw, db, ln["dout"], ln["x"], ln["mean"], ln["rstd"], 0, LANE_C, False)
        return dw, db

    def ce_forward(f):
        grads, losses = logits.copy(), np.empty(N, np.float32)
        f(grads, losses, targets, 1.0 / N, V)
        return grads, losses

    def bias_backward(f):
        db = mmw["db"].copy()
        f(db, mmw["dout"], 0, CW, True)
        return (db,)

    def enc_backward(f):
        dwte, dwpe = enc["dwte"].copy(), enc["dwpe"].copy()
        f(dwte, dwpe, enc["dout"], enc["tokens"], T, 0, CW, False)
        return dwte, dwpe

    runs = [("layernorm_forward", layernorm.layernorm_forward, ln_forward),
            ("layernorm_backward_input", layernorm.layernorm_backward_input, ln_backward_input),
            ("layernorm_backward_params", layernorm.layernorm_backward_params, ln_backward_params),
            ("crossentropy_forward_backward", crossentropy.crossentropy_forward_backward, ce_forward),
            ("sum_of_squares", adamw.sum_of_squares, lambda f: (np.float64(f(big)),)),
            ("bias_backward", matmul.bias_backward, bias_backward),
            ("encoder_backward", encoder.encoder_backward, enc_backward)]
    for hs in HEAD_SIZES:
        nh, qkv, dout, out0, preatt0, att0 = _lane_attention_inputs(69, hs)

        def att_forward(f, nh=nh, qkv=qkv, out0=out0, preatt0=preatt0, att0=att0):
            out, preatt, att = out0.copy(), preatt0.copy(), att0.copy()
            f(out, preatt, att, qkv, nh, 0, LB, 0, LT)
            return out, np.tril(preatt[0, 0]), att

        def att_backward(f, nh=nh, qkv=qkv, dout=dout, out0=out0, preatt0=preatt0, att0=att0):
            out, preatt, att = out0.copy(), preatt0.copy(), att0.copy()
            attention_llmc.attention_llmc_forward.serial(out, preatt, att, qkv, nh, 0, LB, 0, LT)
            dqkv, scratch = np.ones_like(qkv), [np.zeros((LB, nh, LT, LT), np.float32) for _ in range(2)]
            f(dqkv, *scratch, dout, qkv, att, nh, 0, LB, 0, LT, False)
            return (dqkv, *scratch)

        runs.append((f"attention_forward-hs{hs}", attention_llmc.attention_llmc_forward, att_forward))
        runs.append((f"attention_backward-hs{hs}", attention_llmc.attention_llmc_backward, att_backward))
    return runs


REDUCTION_RUNS = _reduction_kernel_runs()


@pytest.mark.parametrize("case", range(len(REDUCTION_RUNS)), ids=[r[0] for r in REDUCTION_RUNS])
def test_reduction_kernels_bitwise_across_variants_and_thread_counts(case):
    name, variants, run = REDUCTION_RUNS[case]
    expected = run(variants.serial)
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            for actual, wanted in zip(run(variants.parallel), expected):
                np.testing.assert_array_equal(actual, wanted, err_msg=f"{name}, parallel on {threads} threads")
    finally:
        numba.set_num_threads(before)
