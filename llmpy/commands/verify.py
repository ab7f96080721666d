"""`llmpy verify`: llm.c's test_gpt2 against an llm.c checkpoint and debug state.

Runs forward/backward on the debug state's batch, compares logits, loss and every parameter gradient
with the values PyTorch wrote (llm.c's tolerances: 1e-2 on logits and loss, 2e-2 on gradients), then
10 AdamW steps on that batch (lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay 0.01).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from llmpy.core.config import GPT2Config
from llmpy.core.layout import FlatBuffer

LOGITS_TOLERANCE = 1e-2
LOSS_TOLERANCE = 1e-2
GRAD_TOLERANCE = 2e-2

# The losses llm.c's test_gpt2.c expects for GPT-2 124M (gpt2_124M.bin) on gpt2_124M_debug_state.bin,
# both written by llm.c's train_gpt2.py from the OpenAI weights.
GPT2_124M_EXPECTED_LOSSES = (
    5.270007133483887, 4.059706687927246, 3.3751230239868164, 2.8007826805114746, 2.315382242202759,
    1.8490285873413086, 1.3946564197540283, 0.9991465210914612, 0.6240804195404053, 0.37651097774505615,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODEL_BIN", help="llm.c model checkpoint (e.g. gpt2_124M.bin)")
    parser.add_argument("--state", required=True, metavar="STATE_BIN",
                        help="llm.c debug state (e.g. gpt2_124M_debug_state.bin)")
    parser.add_argument("--steps", type=int, default=10, help="AdamW steps on the state's batch (default 10)")
    parser.add_argument("--expected-losses", default="auto",
                        help="'auto' (llm.c's table for GPT-2 124M when step 0 matches it), 'none', or a "
                             "comma-separated list of losses to compare against")


def compare_tensor(name: str, actual: np.ndarray, expected: np.ndarray, tolerance: float, out) -> bool:
    """llm.c's check_tensor: every element within `tolerance` (absolute)."""
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    max_diff = float(diff.max()) if diff.size else 0.0
    ok = bool(np.all(diff < tolerance))
    status = "OK" if ok else "NOT OK"
    print(f"{'TENSOR ' + status:14s} {name:10s} max diff {max_diff:.3e} (tolerance {tolerance:g})", file=out)
    if not ok:
        worst = int(np.argmax(diff))
        print(f"    worst element {worst}: {actual.reshape(-1)[worst]:.6f} vs expected {expected.reshape(-1)[worst]:.6f}",
              file=out)
    return ok


def _expected_losses(spec: str, config: GPT2Config, first_loss: float, out) -> tuple[float, ...] | None:
    if spec == "none":
        return None
    if spec == "auto":
        is_124m = (config.num_layers, config.num_heads, config.channels, config.vocab_size) == (12, 12, 768, 50257)
        if is_124m and abs(first_loss - GPT2_124M_EXPECTED_LOSSES[0]) < LOSS_TOLERANCE:
            print("comparing losses with llm.c's expected losses for GPT-2 124M", file=out)
            return GPT2_124M_EXPECTED_LOSSES
        print("no reference losses for this checkpoint: checking that the loss decreases", file=out)
        return None
    try:
        return tuple(float(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"--expected-losses must be auto, none or comma-separated numbers, got {spec!r}") from None


def run(args, out=None) -> bool:
    out = out if out is not None else sys.stdout  # the stream of the call, not of the import
    from llmpy.execution.base import Sequential
    from llmpy.io.formats import load_model, read_debug_state
    from llmpy.core.model import GPT2
    from llmpy.core.optim import AdamW, AdamWConfig

    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    config, params = load_model(args.model)
    state = read_debug_state(args.state, config)
    print(f"[GPT-2] max_seq_len {config.max_seq_len}, vocab_size {config.vocab_size}, padded_vocab_size "
          f"{config.padded_vocab_size}, num_layers {config.num_layers}, num_heads {config.num_heads}, "
          f"channels {config.channels}, num_parameters {config.num_parameters():,}", file=out)
    print(f"[State] batch_size {state.B}, seq_len {state.T}", file=out)
    execution = Sequential()
    try:
        model = GPT2(config, state.B, state.T, execution.kernels)
        model.load_parameters(params)
        optimizer = AdamW(model.params, AdamWConfig(0.9, 0.999, 1e-8, 0.01), execution.kernels)
        expected_grads = FlatBuffer(model.params.shapes, state.grads)
        V = config.vocab_size
        allok = True
        losses: list[float] = []
        for step in range(args.steps):
            if step == 0:  # with targets the forward turns the logits into their gradient (fused classifier)
                model.forward(state.inputs)
                logits_ok = compare_tensor("logits", model.logits(), state.logits, LOGITS_TOLERANCE, out)
            loss = model.forward(state.inputs, state.targets)
            model.backward()
            if step == 0:
                if logits_ok:
                    print("OK (LOGITS)", file=out)
                loss_ok = abs(loss - state.loss) < LOSS_TOLERANCE
                print(f"{'LOSS OK' if loss_ok else 'LOSS MISMATCH'}: {loss:.6f} {state.loss:.6f}", file=out)
                grads_ok = True
                for name, grad in model.grads.items():
                    expected = expected_grads[name]
                    if name == "wte":  # llm.c checks the real vocabulary rows only
                        grad, expected = grad[:V], expected[:V]
                    grads_ok &= compare_tensor("d" + name, grad, expected, GRAD_TOLERANCE, out)
                allok = allok and logits_ok and loss_ok and grads_ok
            optimizer.update(model.params, model.grads, 1e-4)
            losses.append(loss)
            print(f"step {step}: loss {loss:.6f}", file=out)
        reference = _expected_losses(args.expected_losses, config, losses[0], out)
        if reference is not None:
            for step, (loss, expected) in enumerate(zip(losses, reference)):
                ok = abs(loss - expected) < LOSS_TOLERANCE
                allok = allok and ok
                print(f"{'loss ok' if ok else 'LOSS MISMATCH'} at step {step}: {loss:.6f} {expected:.6f}", file=out)
        elif len(losses) > 1:
            decreased = losses[-1] < losses[0]
            allok = allok and decreased
            print(f"loss {'decreased' if decreased else 'DID NOT DECREASE'}: {losses[0]:.6f} -> {losses[-1]:.6f}",
                  file=out)
    finally:
        execution.close()
    print(f"overall okay: {int(allok)}", file=out)
    return allok
