"""Task graphs built from declared data accesses: regions, tasks, the dependency tracker, validation, export.

A task is one kernel call. It declares the regions of data it reads and writes; a `Region` is a box (one
half-open range per leading dimension; dimensions left out are taken whole) of one named tensor, e.g.
`Region("acts.qkv", ((3, 4), (1, 2), (0, 16)))` = layer 3, sequence 1, token rows 0..15 of the qkv activations.
Distinct tensor names never alias. Tasks are added in a sequential program order (the order in which one
thread would run them); `DependencyTracker` turns that order and the regions into edges:

  RAW  read after write: a read depends on every earlier write that overlaps it and is still live;
  WAR  write after read: a write depends on every earlier read of an overlapping live region;
  WAW  write after write: a write depends on every earlier overlapping live write.

A write retires the earlier accesses it covers completely (their order is kept through the edge to the new
write), so chains of rewrites do not pile up edges. A read of data that no earlier task wrote must lie in a
region declared as a graph input, else it is an error (a missing producer). `TaskGraph.validate` also checks
that the edges form no cycle (edges added by hand with `add_edge` can make one).
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


class GraphError(ValueError):
    """A malformed task graph: a cycle, or a read that nothing produces."""


Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Region:
    """A box of a named tensor: box[d] = (lo, hi) on dimension d; missing trailing dimensions are whole."""

    tensor: str
    box: Box = ()

    def overlaps(self, other: Region) -> bool:
        if self.tensor != other.tensor:
            return False
        for (a0, a1), (b0, b1) in zip(self.box, other.box):
            if a1 <= b0 or b1 <= a0:
                return False
        return True

    def covers(self, other: Region) -> bool:
        """True if every element of `other` lies in self (dimensions missing from a box are whole)."""
        if self.tensor != other.tensor:
            return False
        for d, (a0, a1) in enumerate(self.box):
            if d >= len(other.box):
                return False  # other is whole on d, self is not (we do not know the extent: assume not)
            b0, b1 = other.box[d]
            if b0 < a0 or b1 > a1:
                return False
        return True

    def empty(self) -> bool:
        return any(hi <= lo for lo, hi in self.box)

    def __str__(self) -> str:
        return self.tensor + "[" + ", ".join(f"{lo}:{hi}" for lo, hi in self.box) + "]"


def _subtract(region: Region, cut: Region) -> list[Region]:
    """region minus cut, as disjoint boxes (at most 2 per dimension)."""
    if not region.overlaps(cut):
        return [region]
    depth = max(len(region.box), len(cut.box))
    # A dimension missing from a box is whole: give it an extent large enough for any index.
    whole = (0, 1 << 62)
    rbox = list(region.box) + [whole] * (depth - len(region.box))
    cbox = list(cut.box) + [whole] * (depth - len(cut.box))
    pieces = []
    for d in range(depth):
        (r0, r1), (c0, c1) = rbox[d], cbox[d]
        if r0 < c0:
            pieces.append(Region(region.tensor, tuple(rbox[:d] + [(r0, c0)] + rbox[d + 1:])))
        if c1 < r1:
            pieces.append(Region(region.tensor, tuple(rbox[:d] + [(c1, r1)] + rbox[d + 1:])))
        rbox[d] = (max(r0, c0), min(r1, c1))
    return pieces


def uncovered(region: Region, covering: Iterable[Region]) -> list[Region]:
    """The parts of `region` that no region of `covering` contains."""
    left = [region]
    for cut in covering:
        left = [piece for part in left for piece in _subtract(part, cut)]
        if not left:
            break
    return left


@dataclass
class Task:
    """One kernel call on one block. `fn(*args)` runs it; `kernel` names the kernel (trace, cost model)."""

    name: str  # unique in its graph, e.g. "matmul_forward.qkv l3 b1 j2"
    kernel: str
    fn: Callable | None
    args: tuple = ()
    reads: tuple[Region, ...] = ()
    writes: tuple[Region, ...] = ()
    layer: int = -1
    block: tuple = ()  # (sequence, token block) or (channel block,) or (parameter block,)
    phase: str = "forward"
    cost: float = 1e-5  # estimated seconds, for the critical-path priority
    flops: float = 0.0
    bytes: float = 0.0
    index: int = -1  # position in the graph, set by TaskGraph.add
    preds: set[int] = field(default_factory=set)
    succs: list[int] = field(default_factory=list)
    priority: float = 0.0  # critical path from this task to the end of the graph (seconds)

    def run(self):
        return self.fn(*self.args)


class DependencyTracker:
    """Edges from declared accesses, in program order (see the module docstring)."""

    def __init__(self, inputs: Iterable[Region] = ()):
        self.inputs: dict[str, list[Region]] = {}
        for region in inputs:
            self.declare_input(region)
        self._writes: dict[str, list[tuple[Region, int]]] = {}
        self._reads: dict[str, list[tuple[Region, int]]] = {}

    def declare_input(self, region: Region) -> None:
        self.inputs.setdefault(region.tensor, []).append(region)

    def add(self, task_id: int, reads: Iterable[Region], writes: Iterable[Region], name: str = "") -> set[int]:
        """Record a task's accesses; returns the ids of the tasks it must wait for."""
        preds: set[int] = set()
        reads, writes = list(reads), list(writes)
        for region in reads:
            live = self._writes.get(region.tensor, [])
            found = [(w, t) for w, t in live if w.overlaps(region)]
            preds.update(t for _, t in found)
            missing = uncovered(region, [w for w, _ in found] + self.inputs.get(region.tensor, []))
            if missing:
                raise GraphError(f"task {name or task_id!r} reads {missing[0]}, which no earlier task writes and "
                                 "which is not a declared graph input (missing producer)")
        for region in writes:
            for r, t in self._reads.get(region.tensor, []):
                if r.overlaps(region):
                    preds.add(t)  # WAR
            for w, t in self._writes.get(region.tensor, []):
                if w.overlaps(region):
                    preds.add(t)  # WAW
        preds.discard(task_id)
        # Retire what the writes cover completely, then record this task's own accesses.
        for region in writes:
            for table in (self._writes, self._reads):
                if region.tensor in table:
                    table[region.tensor] = [(r, t) for r, t in table[region.tensor] if not region.covers(r)]
        for region in writes:
            self._writes.setdefault(region.tensor, []).append((region, task_id))
        for region in reads:
            self._reads.setdefault(region.tensor, []).append((region, task_id))
        return preds


class TaskGraph:
    """Tasks plus edges; built through `add` (edges from the tracker) and optionally `add_edge`."""

    def __init__(self, inputs: Iterable[Region] = ()):
        self.tasks: list[Task] = []
        self.tracker = DependencyTracker(inputs)
        self._names: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.tasks)

    def add(self, task: Task) -> Task:
        if task.name in self._names:
            raise GraphError(f"two tasks named {task.name!r}")
        task.index = len(self.tasks)
        task.preds = self.tracker.add(task.index, task.reads, task.writes, task.name)
        self.tasks.append(task)
        self._names[task.name] = task.index
        for p in task.preds:
            self.tasks[p].succs.append(task.index)
        return task

    def add_edge(self, before: int, after: int) -> None:
        """An extra ordering edge (not derived from data)."""
        if after not in self.tasks[before].succs:
            self.tasks[before].succs.append(after)
            self.tasks[after].preds.add(before)

    def task(self, name: str) -> Task:
        return self.tasks[self._names[name]]

    def edges(self) -> list[tuple[int, int]]:
        return sorted((p, t.index) for t in self.tasks for p in t.preds)

    def topological_order(self) -> list[int]:
        """Task ids in an order where every task follows its predecessors; GraphError on a cycle."""
        remaining = [len(t.preds) for t in self.tasks]
        ready = [i for i, n in enumerate(remaining) if n == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            i = heapq.heappop(ready)
            order.append(i)
            for s in self.tasks[i].succs:
                remaining[s] -= 1
                if remaining[s] == 0:
                    heapq.heappush(ready, s)
        if len(order) != len(self.tasks):
            stuck = [self.tasks[i].name for i, n in enumerate(remaining) if n > 0]
            raise GraphError(f"the task graph has a cycle through {len(stuck)} tasks, e.g. {', '.join(stuck[:3])}")
        return order

    def validate(self) -> list[int]:
        """Check the graph (no cycle; reads are checked as tasks are added) and set each task's priority:
        the longest chain of estimated costs from it to the end. Returns a topological order."""
        order = self.topological_order()
        for i in reversed(order):
            task = self.tasks[i]
            task.priority = task.cost + max((self.tasks[s].priority for s in task.succs), default=0.0)
        return order

    def critical_path(self) -> float:
        self.validate()
        return max((t.priority for t in self.tasks), default=0.0)

    # ------------------------------------------------------------------ export
    def to_json(self) -> dict:
        return {
            "tasks": [{"id": t.index, "name": t.name, "kernel": t.kernel, "layer": t.layer, "block": list(t.block),
                       "phase": t.phase, "cost_us": round(1e6 * t.cost, 3), "priority_us": round(1e6 * t.priority, 3),
                       "reads": [str(r) for r in t.reads], "writes": [str(r) for r in t.writes],
                       "preds": sorted(t.preds)} for t in self.tasks],
            "edges": self.edges(),
        }

    def to_dot(self, tasks: Iterable[int] | None = None) -> str:
        """Graphviz DOT of the graph (or of the subgraph of `tasks`)."""
        keep = set(range(len(self.tasks))) if tasks is None else set(tasks)
        colors = {"forward": "#9ecae1", "backward": "#fdae6b", "update": "#a1d99b", "zero_grad": "#d9d9d9"}
        lines = ["digraph tasks {", "  rankdir=TB;", '  node [shape=box, style=filled, fontsize=10];']
        for t in self.tasks:
            if t.index in keep:
                label = t.name.replace('"', "'")
                lines.append(f'  t{t.index} [label="{label}", fillcolor="{colors.get(t.phase, "white")}"];')
        for p, s in self.edges():
            if p in keep and s in keep:
                lines.append(f"  t{p} -> t{s};")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def save(self, path: str) -> str:
        """Write DOT (path ends in .dot / .gv) or JSON (any other ending)."""
        from llmpy.io.formats import atomic_write_bytes

        text = self.to_dot() if path.endswith((".dot", ".gv")) else json.dumps(self.to_json())
        atomic_write_bytes(path, text.encode())
        return path
