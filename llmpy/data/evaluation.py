"""Multiple-choice evaluation batches and their scores, as llm.c's EvalLoader (llmc/dataloader.h) makes them.

Each example takes one row per completion (B // completions examples a batch): the context, then the
completion; targets are the inputs shifted by one, and the mask marks the positions whose target is a
completion token. A completion's score is its loss over those positions: summed (hellaswag.py's `acc`) or
averaged (its `acc_norm`, the number llm.c's `-h` prints); the lowest wins, the first of equals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from llmpy.data.loader import DataError

COMPLETIONS = 4  # llm.c's ASSUMED_NUM_COMPLETIONS


@dataclass
class EvalBatch:
    inputs: np.ndarray  # (B, T) int32
    targets: np.ndarray  # (B, T) int32
    mask: np.ndarray  # (B, T) bool: target is a completion token
    labels: list[int]  # per example in the batch


@dataclass
class EvalScore:
    predictions: list[int] = field(default_factory=list)  # lowest summed loss, per example
    predictions_norm: list[int] = field(default_factory=list)  # lowest mean loss, per example
    correct: int = 0
    correct_norm: int = 0

    @property
    def total(self) -> int:
        return len(self.predictions)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    @property
    def accuracy_norm(self) -> float:
        return self.correct_norm / max(self.total, 1)


def check_examples_fit(examples, B: int, T: int, where: str) -> None:
    """llm.c's conditions: 4 completions, B >= 4, and context + completion shorter than T."""
    if B < COMPLETIONS:
        raise DataError(f"{where}: evaluation needs a batch of at least {COMPLETIONS} rows, got B={B}")
    for index, example in enumerate(examples):
        if len(example.completions) != COMPLETIONS:
            raise DataError(f"{where}: example {index} has {len(example.completions)} completions; llm.c's "
                            f"evaluation takes {COMPLETIONS}")
        if example.longest >= T:
            raise DataError(f"{where}: example {index} needs {example.longest + 1} positions, more than T={T}")


def eval_batches(examples, B: int, T: int) -> Iterator[EvalBatch]:
    """Batches of B // 4 examples, 4 rows each, of T positions (unused rows and positions zero)."""
    per_batch = B // COMPLETIONS
    for first in range(0, len(examples), per_batch):
        batch = EvalBatch(np.zeros((B, T), np.int32), np.zeros((B, T), np.int32), np.zeros((B, T), bool), [])
        for slot, example in enumerate(examples[first:first + per_batch]):
            batch.labels.append(example.label)
            n = len(example.context)
            for c, completion in enumerate(example.completions):
                row = slot * COMPLETIONS + c
                tokens = example.context + completion
                batch.inputs[row, :len(tokens)] = tokens
                batch.targets[row, :len(tokens) - 1] = tokens[1:]
                batch.mask[row, n - 1:len(tokens) - 1] = True
        yield batch


def score_batch(score: EvalScore, batch: EvalBatch, losses: np.ndarray) -> None:
    """Add the batch's examples to `score` from the per-position losses (B, T) of its forward pass."""
    for slot, label in enumerate(batch.labels):
        rows = slice(slot * COMPLETIONS, (slot + 1) * COMPLETIONS)
        mask = batch.mask[rows]
        sums = np.where(mask, losses[rows], 0.0).sum(axis=1, dtype=np.float64)
        means = sums / mask.sum(axis=1)
        pred, pred_norm = int(np.argmin(sums)), int(np.argmin(means))  # argmin: the first of equals
        score.predictions.append(pred)
        score.predictions_norm.append(pred_norm)
        score.correct += pred == label
        score.correct_norm += pred_norm == label
