"""Distributed checkpoints (`--mode mpi --checkpoint-every/--resume`), run as users run them under mpiexec.

A checkpoint is rank 0's model file, each rank's shard of the AdamW moments, and the completion record that
rank 0 writes only after every shard exists. The references are independent of the checkpoint code: the same
run without interruption (bitwise), and one sequential process with batch 2B (float tolerance, as
test_distributed compares the strategies)."""

import shutil

import numpy as np
import pytest

from llmpy.io.formats import read_model
from test_cli import train_losses
from test_distributed import B, COMMON, PLAIN, data_dir, llmpy_train, needs_mpi  # noqa: F401 (fixture)

STEPS = 6
RUN = [*COMMON, *PLAIN, "--steps", STEPS, "--threads", "1", "--metrics-dir", "", "--checkpoint-every", "2"]


def train(cwd, folder, *args, ranks=2, mode=("--mode", "mpi"), check=True, env=None):
    """Train into checkpoint folder `folder`; returns (result, losses by step, final parameters or None)."""
    result = llmpy_train([*RUN, *mode, "--checkpoint-dir", folder, "--output", f"{folder}/final.bin", *args], cwd,
                         ranks=ranks, check=check, env_extra=env)
    losses = train_losses(result.stdout)
    final = cwd / folder / "final.bin"
    return result, losses, read_model(final)[1] if final.exists() else None


@pytest.fixture(scope="module")
def reference(data_dir):  # noqa: F811
    """One sequential process with batch 2B, uninterrupted: losses and final parameters."""
    _, losses, params = train(data_dir, "ref", "-B", 2 * B, "--checkpoint-every", "0", ranks=None,
                              mode=("--mode", "sequential"))
    return losses, params


@needs_mpi
@pytest.mark.parametrize("strategy", ["zero1"])
def test_kill_9_of_one_rank_while_checkpointing_then_resume_is_bitwise(strategy, data_dir):  # noqa: F811
    _, whole, whole_params = train(data_dir, f"whole-{strategy}", "--strategy", strategy, "-B", B)
    folder = f"killed-{strategy}"
    # rank 1 is killed (SIGKILL) in step 4's checkpoint, after writing its shard: that checkpoint stays incomplete
    killed, before, _ = train(data_dir, folder, "--strategy", strategy, "-B", B, check=False,
                              env={"LLMPY_FAIL_RANK": "1:4:kill-checkpoint"})
    assert killed.returncode != 0 and before == whole[:4]
    assert (data_dir / folder / "state_00000004.rank0001-of-0002.bin").exists()
    assert not (data_dir / folder / "state_00000004.bin").exists()
    resumed, after, params = train(data_dir, folder, "--strategy", strategy, "-B", B, "--resume")
    assert f"resumed from {folder}/state_00000002.bin after step 2" in resumed.stdout
    assert after == whole[2:]  # the printed losses, to the last digit
    np.testing.assert_array_equal(params, whole_params)
    assert whole_params.tobytes() == params.tobytes()


@needs_mpi
def test_a_world_size_2_checkpoint_resumes_on_1_and_2_ranks_with_any_strategy(data_dir, reference):  # noqa: F811
    ref_losses, ref_params = reference
    train(data_dir, "ws2", "--strategy", "zero1", "-B", B, "--steps", "4")
    runs = {"forkjoin, 1 process, B=2B": (None, ("--mode", "forkjoin"), ["-B", 2 * B]),
            "2 ranks, owners": (2, ("--mode", "mpi"), ["--strategy", "owners", "-B", B]),
            "2 ranks, server": (2, ("--mode", "mpi"), ["--strategy", "server", "-B", B])}
    for name, (ranks, mode, args) in runs.items():
        folder = f"ws2-{name.split(',')[0].replace(' ', '')}-{args[1]}"
        shutil.copytree(data_dir / "ws2", data_dir / folder)
        result, losses, params = train(data_dir, folder, *args, "--resume", ranks=ranks, mode=mode)
        assert "resumed from" in result.stdout and "after step 4" in result.stdout, name
        np.testing.assert_allclose(losses, ref_losses[4:], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(params, ref_params, rtol=0, atol=1e-4, err_msg=name)


@needs_mpi
def test_a_single_process_checkpoint_resumes_on_2_ranks(data_dir, reference):  # noqa: F811
    train(data_dir, "single", "-B", 2 * B, "--steps", "2", ranks=None, mode=("--mode", "sequential"))
    result, losses, params = train(data_dir, "single", "--strategy", "allreduce", "-B", B, "--resume")
    assert "after step 2" in result.stdout
    np.testing.assert_allclose(losses, reference[0][2:], rtol=1e-5)
    np.testing.assert_allclose(params, reference[1], rtol=0, atol=1e-4)
