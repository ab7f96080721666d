"""Nothing lost, nothing hangs: checkpoints that are a run's own and verified, numeric guards, output checks,
refused inputs, and a fuzz of every file kind. Each test runs the `llmpy` command as a user does."""

import os
import struct
import subprocess

import numpy as np
import pytest
from test_cli import CHECKPOINTED, llmpy, text_dataset, train_losses  # noqa: F401  (fixture)

from llmpy.core.config import PRESETS, GPT2Config
from llmpy.data.loader import DataError
from llmpy.io import formats
from llmpy.io.formats import FormatError, read_run_state_owner, write_model

CKPT = [a for a in CHECKPOINTED if a not in ("--keep-checkpoints", "1")]


def _states(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("state_"))


def _one_line_error(result, *words):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


# ------------------------------------------------------------------ checkpoints are a run's own
def test_a_second_run_in_the_folder_keeps_its_checkpoints_and_leaves_the_first_runs(text_dataset, tmp_path):  # noqa: F811
    data = ["--data-dir", text_dataset / "data"]
    llmpy(*CKPT, *data, "--steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "2", cwd=tmp_path)
    ckpt = tmp_path / "ckpt"
    (ckpt / "state_best.bin").write_bytes(b"a user's own file")
    first_run = {read_run_state_owner(ckpt / name)[1] for name in _states(ckpt) if name != "state_best.bin"}
    assert _states(ckpt) == ["state_00000004.bin", "state_00000006.bin", "state_best.bin"] and len(first_run) == 1
    # a second run that would write over the first run's checkpoints is refused before its first step
    clash = llmpy(*CKPT, *data, "--seed", "7", "--steps", "4", "--checkpoint-every", "2", cwd=tmp_path, check=False)
    _one_line_error(clash, "--checkpoint-dir", "another run's checkpoints at steps 4", "would overwrite")
    assert "step    1" not in clash.stdout
    llmpy(*CKPT, *data, "--seed", "7", "--steps", "3", "--checkpoint-every", "1", "--keep-checkpoints", "1",
          cwd=tmp_path)
    # the second run rotated only its own checkpoints (steps 1, 2 gone, 3 kept); the first run's are all there
    owners = {name: read_run_state_owner(ckpt / name)[1] for name in _states(ckpt) if name != "state_best.bin"}
    assert set(owners) == {"state_00000003.bin", "state_00000004.bin", "state_00000006.bin"}
    assert owners["state_00000004.bin"] in first_run and owners["state_00000006.bin"] in first_run
    assert owners["state_00000003.bin"] not in first_run
    assert (ckpt / "state_best.bin").read_bytes() == b"a user's own file"
    # the newest checkpoint is the first run's: resuming with the second run's seed is refused, naming the field
    resumed = llmpy(*CKPT, *data, "--seed", "7", "--steps", "8", "--resume", cwd=tmp_path, check=False)
    _one_line_error(resumed, "--resume", "seed")


def test_resume_skips_a_corrupt_newest_checkpoint_and_says_so(text_dataset, tmp_path):  # noqa: F811
    data = ["--data-dir", text_dataset / "data"]
    whole = train_losses(llmpy(*CKPT, *data, "--steps", "6", cwd=tmp_path).stdout)
    llmpy(*CKPT, *data, "--steps", "4", "--checkpoint-every", "2", "--keep-checkpoints", "2", cwd=tmp_path)
    model = tmp_path / "ckpt" / "model_00000004.bin"
    raw = bytearray(model.read_bytes())
    raw[2000] ^= 0x01  # one flipped bit in the parameters: still finite, still a model file
    model.write_bytes(bytes(raw))
    resumed = llmpy(*CKPT, *data, "--steps", "6", "--resume", cwd=tmp_path)
    assert "checkpoint 4 in ckpt skipped" in resumed.stdout and "checksum" in resumed.stdout
    assert "resumed from ckpt/state_00000002.bin" in resumed.stdout
    assert train_losses(resumed.stdout) == whole[2:]  # the run continued from step 2, bitwise


@pytest.mark.parametrize("flags,field", [(["-B", "2"], "sequences_per_step"), (["--grad-accum", "2"], "grad_accum"),
                                         (["--seed", "5"], "seed"), (["-T", "32"], "seq_len")])
def test_resume_refuses_another_runs_configuration(text_dataset, tmp_path, flags, field):  # noqa: F811
    data = ["--data-dir", text_dataset / "data"]
    llmpy(*CKPT, *data, "--steps", "2", "--checkpoint-every", "2", cwd=tmp_path)
    resumed = llmpy(*CKPT, *data, *flags, "--steps", "4", "--resume", cwd=tmp_path, check=False)
    _one_line_error(resumed, "another run's checkpoint", field)


def test_resume_refuses_other_data_files(text_dataset, tmp_path):  # noqa: F811
    data = text_dataset / "data"
    llmpy(*CKPT, "--data-dir", data, "--steps", "2", "--checkpoint-every", "2", cwd=tmp_path)
    (tmp_path / "other.txt").write_text((text_dataset / "corpus.txt").read_text() * 2)
    llmpy("prepare", "text", "other.txt", "--data-dir", "other", cwd=tmp_path)
    resumed = llmpy(*CKPT, "--data-dir", "other", "--steps", "4", "--resume", cwd=tmp_path, check=False)
    _one_line_error(resumed, "train_data")


def test_a_run_killed_before_its_final_save_finishes_it_on_resume(text_dataset, tmp_path):  # noqa: F811
    data = ["--data-dir", text_dataset / "data"]
    args = [a if a != "" else "final.bin" for a in CKPT]  # --output final.bin
    llmpy(*args, *data, "--steps", "2", "--checkpoint-every", "2", cwd=tmp_path)
    saved = (tmp_path / "final.bin").read_bytes()
    (tmp_path / "final.bin").unlink()  # as if killed between the last checkpoint and the final save
    finished = llmpy(*args, *data, "--steps", "2", "--resume", cwd=tmp_path)
    assert "finishing its final save" in finished.stdout
    assert (tmp_path / "final.bin").read_bytes() == saved


# ------------------------------------------------------------------ numeric guards
@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--lr", "inf"), ("--beta1", "nan"), ("--beta1", "1"),
                                        ("--beta2", "2"), ("--eps", "0"), ("--eps", "-1"), ("--weight-decay", "nan"),
                                        ("--grad-clip", "nan"), ("--grad-clip", "-1"), ("--seed", "3000000000")])
def test_bad_hyperparameters_are_refused_at_the_command_line(tmp_path, flag, value):
    result = llmpy("train", "--model", "tiny", flag, value, "--steps", "1", "--output", "", "--metrics-dir", "",
                   cwd=tmp_path, check=False)
    _one_line_error(result, flag)


def test_a_step_that_makes_the_parameters_non_finite_keeps_the_last_good_checkpoint(text_dataset, tmp_path):  # noqa: F811
    data = ["--data-dir", text_dataset / "data"]
    llmpy(*CKPT, *data, "--steps", "2", "--checkpoint-every", "1", "--keep-checkpoints", "1", cwd=tmp_path)
    good = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    # 1e39 is a finite learning rate, but infinite in float32: the update makes every parameter it moves infinite
    bad = llmpy(*CKPT, *data, "--lr", "1e39", "--steps", "4", "--checkpoint-every", "1", "--keep-checkpoints", "1",
                "--resume", cwd=tmp_path, check=False)
    _one_line_error(bad, "step 3", "non-finite", "nothing of this step is saved")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == good


def test_a_diverged_run_stops_instead_of_training_on(text_dataset, tmp_path):  # noqa: F811
    result = llmpy(*CKPT, "--data-dir", text_dataset / "data", "--lr", "1e4", "--steps", "6", cwd=tmp_path,
                   check=False)
    _one_line_error(result, "diverged", "lower --lr")
    assert len(train_losses(result.stdout)) < 6


def test_non_finite_weights_in_a_model_file_are_refused_naming_the_tensor(tmp_path):
    config = PRESETS["tiny"]
    params = np.zeros(config.num_parameters(), dtype=np.float32)
    from llmpy.core.layout import parameter_buffer

    offset = parameter_buffer(config).offsets["qkvw"] + 5
    params[offset] = np.nan
    write_model(tmp_path / "bad.bin", config, params)
    result = llmpy("train", "--init-from", "bad.bin", "--steps", "1", "--output", "", "--metrics-dir", "",
                   cwd=tmp_path, check=False)
    _one_line_error(result, "bad.bin", "tensor qkvw", "non-finite")


# ------------------------------------------------------------------ outputs checked before the first step
def test_an_output_path_of_the_wrong_kind_is_refused_before_training(tmp_path):
    (tmp_path / "afile").write_text("x")
    for flags, word in ((["--metrics-dir", "afile/metrics"], "--metrics-dir"), (["--output", "."], "--output"),
                        (["--trace", "afile"], "--trace")):
        result = llmpy("train", "--model", "tiny", "--steps", "1", *flags, cwd=tmp_path, check=False)
        _one_line_error(result, word)
        assert "step    1" not in result.stdout  # refused before any step ran


def test_output_refuses_to_replace_a_file_that_is_no_model(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    os.chmod(notes, 0o600)
    result = llmpy("train", "--model", "tiny", "--steps", "1", "--output", "notes.txt", "--metrics-dir", "",
                   cwd=tmp_path, check=False)
    _one_line_error(result, "--output", "not an llm.c model file", "--force")
    assert notes.read_text() == "my notes"
    llmpy("train", "--model", "d2", "-B", "1", "-T", "16", "--steps", "1", "--output", "notes.txt", "--metrics-dir",
          "", "--force", "--val-every", "0", "--sample-every", "0", cwd=tmp_path)
    assert formats.is_model_file(notes) and (os.stat(notes).st_mode & 0o777) == 0o600  # its permissions kept


def test_a_full_output_folder_is_a_one_line_error_and_leaves_no_temporary_file(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        result = llmpy("train", "--model", "d2", "--steps", "1", "--val-every", "0", "--sample-every", "0",
                       "--output", full / "model.bin", "--metrics-dir", "", cwd=tmp_path, check=False)
        _one_line_error(result, str(full / "model.bin"), "No space left on device")
        assert os.listdir(full) == []
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_stale_temporary_files_of_a_dead_process_are_cleaned_on_the_next_start(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = out / f".model.bin.{dead.pid}.deadbeef.tmp"
    stale.write_bytes(b"half a model")
    mine = out / f".model.bin.{os.getpid()}.cafebabe.tmp"  # a live process's temp file stays
    mine.write_bytes(b"being written")
    llmpy("train", "--model", "d2", "-B", "1", "-T", "16", "--steps", "1", "--val-every", "0", "--sample-every", "0",
          cwd=tmp_path)
    assert not stale.exists() and mine.exists()


# ------------------------------------------------------------------ inputs that are not regular files
def test_a_named_pipe_as_input_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "pipe.bin")
    result = llmpy("train", "--init-from", "pipe.bin", "--steps", "1", cwd=tmp_path, check=False)
    _one_line_error(result, "pipe.bin", "named pipe")
    result = llmpy("prepare", "text", "pipe.bin", cwd=tmp_path, check=False)
    _one_line_error(result, "pipe.bin", "not a regular file")


# ------------------------------------------------------------------ fuzz: every file kind, corrupted at random
def _file_kinds(tmp_path):
    """(name, path, load) for one small valid file of each kind; load(path) raises FormatError or DataError, or
    returns arrays that must be finite."""
    rng = np.random.default_rng(0)
    config = GPT2Config(max_seq_len=8, vocab_size=50, padded_vocab_size=64, num_layers=1, num_heads=1, channels=8)
    n = config.num_parameters()
    write_model(tmp_path / "model.bin", config, rng.standard_normal(n).astype(np.float32))
    formats.write_model(tmp_path / "model16.bin", config, rng.standard_normal(n).astype(np.float32), "bfloat16")
    state = formats.RunState(3, 42, 0, 1, 2, rng.standard_normal(n).astype(np.float32),
                             rng.random(n).astype(np.float32), "run", {"seed": 42}, "0" * 64)
    formats.write_run_state(tmp_path / "state.bin", state)
    formats.write_shard(tmp_path / "shard.bin", rng.integers(0, 50, 300))
    formats.write_tokenizer(tmp_path / "tok.bin", [bytes([65 + i % 26]) * (1 + i % 3) for i in range(50)], 49)
    return [
        ("model", tmp_path / "model.bin", lambda p: [formats.load_model(p)[1]]),
        ("model bf16", tmp_path / "model16.bin", lambda p: [formats.load_model(p)[1]]),
        ("run state", tmp_path / "state.bin", lambda p: [formats.read_run_state(p, n).m, formats.read_run_state(p, n).v]),
        ("shard", tmp_path / "shard.bin", lambda p: [formats.read_shard(p, mmap=False).astype(np.float32)]),
        ("tokenizer", tmp_path / "tok.bin", lambda p: [np.zeros(len(formats.read_tokenizer(p)[0]))]),
    ]


def test_fuzz_corrupted_files_give_a_clean_error_or_a_checked_load(tmp_path):
    rng = np.random.default_rng(12345)
    outcomes = {}
    for name, path, load in _file_kinds(tmp_path):
        original = path.read_bytes()
        for trial in range(60):
            raw = bytearray(original)
            kind = trial % 3
            if kind == 0:  # random bytes at random offsets (header and payload)
                for offset in rng.integers(0, len(raw), size=int(rng.integers(1, 8))):
                    raw[offset] = int(rng.integers(0, 256))
            elif kind == 1:  # truncated
                raw = raw[: int(rng.integers(0, len(raw)))]
            else:  # a header int replaced by a random or huge value
                index = int(rng.integers(0, 12))
                raw[4 * index:4 * index + 4] = struct.pack("<i", int(rng.choice([-1, 0, 2**31 - 1,
                                                                                   int(rng.integers(-9, 1 << 20))])))
            path.write_bytes(bytes(raw))
            try:
                arrays = load(path)
            except (FormatError, DataError) as error:
                assert "\n" not in str(error) and str(path) in str(error), (name, trial, str(error))
                outcomes[name, "error"] = outcomes.get((name, "error"), 0) + 1
                continue
            assert all(np.isfinite(a).all() for a in arrays), (name, trial)
            outcomes[name, "load"] = outcomes.get((name, "load"), 0) + 1
        path.write_bytes(original)
    assert all(outcomes.get((name, "error"), 0) > 0 for name, _, _ in _file_kinds(tmp_path)), outcomes
