"""llm.c's `main.log` (llmc/logger.h): one line per event, read by llm.c's dev/vislog notebook and `llmpy plot log`.

    s:STEP trl:LOSS lr:LR norm:NORM   training loss of step STEP (0-based, the step's own update)
    s:STEP tel:LOSS                   validation loss before step STEP
    s:STEP eval:ACC                   HellaSwag acc_norm before step STEP
"""

from __future__ import annotations

import os
import re

LOG_FILE = "main.log"
_LINE = re.compile(r"^s:(-?\d+) (trl|tel|eval):(\S+)")


class MainLog:
    """Appends llm.c's lines to DIR/main.log; a fresh run empties it first, as llm.c's logger_init does."""

    def __init__(self, log_dir: str, resume: bool = False):
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, LOG_FILE)
        if not resume:
            open(self.path, "w").close()

    def _write(self, line: str) -> None:
        # one open per line (as llm.c): a reader sees every finished line, a crash loses none
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def train(self, step: int, loss: float, learning_rate: float, grad_norm: float) -> None:
        self._write(f"s:{step} trl:{loss:.4f} lr:{learning_rate:.6f} norm:{grad_norm:.2f}")

    def val(self, step: int, loss: float) -> None:
        self._write(f"s:{step} tel:{loss:.4f}")

    def eval(self, step: int, accuracy: float) -> None:
        self._write(f"s:{step} eval:{accuracy:.4f}")


def read_main_log(path) -> dict[str, list[tuple[int, float]]]:
    """{"trl": [(step, value)], "tel": [...], "eval": [...]} of a main.log; other lines are skipped."""
    series: dict[str, list[tuple[int, float]]] = {"trl": [], "tel": [], "eval": []}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found (written by `llmpy train --log-dir DIR` or llm.c's -o DIR)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the log ({error})") from None
    for number, line in enumerate(lines, 1):
        match = _LINE.match(line)
        if match is None:
            continue
        try:
            series[match.group(2)].append((int(match.group(1)), float(match.group(3))))
        except ValueError:
            raise ValueError(f"{path}: line {number}: {match.group(3)!r} is not a number") from None
    if not any(series.values()):
        raise ValueError(f"{path}: no s:N trl/tel/eval lines (not llm.c's main.log?)")
    return series
