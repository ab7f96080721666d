"""Hugging Face GPT-2 folders in and out, with `transformers` as the oracle (a test dependency only).

The models are small random GPT2LMHeadModels built here (no download); every parameter is perturbed so
that biases and layernorm gains are not their init values and a wrong mapping cannot go unnoticed.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmpy.core.config import GPT2Config
from llmpy.core.model import GPT2
from llmpy.io.formats import FormatError, read_model
from llmpy.io.huggingface import read_huggingface, write_huggingface

LAYERS, CHANNELS, HEADS, POSITIONS, VOCAB = 2, 64, 4, 64, 50257


def random_hf_model(seed=0, vocab=VOCAB):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=LAYERS, n_embd=CHANNELS, n_head=HEADS, n_positions=POSITIONS,
                                     vocab_size=vocab)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.05 if "ln_" not in name else 0.2))
    return model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    model = random_hf_model()
    model.save_pretrained(folder)
    return folder, model


def state_numpy(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def expected_llmc(hf: dict, L: int, V: int, Vp: int, grads=False) -> dict:
    """llm.c's 16 tensors from Hugging Face's, written out here: Conv1D weights transposed, wte padded."""
    g = lambda n: hf[f"transformer.{n}"]
    layer = lambda n, t: np.stack([g(f"h.{l}.{n}").T if t else g(f"h.{l}.{n}") for l in range(L)])
    wte = np.zeros((Vp, g("wte.weight").shape[1]), np.float32)
    wte[:V] = g("wte.weight")
    return {"wte": wte, "wpe": g("wpe.weight"), "ln1w": layer("ln_1.weight", 0), "ln1b": layer("ln_1.bias", 0),
            "qkvw": layer("attn.c_attn.weight", 1), "qkvb": layer("attn.c_attn.bias", 0),
            "attprojw": layer("attn.c_proj.weight", 1), "attprojb": layer("attn.c_proj.bias", 0),
            "ln2w": layer("ln_2.weight", 0), "ln2b": layer("ln_2.bias", 0), "fcw": layer("mlp.c_fc.weight", 1),
            "fcb": layer("mlp.c_fc.bias", 0), "fcprojw": layer("mlp.c_proj.weight", 1),
            "fcprojb": layer("mlp.c_proj.bias", 0), "lnfw": g("ln_f.weight"), "lnfb": g("ln_f.bias")}


def tokens(seed, B=2, T=17):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(B, T))


def test_import_matches_transformers_logits_loss_and_gradients(hf_folder):
    folder, hf = hf_folder
    config, params = read_huggingface(folder)
    assert config == GPT2Config(max_seq_len=POSITIONS, vocab_size=VOCAB, padded_vocab_size=50304,
                                num_layers=LAYERS, num_heads=HEADS, channels=CHANNELS)
    expected = expected_llmc(state_numpy(hf), LAYERS, VOCAB, 50304)
    model = GPT2(config, 2, 16)
    model.load_parameters(params)
    for name, values in expected.items():
        np.testing.assert_array_equal(model.params[name], values, err_msg=name)

    batch = tokens(1)
    x, y = batch[:, :-1], batch[:, 1:]
    model.forward(x)
    ours = model.logits().copy()
    loss = model.forward(x, y)  # with targets the logits' buffer ends up holding their gradient
    model.backward()
    hf.zero_grad()
    logits = hf(torch.tensor(x)).logits
    ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.tensor(y).reshape(-1))
    ref_loss.backward()
    np.testing.assert_allclose(ours, logits.detach().numpy(), atol=1e-4, rtol=0)
    assert abs(loss - ref_loss.item()) < 1e-5
    hf_grads = {k: p.grad.numpy() for k, p in hf.named_parameters()}
    for name, values in expected_llmc(hf_grads, LAYERS, VOCAB, 50304).items():  # wte: embedding + tied head
        scale = float(np.abs(values).max())
        np.testing.assert_allclose(model.grads[name], values, atol=2e-5 * max(scale, 1e-3), rtol=1e-3, err_msg=name)


def test_export_loads_in_transformers_with_the_same_logits(tmp_path):
    config = GPT2Config(max_seq_len=32, vocab_size=1000, padded_vocab_size=1024, num_layers=2, num_heads=4,
                        channels=64)
    model = GPT2(config, 2, 12, training=False)
    model.init_random(7)
    rng = np.random.default_rng(3)
    model.params.flat[...] += rng.standard_normal(model.params.size).astype(np.float32) * 0.02
    model.params.wte[1000:] = 0.0  # llm.c's padded rows are zero
    write_huggingface(tmp_path / "out", config, model.params.flat)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    x = rng.integers(0, 1000, size=(2, 12))
    model.forward(x)
    with torch.no_grad():
        ref = loaded(torch.tensor(x)).logits.numpy()
    np.testing.assert_allclose(model.logits(), ref, atol=1e-4, rtol=0)

    # bf16: transformers reads back exactly torch's own rounding of the float32 weights
    write_huggingface(tmp_path / "bf16", config, model.params.flat, dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    half = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    full = dict(loaded.state_dict())
    for name, value in half.state_dict().items():
        assert value.dtype == torch.bfloat16, name
        assert torch.equal(value, full[name].to(torch.bfloat16)), name


def test_convert_round_trip(hf_folder, tmp_path):
    from llmpy.commands.cli import main

    folder, hf = hf_folder
    result = subprocess.run([sys.executable, "-m", "llmpy", "convert", folder, tmp_path / "model.bin"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    config, params = read_model(tmp_path / "model.bin")
    expected = expected_llmc(state_numpy(hf), LAYERS, VOCAB, 50304)
    np.testing.assert_array_equal(params, np.concatenate([v.ravel() for v in expected.values()]))
    assert main(["convert", str(tmp_path / "model.bin"), str(tmp_path / "back"), "--dtype", "bfloat16"]) == 0
    back = state_numpy(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back", dtype=torch.bfloat16))
    want = {k: v.to(torch.bfloat16).float().numpy() for k, v in hf.state_dict().items()}
    for name in want:
        np.testing.assert_array_equal(back[name], want[name], err_msg=name)


def broken(folder, tmp_path, name, edit):
    import shutil

    target = tmp_path / name
    shutil.copytree(folder, target)
    edit(target)
    return target


def save_state(target, state):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, target / "model.safetensors", metadata={"format": "pt"})


def test_broken_folders_name_the_file_and_tensor(hf_folder, tmp_path, capsys):
    folder, hf = hf_folder
    state = {k: v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}

    def config_edit(**changes):
        def edit(target):
            data = json.loads((target / "config.json").read_text())
            data.update(changes)
            (target / "config.json").write_text(json.dumps(data))
        return edit

    def drop(name):
        return lambda target: save_state(target, {k: v for k, v in state.items() if k != name})

    def reshape(name):
        return lambda target: save_state(target, {**state, name: state[name][:, :-1]})

    cases = [
        ("model_type", config_edit(model_type="llama"), ["config.json", "model_type", "llama"]),
        ("activation", config_edit(activation_function="relu"), ["activation_function", "relu"]),
        ("missing", drop("transformer.h.1.mlp.c_fc.bias"), ["transformer.h.1.mlp.c_fc.bias", "missing"]),
        ("shape", reshape("transformer.h.0.attn.c_attn.weight"),
         ["model.safetensors", "transformer.h.0.attn.c_attn.weight", "[64, 192]", "[64, 191]"]),
        ("untied", lambda t: save_state(t, {**state, "lm_head.weight": state["transformer.wte.weight"] + 1}),
         ["lm_head.weight", "ties"]),
        ("extra", lambda t: save_state(t, {**state, "score.weight": torch.zeros(2, 64)}), ["score.weight"]),
        ("truncated", lambda t: (t / "model.safetensors").write_bytes((t / "model.safetensors").read_bytes()[:5000]),
         ["model.safetensors", "not a readable safetensors file"]),
        ("pickle", lambda t: ((t / "model.safetensors").unlink(), (t / "pytorch_model.bin").write_bytes(b"x")),
         ["model.safetensors", "file not found", "pickle"]),
        ("nan", lambda t: save_state(t, {**state, "transformer.wpe.weight": state["transformer.wpe.weight"] * np.nan}),
         ["non-finite", "wpe"]),
    ]
    for name, edit, words in cases:
        with pytest.raises(FormatError) as error:
            read_huggingface(broken(folder, tmp_path, name, edit))
        for word in words:
            assert word in str(error.value), (name, str(error.value))
    # the command line says it in one line, no traceback
    from llmpy.commands.cli import main

    bad = broken(folder, tmp_path, "cli", drop("transformer.ln_f.weight"))
    capsys.readouterr()
    assert main(["convert", str(bad), str(tmp_path / "x.bin")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "transformer.ln_f.weight" in stderr and not (tmp_path / "x.bin").exists()
