"""A data-parallel strategy's step as tasks of a task rank's graph (`--rank-mode tasks`; the mixin of
llmpy.execution.mpi.strategies.DataParallelStrategy, whose buckets, collectives, waits and AdamW it uses).

Per bucket, where backward has finished its gradients (llmpy.execution.tasks.builder.GraphBuilder adds them at
the step's GradientsReady points): the start of its gradient collectives, a task that ends when they have (a
`Completion` the progress thread fires; its worker goes on meanwhile, as TAMPI's non-blocking mode in OmpSs-2),
the bucket's AdamW with the start of its parameter collectives, and a task that ends when those have. The
starts of each kind are chained in program order by a token tensor each (MPI matches a communicator's
collectives by the order of their calls). With clipping, the updates follow a task computing the global norm.
"""

from __future__ import annotations

import math
import time

import numpy as np

from llmpy.execution.deferred import Completion, GraphWork

COMMUNICATION_PRIORITY_S = 1e3  # see bucket_tasks
EST_UPDATE_S = 1e-3  # an update task's estimate where it goes after ordinary tasks (see _update_works)


class GraphTasks:
    """The strategy's step as GraphWork for a task rank's graph (see the module docstring)."""

    def graph_tensors(self) -> dict[str, np.ndarray]:
        """Tokens for a task rank's graph: the tasks starting collectives on one communicator all write its token,
        which keeps them in program order (MPI matches a communicator's collectives by the order of their calls,
        and the ranks' workers must not start them in different orders)."""
        return {"order.gradients": self._gradient_order, "order.parameters": self._parameter_order}

    def bucket_tasks(self, part: int) -> list[GraphWork]:
        """The tasks of bucket `part` where backward has finished its gradients: the start of its gradient
        collectives (it reads the gradients, so it follows every task writing them), a task that 'writes' them
        and ends when the collectives have (with the progress thread; else at once), and, without clipping, the
        bucket's update (_update_works)."""
        state = self._by_part[part]
        grads = self._views(self.grads, state)
        # An estimate far above any chain of kernels puts the bucket and the tasks finishing it ahead of ordinary
        # tasks; it falls with the bucket's place in backward so the earliest bucket goes first. (The transfer's
        # own estimate made the encoder's large bucket the longest path: every weight gradient then waited for
        # the input-gradient chain, and every collective started at the end of backward.)
        seconds = COMMUNICATION_PRIORITY_S * (len(self.states) - self.states.index(state))
        works = [GraphWork(f"MPI_Istart_bucket l{part}", "MPI_Istart_bucket", self.start_bucket, (part,), grads,
                           (self._gradient_order,), seconds, "backward", part),
                 GraphWork(f"MPI_Wait_bucket l{part}", "MPI_Wait_bucket", self._grad_completions.get, (part,), (),
                           grads, seconds, "backward", part)]
        return works if self.clips else works + self._update_works(state, seconds)

    def closing_tasks(self) -> list[GraphWork]:
        """After the backward, with clipping: the global gradient norm (it reads every gradient, so it follows
        every bucket's collectives) and then each bucket's update, which reads it."""
        if not self.clips:
            return []
        grads = tuple(view for state in self.states for view in self._views(self.grads, state))
        norm = GraphWork("sum_of_squares grads", "sum_of_squares", self._norm_task, (), grads, (self.grad_norm_sq,),
                         EST_UPDATE_S, "update")
        return [norm] + [work for state in self.states for work in self._update_works(state, EST_UPDATE_S)]

    def _update_works(self, state: BucketState, seconds: float) -> list[GraphWork]:
        """AdamW on what this rank owns of the bucket, then the start of its parameter collectives: it reads the
        gradients (with the progress thread they have arrived by then, so it never waits; testing instead, it
        would wait, and goes after ordinary tasks) and writes the parameters (after every task reading them).
        With the progress thread, a task after it ends when the parameter collectives have (unless the next
        forward waits for them: overlap_steps)."""
        params, part = self._views(self.params, state), state.bucket.part
        reads = self._views(self.grads, state) + ((self.grad_norm_sq,) if self.clips else ())
        # ahead of ordinary tasks only to start parameter collectives early (allreduce has none: its AdamW fills
        # the wait for the last buckets instead of delaying backward)
        if self._progress_thread is None or not self.parameter_collectives:
            seconds = EST_UPDATE_S
        works = [GraphWork(f"adamw_update bucket l{part}", "adamw_update", self._update_bucket_task, (part,), reads,
                           params + (self._parameter_order,), seconds, "update", part)]
        if self._progress_thread is not None and not self.overlap_steps:
            works.append(GraphWork(f"MPI_Wait_params_bucket l{part}", "MPI_Wait_params_bucket",
                                   self._param_completions.get, (part,), (), params, EST_UPDATE_S, "update", part))
        return works

    @staticmethod
    def _views(buffer, state: BucketState) -> tuple:
        return tuple(buffer.flat[s.start:s.stop] for s in state.bucket.segments)

    def begin_update(self, learning_rate: float, grad_scale: float = 1.0) -> None:
        """Before a task rank's graph that holds the update: the step's scalars (and an injected failure)."""
        self.scalars = self.next_step(learning_rate, grad_scale / self.world_size)
        self._injected_failure()
        self._done_at: dict[int, float] = {}  # bucket -> when its gradient collectives were seen complete
        self._grad_completions.clear()
        self._param_completions.clear()
        self._backward_end = self._updates_end = 0.0

    def start_bucket(self, part: int) -> None:
        """GPT2.gradients_ready(part) from a task worker: one thread in MPI at a time, and no recorder (the
        worker's task is recorded as itself; the bytes are counted as ever). With the progress thread, the
        collectives' Completion ends the bucket's wait task."""
        completion = Completion() if self._progress_thread is not None else None
        if completion is not None:
            self._grad_completions[part] = completion
        with self._lock, self._unobserved():
            self._gradients_ready(part, completion)
        if part == self.states[-1].bucket.part:
            self._backward_end = time.perf_counter()

    def _norm_task(self) -> None:
        with self._lock, self._unobserved():
            for state in self.states:
                self._wait_gradients(state)
            self.grad_norm_sq[0] = self._global_sum_of_squares()
        self.last_grad_norm = self.grad_norm(self.scalars)

    def _update_bucket_task(self, part: int) -> None:
        state = self._by_part[part]
        with self._lock, self._unobserved():
            self._wait_gradients(state)
        for owned in state.owned:
            self._adamw(owned, observed=False)
        self._updates_end = max(self._updates_end, time.perf_counter())
        with self._lock, self._unobserved():
            self.start_parameter_collectives(state)
        if self._progress_thread is not None:
            completion = None if self.overlap_steps else Completion()
            if completion is not None:
                self._param_completions[part] = completion
            self._progress_thread.watch(state.param_requests, completion, f"the parameter collectives of part {part}")

    def _wait_gradients(self, state: BucketState) -> None:
        """(Under the lock.) The bucket's gradient collectives done, and when that was seen first."""
        part, completion = state.bucket.part, self._grad_completions.get(state.bucket.part)
        if completion is not None and completion.completed_at is not None:
            self._done_at.setdefault(part, completion.completed_at)
        elif part not in self._done_at and self._test(part, state.grad_requests):
            self._done_at[part] = time.perf_counter()
        self._wait(part, state.grad_requests)
        self._done_at.setdefault(part, time.perf_counter())
        state.grad_requests = []

    def _params_done_by(self, state: BucketState, moment: float) -> bool:
        completion = self._param_completions.get(state.bucket.part)
        if completion is None:  # not watched in the graph: test them now
            return self._test(state.bucket.part, state.param_requests)
        return completion.completed_at is not None and completion.completed_at <= moment

    def end_update(self) -> None:
        """After a task rank's graph that held the update: its parameter collectives done (unless the next
        forward waits for them, overlap_steps), and the share of bytes that completed behind compute: gradients
        complete when the backward's last bucket started, parameters when the last bucket's AdamW ended."""
        nbytes = lambda s: 4 * s.bucket.size
        grads_done = sum(nbytes(s) for s in self.states if self._done_at.get(s.bucket.part, math.inf)
                         <= self._backward_end)
        with_params = [s for s in self.states if s.param_requests]
        params_done = sum(nbytes(s) for s in with_params if self._params_done_by(s, self._updates_end))
        if self.overlap_steps:
            self._params_pending = with_params[::-1]
            self._params_done_when_read, params_done = 0, None
        else:
            with self._lock:
                for state in with_params:
                    self._wait(state.bucket.part, state.param_requests)
                    state.param_requests = []
        self._close_step(grads_done, params_done, sum(nbytes(s) for s in with_params))
