"""HellaSwag: llm.c's eval file written as data_common.py writes it, and accuracies equal to hellaswag.py's,
computed here with transformers/torch on the same small random GPT-2."""

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmpy.commands.evaluate import evaluate
from llmpy.core.model import GPT2
from llmpy.data.prepare import prepare_hellaswag
from llmpy.io.evalfile import read_eval_file
from llmpy.io.formats import FormatError
from llmpy.io.huggingface import read_huggingface
from llmpy.io.tokenizer import Tokenizer

WORDS = ("the a man woman dog cat runs jumps over under table slowly quickly red blue house river car "
         "then and sits looks at holds ball water tree green small big opens door window").split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS, size=n)).capitalize()


def hellaswag_jsonl(path, count=14, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(count):
            ctx = sentence(rng, int(rng.integers(4, 14))) + "."
            endings = [sentence(rng, int(rng.integers(2, 9))) + "." for _ in range(4)]
            f.write(json.dumps({"ind": i, "ctx": ctx, "endings": endings, "label": int(rng.integers(4)),
                                "activity_label": "test", "split": "val"}) + "\n")


def data_common_evalfile(records, encode):
    """dev/data/hellaswag.py's render_example + data_common.py's write_evalfile, transcribed."""
    stream, longest = [], 0
    for idx, ex in enumerate(records):
        ctx = encode(ex["ctx"])
        ends = [encode(" " + e) for e in ex["endings"]]
        part = [2**16 - 1, 0, idx, ex["label"], 4, len(ctx), *ctx]
        for e in ends:
            part += [len(e), *e]
        part[1] = 2 * len(part)
        longest = max(longest, part[1])
        stream += part
    header = np.zeros(256, np.int32)
    header[:4] = [20240522, 1, len(records), longest]
    return header.tobytes() + np.array(stream, np.uint16).tobytes()


def hellaswag_reference(model, records, encode):
    """hellaswag.py's evaluate(): per example, argmin of the summed and of the mean completion loss."""
    preds, preds_norm = [], []
    for ex in records:
        ctx = encode(ex["ctx"])
        rows = [ctx + encode(" " + e) for e in ex["endings"]]
        width = max(map(len, rows))
        tokens = torch.zeros((4, width), dtype=torch.long)
        mask = torch.zeros((4, width), dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = torch.tensor(row)
            mask[i, len(ctx):len(row)] = 1
        with torch.no_grad():
            logits = model(tokens).logits
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                   tokens[:, 1:].reshape(-1), reduction="none").view(4, -1)
        shift_mask = mask[:, 1:]
        sums = (losses * shift_mask).sum(dim=1)
        means = sums / shift_mask.sum(dim=1)
        for values in (sums, means):  # the test means something only if no two scores nearly tie
            ordered = torch.sort(values).values
            assert float(ordered[1] - ordered[0]) > 1e-4
        preds.append(int(sums.argmin()))
        preds_norm.append(int(means.argmin()))
    return preds, preds_norm


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("hellaswag")
    hellaswag_jsonl(work / "hellaswag_val.jsonl")
    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # sharper predictions than the init: clear margins between endings
    model.eval().save_pretrained(work / "model")
    return work, model


def test_prepare_writes_llmc_eval_file(setup):
    work, _ = setup
    path, count = prepare_hellaswag(work / "out", work / "hellaswag_val.jsonl")
    records = [json.loads(line) for line in (work / "hellaswag_val.jsonl").read_text().splitlines()]
    assert count == len(records)
    assert path.read_bytes() == data_common_evalfile(records, Tokenizer.gpt2().encode)


def test_accuracy_equals_hellaswag_py_reference(setup):
    work, hf = setup
    path, _ = prepare_hellaswag(work / "eval", work / "hellaswag_val.jsonl")
    records = [json.loads(line) for line in (work / "hellaswag_val.jsonl").read_text().splitlines()]
    preds, preds_norm = hellaswag_reference(hf, records, Tokenizer.gpt2().encode)
    labels = [r["label"] for r in records]
    config, params = read_huggingface(work / "model")
    model = GPT2(config, 8, 48, training=False)  # 2 examples a batch: the last batch is half empty
    model.load_parameters(params)
    score = evaluate(model, read_eval_file(path), str(path))
    assert score.predictions == preds and score.predictions_norm == preds_norm
    assert score.correct == sum(p == l for p, l in zip(preds, labels))
    assert score.correct_norm == sum(p == l for p, l in zip(preds_norm, labels))
    assert 0 < score.correct_norm < score.total  # a random model: neither all right nor all wrong

    result = subprocess.run([sys.executable, "-m", "llmpy", "eval", "--file", path, "--model", work / "model",
                             "-B", "4"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"HellaSwag: {score.correct_norm}/{score.total} = " in result.stdout
    assert f"acc {score.correct}/{score.total} = " in result.stdout


def test_bad_eval_files_are_named(setup, tmp_path, capsys):
    from llmpy.commands.cli import main

    work, _ = setup
    path, _ = prepare_hellaswag(work / "bad", work / "hellaswag_val.jsonl")
    data = path.read_bytes()
    cases = {"magic": b"\x01" + data[1:], "truncated": data[:-7], "index": data[:1024 + 4] + b"\x05\x00" + data[1030:]}
    for name, content in cases.items():
        (tmp_path / f"{name}.bin").write_bytes(content)
        with pytest.raises(FormatError, match=f"{name}.bin"):
            read_eval_file(tmp_path / f"{name}.bin")
    capsys.readouterr()
    assert main(["eval", "--file", str(tmp_path / "magic.bin"), "--model", str(work / "model")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "magic.bin" in stderr and "magic" in stderr
