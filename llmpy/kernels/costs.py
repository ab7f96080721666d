"""Cost model of every kernel call: floating-point operations and bytes moved, from its arguments.

Counts are per call, for the arguments actually passed (blocks included). FLOPs count multiply and add
separately (a GEMM is 2*M*N*K); exp, tanh, sqrt and division count as one. Bytes count each array
element the kernel reads once and each it writes once (float32 = 4 bytes, token ids 4 bytes), assuming
caches do not hold data across calls: the DRAM traffic the roofline model compares against bandwidth.
These feed per-kernel GFLOP/s and GB/s and the roofline; MFU uses llm.c's 6N + 6LCT count instead.
"""

from __future__ import annotations

from typing import Callable

F = 4  # bytes per float32 / int32 element


def _encoder_forward(out, tokens, wte, wpe, T, row0):
    N, C = out.shape
    return N * C, F * (3 * N * C + N)


def _encoder_backward(dwte, dwpe, dout, tokens, T, c0, c1, accumulate_wpe):
    N, w = dout.shape[0], c1 - c0
    return 2 * N * w, F * (N * w + 4 * N * w + N)


def _layernorm_forward(out, mean, rstd, inp, weight, bias):
    N, C = inp.shape
    return 8 * N * C, F * (2 * N * C + 2 * N + 2 * C)


def _layernorm_backward_input(dinp, dout, inp, weight, mean, rstd, accumulate):
    N, C = inp.shape
    return 12 * N * C, F * ((4 if accumulate else 3) * N * C + 2 * N + C)


def _layernorm_backward_params(dweight, dbias, dout, inp, mean, rstd, c0, c1, accumulate):
    N, w = inp.shape[0], c1 - c0
    return 5 * N * w, F * (2 * N * w + 2 * N + (4 if accumulate else 2) * w)


def _matmul_forward(out, inp, weight, bias):
    N, C = inp.shape
    OC = weight.shape[0]
    flops, moved = 2 * N * C * OC, N * C + OC * C + N * OC
    if bias is not None:  # a second pass over out
        flops, moved = flops + N * OC, moved + OC + 2 * N * OC
    return flops, F * moved


def _matmul_backward_input(dinp, dout, weight):
    N, OC = dout.shape
    C = weight.shape[1]
    return 2 * N * OC * C, F * (N * OC + OC * C + N * C)


def _matmul_backward_weight(dweight, dbias, dout, inp, accumulate, o0=0, o1=None, scratch=None):
    o1 = dweight.shape[0] if o1 is None else o1
    N, C, OC = inp.shape[0], inp.shape[1], o1 - o0
    flops, moved = 2 * N * OC * C, N * OC + N * C + (3 if accumulate else 1) * OC * C
    if dbias is not None:
        flops, moved = flops + N * OC, moved + N * OC + OC
    return flops, F * moved


def _attention_pairs(b0, b1, t0, t1, num_heads):
    # query rows t attend to t+1 keys: sum over t in [t0, t1) of (t+1)
    return (b1 - b0) * num_heads * ((t1 * (t1 + 1) - t0 * (t0 + 1)) // 2)


def _attention_forward(out, lse, qkv, num_heads, b0, b1, t0, t1):
    # the causal half only (the tiles' masked part of the diagonal is not counted); scores, softmax, P @ v;
    # qkv and out once each (the key tiles are re-read from cache)
    hs = out.shape[2] // num_heads
    pairs = _attention_pairs(b0, b1, t0, t1, num_heads)
    rows, C, keys = (b1 - b0) * (t1 - t0), out.shape[2], (b1 - b0) * t1
    return pairs * (4 * hs + 5), F * (rows * C + 2 * keys * C + rows * C + (b1 - b0) * num_heads * (t1 - t0))


def _attention_backward(dqkv, dout, qkv, out, lse, num_heads, b0, b1, t0, t1, accumulate):
    # scores recomputed (2 hs), dv, dP, dq, dk (8 hs), the softmax's pointwise work
    hs = dout.shape[2] // num_heads
    pairs = _attention_pairs(b0, b1, t0, t1, num_heads)
    C, rows, keys = dout.shape[2], (b1 - b0) * (t1 - t0), (b1 - b0) * t1
    return pairs * (10 * hs + 8), F * (3 * rows * C + 3 * keys * C + 2 * 3 * keys * C)


def _attention_cached_forward(out, cache, lse, qkv, num_heads, t0):
    b, n, C = out.shape
    hs, pairs = C // num_heads, _attention_pairs(0, b, t0, t0 + n, num_heads)
    return pairs * (4 * hs + 5), F * (4 * b * n * C + 2 * b * (t0 + n) * C)


def _attention_llmc_forward(out, preatt, att, qkv, num_heads, b0, b1, t0, t1):
    hs = out.shape[2] // num_heads
    pairs = _attention_pairs(b0, b1, t0, t1, num_heads)
    rows, T, C = (b1 - b0) * (t1 - t0), qkv.shape[1], out.shape[2]
    keys = (b1 - b0) * t1
    return pairs * (4 * hs + 5), F * (rows * C + 2 * keys * C + rows * C + 2 * (b1 - b0) * num_heads * (t1 - t0) * T)


def _attention_llmc_backward(dqkv, dpreatt, datt, dout, qkv, att, num_heads, b0, b1, t0, t1, accumulate):
    hs = dout.shape[2] // num_heads
    pairs = _attention_pairs(b0, b1, t0, t1, num_heads)
    T, C = qkv.shape[1], dout.shape[2]
    rows, keys = (b1 - b0) * (t1 - t0), (b1 - b0) * t1
    att_rows = (b1 - b0) * num_heads * (t1 - t0) * T
    return pairs * (8 * hs + 6), F * (rows * C + 3 * keys * C + 2 * 3 * keys * C + 3 * att_rows)


def _gelu_forward(out, inp):
    return 10 * inp.size, F * 2 * inp.size


def _gelu_backward(dinp, inp, dout):
    return 18 * inp.size, F * 3 * inp.size


def _residual_forward(out, a, b):
    return out.size, F * 3 * out.size


def _residual_backward(da, db, dout):
    return 0, F * 3 * dout.size


def _crossentropy_forward_backward(logits, losses, targets, dloss, vocab_size):
    N, Vp = logits.shape
    return 6 * N * vocab_size, F * (2 * N * Vp + 2 * N)


def _adamw_update(params, grads, m, v, *hyperparameters):
    return 18 * params.size, F * 7 * params.size


def _sum_of_squares(x, *into):
    return 2 * x.size, F * x.size


KERNEL_COSTS: dict[str, Callable[..., tuple[int, int]]] = {
    "encoder_forward": _encoder_forward,
    "encoder_backward": _encoder_backward,
    "layernorm_forward": _layernorm_forward,
    "layernorm_backward_input": _layernorm_backward_input,
    "layernorm_backward_params": _layernorm_backward_params,
    "matmul_forward": _matmul_forward,
    "matmul_backward_input": _matmul_backward_input,
    "matmul_backward_weight": _matmul_backward_weight,
    "attention_forward": _attention_forward,
    "attention_backward": _attention_backward,
    "attention_cached_forward": _attention_cached_forward,
    "attention_llmc_forward": _attention_llmc_forward,
    "attention_llmc_backward": _attention_llmc_backward,
    "gelu_forward": _gelu_forward,
    "gelu_backward": _gelu_backward,
    "residual_forward": _residual_forward,
    "residual_backward": _residual_backward,
    "crossentropy_forward_backward": _crossentropy_forward_backward,
    # the same kernels on a chunk of the batch's rows (llmpy.kernels.specs.on_chunk)
    "matmul_forward_chunk": _matmul_forward,
    "matmul_backward_input_chunk": _matmul_backward_input,
    "crossentropy_forward_backward_chunk": _crossentropy_forward_backward,
    "adamw_update": _adamw_update,
    "sum_of_squares": _sum_of_squares,
}


def kernel_cost(name: str, args: tuple) -> tuple[float, float]:
    """(flops, bytes) of one call of kernel `name` with `args`; (0, 0) for a kernel without a model."""
    cost = KERNEL_COSTS.get(name)
    if cost is None:
        return 0.0, 0.0
    flops, moved = cost(*args)
    return float(flops), float(moved)
