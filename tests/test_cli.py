"""The `llmpy` command end to end, run as a user runs it (a subprocess per command)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmpy.core.config import GPT2Config
from llmpy.execution.threads import available_cores
from llmpy.io.formats import write_debug_state, write_model, write_shard
from llmpy.core.layout import parameter_shapes
from llmpy.core.model import GPT2
from torch_reference import TorchGPT2

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"

CORPUS = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog while the {['red', 'green', 'blue'][i % 3]} "
    f"bird sings a song of {i % 7} notes and the river runs to the sea."
    for i in range(400)
)


def llmpy(*args, cwd, check=True, env_extra=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    result = subprocess.run([sys.executable, "-m", "llmpy", *map(str, args)], cwd=cwd, capture_output=True,
                            text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"llmpy {' '.join(map(str, args))} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def train_losses(output: str) -> list[float]:
    return [float(x) for x in re.findall(r"train loss ([0-9.]+)", output)]


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory):
    work = tmp_path_factory.mktemp("textdata")
    (work / "corpus.txt").write_text(CORPUS)
    llmpy("prepare", "text", "corpus.txt", cwd=work)
    return work


def test_every_subcommand_has_help(tmp_path):
    for command in ([], ["prepare"], ["train"], ["sample"], ["verify"]):
        result = llmpy(*command, "--help", cwd=tmp_path)
        assert "usage: llmpy" in result.stdout


def test_installed_console_command(tmp_path):
    script = Path(sys.executable).parent / "llmpy"
    if not script.exists():
        pytest.skip("llmpy is not installed as a console script in this environment")
    result = subprocess.run([str(script), "train", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--threading-layer" in result.stdout


def test_prepare_train_sample(text_dataset):
    result = llmpy("train", "--model", "d2", "--steps", "16", "--lr", "1e-3", "--val-every", "8", "--sample-every",
                   "8", "--sample-length", "8", "--no-progress", cwd=text_dataset)
    losses = train_losses(result.stdout)
    assert len(losses) == 16
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 1.0, losses
    val = [float(x) for x in re.findall(r"val loss ([0-9.]+)", result.stdout)]
    assert len(val) == 3 and val[-1] < val[0]
    assert "MFU" in result.stdout and "tok/s" in result.stdout
    assert (text_dataset / "out" / "model.bin").is_file()
    sample = llmpy("sample", "--model", "out/model.bin", "--prompt", "The quick", "--length", "8", "--seed", "1",
                   cwd=text_dataset)
    assert sample.stdout.startswith("The quick") and len(sample.stdout.strip()) > len("The quick")


def test_execution_models_give_the_same_losses(text_dataset):
    common = ["train", "--model", "d2", "--steps", "4", "--lr", "1e-3", "--val-every", "0", "--sample-every", "0",
              "--no-progress", "--output", ""]
    runs = {"sequential": llmpy(*common, "--mode", "sequential", cwd=text_dataset)}
    assert "sequential, 1 thread" in runs["sequential"].stdout
    threads = min(2, available_cores())
    for layer in ("omp", "tbb"):
        runs[layer] = llmpy(*common, "--mode", "forkjoin", "--threads", threads, "--threading-layer", layer,
                            cwd=text_dataset)
        assert f"numba {layer}" in runs[layer].stdout
    reference = train_losses(runs["sequential"].stdout)
    assert len(reference) == 4
    for layer in ("omp", "tbb"):
        np.testing.assert_allclose(train_losses(runs[layer].stdout), reference, atol=1e-5, rtol=0)


def test_classifier_rows_chunk_the_classifier_with_the_same_losses(text_dataset):
    common = ["train", "--model", "d2", "--steps", "3", "-B", "2", "-T", "16", "--lr", "1e-3", "--val-every", "2",
              "--sample-every", "0", "--no-progress", "--output", "", "--mode", "sequential"]
    whole, chunked = (llmpy(*common, *extra, cwd=text_dataset).stdout for extra in ([], ["--classifier-rows", "6"]))
    assert "matmul_forward_chunk" in chunked and "matmul_forward_chunk" not in whole  # 32 rows: 1 chunk by default
    np.testing.assert_allclose(train_losses(chunked), train_losses(whole), atol=1e-5, rtol=0)
    val = [[float(x) for x in re.findall(r"val loss ([0-9.]+)", run)] for run in (whole, chunked)]
    assert len(val[0]) == 3 and val[1] == pytest.approx(val[0], abs=1e-5)  # steps 0, 2 and the last
    bad = llmpy("train", "--classifier-rows", "-1", cwd=text_dataset, check=False)
    assert bad.returncode == 2 and "--classifier-rows -1 must be a number of token rows" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_train_builds_the_offline_corpus_when_nothing_is_prepared(tmp_path):
    result = llmpy("train", "--model", "d2", "--steps", "2", "--val-every", "0", "--sample-every", "0",
                   "--no-progress", cwd=tmp_path)
    assert "offline default corpus" in result.stdout
    assert (tmp_path / "data" / "pydocs_train.bin").is_file()
    assert len(train_losses(result.stdout)) == 2


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="tinyshakespeare input.txt not in ../shared")
def test_prepare_tinyshakespeare_matches_llm_c_counts(tmp_path):
    result = llmpy("prepare", "tinyshakespeare", "--input", SHAKESPEARE, cwd=tmp_path)
    # llm.c's dev/data/tinyshakespeare.py reports 32,768 val and 305,260 train tokens for this file
    assert "32,768 validation tokens" in result.stdout
    assert "305,260 training tokens" in result.stdout


def test_bad_arguments_get_clear_errors(tmp_path):
    too_many = available_cores() + 1
    result = llmpy("train", "--mode", "forkjoin", "--threads", too_many, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "oversubscribe" in result.stderr and "Traceback" not in result.stderr

    config = GPT2Config(max_seq_len=16, vocab_size=97, padded_vocab_size=128, num_layers=1, num_heads=2, channels=8)
    write_model(tmp_path / "small.bin", config, np.zeros(config.num_parameters(), dtype=np.float32))
    result = llmpy("train", "--init-from", "small.bin", "-T", "32", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "max_seq_len=16" in result.stderr and "Traceback" not in result.stderr

    tokens = np.arange(1000) % 97
    tokens[500] = 200  # outside the model's 97-token vocabulary
    write_shard(tmp_path / "bad_train.bin", tokens)
    result = llmpy("train", "--init-from", "small.bin", "-T", "16", "--train-data", "bad_train.bin", "--steps", "40",
                   "--val-every", "0", "--sample-every", "0", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "bad_train.bin" in result.stderr and "200" in result.stderr
    assert "Traceback" not in result.stderr

    (tmp_path / "broken.bin").write_bytes(b"\x00" * 100)
    result = llmpy("sample", "--model", "broken.bin", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "broken.bin" in result.stderr and "Traceback" not in result.stderr


def write_reference_state(path_model, path_state, config, B, T, seed=0):
    """A model file and debug state as llm.c's train_gpt2.py writes them, computed by the torch oracle."""
    model = GPT2(config, B, T)
    model.init_random(seed)
    params = dict(model.params.items())
    ref = TorchGPT2(config, params)
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, config.vocab_size, (B, T))
    targets = rng.integers(0, config.vocab_size, (B, T))
    loss, logits = ref.loss(inputs, targets)
    loss.backward()
    grads = ref.gradients()
    grads_flat = np.concatenate([grads[name].reshape(-1) for name in parameter_shapes(config)])
    write_model(path_model, config, model.params.flat)
    write_debug_state(path_state, config, inputs, targets, logits.detach().numpy()[:, :, : config.vocab_size],
                      loss.item(), grads_flat)
    return grads_flat


def test_verify_against_a_reference_debug_state(tmp_path):
    config = GPT2Config(max_seq_len=32, vocab_size=1000, padded_vocab_size=1024, num_layers=2, num_heads=4,
                        channels=64)
    write_reference_state(tmp_path / "m.bin", tmp_path / "s.bin", config, B=2, T=16)
    result = llmpy("verify", "--model", "m.bin", "--state", "s.bin", cwd=tmp_path)
    assert "overall okay: 1" in result.stdout
    assert result.stdout.count("TENSOR OK") == 1 + 16 and "LOSS OK" in result.stdout and "OK (LOGITS)" in result.stdout
    assert len(re.findall(r"step \d+: loss", result.stdout)) == 10

    # the same check must fail when one gradient disagrees beyond llm.c's tolerance
    tampered = write_reference_state(tmp_path / "m2.bin", tmp_path / "s2.bin", config, B=2, T=16)
    tampered[12345] += 0.05
    from llmpy.io.formats import read_debug_state

    state = read_debug_state(tmp_path / "s2.bin", config)
    write_debug_state(tmp_path / "s2.bin", config, state.inputs, state.targets, state.logits, state.loss, tampered)
    result = llmpy("verify", "--model", "m2.bin", "--state", "s2.bin", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "overall okay: 0" in result.stdout and "TENSOR NOT OK" in result.stdout

    truncated = (tmp_path / "s.bin").read_bytes()[:-10]
    (tmp_path / "s3.bin").write_bytes(truncated)
    result = llmpy("verify", "--model", "m.bin", "--state", "s3.bin", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "s3.bin" in result.stderr and "Traceback" not in result.stderr


CHECKPOINTED = ["train", "--model", "d2", "--lr", "1e-3", "--val-every", "0", "--sample-every", "0", "--no-progress",
                "--output", "", "--shuffle", "--checkpoint-dir", "ckpt", "--keep-checkpoints", "1"]


def test_resume_continues_exactly_where_the_checkpoint_left_off(text_dataset, tmp_path):
    data = ["--data-dir", text_dataset / "data"]
    whole = train_losses(llmpy(*CHECKPOINTED, *data, "--steps", "6", cwd=tmp_path).stdout)
    first = llmpy(*CHECKPOINTED, *data, "--steps", "3", "--checkpoint-every", "3", cwd=tmp_path)
    assert train_losses(first.stdout) == whole[:3]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model_00000003.bin", "state_00000003.bin"]
    resumed = llmpy(*CHECKPOINTED, *data, "--steps", "6", "--resume", cwd=tmp_path)
    assert "resumed from" in resumed.stdout
    # same kernels, same order, same AdamW moments and data position: bitwise the same losses
    assert train_losses(resumed.stdout) == whole[3:]


def test_a_killed_run_keeps_its_last_checkpoint(text_dataset, tmp_path):
    import signal
    import time

    from llmpy.io.formats import read_model, read_run_state

    command = [sys.executable, "-m", "llmpy", *CHECKPOINTED, "--data-dir", str(text_dataset / "data"),
               "--steps", "100000", "--checkpoint-every", "2"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "ckpt" / "state_00000006.bin").exists():
            assert process.poll() is None, "training exited early"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert not [n for n in names if n.endswith(".tmp")] or all(n.startswith(".") for n in names if n.endswith(".tmp"))
    states = [n for n in names if n.startswith("state_")]
    assert states, names
    step = int(states[-1][len("state_"):-len(".bin")])
    config, params = read_model(tmp_path / "ckpt" / f"model_{step:08d}.bin")
    state = read_run_state(tmp_path / "ckpt" / f"state_{step:08d}.bin", config.num_parameters())
    assert state.step == step and np.isfinite(params).all() and np.abs(state.v).max() > 0
    resumed = llmpy(*CHECKPOINTED, "--data-dir", text_dataset / "data", "--steps", step + 2, "--resume", cwd=tmp_path)
    assert len(train_losses(resumed.stdout)) == 2


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    result = llmpy("train", "--resume", "--checkpoint-dir", "nothing_here", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "no checkpoint" in result.stderr and "Traceback" not in result.stderr
