"""Resumable checkpoints: model_STEP.bin (llm.c's model file) and then state_STEP.bin (llmpy's run state).

The state file is written last and completes the checkpoint: it names the run (an id unique in the folder,
kept by every resume of that run, and the run's identity: model shape, batch, data, seed, ...) and carries the sha256 of the
model file beside it and of its own m and v. So
  - rotation removes only the current run's older checkpoints, never another run's or a stray file;
  - a resume takes the newest checkpoint whose files verify, and reports every newer one it had to skip;
  - a resume refuses a checkpoint of another run configuration, naming the field that differs.
State files of version 1 (from before checksums) still resume, unverified, and are never rotated away.

Sharded checkpoints (data-parallel ranks, `save_shard` + `complete_sharded_checkpoint`): model_STEP.bin once
(rank 0), each rank's AdamW moments for the parameter ranges it updates in state_STEP.rankR-of-P.bin, and then,
only after every shard was written, state_STEP.bin as the completion record (version 3) listing the shards and
their checksums. A checkpoint is its state_STEP.bin, so shards without it (a rank died while writing) are never
taken for a checkpoint; loading one assembles the whole m and v from its shards, so it resumes on any world
size, strategy or execution model, and a single-file checkpoint resumes on ranks the same way.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, replace

import numpy as np

from llmpy.core.config import GPT2Config
from llmpy.core.layout import packed_ranges
from llmpy.io.formats import (FormatError, RunState, file_sha256, load_model, read_run_state, read_run_state_owner,
                              write_model, write_run_state)

_STATE = re.compile(r"state_(\d{8,})\.bin$")
_SHARD = re.compile(r"state_(\d{8,})\.rank\d+-of-\d+\.bin$")


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


def shard_path(directory: str, step: int, rank: int, world_size: int) -> str:
    return os.path.join(directory, f"state_{step:08d}.rank{rank:04d}-of-{world_size:04d}.bin")


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
    if run_state.shards is not None:
        run_state.m, run_state.v = _assemble_shards(directory, run_state, config.num_parameters())
    if run_state.model_sha256 is not None and file_sha256(model) != run_state.model_sha256:
        raise FormatError(f"{model}: checksum: does not match the one its state file recorded (file corrupt "
                          "or replaced)")
    return Checkpoint(step, config, params, run_state, model, state)


def _assemble_shards(directory: str, record: RunState, num_parameters: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole m and v of a sharded checkpoint, from the shards its completion record lists (each checked
    against the record: run, step, checksum, ranges; together they cover every parameter once)."""
    m, v = np.zeros(num_parameters, np.float32), np.zeros(num_parameters, np.float32)
    covered = np.zeros(num_parameters, np.int8)
    for entry in record.shards:
        path = os.path.join(directory, os.path.basename(entry["file"]))
        if not os.path.exists(path):
            raise FormatError(f"{path}: file not found (a shard its completion record lists)")
        ranges = entry["ranges"]
        if any(stop > num_parameters for _, stop in ranges):
            raise FormatError(f"{path}: ranges: beyond the model's {num_parameters} parameters")
        shard = read_run_state(path, sum(stop - start for start, stop in ranges))
        if (shard.step, shard.run_id, shard.state_sha256, shard.ranges) != (record.step, record.run_id,
                                                                           entry["state_sha256"], ranges):
            raise FormatError(f"{path}: not the shard its completion record lists (step, run, checksum or ranges "
                              "differ: replaced by another run's?)")
        for packed, whole in packed_ranges(ranges):
            m[whole], v[whole] = shard.m[packed], shard.v[packed]
            covered[whole] += 1
    if (covered != 1).any():
        first = int(np.argmax(covered != 1))
        raise FormatError(f"{state_path(directory, record.step)}: shards: parameter {first} is held by "
                          f"{int(covered[first])} shards, not 1")
    return m, v


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


def save_shard(directory: str, step: int, rank: int, world_size: int, state: RunState) -> dict:
    """This rank's part of a sharded checkpoint: `state` holds the moments of `state.ranges`. Returns the
    entry the completion record lists for it."""
    os.makedirs(directory, exist_ok=True)
    path = shard_path(directory, step, rank, world_size)
    checksum = write_run_state(path, replace(state, model_sha256=state.model_sha256 or ""))
    return {"file": os.path.basename(path), "state_sha256": checksum, "ranges": [list(r) for r in state.ranges],
            "bytes": os.path.getsize(path)}


def complete_sharded_checkpoint(directory: str, step: int, num_parameters: int, state: RunState, shards: list[dict],
                                keep: int) -> None:
    """After model_STEP.bin and every shard are written: state_STEP.bin, the completion record (naming the
    model's checksum and each shard's), then rotation. A shard this process cannot see (a checkpoint folder
    that is not shared between the hosts) is refused, naming it."""
    for entry in shards:
        path = os.path.join(directory, entry["file"])
        if not os.path.exists(path) or os.path.getsize(path) != entry["bytes"]:
            raise OSError(f"{path}: the shard written by another rank is not here (is {directory} on a file "
                          "system every host shares?)")
    state.model_sha256 = file_sha256(model_path(directory, step))
    record = replace(state, m=np.zeros(0, np.float32), v=np.zeros(0, np.float32), ranges=None,
                     shards=[{k: e[k] for k in ("file", "state_sha256", "ranges")} for e in shards])
    write_run_state(state_path(directory, step), record, num_parameters)
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
        for shard in _shard_files(directory, step):
            os.remove(shard)
        if os.path.exists(model_path(directory, step)):
            os.remove(model_path(directory, step))
    _remove_orphan_shards(directory, run_id, ours[0] if ours else None)


def _shard_files(directory: str, step: int) -> list[str]:
    return glob.glob(os.path.join(glob.escape(directory), f"state_{step:08d}.rank*-of-*.bin"))


def _remove_orphan_shards(directory: str, run_id: str, newest: int | None) -> None:
    """Shards of this run older than its newest checkpoint that no completion record names (a rank died
    while the checkpoint was written): never a checkpoint, so nothing is lost by removing them."""
    if newest is None:
        return
    complete = set(checkpoint_steps(directory))
    for path in glob.glob(os.path.join(glob.escape(directory), "state_*.rank*-of-*.bin")):
        found = _SHARD.match(os.path.basename(path))
        if not found or int(found.group(1)) >= newest or int(found.group(1)) in complete:
            continue
        try:
            if read_run_state_owner(path)[1] == run_id:
                os.remove(path)
        except FormatError:
            continue


def identity_mismatch(saved: dict | None, current: dict) -> str | None:
    """The first field in which a checkpoint's run identity differs from this run's, as 'field: saved X, now Y'."""
    if saved is None:
        return None
    if "sequences_per_step" not in saved and "batch_size" in saved:  # checkpoints from before sharding
        saved = dict(saved, sequences_per_step=saved["batch_size"] * saved.get("world_size", 1))
    for field, value in current.items():
        if field in saved and saved[field] != value:
            return f"{field}: the checkpoint's run had {saved[field]!r}, this run has {value!r}"
    return None
