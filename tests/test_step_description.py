"""The step has one description: the model's list of kernel calls. A kernel added to the list reaches every
execution model without a change to the execution code. (The graph derived from the list was checked against the
former hand-written builder while both described llm.c's CPU layout; with one layer of activation gradients and
the tiled attention that builder no longer describes the model, and tests/test_tasks.py checks the derived
graph's dependencies directly.)"""

import numpy as np
import pytest
from numba import prange

from llmpy.core.config import PRESETS
from llmpy.core.model import GPT2
from llmpy.core.optim import AdamWConfig
from llmpy.core.step import KernelCall
from llmpy.execution.factory import make_execution_model
from llmpy.execution.threads import available_cores
from llmpy.kernels import costs, specs
from llmpy.kernels.compile import kernel
from llmpy.observe.recorder import Recorder


def _model(name, B=2, T=16):
    model = GPT2(PRESETS[name], B, T)
    model.init_random(1)
    return model


# ------------------------------------------------------------------ a new kernel reaches every execution model
@kernel
def scale_rows(out, inp, factor):
    """out (N, C) = inp (N, C) * factor: a toy kernel for the test."""
    for n in prange(out.shape[0]):
        for c in range(out.shape[1]):
            out[n, c] = inp[n, c] * factor


def _scale_rows_accesses(out, inp, factor):
    return [(specs.W, out), (specs.R, inp)]


class ScaledGPT2(GPT2):
    """GPT-2 with one more call: the final layernorm's output scaled by 0.5 in place, before the lm_head."""

    def _forward_calls(self, b, t, with_loss, kernels, cache=None):
        calls = super()._forward_calls(b, t, with_loss, kernels, cache)
        rows = self._buffers_for(b, t)[0].lnf.reshape(b * t, self.config.channels)  # this batch shape's views
        lm_head = next(i for i, c in enumerate(calls) if c.name == "matmul_forward.logits")
        toy = KernelCall("scale_rows", "", -1, scale_rows.variant(kernels.parallel), (rows, rows, np.float32(0.5)))
        return calls[:lm_head] + [toy] + calls[lm_head:]


@pytest.fixture
def toy_kernel_registered(monkeypatch):
    monkeypatch.setitem(specs.SPECS, "scale_rows", specs.KernelSpec(
        "scale_rows", _scale_rows_accesses, {"rows": specs.rows_rule((0, 1))}))
    monkeypatch.setitem(costs.KERNEL_COSTS, "scale_rows", lambda out, inp, factor: (out.size, 8 * out.size))


def test_a_kernel_added_to_the_model_runs_in_every_execution_model(toy_kernel_registered):
    rng = np.random.default_rng(5)
    batch = (rng.integers(0, 97, (2, 16)), rng.integers(0, 97, (2, 16)))
    plain = _model("tiny")
    plain_loss = plain.forward(*batch)
    losses, calls = {}, {}
    threads = min(2, available_cores())
    for mode, workers in (("sequential", 1), ("forkjoin", threads), ("tasks", threads)):
        execution = make_execution_model(mode, workers, **({"block_tokens": 8} if mode == "tasks" else {}))
        try:
            model = ScaledGPT2(PRESETS["tiny"], 2, 16, execution.kernels)
            model.init_random(1)
            optimizer = execution.make_optimizer(model, AdamWConfig())
            recorder = Recorder(keep_calls=True)
            model.observer = optimizer.observer = recorder
            losses[mode] = execution.train_step(model, optimizer, [batch], 1e-3, recorder, 1)
        finally:
            execution.close()
        calls[mode] = recorder.kernel_totals[1]["scale_rows"][0]
    assert calls == {"sequential": 1, "forkjoin": 1, "tasks": 2 * 2}  # tasks: one per (sequence, 8-token block)
    assert losses["sequential"] != pytest.approx(plain_loss, abs=1e-3)  # the call changed the logits
    # the same arithmetic in every execution model (the GEMMs' blocking differs in tasks: float tolerance)
    assert losses["forkjoin"] == pytest.approx(losses["sequential"], abs=1e-6)
    assert losses["tasks"] == pytest.approx(losses["sequential"], abs=1e-5)


def test_generation_runs_the_same_description(toy_kernel_registered):
    """The KV-cache forward is the model's forward list over the new positions: a kernel added to the list is in
    it, and a prompt fed at once, then token by token, gives the full forward's logits at every position."""
    config = PRESETS["tiny"]
    tokens = np.random.default_rng(6).integers(0, config.vocab_size, (2, 12))
    full = ScaledGPT2(config, 2, 12, training=False)
    full.init_random(2)
    full.forward(tokens)
    expected = full.logits().copy()
    decoding = ScaledGPT2(config, 2, 12, training=False, params=full.params)
    cache = decoding.kv_cache(2, 12)
    assert any(c.kernel == "scale_rows" for c in decoding.decode_calls(2, 1, cache))
    got = [decoding.decode(tokens[:, :5], cache)]  # the prompt at once: the logits of its last position
    got += [decoding.decode(tokens[:, t:t + 1], cache) for t in range(5, 12)]
    np.testing.assert_allclose(np.stack(got, axis=1), expected[:, 4:], atol=1e-5, rtol=0)
    assert cache.length == 12
    with pytest.raises(ValueError, match="cache holds"):
        decoding.decode(tokens[:, :1], cache)
