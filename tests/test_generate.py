"""KV-cache generation against full forward passes and against transformers' generate (greedy), sampling filters
against a direct computation, and `llmpy sample`."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmpy.core.generate import KVCacheModel, Sampling, generate, positions_needed, token_probabilities
from llmpy.core.layout import parameter_buffer
from llmpy.core.model import GPT2
from llmpy.io.huggingface import read_huggingface
from llmpy.kernels import KernelSet

PROMPTS = [[50256, 464, 2068, 7586], [15496, 11], [40, 588, 262, 3290, 290, 262, 3797]]
NEW = 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen") / "model"
    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # away from the init: varied, clearly ranked predictions
    hf.eval().save_pretrained(folder)
    config, params = read_huggingface(folder)
    return folder, hf, config, params


def kv_model(config, params, batch, positions, parallel=False):
    return KVCacheModel(config, parameter_buffer(config, params.copy()), batch, positions, KernelSet(parallel))


def full_forward_greedy(config, params, prompt, new):
    """Greedy decoding the slow way: one full forward over the whole context per token."""
    model = GPT2(config, 1, len(prompt) + new, training=False)
    model.load_parameters(params)
    context, logits = list(prompt), []
    for _ in range(new):
        model.forward(np.array([context]))
        logits.append(model.logits()[0, -1].copy())
        context.append(int(np.argmax(logits[-1])))
    return context[len(prompt):], logits


def test_kv_cache_equals_full_forward_and_transformers_greedy(models):
    folder, hf, config, params = models
    hf.generation_config.eos_token_id = None  # generate all NEW tokens, as llmpy does without a stop token
    model = kv_model(config, params, len(PROMPTS), positions_needed(PROMPTS, NEW))
    logged = {s: [] for s in range(len(PROMPTS))}
    batched = generate(model, PROMPTS, NEW, Sampling(temperature=0), on_token=lambda s, t: logged[s].append(t))
    assert logged == dict(enumerate(batched))  # streamed as chosen
    for prompt, tokens in zip(PROMPTS, batched):
        slow, _ = full_forward_greedy(config, params, prompt, NEW)
        assert tokens == slow
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)
        for scores in out.scores:  # the comparison means something only without near-ties
            top = torch.topk(scores[0], 2).values
            assert float(top[0] - top[1]) > 1e-3
        assert tokens == out.sequences[0, len(prompt):].tolist()
        assert len(set(tokens)) > 3  # not one repeated token


def test_kv_cache_logits_equal_full_forward_logits(models):
    _, _, config, params = models
    prompt = PROMPTS[2]
    tokens, logits = full_forward_greedy(config, params, prompt, 6)
    model = kv_model(config, params, 1, len(prompt) + 6, parallel=True)
    got = [model.forward(np.array([prompt]))[0]]
    for token in tokens[:-1]:
        got.append(model.forward(np.array([[token]]))[0])
    np.testing.assert_allclose(np.array(got), np.array(logits), atol=1e-4, rtol=0)


def test_stop_token_and_seeded_sampling(models):
    _, _, config, params = models
    first = full_forward_greedy(config, params, PROMPTS[1], 1)[0][0]
    model = kv_model(config, params, len(PROMPTS), positions_needed(PROMPTS, NEW))
    new = generate(model, PROMPTS, NEW, Sampling(temperature=0), stop_token=first)
    assert new[1] == [first] and all(len(t) == NEW or t[-1] == first for t in new)

    sampling = Sampling(temperature=0.9, top_k=50, top_p=0.9)
    runs = [generate(kv_model(config, params, 3, positions_needed(PROMPTS, NEW)), PROMPTS, NEW, sampling, seed=5)
            for _ in range(2)]
    assert runs[0] == runs[1]  # seeded
    alone = generate(kv_model(config, params, 1, positions_needed(PROMPTS[:1], NEW)), PROMPTS[:1], NEW, sampling, seed=5)
    assert alone[0] == runs[0][0]  # sequence 0 samples what it samples alone
    other = generate(kv_model(config, params, 3, positions_needed(PROMPTS, NEW)), PROMPTS, NEW, sampling, seed=6)
    assert other != runs[0]


def test_sampling_filters():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(300).astype(np.float32) * 3
    T, k, p = 0.7, 40, 0.8
    z = np.exp((logits - logits.max()) / T)
    probs = z / z.sum()
    order = np.argsort(-probs)
    kept = order[:k]  # top-k
    renorm = probs[kept] / probs[kept].sum()
    cumulative = np.cumsum(renorm)
    nucleus = kept[:int(np.argmax(cumulative >= p)) + 1]  # smallest prefix reaching p
    expected = np.zeros(300)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    got = token_probabilities(logits, Sampling(T, k, p))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
    assert np.count_nonzero(got) == len(nucleus) < k


def test_sample_command_streams_batches_and_reports_tokens_per_second(models, capsys):
    folder, _, config, params = models
    run = lambda *a: subprocess.run([sys.executable, "-m", "llmpy", "sample", "--model", folder, *map(str, a)],
                                    capture_output=True, text=True, timeout=300)
    result = run("--prompt", "Hello,", "--temperature", "0", "--length", "8", "--threads", "2")
    assert result.returncode == 0, result.stderr
    from llmpy.io.tokenizer import Tokenizer

    tokenizer = Tokenizer.gpt2()
    tokens, _ = full_forward_greedy(config, params, tokenizer.encode("Hello,"), 8)
    if 50256 in tokens:
        tokens = tokens[:tokens.index(50256) + 1]
    assert result.stdout == "Hello," + tokenizer.decode([t for t in tokens if t != 50256]) + "\n"
    assert "tok/s" in result.stderr and "KV cache" in result.stderr
    result = run("--prompt", "A", "--prompt", "The cat", "--length", "4", "--seed", "1", "--top-p", "0.9")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("A") and any(line.startswith("The cat") for line in lines[1:])
    from llmpy.commands.cli import main

    capsys.readouterr()
    assert main(["sample", "--model", str(folder), "--top-p", "1.5"]) == 2
    stderr = capsys.readouterr().err
    assert "--top-p 1.5" in stderr and stderr.count("\n") == 1
