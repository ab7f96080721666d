"""What each kernel call reads and writes, and how a call may be cut into smaller calls.

Beside its cost model (`costs.py`), every kernel declares:
  - its accesses: for a call's arguments, the array views it reads (R), writes (W) or reads and writes (RW).
    A view is a slice of the array actually passed, narrowed where the kernel touches less than that (attention
    reads the keys/values of rows < t1 only; a weight-gradient call owns output channels [o0, o1) only), so
    whoever needs the data a call touches (the task builder) derives it from the call, never writes it by hand;
  - its split rules: how one call becomes several calls on blocks, each a call of the same kernel with the
    same result as the whole call, given in the order they must run.

Rules (the block parameters are chosen by the caller):
  rows(args, N, r0, r1)         token rows [r0, r1) of the N of every token-major argument (token-wise);
  queries(args, b, t0, t1, j)   sequence b, query rows [t0, t1), j-th block of that sequence (attention);
  channels(args, c0, c1)        output channels [c0, c1) owned by the call (weight-gradient reductions);
  columns(args, c0, c1)         output columns [c0, c1) of a GEMM, over all token rows (forward and dinp GEMMs);
  elements(args, lo, hi)        elements [lo, hi) of the arrays an elementwise kernel maps (AdamW).

A call on a chunk of the batch's token rows that is not the whole batch (the training classifier's, see
llmpy.core.layout.classifier_chunks) carries its kernel's `_chunk` name where the kernel has a rows rule
(`on_chunk`): the same kernel, accesses and costs, without that rule, since a rows rule cuts the whole batch's
N rows and a chunk's arrays hold some of them; its GEMMs still split by output columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

R, W, RW = "r", "w", "rw"

Access = tuple[str, np.ndarray]


def _written(accumulate: bool) -> str:
    return RW if accumulate else W


def _token_rows(array: np.ndarray, n_rows: int, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of a token-major argument: (N, W) arrays by row, flat (N*W,) arrays by W-element runs."""
    if array.ndim == 2:
        return array[r0:r1]
    width = array.shape[0] // n_rows
    return array[r0 * width:r1 * width]


def rows_rule(token_args: tuple[int, ...], row_offset_arg: int | None = None) -> Callable:
    """The rows rule of a token-wise kernel: `token_args` are the positions of its token-major arguments, (N, W) or
    flat (N*W,); `row_offset_arg` holds the block's first global row (the encoder)."""

    def split(args: tuple, n_rows: int, r0: int, r1: int) -> tuple:
        out = list(args)
        for i in token_args:
            out[i] = _token_rows(args[i], n_rows, r0, r1)
        if row_offset_arg is not None:
            out[row_offset_arg] = args[row_offset_arg] + r0
        return tuple(out)

    return split


def range_rule(lo_arg: int) -> Callable:
    """The channels rule of a kernel whose arguments lo_arg, lo_arg+1 are the [c0, c1) it owns."""

    def split(args: tuple, c0: int, c1: int) -> tuple:
        return args[:lo_arg] + (c0, c1) + args[lo_arg + 2:]

    split.extent = lambda args: (args[lo_arg], args[lo_arg + 1])  # the range the whole call owns
    return split


def elements_rule(count: int) -> Callable:
    """The elements rule of an elementwise kernel whose first `count` arguments are the arrays it maps."""

    def split(args: tuple, lo: int, hi: int) -> tuple:
        return tuple(a[lo:hi] for a in args[:count]) + args[count:]

    return split


@dataclass(frozen=True)
class KernelSpec:
    name: str
    accesses: Callable[..., list[Access]]  # accesses(*args)
    splits: dict[str, Callable] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- accesses
def _encoder_forward(out, tokens, wte, wpe, T, row0):
    return [(W, out), (R, tokens), (R, wte), (R, wpe)]


def _encoder_backward(dwte, dwpe, dout, tokens, T, c0, c1, accumulate_wpe):
    return [(RW, dwte[:, c0:c1]), (_written(accumulate_wpe), dwpe[:, c0:c1]), (R, dout[:, c0:c1]), (R, tokens)]


def _layernorm_forward(out, mean, rstd, inp, weight, bias):
    return [(W, out), (W, mean), (W, rstd), (R, inp), (R, weight), (R, bias)]


def _layernorm_backward_input(dinp, dout, inp, weight, mean, rstd, accumulate):
    return [(_written(accumulate), dinp), (R, dout), (R, inp), (R, weight), (R, mean), (R, rstd)]


def _layernorm_backward_params(dweight, dbias, dout, inp, mean, rstd, c0, c1, accumulate):
    mode = _written(accumulate)
    return [(mode, dweight[c0:c1]), (mode, dbias[c0:c1]), (R, dout[:, c0:c1]), (R, inp[:, c0:c1]), (R, mean),
            (R, rstd)]


def _matmul_forward(out, inp, weight, bias):
    return [(W, out), (R, inp), (R, weight)] + ([] if bias is None else [(R, bias)])


def _matmul_backward_input(dinp, dout, weight):
    return [(W, dinp), (R, dout), (R, weight)]


def _matmul_backward_weight(dweight, dbias, dout, inp, accumulate, o0=0, o1=None, scratch=None):
    o1 = dweight.shape[0] if o1 is None else o1
    mode = _written(accumulate)
    writes = [(mode, dweight[o0:o1])] + ([] if dbias is None else [(mode, dbias[o0:o1])])
    return writes + [(R, dout[:, o0:o1]), (R, inp)]


def _attention_forward(out, lse, qkv, num_heads, b0, b1, t0, t1):
    return [(W, out[b0:b1, t0:t1]), (W, lse[b0:b1, :, t0:t1]), (R, qkv[b0:b1, :t1])]


def _dqkv_access(dqkv, b0, b1, t1, accumulate):
    # accumulate=False zeroes all T rows of dqkv for its sequences first
    return (RW, dqkv[b0:b1, :t1]) if accumulate else (W, dqkv[b0:b1])


def _attention_backward(dqkv, dout, qkv, out, lse, num_heads, b0, b1, t0, t1, accumulate):
    return [_dqkv_access(dqkv, b0, b1, t1, accumulate), (R, dout[b0:b1, t0:t1]), (R, qkv[b0:b1, :t1]),
            (R, out[b0:b1, t0:t1]), (R, lse[b0:b1, :, t0:t1])]


def _attention_cached_forward(out, cache, lse, qkv, num_heads, t0):
    return [(W, out), (RW, cache[:, :t0 + qkv.shape[1]]), (W, lse), (R, qkv)]


def _attention_llmc_forward(out, preatt, att, qkv, num_heads, b0, b1, t0, t1):
    return [(W, out[b0:b1, t0:t1]), (W, preatt[b0:b1, :, t0:t1]), (W, att[b0:b1, :, t0:t1]), (R, qkv[b0:b1, :t1])]


def _attention_llmc_backward(dqkv, dpreatt, datt, dout, qkv, att, num_heads, b0, b1, t0, t1, accumulate):
    return [_dqkv_access(dqkv, b0, b1, t1, accumulate), (W, dpreatt[b0:b1, :, t0:t1]), (W, datt[b0:b1, :, t0:t1]),
            (R, dout[b0:b1, t0:t1]), (R, qkv[b0:b1, :t1]), (R, att[b0:b1, :, t0:t1])]


def _gelu_forward(out, inp):
    return [(W, out), (R, inp)]


def _gelu_backward(dinp, inp, dout):
    return [(W, dinp), (R, inp), (R, dout)]


def _residual_forward(out, a, b):
    return [(W, out), (R, a), (R, b)]


def _residual_backward(da, db, dout):
    return [(W, da), (W, db), (R, dout)]


def _crossentropy_forward_backward(logits, losses, targets, dloss, vocab_size):
    return [(RW, logits), (W, losses), (R, targets)]


def _adamw_update(params, grads, m, v, *hyperparameters):
    return [(RW, params), (R, grads), (RW, m), (RW, v)] + [(R, h) for h in hyperparameters
                                                           if isinstance(h, np.ndarray)]


def _sum_of_squares(x, *into):
    """sum_of_squares(x) returns its result; a call that stores it passes the (1,) array it goes into."""
    return [(R, x)] + [(W, out) for out in into]


# ---------------------------------------------------------------------------------------------- split rules
def _attention_forward_queries(args, b, t0, t1, j):
    return args[:4] + (b, b + 1, t0, t1)


def _attention_backward_queries(args, b, t0, t1, j):
    # blocks of a sequence run j = 0, 1, ...: each adds to the key/value rows of the blocks before it, the first
    # one (unless the whole call accumulates) zeroes the sequence's dqkv
    return args[:6] + (b, b + 1, t0, t1, args[10] or j > 0)


def _attention_llmc_forward_queries(args, b, t0, t1, j):
    return args[:5] + (b, b + 1, t0, t1)


def _attention_llmc_backward_queries(args, b, t0, t1, j):
    return args[:7] + (b, b + 1, t0, t1, args[11] or j > 0)


def _matmul_forward_columns(args, c0, c1):
    out, inp, weight, bias = args
    return out[:, c0:c1], inp, weight[c0:c1], None if bias is None else bias[c0:c1]


def _matmul_backward_input_columns(args, c0, c1):
    dinp, dout, weight = args
    return dinp[:, c0:c1], dout, weight[:, c0:c1]


SPECS: dict[str, KernelSpec] = {spec.name: spec for spec in (
    KernelSpec("encoder_forward", _encoder_forward, {"rows": rows_rule((0, 1), row_offset_arg=5)}),
    KernelSpec("encoder_backward", _encoder_backward, {"channels": range_rule(5)}),
    KernelSpec("layernorm_forward", _layernorm_forward, {"rows": rows_rule((0, 1, 2, 3))}),
    KernelSpec("layernorm_backward_input", _layernorm_backward_input, {"rows": rows_rule((0, 1, 2, 4, 5))}),
    KernelSpec("layernorm_backward_params", _layernorm_backward_params, {"channels": range_rule(6)}),
    KernelSpec("matmul_forward", _matmul_forward, {"rows": rows_rule((0, 1)), "columns": _matmul_forward_columns}),
    KernelSpec("matmul_backward_input", _matmul_backward_input,
               {"rows": rows_rule((0, 1)), "columns": _matmul_backward_input_columns}),
    KernelSpec("matmul_backward_weight", _matmul_backward_weight, {"channels": range_rule(5)}),
    KernelSpec("attention_forward", _attention_forward, {"queries": _attention_forward_queries}),
    KernelSpec("attention_backward", _attention_backward, {"queries": _attention_backward_queries}),
    KernelSpec("attention_cached_forward", _attention_cached_forward),
    KernelSpec("attention_llmc_forward", _attention_llmc_forward, {"queries": _attention_llmc_forward_queries}),
    KernelSpec("attention_llmc_backward", _attention_llmc_backward, {"queries": _attention_llmc_backward_queries}),
    KernelSpec("gelu_forward", _gelu_forward, {"rows": rows_rule((0, 1))}),
    KernelSpec("gelu_backward", _gelu_backward, {"rows": rows_rule((0, 1, 2))}),
    KernelSpec("residual_forward", _residual_forward, {"rows": rows_rule((0, 1, 2))}),
    KernelSpec("residual_backward", _residual_backward, {"rows": rows_rule((0, 1, 2))}),
    KernelSpec("crossentropy_forward_backward", _crossentropy_forward_backward, {"rows": rows_rule((0, 1, 2))}),
    KernelSpec("matmul_forward_chunk", _matmul_forward, {"columns": _matmul_forward_columns}),
    KernelSpec("matmul_backward_input_chunk", _matmul_backward_input, {"columns": _matmul_backward_input_columns}),
    KernelSpec("crossentropy_forward_backward_chunk", _crossentropy_forward_backward),
    KernelSpec("adamw_update", _adamw_update, {"elements": elements_rule(4)}),
    KernelSpec("sum_of_squares", _sum_of_squares),
)}


def on_chunk(kernel: str) -> str:
    """The name a call of `kernel` carries on a chunk of the batch's token rows (see the module docstring)."""
    chunk = f"{kernel}_chunk"
    return chunk if chunk in SPECS else kernel


def kernel_spec(name: str) -> KernelSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"kernel {name!r} declares no accesses (add a KernelSpec in llmpy.kernels.specs)") from None
