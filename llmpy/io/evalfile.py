"""llm.c's multiple-choice eval file (HellaSwag, MMLU): dev/data/data_common.py's write_evalfile, llmc's EvalLoader.

    header   int32 [20240522, version=1, num_examples, longest_example_bytes, 0...]  (1024 bytes)
    example  uint16 stream: 65535, example bytes (these fields included), example index, label,
             num_completions, then num_context + context tokens, then per completion num + tokens
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmpy.io.formats import (HEADER_BYTES, I32, U16, FormatError, _header, _open_for_read, _read_header,
                              atomic_write_bytes)

EVAL_MAGIC = 20240522
EVAL_VERSION = 1
START_EXAMPLE = 2**16 - 1
EVAL_KIND = "llm.c eval file"


@dataclass(frozen=True)
class EvalExample:
    """One multiple-choice example: the shared context, the candidate completions, the right one's index."""

    label: int
    context: list[int]
    completions: list[list[int]]

    @property
    def longest(self) -> int:
        """Tokens of the longest context + completion row."""
        return len(self.context) + max(len(c) for c in self.completions)


def _example_stream(index: int, example: EvalExample) -> list[int]:
    stream = [START_EXAMPLE, 0, index, example.label, len(example.completions), len(example.context), *example.context]
    for completion in example.completions:
        stream += [len(completion), *completion]
    stream[1] = 2 * len(stream)
    return stream


def write_eval_file(path, examples: list[EvalExample]) -> None:
    """Atomically write examples in llm.c's eval format (as data_common.write_evalfile writes them)."""
    if not 0 < len(examples) < 2**16:
        raise ValueError(f"write_eval_file: need 1 to {2**16 - 1} examples, got {len(examples)}")
    streams = []
    for index, example in enumerate(examples):
        if not example.context or not example.completions or not all(example.completions):
            raise ValueError(f"write_eval_file: example {index}: empty context or completion")
        if not 0 <= example.label < len(example.completions):
            raise ValueError(f"write_eval_file: example {index}: label {example.label} is not a completion index")
        stream = _example_stream(index, example)
        if max(stream[2:]) >= START_EXAMPLE or stream[1] >= 2**16:
            raise ValueError(f"write_eval_file: example {index}: a token id or its size does not fit in uint16")
        streams.append(stream)
    longest = max(stream[1] for stream in streams)
    header = _header([EVAL_MAGIC, EVAL_VERSION, len(examples), longest], I32)
    atomic_write_bytes(path, (header, np.array([x for s in streams for x in s], dtype=U16)))


def read_eval_file(path) -> list[EvalExample]:
    """Every example of an llm.c eval file, after checking the header, each example's delimiter, size and index."""
    with _open_for_read(path) as (f, size):
        header = _read_header(f, path, size, EVAL_MAGIC, I32, EVAL_KIND)
        if header[1] != EVAL_VERSION:
            raise FormatError(f"{path}: header version: expected {EVAL_VERSION}, found {header[1]}")
        count, longest = int(header[2]), int(header[3])
        if count <= 0:
            raise FormatError(f"{path}: header num_examples: expected a positive integer, found {count}")
        if (size - HEADER_BYTES) % 2:
            raise FormatError(f"{path}: file size: {size} bytes is not the header plus whole uint16 values")
        stream = np.frombuffer(f.read(), dtype=U16).astype(np.int64)
    examples, offset = [], 0
    for index in range(count):
        example, offset = _parse_example(path, stream, offset, index, longest)
        examples.append(example)
    if offset != stream.size:
        raise FormatError(f"{path}: {2 * (stream.size - offset)} trailing bytes after example {count - 1}")
    return examples


def _parse_example(path, stream: np.ndarray, offset: int, index: int, longest: int) -> tuple[EvalExample, int]:
    where = f"{path}: example {index} (byte {HEADER_BYTES + 2 * offset})"
    if offset + 6 > stream.size:
        raise FormatError(f"{where}: file ends inside the example header (file truncated?)")
    start, nbytes, found, label, num_completions = (int(x) for x in stream[offset:offset + 5])
    if start != START_EXAMPLE:
        raise FormatError(f"{where}: expected the delimiter {START_EXAMPLE}, found {start}")
    if found != index:
        raise FormatError(f"{where}: expected example index {index}, found {found}")
    if not 12 <= nbytes <= longest or offset + nbytes // 2 > stream.size:
        raise FormatError(f"{where}: example bytes {nbytes} is not within the file and the header's longest "
                          f"example ({longest}) (file truncated?)")
    end = offset + nbytes // 2
    fields = stream[offset + 5:end]
    parts, position = [], 0
    for _ in range(1 + num_completions):
        length = int(fields[position]) if position < fields.size else 0
        if length == 0 or position + 1 + length > fields.size:
            raise FormatError(f"{where}: a context or completion is empty or runs past the example's {nbytes} bytes")
        parts.append(fields[position + 1:position + 1 + length].tolist())
        position += 1 + length
    if position != fields.size or not 0 <= label < num_completions:
        raise FormatError(f"{where}: label {label} of {num_completions} completions, or bytes left in the example")
    return EvalExample(label, parts[0], parts[1:]), end
