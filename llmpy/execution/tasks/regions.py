"""From array views to the regions the dependency tracker compares.

Every tensor a step touches is registered once by name with its full array (`p.qkvw`, `a.qkv`, `d.qkv`,
`g.qkvw`, `m.qkvw`, `tokens.inputs`, ...). A view passed to a kernel lies inside one of them; its region is
the box of that tensor's indices it covers, found from the view's address, shape and strides. A view that is
not a box of its tensor (rows that wrap around a sequence boundary, say) is an error, never approximated.
"""

from __future__ import annotations

import bisect
import math

import numpy as np

from llmpy.core.layout import FlatBuffer
from llmpy.execution.tasks.graph import GraphError, Region


class TensorRegistry:
    """Named tensors by address range, to map views onto regions."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._tensors: list[tuple[int, int, str, np.ndarray]] = []  # (start, end, name, array), sorted by start

    def add(self, name: str, array: np.ndarray) -> None:
        if array.size == 0:
            return
        if not array.flags.c_contiguous:
            raise ValueError(f"tensor {name} must be contiguous")
        start = array.__array_interface__["data"][0]
        index = bisect.bisect(self._starts, start)
        self._starts.insert(index, start)
        self._tensors.insert(index, (start, start + array.nbytes, name, array))

    def add_buffer(self, kind: str, buffer: FlatBuffer) -> None:
        for name, view in buffer.items():
            self.add(f"{kind}.{name}", view)

    def names(self, kind: str) -> list[str]:
        return [name for _, _, name, _ in self._tensors if name.startswith(kind + ".")]

    def whole(self, name: str) -> Region:
        for _, _, tensor, array in self._tensors:
            if tensor == name:
                return Region(name, tuple((0, n) for n in array.shape))
        raise KeyError(name)

    def regions(self, view: np.ndarray) -> list[Region]:
        """The boxes of the tensors that `view` covers: one, or for a flat view across tensors (a whole buffer)
        one per tensor it spans."""
        if view.size == 0:
            return []
        address = view.__array_interface__["data"][0]
        index = bisect.bisect_right(self._starts, address) - 1
        if index < 0 or address >= self._tensors[index][1]:
            raise GraphError(f"a kernel argument of shape {view.shape} lies in no registered tensor")
        if view.ndim == 1 and view.flags.c_contiguous and address + view.nbytes > self._tensors[index][1]:
            return self._spanning(address, address + view.nbytes, index)
        return [self._box(view, address, *self._tensors[index])]

    def _spanning(self, address: int, end: int, index: int) -> list[Region]:
        out = []
        while address < end:
            start, stop, name, tensor = self._tensors[index]
            if start > address:
                raise GraphError(f"a flat kernel argument covers memory between tensors, before {name}")
            flat = tensor.reshape(-1)
            lo, hi = (address - start) // flat.itemsize, (min(end, stop) - start) // flat.itemsize
            out.append(self._box(flat[lo:hi], address, start, stop, name, tensor))
            address, index = min(end, stop), index + 1
            if address < end and index == len(self._tensors):
                raise GraphError(f"a flat kernel argument runs past the last registered tensor {name}")
        return out

    @staticmethod
    def _box(view: np.ndarray, address: int, start: int, end: int, name: str, tensor: np.ndarray) -> Region:
        item = tensor.itemsize
        first = (address - start) // item
        last = first + sum((n - 1) * s // item for n, s in zip(view.shape, view.strides))
        if last * item >= end - start or any(s < 0 for s in view.strides):
            raise GraphError(f"a kernel argument of shape {view.shape} runs past the end of tensor {name}")
        lo = np.unravel_index(first, tensor.shape)
        hi = np.unravel_index(last, tensor.shape)
        box = tuple((int(a), int(b) + 1) for a, b in zip(lo, hi))
        if math.prod(b - a for a, b in box) != view.size:
            raise GraphError(f"a kernel argument of shape {view.shape} is not a box of tensor {name} "
                             f"{tensor.shape} (it starts at {tuple(map(int, lo))} and ends at {tuple(map(int, hi))})")
        return Region(name, box)
