"""The task graph of a step, derived from the model's and the optimizer's list of kernel calls.

Each call is cut by its kernel's split rule (llmpy.kernels.specs) into blocks, each block a task:
- token-wise kernels per sequence b and block j of K tokens (rows b*T + j*K .. + K);
- attention per sequence b and query block j: it reads the qkv rows 0 .. (j+1)K of that sequence only, so it
  waits for the qkv blocks 0..j; its backward blocks of a sequence run j = 0, 1, ... (each adds to the rows of
  the blocks before it; block 0 zeroes the sequence's dqkv);
- weight gradients (matmul dW and db, layernorm dw and db, the embeddings) per block of output channels over
  every token;
- the forward and input-gradient GEMMs per token block (`gemm_split="rows"`) or per block of output columns over
  all token rows (the lm_head only, or every GEMM): a column block reads a slice of the weight once;
- AdamW per block of whole rows of each layer's parameter tensors.
What each task reads and writes is derived from its call's views, and the edges from `DependencyTracker`.
"""

from __future__ import annotations

import math

from llmpy.core.step import GradientsReady, KernelCall, kernel_calls
from llmpy.execution.options import TaskOptions
from llmpy.execution.tasks.graph import Region, Task, TaskGraph
from llmpy.execution.tasks.regions import TensorRegistry
from llmpy.kernels.costs import kernel_cost
from llmpy.kernels.specs import R, RW, W, kernel_spec

# Cost estimate of a task for the critical-path priority (one core): GEMM-ish rate, memory rate, overhead.
EST_FLOPS = 30e9
EST_BYTES = 8e9
EST_OVERHEAD = 10e-6


def blocks(n: int, width: int) -> list[tuple[int, int]]:
    """[0, n) cut into consecutive ranges of `width` (the last may be shorter)."""
    return [(lo, min(n, lo + width)) for lo in range(0, n, width)]


def task_cost(flops: float, moved: float) -> float:
    return max(flops / EST_FLOPS, moved / EST_BYTES) + EST_OVERHEAD


class GraphBuilder:
    """Adds the tasks of kernel calls on `model`'s buffers (its whole B x T batch) to a graph, in call order, cut
    as `options` say with `block_tokens` tokens per block of a sequence."""

    def __init__(self, graph: TaskGraph, tensors: TensorRegistry, model, options: TaskOptions, block_tokens: int,
                 communication=None):
        """communication(part) -> [GraphWork]: the tasks added where the step's list marks a group of gradients
        final (GradientsReady): a data-parallel strategy's collectives and update of that group (None: markers
        are left out)."""
        self.graph, self.tensors, self.options, self.block_tokens = graph, tensors, options, block_tokens
        self.communication = communication
        self.B, self.T = model.B, model.T
        self.segments = parameter_segments(model.params)  # for the AdamW blocks
        self.flat_base = model.params.flat.__array_interface__["data"][0]

    def add_calls(self, calls) -> None:
        for call in calls:
            if isinstance(call, GradientsReady) and self.communication is not None:
                self.add_works(self.communication(call.part))
                continue
            for call in kernel_calls([call]):
                for label, layer, suffix, block, args, owner in self._blocks(call):
                    self._add(call, label, layer, suffix, block, args, owner)

    def add_works(self, works) -> list[Task]:
        """A strategy's GraphWork as tasks: edges from the views they read and write, priority from their estimate
        (llmpy.execution.deferred)."""
        return [self.graph.add(Task(w.name, w.kernel, w.fn, w.args, self._regions(w.reads), self._regions(w.writes),
                                    w.layer, (), w.phase, w.seconds)) for w in works]

    def _regions(self, views) -> tuple[Region, ...]:
        return tuple(region for view in views for region in self.tensors.regions(view))

    def add_parameter_wait(self, name: str, fn, args: tuple, views) -> Task:
        """A task that 'writes' the parameters in `views` (the tasks reading them wait for it) and waits for the
        collectives bringing them in."""
        return self.graph.add(Task(name, name.split(" ")[0], fn, args, (), self._regions(views), -1, (), "forward"))

    def _add(self, call: KernelCall, label: str, layer: int, suffix: str, block: tuple, args: tuple,
             owner: bool) -> Task:
        reads, writes = [], []
        for mode, view in kernel_spec(call.kernel).accesses(*args):
            regions = self.tensors.regions(view)
            if mode in (R, RW):
                reads += regions
            if mode in (W, RW):
                writes += regions
        flops, moved = kernel_cost(call.kernel, args)
        # a task owning a block of a named parameter tensor names its layer, -1 (outside the blocks) too
        name = f"{call.kernel}.{label}" if label else call.kernel
        name += ("" if layer < 0 and not (owner and label) else f" l{layer}") + suffix
        return self.graph.add(Task(name, call.kernel, call.fn, args, tuple(reads), tuple(writes), layer, block,
                                   call.phase, task_cost(flops, moved), flops, moved))

    def _blocks(self, call: KernelCall) -> list[tuple]:
        """(label, layer, name suffix, block, arguments, owns a parameter block) of each task of `call`, in the
        order they must run."""
        splits = kernel_spec(call.kernel).splits
        b, K = self.options, self.block_tokens
        args, named = call.args, (call.label, call.layer)
        if "columns" in splits and self._by_columns(call):
            return [(*named, f" c{c0}", (c0, c1), splits["columns"](args, c0, c1), False)
                    for c0, c1 in blocks(args[0].shape[1], b.gemm_channel_block)]
        token_blocks = [(s, j) for s in range(self.B) for j in range(self.T // K)]
        if "rows" in splits:
            N = self.B * self.T
            return [(*named, f" b{s} j{j}", (s, j), splits["rows"](args, N, s * self.T + j * K, s * self.T + (j + 1) * K),
                     False) for s, j in token_blocks]
        if "queries" in splits:
            return [(*named, f" b{s} j{j}", (s, j), splits["queries"](args, s, j * K, (j + 1) * K, j), False)
                    for s, j in token_blocks]
        if "channels" in splits:
            lo, hi = splits["channels"].extent(args)
            return [(*named, f" c{c0}", (c0, c1), splits["channels"](args, c0, c1), True)
                    for c0, c1 in blocks(hi - lo, b.channel_block)]
        if "elements" in splits:
            return self._parameter_blocks(call, splits["elements"])
        return [(*named, "", (), args, False)]

    def _by_columns(self, call: KernelCall) -> bool:
        split = self.options.gemm_split
        return split == "channels" or (split == "lm_head" and call.layer < 0)

    def _parameter_blocks(self, call: KernelCall, rule) -> list[tuple]:
        """AdamW on a range of the flat parameters: blocks of whole rows of each (tensor, layer) inside it, each
        labelled with its tensor and layer."""
        params = call.args[0]
        start = (params.__array_interface__["data"][0] - self.flat_base) // params.itemsize
        stop = start + params.size
        out = []
        for name, layer, seg_start, seg_stop, row_size in self.segments:
            if seg_start < start or seg_stop > stop:
                continue
            per_block = max(1, self.options.param_block // row_size)
            for lo, hi in blocks((seg_stop - seg_start) // row_size, per_block):
                a, z = seg_start - start + lo * row_size, seg_start - start + hi * row_size
                out.append((name, layer, f" r{lo}", (lo, hi), rule(call.args, a, z), True))
        return out


def parameter_segments(params) -> list[tuple[str, int, int, int, int]]:
    """(tensor, layer or -1, start, stop, row size) of each layer's slice of each parameter tensor."""
    out = []
    for name, shape in params.shapes.items():
        offset = params.offsets[name]
        layered = name not in ("wte", "wpe", "lnfw", "lnfb")
        per_layer = shape[1:] if layered else shape
        size = math.prod(per_layer)
        row_size = math.prod(per_layer[1:])
        for layer in range(shape[0] if layered else 1):
            out.append((name, layer if layered else -1, offset + layer * size, offset + (layer + 1) * size, row_size))
    return out


def whole_regions(tensors: TensorRegistry, kinds) -> list[Region]:
    return [tensors.whole(name) for kind in kinds for name in tensors.names(kind)]
