"""Resumable checkpoints: model_STEP.bin (llm.c's model file) and then state_STEP.bin (llmpy's run state).

The state file is written last and completes the checkpoint: it names the run (an id unique in the folder,
kept by every resume of that run, and the run's identity: model shape, batch, data, seed, ...) and carries the sha256 of the
model file beside it and of its own m and v. So
  - rotation removes only the current run's older checkpoints, never another run's or a stray file;
  - a resume takes the newest checkpoint whose files verify, and reports every newer one it had to skip;
  - a resume refuses a checkpoint of another run configuration, naming the field that differs.
State files of version 1 (from before checksums) still resume, unverified, and are never rotated away.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np

from llmpy.core.config import GPT2Config
from llmpy.io.formats import (FormatError, RunState, file_sha256, load_model, read_run_state, read_run_state_owner,
                              write_model, write_run_state)

_STATE = re.compile(r"state_(\d{8,})\.bin$")


def new_run_id(identity: dict, directory: str) -> str:
    """An id for a fresh run, unique among the runs whose checkpoints are in `directory`: derived from the run's
    identity and the ids already there, so that identical runs in separate folders write identical files."""
    present = sorted(run_ids(directory))
    digest = hashlib.sha256(json.dumps([identity, present], sort_keys=True).encode()).hexdigest()
    return digest[:16]


def run_ids(directory: str) -> set[str]:
    """The ids of the runs whose checkpoints are in `directory`."""
    ids = set()
    for step in checkpoint_steps(directory):
        try:
            owner = read_run_state_owner(state_path(directory, step))[1]
        except FormatError:
            continue
        if owner is not None:
            ids.add(owner)
    return ids


def model_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"model_{step:08d}.bin")


def state_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"state_{step:08d}.bin")


def checkpoint_steps(directory: str) -> list[int]:
    """Steps of the state_STEP.bin files in `directory`, newest first."""
    found = [_STATE.match(os.path.basename(p)) for p in glob.glob(os.path.join(glob.escape(directory), "state_*.bin"))]
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


@dataclass
class Checkpoint:
    step: int
    config: GPT2Config
    params: np.ndarray
    state: RunState
    model_path: str
    state_path: str

    @property
    def verified(self) -> bool:
        return self.state.run_id is not None


def _load(directory: str, step: int) -> Checkpoint:
    model, state = model_path(directory, step), state_path(directory, step)
    if not os.path.exists(model):
        raise FormatError(f"{model}: file not found (its state file is there)")
    config, params = load_model(model)
    run_state = read_run_state(state, config.num_parameters())
    if run_state.step != step:
        raise FormatError(f"{state}: header step: expected {step} (the file's name), found {run_state.step}")
    if run_state.model_sha256 is not None and file_sha256(model) != run_state.model_sha256:
        raise FormatError(f"{model}: checksum: does not match the one its state file recorded (file corrupt "
                          "or replaced)")
    return Checkpoint(step, config, params, run_state, model, state)


def latest_checkpoint(directory: str, report=None) -> Checkpoint | None:
    """The newest checkpoint in `directory` whose files load and verify; `report(line)` hears of each newer one
    skipped and why."""
    for step in checkpoint_steps(directory):
        try:
            return _load(directory, step)
        except FormatError as error:
            if report is not None:
                report(f"checkpoint {step} in {directory} skipped: {error}")
    return None


def save_checkpoint(directory: str, step: int, config: GPT2Config, params: np.ndarray, state: RunState,
                    keep: int) -> None:
    """model_STEP.bin, then state_STEP.bin with the model's checksum (both atomic), then rotation of this run's
    older checkpoints down to `keep` (0: keep all)."""
    os.makedirs(directory, exist_ok=True)
    model = model_path(directory, step)
    write_model(model, config, params)
    state.model_sha256 = file_sha256(model)
    write_run_state(state_path(directory, step), state)
    if keep:
        rotate(directory, state.run_id, keep)


def rotate(directory: str, run_id: str, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints of run `run_id`: the state first, so a model without its
    state is never taken for a checkpoint."""
    ours = []
    for step in checkpoint_steps(directory):
        try:
            if read_run_state_owner(state_path(directory, step))[1] == run_id:
                ours.append(step)
        except FormatError:
            continue  # not ours to judge: left as it is
    for step in ours[keep:]:
        os.remove(state_path(directory, step))
        if os.path.exists(model_path(directory, step)):
            os.remove(model_path(directory, step))


def identity_mismatch(saved: dict | None, current: dict) -> str | None:
    """The first field in which a checkpoint's run identity differs from this run's, as 'field: saved X, now Y'."""
    if saved is None:
        return None
    for field, value in current.items():
        if field in saved and saved[field] != value:
            return f"{field}: the checkpoint's run had {saved[field]!r}, this run has {value!r}"
    return None
