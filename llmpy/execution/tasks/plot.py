"""A picture of a task graph: one transformer layer's tasks, in a layered layout (PNG, matplotlib).

Rows are dependency depths (longest path from the start of the step; depths with no drawn task are
left out); within a row tasks are ordered by phase, kernel and block. Colour = kernel, marker = phase.
"""

from __future__ import annotations

import os

from llmpy.execution.tasks.graph import TaskGraph

MARKERS = {"forward": "o", "backward": "s", "update": "D", "zero_grad": "^"}


def layer_tasks(graph: TaskGraph, layer: int, phases: tuple[str, ...] = ("forward", "backward", "update")) -> list[int]:
    return [t.index for t in graph.tasks if t.layer == layer and t.phase in phases]


def task_graph_png(graph: TaskGraph, layer: int, path: str, title: str | None = None) -> str:
    """Draw the tasks of transformer block `layer` (-1: the tasks outside the blocks) and the edges among them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = layer_tasks(graph, layer)
    if not keep:
        raise ValueError(f"the graph has no tasks in layer {layer}")
    kept = set(keep)
    depth: dict[int, int] = {}  # longest path from the graph's sources, over the whole graph
    for i in graph.topological_order():
        depth[i] = 1 + max((depth[p] for p in graph.tasks[i].preds), default=-1)
    levels = {d: k for k, d in enumerate(sorted({depth[i] for i in keep}))}  # drop depths with no drawn task
    rows: dict[int, list[int]] = {}
    for i in keep:
        rows.setdefault(levels[depth[i]], []).append(i)
    position: dict[int, tuple[float, float]] = {}
    widest = max(len(r) for r in rows.values())
    for level, members in rows.items():
        members.sort(key=lambda i: (graph.tasks[i].phase, graph.tasks[i].kernel, graph.tasks[i].name))
        for k, i in enumerate(members):
            position[i] = ((k + 0.5) / len(members) * widest, -level)

    kernels = sorted({graph.tasks[i].kernel for i in keep})
    cmap = plt.get_cmap("tab20")
    colors = {name: cmap(k % 20) for k, name in enumerate(kernels)}
    fig_w = min(40.0, max(8.0, 0.12 * widest + 4))
    fig_h = min(60.0, max(6.0, 0.35 * len(rows) + 2))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    for i in keep:
        x1, y1 = position[i]
        for p in graph.tasks[i].preds:
            if p in kept:
                x0, y0 = position[p]
                ax.plot((x0, x1), (y0, y1), color="0.75", linewidth=0.3, zorder=1)
    for phase, marker in MARKERS.items():
        for kernel in kernels:
            pts = [position[i] for i in keep if graph.tasks[i].phase == phase and graph.tasks[i].kernel == kernel]
            if pts:
                ax.scatter([x for x, _ in pts], [y for _, y in pts], s=14, marker=marker, color=colors[kernel],
                           edgecolors="black", linewidths=0.2, zorder=2, label=f"{kernel} ({phase})")
    ax.set_xticks([])
    ax.set_ylabel("dependency depth (rows with tasks of this layer)")
    ax.set_title(title or f"tasks of layer {layer}: {len(keep)} tasks, "
                          f"{sum(1 for i in keep for p in graph.tasks[i].preds if p in kept)} edges among them")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
