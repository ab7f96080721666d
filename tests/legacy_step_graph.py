"""The task builder as it was before the step had one description (kept for tests only): it spelled out every
kernel call of the step again, with hand-written regions. test_step_description compares the graphs it gives
with the ones derived from the model's call list.

Original docstring: the task-based execution model: one training step as a dataflow graph of kernel calls on blocks.

`build_step_graph` issues the kernel calls of `GPT2.forward`, `GPT2.backward` and `AdamW.update` in the same
order and with the same arguments, cut into blocks:

- token-row kernels (encoder, layernorm, matmul, gelu, residual, crossentropy and their backward input
  gradients) run per sequence b and block j of K tokens (rows b*T + j*K .. + K of the (B*T, C) views);
- causal attention runs per query block j of sequence b and reads the qkv rows 0 .. (j+1)K of that sequence
  only, so it waits for the qkv blocks 0..j and no others; its backward for (b, j) accumulates into dqkv
  rows 0 .. (j+1)K, so the blocks of a sequence run j = 0, 1, ... in turn (the order the one-call kernel
  uses: results are bitwise the same); block 0 runs with accumulate=False, which zeroes the sequence's dqkv
  first (the zeroing task of this gradient);
- weight gradients (matmul dW and db, layernorm dw and db, the embeddings) run per block of output channels,
  reading every token block; with accumulate=False each gradient block is written, not added to, so no
  separate zeroing pass is needed (llm.c zeroes every gradient before the backward);
- AdamW runs per block of each layer's parameters, as soon as that block's gradient is complete and the
  step's forward and backward have finished reading it. With `--overlap-steps` (the study's taskiter idea)
  a step's AdamW tasks go instead at the head of the next step's graph, so the next forward of layer l waits
  only for the update of the parameters it reads while later layers are still updating; each step's update
  reads its own learning rate and bias corrections, and `TaskExecution.synchronize` runs an update still
  pending before the parameters are read from outside a step.

Each task declares the regions it reads and writes; the edges come from `DependencyTracker`, not from a
hand-drawn order. The kernels are the serial (nogil) numba variants and 1-thread BLAS GEMMs, run by N
worker threads of a runtime (`llmpy.execution.tasks.runtime`: llmpy's own scheduler or Dask's threaded one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from llmpy.execution.tasks.graph import Region, Task, TaskGraph
from llmpy.kernels import KernelSet
from llmpy.kernels import matmul as matmul_kernels
from llmpy.kernels.costs import kernel_cost
from llmpy.core.layout import MATRIX_PARAMETERS

# Cost estimate of a task for the critical-path priority (one core): GEMM-ish rate, memory rate, overhead.
EST_FLOPS = 30e9
EST_BYTES = 8e9
EST_OVERHEAD = 10e-6

DEFAULT_CHANNEL_BLOCK = 256  # output channels per weight-gradient task (a multiple of the kernels' 64)
DEFAULT_PARAM_BLOCK = 1 << 20  # parameters per AdamW task (at most; whole rows)
DEFAULT_GEMM_CHANNEL_BLOCK = 384  # columns per channel-split GEMM task (--gemm-split lm_head|channels)
# How the forward and input-gradient GEMMs are cut: "rows": per token block (each task re-reads and re-packs the
# whole weight); "lm_head": the lm_head (logits = lnf @ wte.T, dlnf = dlogits @ wte) per block of output columns
# over all token rows (each task reads a slice of the weight once), the layers' GEMMs per token block;
# "channels": every GEMM (lm_head, qkv, attproj, fc, fcproj) per block of output columns.
GEMM_SPLITS = ("rows", "lm_head", "channels")


def _matmul_backward_weight(dweight, dbias, dout, inp, accumulate, o0, o1, scratch):
    """matmul_backward_weight with positional output channels (the argument order of its cost model)."""
    matmul_kernels.matmul_backward_weight(dweight, dbias, dout, inp, accumulate, o0=o0, o1=o1, scratch=scratch)


@dataclass
class StepContext:
    """What changes from step to step: read by the AdamW tasks when they run."""

    learning_rate: float = 0.0
    bias_correction1: float = 1.0
    bias_correction2: float = 1.0
    grad_scale: float = 1.0
    grad_norm_sq: float = 0.0  # written by the gradient-norm task when clipping


@dataclass
class StepGraph:
    """A built graph plus the buffers its tasks read the step's tokens from."""

    graph: TaskGraph
    inputs: np.ndarray  # (B, T) int32, copied in before each run
    targets: np.ndarray
    context: StepContext
    block_tokens: int
    accumulate: bool
    with_update: bool
    loss_tasks: list[int] = field(default_factory=list)


def blocks(n: int, width: int) -> list[tuple[int, int]]:
    """[0, n) cut into consecutive ranges of `width` (the last may be shorter)."""
    return [(lo, min(n, lo + width)) for lo in range(0, n, width)]


def _cost(flops: float, moved: float) -> float:
    return max(flops / EST_FLOPS, moved / EST_BYTES) + EST_OVERHEAD


def build_step_graph(model, optimizer=None, block_tokens: int | None = None, accumulate: bool = False,
                     with_update: bool = True, channel_block: int = DEFAULT_CHANNEL_BLOCK,
                     param_block: int = DEFAULT_PARAM_BLOCK, inputs: np.ndarray | None = None,
                     targets: np.ndarray | None = None, context: StepContext | None = None,
                     leading_update: bool = False, grad_norm_at_end: bool = False, gemm_split: str = "rows",
                     gemm_channel_block: int = DEFAULT_GEMM_CHANNEL_BLOCK) -> StepGraph:
    """The task graph of one micro-step of `model` (a GPT2 with buffers for B x T tokens): forward with loss,
    backward (gradients written, or added to when `accumulate`), and when `with_update` the AdamW step of
    `optimizer`. Token ids are read from `inputs`/`targets` ((B, T) int32 arrays, allocated if None).

    Overlapping steps (`--overlap-steps`): with `leading_update` the graph starts with the AdamW tasks of the
    previous step (its gradients, complete, are graph inputs; `context` then holds that step's learning rate and
    bias corrections), so the forward tasks of layer l wait only for the update of the parameters they read
    (RAW) and the backward's gradient writes wait for the update's reads (WAR): the forward of layer 0 runs
    while later layers are still updating. `grad_norm_at_end` adds the gradient-norm task (clipping) after the
    backward without the update, which then runs in the next step's graph.

    `gemm_split` (GEMM_SPLITS) cuts the forward and input-gradient GEMMs per token block ("rows") or per block
    of `gemm_channel_block` output columns over all token rows (the lm_head only, or every GEMM): a column
    block of out = inp @ W.T reads all of inp and rows of W; a column block of dinp = dout @ W reads all of
    dout and columns of W. The token-row tasks after such a GEMM wait for all its column blocks."""
    cfg = model.config
    B, T = model.B, model.T
    K = T if block_tokens is None else int(block_tokens)
    if K < 1 or T % K != 0:
        raise ValueError(f"--block-tokens {K} must divide the sequence length T={T}")
    if with_update and optimizer is None:
        raise ValueError("an update needs the optimizer")
    if channel_block % 64 != 0 or channel_block <= 0:
        raise ValueError(f"channel block {channel_block} must be a positive multiple of 64")
    if gemm_split not in GEMM_SPLITS:
        raise ValueError(f"unknown GEMM split {gemm_split!r}; choose one of {', '.join(GEMM_SPLITS)}")
    if gemm_channel_block % 64 != 0 or gemm_channel_block <= 0:
        raise ValueError(f"GEMM channel block {gemm_channel_block} must be a positive multiple of 64")
    split_lm_head = gemm_split in ("lm_head", "channels")
    split_layers = gemm_split == "channels"
    kern = KernelSet(parallel=False)
    L, NH, C, Vp, V = cfg.num_layers, cfg.num_heads, cfg.channels, cfg.padded_vocab_size, cfg.vocab_size
    maxT = cfg.max_seq_len
    N = B * T
    J = T // K
    p, a = model.params, model.acts
    g, d = model.grads, model.grad_acts
    inputs = np.zeros((B, T), dtype=np.int32) if inputs is None else inputs
    targets = np.zeros((B, T), dtype=np.int32) if targets is None else targets
    context = context or StepContext()
    tok_in, tok_tg = inputs.reshape(-1), targets.reshape(-1)

    # ------------------------------------------------------------------ regions
    def layered(kind: str, name: str, layer: int | None) -> str:
        return f"{kind}.{name}" if layer is None else f"{kind}.{name}.{layer}"

    def rows_region(kind, name, layer, b, t0, t1, width):
        """Token rows [t0, t1) of sequence b of a (B, T, width) tensor."""
        return Region(layered(kind, name, layer), ((b, b + 1), (t0, t1), (0, width)))

    def stat_region(kind, name, layer, b, t0, t1):
        return Region(layered(kind, name, layer), ((b, b + 1), (t0, t1)))

    def all_rows(kind, name, layer, width, c0=0, c1=None):
        return Region(layered(kind, name, layer), ((0, B), (0, T), (c0, width if c1 is None else c1)))

    def all_stats(kind, name, layer):
        return Region(layered(kind, name, layer), ((0, B), (0, T)))

    def param(kind, name, layer=None, lo=None, hi=None):
        return _param_region(model, kind, name, layer, lo, hi)

    def att_region(kind, name, layer, b, t0, t1):
        return Region(layered(kind, name, layer), ((b, b + 1), (0, NH), (t0, t1), (0, T)))

    # Graph inputs: the parameters, the optimizer moments, the tokens; with accumulate, the gradients too.
    graph_inputs = [Region("tokens.inputs", ((0, B), (0, T))), Region("tokens.targets", ((0, B), (0, T)))]
    graph_inputs += _parameter_inputs(model, ("p", "m", "v") + (("g",) if accumulate or leading_update else ()))
    if leading_update:
        graph_inputs.append(GRAD_NORM_REGION)  # the previous step's gradient norm (clipping)
    graph = TaskGraph(graph_inputs)
    step_graph = StepGraph(graph, inputs, targets, context, K, accumulate, with_update)

    def add(name, kernel, fn, args, reads, writes, layer=-1, block=(), phase="forward", cost_args=None):
        flops, moved = kernel_cost(kernel, args if cost_args is None else cost_args)
        return graph.add(Task(name, kernel, fn, tuple(args), tuple(reads), tuple(writes), layer, tuple(block), phase,
                              _cost(flops, moved), flops, moved))

    if leading_update:
        if optimizer is None:
            raise ValueError("a leading update needs the optimizer")
        _add_update_tasks(add, model, optimizer, context, param, param_block, with_norm=False)

    def rows(x):
        return x.reshape(N, -1)

    token_blocks = [(b, j, j * K, (j + 1) * K, b * T + j * K, b * T + (j + 1) * K) for b in range(B) for j in range(J)]

    # ------------------------------------------------------------------ forward
    for b, j, t0, t1, r0, r1 in token_blocks:
        add(f"encoder_forward b{b} j{j}", "encoder_forward", kern.encoder_forward,
            (rows(a.encoded)[r0:r1], tok_in[r0:r1], p.wte, p.wpe, T, r0),
            [Region("tokens.inputs", ((b, b + 1), (t0, t1))), param("p", "wte"), param("p", "wpe")],
            [rows_region("a", "encoded", None, b, t0, t1, C)], block=(b, j))

    def layer_residual(l):
        return (a.encoded, "encoded", None) if l == 0 else (a.residual3[l - 1], "residual3", l - 1)

    def forward_layer(l: int) -> None:
        residual, res_name, res_layer = layer_residual(l)

        def per_block(kernel, label, fn, make_args, reads, writes):
            for b, j, t0, t1, r0, r1 in token_blocks:
                add(f"{kernel}{label} l{l} b{b} j{j}", kernel, fn, make_args(b, j, t0, t1, r0, r1),
                    reads(b, t0, t1), writes(b, t0, t1), layer=l, block=(b, j))

        def layernorm(label, out, mean, rstd, inp, inp_name, inp_layer, w_name, b_name):
            per_block("layernorm_forward", label, kern.layernorm_forward,
                      lambda b, j, t0, t1, r0, r1: (rows(out[l])[r0:r1], mean[l].reshape(-1)[r0:r1],
                                                    rstd[l].reshape(-1)[r0:r1], rows(inp)[r0:r1], p[w_name][l],
                                                    p[b_name][l]),
                      lambda b, t0, t1: [rows_region("a", inp_name, inp_layer, b, t0, t1, C),
                                         param("p", w_name, l), param("p", b_name, l)],
                      lambda b, t0, t1: [rows_region("a", label[1:], l, b, t0, t1, C),
                                         stat_region("a", label[1:] + "_mean", l, b, t0, t1),
                                         stat_region("a", label[1:] + "_rstd", l, b, t0, t1)])

        def linear(label, out, out_name, width_out, inp, inp_name, width_in, w_name, b_name):
            if split_layers:  # per block of output columns over all token rows: W[o0:o1] read once
                for o0, o1 in blocks(width_out, gemm_channel_block):
                    add(f"matmul_forward{label} l{l} c{o0}", "matmul_forward", kern.matmul_forward,
                        (rows(out[l])[:, o0:o1], rows(inp[l]), p[w_name][l][o0:o1], p[b_name][l][o0:o1]),
                        [all_rows("a", inp_name, l, width_in), param("p", w_name, l, o0, o1),
                         param("p", b_name, l, o0, o1)],
                        [all_rows("a", out_name, l, width_out, o0, o1)], layer=l, block=(o0, o1))
                return
            per_block("matmul_forward", label, kern.matmul_forward,
                      lambda b, j, t0, t1, r0, r1: (rows(out[l])[r0:r1], rows(inp[l])[r0:r1], p[w_name][l],
                                                    p[b_name][l]),
                      lambda b, t0, t1: [rows_region("a", inp_name, l, b, t0, t1, width_in),
                                         param("p", w_name, l), param("p", b_name, l)],
                      lambda b, t0, t1: [rows_region("a", out_name, l, b, t0, t1, width_out)])

        def add_residual(label, out, out_name, x, x_name, x_layer, y, y_name):
            per_block("residual_forward", label, kern.residual_forward,
                      lambda b, j, t0, t1, r0, r1: (rows(out)[r0:r1].reshape(-1), rows(x)[r0:r1].reshape(-1),
                                                    rows(y)[r0:r1].reshape(-1)),
                      lambda b, t0, t1: [rows_region("a", x_name, x_layer, b, t0, t1, C),
                                         rows_region("a", y_name, l, b, t0, t1, C)],
                      lambda b, t0, t1: [rows_region("a", out_name, l, b, t0, t1, C)])

        layernorm(".ln1", a.ln1, a.ln1_mean, a.ln1_rstd, residual, res_name, res_layer, "ln1w", "ln1b")
        linear(".qkv", a.qkv, "qkv", 3 * C, a.ln1, "ln1", C, "qkvw", "qkvb")
        per_block("attention_forward", "", kern.attention_forward,
                  lambda b, j, t0, t1, r0, r1: (a.atty[l], a.preatt[l], a.att[l], a.qkv[l], NH, b, b + 1, t0, t1),
                  lambda b, t0, t1: [rows_region("a", "qkv", l, b, 0, t1, 3 * C)],
                  lambda b, t0, t1: [rows_region("a", "atty", l, b, t0, t1, C),
                                     att_region("a", "preatt", l, b, t0, t1), att_region("a", "att", l, b, t0, t1)])
        linear(".attproj", a.attproj, "attproj", C, a.atty, "atty", C, "attprojw", "attprojb")
        add_residual(".residual2", a.residual2[l], "residual2", residual, res_name, res_layer, a.attproj[l], "attproj")
        layernorm(".ln2", a.ln2, a.ln2_mean, a.ln2_rstd, a.residual2[l], "residual2", l, "ln2w", "ln2b")
        linear(".fc", a.fch, "fch", 4 * C, a.ln2, "ln2", C, "fcw", "fcb")
        per_block("gelu_forward", "", kern.gelu_forward,
                  lambda b, j, t0, t1, r0, r1: (rows(a.fch_gelu[l])[r0:r1].reshape(-1), rows(a.fch[l])[r0:r1].reshape(-1)),
                  lambda b, t0, t1: [rows_region("a", "fch", l, b, t0, t1, 4 * C)],
                  lambda b, t0, t1: [rows_region("a", "fch_gelu", l, b, t0, t1, 4 * C)])
        linear(".fcproj", a.fcproj, "fcproj", C, a.fch_gelu, "fch_gelu", 4 * C, "fcprojw", "fcprojb")
        add_residual(".residual3", a.residual3[l], "residual3", a.residual2[l], "residual2", l, a.fcproj[l], "fcproj")

    for l in range(L):
        forward_layer(l)

    last = ("residual3", L - 1)
    for b, j, t0, t1, r0, r1 in token_blocks:
        add(f"layernorm_forward.lnf b{b} j{j}", "layernorm_forward", kern.layernorm_forward,
            (rows(a.lnf)[r0:r1], a.lnf_mean.reshape(-1)[r0:r1], a.lnf_rstd.reshape(-1)[r0:r1],
             rows(a.residual3[L - 1])[r0:r1], p.lnfw, p.lnfb),
            [rows_region("a", *last, b, t0, t1, C), param("p", "lnfw"), param("p", "lnfb")],
            [rows_region("a", "lnf", None, b, t0, t1, C), stat_region("a", "lnf_mean", None, b, t0, t1),
             stat_region("a", "lnf_rstd", None, b, t0, t1)], block=(b, j))
        if not split_lm_head:
            add(f"matmul_forward.logits b{b} j{j}", "matmul_forward", kern.matmul_forward,
                (rows(a.logits)[r0:r1], rows(a.lnf)[r0:r1], p.wte, None),
                [rows_region("a", "lnf", None, b, t0, t1, C), param("p", "wte")],
                [rows_region("a", "logits", None, b, t0, t1, Vp)], block=(b, j))
    if split_lm_head:  # per block of vocabulary columns over all token rows: each row of wte read once
        for o0, o1 in blocks(Vp, gemm_channel_block):
            add(f"matmul_forward.logits c{o0}", "matmul_forward", kern.matmul_forward,
                (rows(a.logits)[:, o0:o1], rows(a.lnf), p.wte[o0:o1], None),
                [all_rows("a", "lnf", None, C), param("p", "wte", None, o0, o1)],
                [all_rows("a", "logits", None, Vp, o0, o1)], block=(o0, o1))
    for b, j, t0, t1, r0, r1 in token_blocks:
        task = add(f"crossentropy_forward b{b} j{j}", "crossentropy_forward", kern.crossentropy_forward,
                   (rows(a.probs)[r0:r1], a.losses.reshape(-1)[r0:r1], rows(a.logits)[r0:r1], tok_tg[r0:r1], V),
                   [rows_region("a", "logits", None, b, t0, t1, Vp), Region("tokens.targets", ((b, b + 1), (t0, t1)))],
                   [rows_region("a", "probs", None, b, t0, t1, Vp), stat_region("a", "losses", None, b, t0, t1)],
                   block=(b, j))
        step_graph.loss_tasks.append(task.index)

    # ------------------------------------------------------------------ backward
    acc = accumulate
    bwd = "backward"

    def weight_grad(label, layer, weight_name_, bias_name, dout, dout_name, dout_layer, width_out, inp, inp_name,
                    inp_layer, width_in):
        """matmul dW (and db) per block of output channels, reading every token row."""
        lidx = -1 if layer is None else layer
        dweight = g[weight_name_] if layer is None else g[weight_name_][layer]
        dbias = None if bias_name is None else g[bias_name][layer]
        for o0, o1 in blocks(width_out, channel_block):
            writes = [param("g", weight_name_, layer, o0, o1)]
            if bias_name is not None:
                writes.append(param("g", bias_name, layer, o0, o1))
            reads = [all_rows("d", dout_name, dout_layer, width_out, o0, o1), all_rows("a", inp_name, inp_layer, width_in)]
            add(f"matmul_backward_weight{label} l{lidx} c{o0}", "matmul_backward_weight", _matmul_backward_weight,
                (dweight, dbias, rows(dout), rows(inp), acc, o0, o1, None), reads + (writes if acc else []), writes,
                layer=lidx, block=(o0, o1), phase=bwd)

    def layernorm_params(label, layer, w_name, b_name, dout, dout_name, dout_layer, inp, inp_name, inp_layer,
                         mean, rstd, stats_name):
        lidx = -1 if layer is None else layer
        dweight = g[w_name] if layer is None else g[w_name][layer]
        dbias = g[b_name] if layer is None else g[b_name][layer]
        for c0, c1 in blocks(C, channel_block):
            writes = [param("g", w_name, layer, c0, c1), param("g", b_name, layer, c0, c1)]
            reads = [all_rows("d", dout_name, dout_layer, C, c0, c1), all_rows("a", inp_name, inp_layer, C, c0, c1),
                     all_stats("a", stats_name + "_mean", layer), all_stats("a", stats_name + "_rstd", layer)]
            add(f"layernorm_backward_params{label} l{lidx} c{c0}", "layernorm_backward_params",
                kern.layernorm_backward_params, (dweight, dbias, rows(dout), rows(inp), mean, rstd, c0, c1, acc),
                reads + (writes if acc else []), writes, layer=lidx, block=(c0, c1), phase=bwd)

    for b, j, t0, t1, r0, r1 in token_blocks:
        add(f"crossentropy_backward b{b} j{j}", "crossentropy_backward", kern.crossentropy_backward,
            (rows(d.logits)[r0:r1], rows(a.probs)[r0:r1], tok_tg[r0:r1], 1.0 / N, V),
            [rows_region("a", "probs", None, b, t0, t1, Vp), Region("tokens.targets", ((b, b + 1), (t0, t1)))],
            [rows_region("d", "logits", None, b, t0, t1, Vp)], block=(b, j), phase=bwd)
        if not split_lm_head:
            add(f"matmul_backward_input.logits b{b} j{j}", "matmul_backward_input", kern.matmul_backward_input,
                (rows(d.lnf)[r0:r1], rows(d.logits)[r0:r1], p.wte),
                [rows_region("d", "logits", None, b, t0, t1, Vp), param("p", "wte")],
                [rows_region("d", "lnf", None, b, t0, t1, C)], block=(b, j), phase=bwd)
    if split_lm_head:  # dlnf[:, c0:c1] = dlogits @ wte[:, c0:c1]: all of dlogits, columns of wte
        for c0, c1 in blocks(C, gemm_channel_block):
            add(f"matmul_backward_input.logits c{c0}", "matmul_backward_input", kern.matmul_backward_input,
                (rows(d.lnf)[:, c0:c1], rows(d.logits), p.wte[:, c0:c1]),
                [all_rows("d", "logits", None, Vp), Region("p.wte", ((0, Vp), (c0, c1)))],
                [all_rows("d", "lnf", None, C, c0, c1)], block=(c0, c1), phase=bwd)
    weight_grad(".logits", None, "wte", None, d.logits, "logits", None, Vp, a.lnf, "lnf", None, C)
    for b, j, t0, t1, r0, r1 in token_blocks:
        add(f"layernorm_backward_input.lnf b{b} j{j}", "layernorm_backward_input", kern.layernorm_backward_input,
            (rows(d.residual3[L - 1])[r0:r1], rows(d.lnf)[r0:r1], rows(a.residual3[L - 1])[r0:r1], p.lnfw,
             a.lnf_mean.reshape(-1)[r0:r1], a.lnf_rstd.reshape(-1)[r0:r1], False),
            [rows_region("d", "lnf", None, b, t0, t1, C), rows_region("a", *last, b, t0, t1, C), param("p", "lnfw"),
             stat_region("a", "lnf_mean", None, b, t0, t1), stat_region("a", "lnf_rstd", None, b, t0, t1)],
            [rows_region("d", *last, b, t0, t1, C)], block=(b, j), phase=bwd)
    layernorm_params(".lnf", None, "lnfw", "lnfb", d.lnf, "lnf", None, a.residual3[L - 1], *last,
                     a.lnf_mean.reshape(-1), a.lnf_rstd.reshape(-1), "lnf")

    def backward_layer(l: int) -> None:
        residual, res_name, res_layer = layer_residual(l)
        dresidual = d.encoded if l == 0 else d.residual3[l - 1]

        def per_block(kernel, label, fn, make_args, reads, writes):
            for b, j, t0, t1, r0, r1 in token_blocks:
                add(f"{kernel}{label} l{l} b{b} j{j}", kernel, fn, make_args(b, j, t0, t1, r0, r1),
                    reads(b, t0, t1), writes(b, t0, t1), layer=l, block=(b, j), phase=bwd)

        def split_residual(label, da, da_name, da_layer, db, db_name, dout, dout_name, dout_layer):
            per_block("residual_backward", label, kern.residual_backward,
                      lambda b, j, t0, t1, r0, r1: (rows(da)[r0:r1].reshape(-1), rows(db)[r0:r1].reshape(-1),
                                                    rows(dout)[r0:r1].reshape(-1)),
                      lambda b, t0, t1: [rows_region("d", dout_name, dout_layer, b, t0, t1, C)],
                      lambda b, t0, t1: [rows_region("d", da_name, da_layer, b, t0, t1, C),
                                         rows_region("d", db_name, l, b, t0, t1, C)])

        def input_grad(label, dinp, dinp_name, width_in, dout, dout_name, width_out, weight, weight_name_):
            if split_layers:  # dinp[:, c0:c1] = dout @ W[:, c0:c1]: all of dout, columns of W
                for c0, c1 in blocks(width_in, gemm_channel_block):
                    add(f"matmul_backward_input{label} l{l} c{c0}", "matmul_backward_input",
                        kern.matmul_backward_input, (rows(dinp[l])[:, c0:c1], rows(dout[l]), weight[l][:, c0:c1]),
                        [all_rows("d", dout_name, l, width_out),
                         Region(f"p.{weight_name_}.{l}", ((0, width_out), (c0, c1)))],
                        [all_rows("d", dinp_name, l, width_in, c0, c1)], layer=l, block=(c0, c1), phase=bwd)
                return
            per_block("matmul_backward_input", label, kern.matmul_backward_input,
                      lambda b, j, t0, t1, r0, r1: (rows(dinp[l])[r0:r1], rows(dout[l])[r0:r1], weight[l]),
                      lambda b, t0, t1: [rows_region("d", dout_name, l, b, t0, t1, width_out),
                                         param("p", weight_name_, l)],
                      lambda b, t0, t1: [rows_region("d", dinp_name, l, b, t0, t1, width_in)])

        def layernorm_input(label, dinp, dinp_name, dinp_layer, dout, dout_name, inp, inp_name, inp_layer, weight_name_,
                            mean, rstd, stats_name):
            per_block("layernorm_backward_input", label, kern.layernorm_backward_input,
                      lambda b, j, t0, t1, r0, r1: (rows(dinp)[r0:r1], rows(dout)[r0:r1], rows(inp)[r0:r1],
                                                    p[weight_name_][l], mean[r0:r1], rstd[r0:r1], True),
                      lambda b, t0, t1: [rows_region("d", dout_name, l, b, t0, t1, C),
                                         rows_region("a", inp_name, inp_layer, b, t0, t1, C),
                                         param("p", weight_name_, l),
                                         stat_region("a", stats_name + "_mean", l, b, t0, t1),
                                         stat_region("a", stats_name + "_rstd", l, b, t0, t1),
                                         rows_region("d", dinp_name, dinp_layer, b, t0, t1, C)],
                      lambda b, t0, t1: [rows_region("d", dinp_name, dinp_layer, b, t0, t1, C)])

        ln2_mean, ln2_rstd = a.ln2_mean[l].reshape(-1), a.ln2_rstd[l].reshape(-1)
        ln1_mean, ln1_rstd = a.ln1_mean[l].reshape(-1), a.ln1_rstd[l].reshape(-1)
        split_residual(".residual3", d.residual2[l], "residual2", l, d.fcproj[l], "fcproj", d.residual3[l],
                       "residual3", l)
        input_grad(".fcproj", d.fch_gelu, "fch_gelu", 4 * C, d.fcproj, "fcproj", C, p.fcprojw, "fcprojw")
        weight_grad(".fcproj", l, "fcprojw", "fcprojb", d.fcproj[l], "fcproj", l, C, a.fch_gelu[l], "fch_gelu", l, 4 * C)
        per_block("gelu_backward", "", kern.gelu_backward,
                  lambda b, j, t0, t1, r0, r1: (rows(d.fch[l])[r0:r1].reshape(-1), rows(a.fch[l])[r0:r1].reshape(-1),
                                                rows(d.fch_gelu[l])[r0:r1].reshape(-1)),
                  lambda b, t0, t1: [rows_region("a", "fch", l, b, t0, t1, 4 * C),
                                     rows_region("d", "fch_gelu", l, b, t0, t1, 4 * C)],
                  lambda b, t0, t1: [rows_region("d", "fch", l, b, t0, t1, 4 * C)])
        input_grad(".fc", d.ln2, "ln2", C, d.fch, "fch", 4 * C, p.fcw, "fcw")
        weight_grad(".fc", l, "fcw", "fcb", d.fch[l], "fch", l, 4 * C, a.ln2[l], "ln2", l, C)
        layernorm_input(".ln2", d.residual2[l], "residual2", l, d.ln2[l], "ln2", a.residual2[l], "residual2", l,
                        "ln2w", ln2_mean, ln2_rstd, "ln2")
        layernorm_params(".ln2", l, "ln2w", "ln2b", d.ln2[l], "ln2", l, a.residual2[l], "residual2", l, ln2_mean,
                         ln2_rstd, "ln2")
        split_residual(".residual2", dresidual, res_name, res_layer, d.attproj[l], "attproj", d.residual2[l],
                       "residual2", l)
        input_grad(".attproj", d.atty, "atty", C, d.attproj, "attproj", C, p.attprojw, "attprojw")
        weight_grad(".attproj", l, "attprojw", "attprojb", d.attproj[l], "attproj", l, C, a.atty[l], "atty", l, C)
        for b in range(B):
            for j in range(J):  # in order: each block adds to the key/value rows of the blocks before it
                t0, t1 = j * K, (j + 1) * K
                first = j == 0  # accumulate=False: zeroes the sequence's dqkv rows 0..T first
                dqkv = rows_region("d", "qkv", l, b, 0, T if first else t1, 3 * C)
                reads = [rows_region("d", "atty", l, b, t0, t1, C), rows_region("a", "qkv", l, b, 0, t1, 3 * C),
                         att_region("a", "att", l, b, t0, t1)] + ([] if first else [dqkv])
                add(f"attention_backward l{l} b{b} j{j}", "attention_backward", kern.attention_backward,
                    (d.qkv[l], d.preatt[l], d.att[l], d.atty[l], a.qkv[l], a.att[l], NH, b, b + 1, t0, t1, not first),
                    reads, [dqkv, att_region("d", "preatt", l, b, t0, t1), att_region("d", "att", l, b, t0, t1)],
                    layer=l, block=(b, j), phase=bwd)
        input_grad(".qkv", d.ln1, "ln1", C, d.qkv, "qkv", 3 * C, p.qkvw, "qkvw")
        weight_grad(".qkv", l, "qkvw", "qkvb", d.qkv[l], "qkv", l, 3 * C, a.ln1[l], "ln1", l, C)
        layernorm_input(".ln1", dresidual, res_name, res_layer, d.ln1[l], "ln1", residual, res_name, res_layer,
                        "ln1w", ln1_mean, ln1_rstd, "ln1")
        layernorm_params(".ln1", l, "ln1w", "ln1b", d.ln1[l], "ln1", l, residual, res_name, res_layer, ln1_mean,
                         ln1_rstd, "ln1")

    for l in reversed(range(L)):
        backward_layer(l)

    for c0, c1 in blocks(C, channel_block):
        wte_cols = Region("g.wte", ((0, Vp), (c0, c1)))
        wpe_cols = Region("g.wpe", ((0, maxT), (c0, c1)))
        add(f"encoder_backward c{c0}", "encoder_backward", kern.encoder_backward,
            (g.wte, g.wpe, rows(d.encoded), tok_in, T, c0, c1, acc),
            [all_rows("d", "encoded", None, C, c0, c1), Region("tokens.inputs", ((0, B), (0, T))), wte_cols]
            + ([wpe_cols] if acc else []), [wte_cols, wpe_cols], block=(c0, c1), phase=bwd)

    if with_update:
        _add_update_tasks(add, model, optimizer, context, param, param_block)
    elif grad_norm_at_end and optimizer is not None and optimizer.config.grad_clip > 0.0:
        _add_grad_norm_task(add, model, context, param)
    graph.validate()
    return step_graph


GRAD_NORM_REGION = Region("update.grad_norm", ())


def _param_region(model, kind: str, name: str, layer: int | None = None, lo: int | None = None,
                  hi: int | None = None) -> Region:
    """A parameter-shaped tensor (kind p, g, m, v) of one layer, rows [lo, hi) (default all)."""
    shape = model.params.shapes[name]
    shape = shape[1:] if layer is not None else shape
    first = (0 if lo is None else lo, shape[0] if hi is None else hi)
    tensor = f"{kind}.{name}" if layer is None else f"{kind}.{name}.{layer}"
    return Region(tensor, (first,) + tuple((0, s) for s in shape[1:]))


def _parameter_inputs(model, kinds) -> list[Region]:
    """Every parameter-shaped tensor of the given kinds, whole, as graph inputs."""
    return [_param_region(model, kind, name, layer) for kind in kinds for name in model.params.shapes
            for layer in _layers(name, model.config.num_layers)]


def build_update_graph(model, optimizer, context: StepContext, param_block: int = DEFAULT_PARAM_BLOCK) -> TaskGraph:
    """The AdamW tasks alone, reading the gradients and norm already computed (the update still pending
    after the last step of an --overlap-steps run: `TaskExecution.synchronize`)."""
    graph = TaskGraph(_parameter_inputs(model, ("p", "g", "m", "v")) + [GRAD_NORM_REGION])

    def add(name, kernel, fn, args, reads, writes, layer=-1, block=(), phase="forward", cost_args=None):
        flops, moved = kernel_cost(kernel, args if cost_args is None else cost_args)
        return graph.add(Task(name, kernel, fn, tuple(args), tuple(reads), tuple(writes), layer, tuple(block), phase,
                              _cost(flops, moved), flops, moved))

    _add_update_tasks(add, model, optimizer, context, lambda *a: _param_region(model, *a), param_block,
                      with_norm=False)
    graph.validate()
    return graph


def _add_grad_norm_task(add, model, context: StepContext, param) -> None:
    """The squared global gradient norm into context.grad_norm_sq (read by the AdamW tasks when clipping)."""
    kern = KernelSet(parallel=False)

    def grad_norm_sq(flat):
        context.grad_norm_sq = kern.sum_of_squares(flat)

    L = model.config.num_layers
    reads = [param("g", name, layer) for name in model.params for layer in _layers(name, L)]
    add("sum_of_squares.grads", "sum_of_squares", grad_norm_sq, (model.grads.flat,), reads, [GRAD_NORM_REGION],
        phase="update")


def _add_update_tasks(add, model, optimizer, context: StepContext, param, param_block: int,
                      with_norm: bool = True) -> None:
    """AdamW per block of whole rows of each layer's parameter tensors (after the norm task when clipping;
    `with_norm` False: the norm was computed by an earlier graph)."""
    cfg = optimizer.config
    kern = KernelSet(parallel=False)
    L = model.config.num_layers
    p, g, m, v = model.params, model.grads, optimizer.m, optimizer.v
    norm_region = GRAD_NORM_REGION
    if cfg.grad_clip > 0.0 and with_norm:
        _add_grad_norm_task(add, model, context, param)
    for name in p:
        decay = cfg.weight_decay if (not cfg.decay_matrices_only or name in MATRIX_PARAMETERS) else 0.0
        for layer in _layers(name, L):
            tensors = [x[name] if layer is None else x[name][layer] for x in (p, g, m, v)]
            shape = tensors[0].shape
            row_size = math.prod(shape[1:])
            rows_per_block = max(1, param_block // row_size)
            for lo, hi in blocks(shape[0], rows_per_block):
                views = [t[lo:hi].reshape(-1) for t in tensors]
                regions = {kind: param(kind, name, layer, lo, hi) for kind in ("p", "g", "m", "v")}
                reads = list(regions.values()) + ([norm_region] if cfg.grad_clip > 0.0 else [])
                writes = [regions["p"], regions["m"], regions["v"]]
                lidx = -1 if layer is None else layer
                add(f"adamw_update.{name} l{lidx} r{lo}", "adamw_update", _adamw_task(kern, views, decay, context, cfg),
                    (), reads, writes, layer=lidx, block=(lo, hi), phase="update", cost_args=tuple(views))


def _layers(name: str, num_layers: int):
    return [None] if name in ("wte", "wpe", "lnfw", "lnfb") else range(num_layers)


def _adamw_task(kern, views, decay, context: StepContext, cfg):
    params, grads, m, v = views
    update = kern.adamw_update

    def run():
        scale = context.grad_scale
        if cfg.grad_clip > 0.0:
            norm = math.sqrt(context.grad_norm_sq) * context.grad_scale
            if norm > cfg.grad_clip:
                scale *= cfg.grad_clip / norm
        update(params, grads, m, v, context.learning_rate, cfg.beta1, cfg.beta2, cfg.eps, decay,
               context.bias_correction1, context.bias_correction2, scale)

    return run
