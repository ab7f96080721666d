"""Running the step as task graphs: one graph per kind of micro-step, built from the model's and the optimizer's
kernel calls (llmpy.execution.tasks.builder), run by N worker threads of a runtime (llmpy's scheduler or Dask's).

The kernels are the serial (nogil) numba variants and 1-thread BLAS GEMMs. AdamW runs per block of each layer's
parameters as soon as that block's gradient is complete and the step's forward and backward have finished
reading it. With `overlap_steps` (the study's taskiter idea) a step's AdamW tasks go instead at the head of the
next step's graph, so the next forward of layer l waits only for the update of the parameters it reads while
later layers are still updating; each step's update applies its own scalars, and `synchronize` runs an update
still pending before the parameters are read from outside a step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from llmpy.core.layout import FlatBuffer
from llmpy.core.step import GradientsReady
from llmpy.execution.options import TaskOptions
from llmpy.execution.tasks.builder import GraphBuilder, whole_regions
from llmpy.execution.tasks.graph import TaskGraph
from llmpy.execution.tasks.regions import TensorRegistry
from llmpy.kernels import KernelSet


# a worker's wait in a rank's graph when no task is ready and only collectives in flight (Completions) are
# pending: recorded as an MPI event (communication, waiting), like the time a sequential rank spends in MPI_Waitall
IDLE_WAIT = "MPI_Wait_idle"


@dataclass
class StepGraph:
    """A built graph plus the (B, T) token buffers its tasks read (the model's)."""

    graph: TaskGraph
    inputs: np.ndarray
    targets: np.ndarray
    block_tokens: int


def tensor_registry(model, optimizer=None) -> TensorRegistry:
    """Every tensor a step's calls touch, by name: p (parameters), g, a (activations), d (their gradients),
    m, v (AdamW moments), the token ids and the gradient norm."""
    tensors = TensorRegistry()
    tensors.add("tokens.inputs", model.inputs.reshape(model.B, model.T))
    tensors.add("tokens.targets", model.targets.reshape(model.B, model.T))
    for kind, buffer in (("p", model.params), ("g", model.grads), ("a", model.acts), ("d", model.grad_acts)):
        tensors.add_buffer(kind, buffer)
    if optimizer is not None:
        tensors.add("update.grad_norm", optimizer.grad_norm_sq)
        for name, array in getattr(optimizer, "graph_tensors", dict)().items():  # a strategy's ordering tokens
            tensors.add(name, array)
        if isinstance(getattr(optimizer, "m", None), FlatBuffer):  # a data-parallel strategy holds shards
            tensors.add_buffer("m", optimizer.m)
            tensors.add_buffer("v", optimizer.v)
    return tensors


def build_step_graph(model, optimizer=None, block_tokens: int | None = None, accumulate: bool = False,
                     with_update: bool = True, leading_update: bool = False, grad_norm_at_end: bool = False,
                     gemm_split: str = "rows", gemm_channel_block: int | None = None,
                     options: TaskOptions | None = None, communication=None, parameter_waits=(),
                     closing=()) -> StepGraph:
    """The task graph of one micro-step of `model` (a GPT2 with buffers for B x T tokens): forward with loss,
    backward (gradients written, or added to when `accumulate`), and when `with_update` the AdamW step of
    `optimizer`. With `leading_update` the graph starts with the previous step's AdamW tasks (its gradients are
    graph inputs), so the forward tasks of layer l wait only for the update of what they read (RAW) and the
    backward's gradient writes for the update's reads (WAR). `grad_norm_at_end` adds the gradient-norm task
    (clipping) without the update, which then runs in the next step's graph. `communication`: see GraphBuilder
    (a data-parallel strategy's collectives and update as tasks of the backward); `closing`: the strategy's
    GraphWork after the backward (the gradient norm and the updates when it clips); `parameter_waits`: (name, fn,
    args, parameter views) of tasks that head the graph and 'write' those parameters, so the forward tasks
    reading them wait for them (a strategy's parameter collectives still in flight from the last update)."""
    if options is None:
        extra = {} if gemm_channel_block is None else {"gemm_channel_block": gemm_channel_block}
        options = TaskOptions(block_tokens=block_tokens, gemm_split=gemm_split, **extra)
    if (with_update or leading_update) and optimizer is None:
        raise ValueError("an update needs the optimizer")
    B, T = model.B, model.T
    K = options.tokens_per_block(T)
    kinds = ["tokens", "p"] + (["m", "v"] if optimizer is not None else []) + (
        ["g"] if accumulate or leading_update else []) + (["update"] if leading_update else [])
    graph, builder = _graph_builder(model, optimizer, options, K, kinds, communication)
    if leading_update:
        builder.add_calls(optimizer.update_calls(model.params, model.grads))
    for wait in parameter_waits:
        builder.add_parameter_wait(*wait)
    serial = KernelSet(parallel=False)  # workers run serial kernels, whatever the model's own variant
    builder.add_calls(model.forward_calls(B, T, kernels=serial))
    builder.add_calls(model.backward_calls(B, T, accumulate, kernels=serial))
    builder.add_works(closing)
    norm = [optimizer.grad_norm_call(model.grads.flat)] if optimizer is not None and optimizer.clips else []
    if with_update:
        builder.add_calls(norm + optimizer.update_calls(model.params, model.grads))
    elif grad_norm_at_end:
        builder.add_calls(norm)
    graph.validate()
    return StepGraph(graph, model.inputs.reshape(B, T), model.targets.reshape(B, T), K)


def build_update_graph(model, optimizer, options: TaskOptions) -> TaskGraph:
    """The AdamW tasks alone, reading the gradients and norm already computed (the update still pending after the
    last step of an overlap_steps run: `TaskExecution.synchronize`)."""
    graph, builder = _graph_builder(model, optimizer, options, model.T, ("p", "g", "m", "v", "update"))
    builder.add_calls(optimizer.update_calls(model.params, model.grads))
    graph.validate()
    return graph


def _graph_builder(model, optimizer, options: TaskOptions, block_tokens: int, input_kinds,
                   communication=None) -> tuple:
    """An empty graph whose inputs are the whole tensors of `input_kinds`, and the builder that adds to it."""
    tensors = tensor_registry(model, optimizer)
    graph = TaskGraph(whole_regions(tensors, input_kinds))
    return graph, GraphBuilder(graph, tensors, model, options, block_tokens, communication)


def _progressing(log, progress):
    def on_done(index: int, worker: int, start: float, end: float) -> None:
        if log is not None:
            log(index, worker, start, end)
        progress()

    return on_done


class _TaskLog(list):
    """(task index, worker, start, end) of each task run, appended from the workers."""

    def append_entry(self, index: int, worker: int, start: float, end: float) -> None:
        self.append((index, worker, start, end))


class TaskExecution:
    """The work of the `tasks` execution model: graphs per (model, kind of micro-step), a runtime, and the step
    function that runs them and records every task."""

    def __init__(self, workers: int, options: TaskOptions):
        from llmpy.execution.tasks.runtime import make_runtime

        self.options = options
        self.runtime = make_runtime(options.runtime, workers)
        self._graphs: dict[tuple, StepGraph] = {}
        self._update_graphs: dict[tuple, TaskGraph] = {}
        # overlap_steps: the update of the last step, not yet run: (model, optimizer, its AdamWScalars)
        self._pending: tuple | None = None

    def step_graph(self, model, optimizer, accumulate: bool = False, with_update: bool = True,
                   leading_update: bool = False, grad_norm_at_end: bool = False,
                   communication: bool = False) -> StepGraph:
        key = (id(model), id(optimizer), accumulate, with_update, leading_update, grad_norm_at_end, communication)
        if key not in self._graphs:
            # a strategy that leaves its parameter collectives in flight (overlap_steps): the first micro-step's
            # forward waits for them bucket by bucket
            waits = optimizer.parameter_wait_tasks() if (communication and not accumulate and
                                                         getattr(optimizer, "overlap_steps", False)) else ()
            self._graphs[key] = build_step_graph(model, optimizer, accumulate=accumulate, with_update=with_update,
                                                 leading_update=leading_update, grad_norm_at_end=grad_norm_at_end,
                                                 options=self.options,
                                                 communication=optimizer.bucket_tasks if communication else None,
                                                 parameter_waits=waits,
                                                 closing=optimizer.closing_tasks() if communication else ())
        return self._graphs[key]

    def synchronize(self) -> None:
        """Run the update still pending from the last overlap_steps step, so the parameters are the step's
        (before anything reads them from outside the step: validation, sampling, checkpoints, the final save)."""
        if self._pending is None:
            return
        model, optimizer, scalars = self._pending
        key = (id(model), id(optimizer))
        if key not in self._update_graphs:
            self._update_graphs[key] = build_update_graph(model, optimizer, self.options)
        optimizer.scalars = scalars
        self._pending = None
        self.runtime.run(self._update_graphs[key])

    def train_step(self, model, optimizer, batches, learning_rate: float, recorder=None, step: int = 0) -> float:
        """One optimizer step as task graphs, one per micro-batch, the last one with the AdamW tasks (the
        execution model's train_step, run as dataflow). Returns the mean loss."""
        batches = list(batches)
        if self._pending is not None and (self._pending[0] is not model or self._pending[1] is not optimizer):
            self.synchronize()  # another model's update is pending: finish it first
        if recorder is not None:
            recorder.begin_step(step)
        phases: dict[str, tuple[float, float]] = {}
        loss = 0.0
        overlap = self.options.overlap_steps
        # a data-parallel strategy (mpi mode, tasks inside ranks) combines the ranks' gradients and runs AdamW
        # itself: as tasks it adds to the graph (one micro-step, collectives overlapping the backward), else after
        # the graph
        external_update = getattr(optimizer, "updates_outside_task_graph", False)
        communicate = external_update and len(batches) == 1 and getattr(optimizer, "overlap", False)
        if external_update and overlap:
            raise ValueError("overlap_steps needs the AdamW tasks in the graph; it does not combine with mpi mode")
        clip = optimizer.clips and not external_update
        scalars = None
        for micro_step, (inputs, targets) in enumerate(batches):
            last = micro_step == len(batches) - 1
            # overlap: the first micro-step's graph begins with the previous step's update, and this step's update
            # waits for the next step (or synchronize)
            leading = overlap and micro_step == 0 and self._pending is not None
            graph = self.step_graph(model, optimizer, accumulate=micro_step > 0,
                                    with_update=last and not overlap and not external_update,
                                    leading_update=leading, grad_norm_at_end=overlap and last and clip,
                                    communication=communicate)
            if model.load_batch(inputs, targets) != (model.B, model.T):
                raise ValueError(f"task mode runs whole batches of shape ({model.B}, {model.T}); got inputs "
                                 f"{np.shape(inputs)}")
            if leading:
                optimizer.scalars = self._pending[2]
                self._pending = None
            if communicate:
                optimizer.begin_update(learning_rate)
            if last and not external_update:
                scalars = optimizer.next_step(learning_rate, 1.0 / len(batches))  # its update may run next step
                if not overlap:
                    optimizer.scalars = scalars
            log = _TaskLog()
            on_done = None if recorder is None else log.append_entry
            if communicate:  # MPI moves data only inside MPI calls: a test of what is in flight after each task
                on_done = _progressing(on_done, optimizer.progress)
            on_idle = log.append_entry if recorder is not None and communicate else None
            self.runtime.run(graph.graph, on_done, on_idle)
            if recorder is not None:
                self._record(recorder, graph.graph, log, phases)
            loss += model.read_loss() / len(batches)
            if external_update and not communicate and model.gradients_ready is not None:  # every gradient is final
                for marker in model.backward_calls(model.B, model.T, micro_step > 0):
                    if isinstance(marker, GradientsReady):
                        model.gradients_ready(marker.part)
        if external_update:
            self._external_update(optimizer, communicate, model, learning_rate, len(batches), recorder, phases)
        if overlap:
            self._pending = (model, optimizer, scalars)
        if clip:
            optimizer.last_grad_norm = optimizer.grad_norm(scalars)
        if recorder is not None:
            recorder.end_step(loss, sum(np.asarray(x).size for x, _ in batches), phases)
        return loss

    @staticmethod
    def _external_update(optimizer, in_graph: bool, model, learning_rate: float, micro_steps: int, recorder,
                         phases: dict) -> None:
        """A data-parallel strategy's update after the graph (or what is left of it when its tasks were in the
        graph: waits for parameter collectives, the step's overlap record)."""
        if recorder is not None:
            recorder.set_phase("update")  # the strategy's AdamW and MPI calls go through recorder as observer
        update_start = time.perf_counter()
        if in_graph:
            optimizer.end_update()
        else:
            optimizer.update(model.params, model.grads, learning_rate, grad_scale=1.0 / micro_steps)
        if recorder is not None:
            start, end = update_start - recorder.origin, time.perf_counter() - recorder.origin
            lo, _ = phases.get("update", (start, end))  # the update tasks' span, if any
            phases["update"] = (min(lo, start), end)

    @staticmethod
    def _record(recorder, graph: TaskGraph, log, phases: dict[str, tuple[float, float]]) -> None:
        """Every task into the recorder (worker row, kernel, layer, task name); phase spans = first start to
        last end of the phase's tasks (they overlap in task mode)."""
        origin = recorder.origin
        for index, worker, start, end in log:
            if index < 0:
                continue
            task = graph.tasks[index]
            recorder.record_task(task.kernel, task.phase, task.layer, worker, start, end, task.flops, task.bytes,
                                 task.name)
            lo, hi = phases.get(task.phase, (math.inf, -math.inf))
            phases[task.phase] = (min(lo, start - origin), max(hi, end - origin))
        backward_end = phases.get("backward", (0.0, 0.0))[1] + origin
        for index, worker, start, end in log:  # a worker idle while only collectives in flight held the graph up
            if index < 0:
                phase = "backward" if end <= backward_end else "update"
                recorder.record_task(IDLE_WAIT, phase, -1, worker, start, end, 0.0, 0.0, IDLE_WAIT)

    def close(self) -> None:
        self.runtime.close()
