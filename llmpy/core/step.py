"""The training step as data: an ordered list of kernel calls, which every execution model runs, splits or
distributes (llm.c's gpt2_forward / gpt2_backward / gpt2_update, as a list instead of a function body).

Each array argument of a call is a view into one of the model's (or optimizer's) flat buffers, so what a call
reads and writes follows from its views and its kernel's declared accesses (llmpy.kernels.specs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

# observer(kernel_name, layer, kernel, args) runs kernel(*args) and returns its result, measuring it on the
# way (llmpy.observe.recorder.Recorder).
KernelObserver = Callable[[str, int, Callable, tuple], object]


@dataclass(frozen=True)
class KernelCall:
    kernel: str  # the kernel's name: its cost model, accesses and split rules
    label: str  # what this call computes among the calls of that kernel, e.g. "qkv" ("" if it is the only one)
    layer: int  # transformer block, -1 outside them
    fn: Callable  # the kernel variant the execution model chose (serial or parallel)
    args: tuple
    phase: str = "forward"

    @property
    def name(self) -> str:
        return f"{self.kernel}.{self.label}" if self.label else self.kernel

    def run(self, observer: KernelObserver | None = None):
        if observer is None:
            return self.fn(*self.args)
        return observer(self.kernel, self.layer, self.fn, self.args)


@dataclass(frozen=True)
class GradientsReady:
    """A point in the backward list where a group of parameter gradients is final: part = L after the final
    layernorm (lnfw, lnfb), l after transformer block l (the [l] slices of its 12 tensors), -1 after the
    encoder (wte, wpe). Data-parallel execution starts that group's collective there."""

    part: int


Step = list  # of KernelCall and GradientsReady


def run_calls(calls: Iterable, observer: KernelObserver | None = None,
              gradients_ready: Callable[[int], None] | None = None) -> None:
    """Run a list of calls in order (the sequential and fork-join execution of the step)."""
    for call in calls:
        if isinstance(call, GradientsReady):
            if gradients_ready is not None:
                gradients_ready(call.part)
        else:
            call.run(observer)


def kernel_calls(calls: Iterable) -> list[KernelCall]:
    """The kernel calls of a list, without its markers."""
    return [call for call in calls if isinstance(call, KernelCall)]
