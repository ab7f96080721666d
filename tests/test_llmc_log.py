"""`train --log-dir` writes llm.c's main.log lines (llmc/logger.h's formats), `--eval-every` adds HellaSwag, and
`llmpy plot log` draws the curves."""

import re

import numpy as np

from llmpy.data.prepare import prepare_hellaswag
from llmpy.io.formats import write_shard
from test_cli import llmpy, train_losses
from test_eval_hellaswag import hellaswag_jsonl

# logger.h: "s:%d trl:%.4f lr:%.6f norm:%.2f", "s:%d tel:%.4f", "s:%d eval:%.4f"
TRL = re.compile(r"^s:(\d+) trl:(\d+\.\d{4}) lr:(\d+\.\d{6}) norm:(\d+\.\d{2})$")
TEL = re.compile(r"^s:(\d+) tel:(\d+\.\d{4})$")
EVAL = re.compile(r"^s:(\d+) eval:(\d\.\d{4})$")


def test_main_log_and_its_plot(tmp_path, capsys, monkeypatch):
    from llmpy.commands.cli import main

    rng = np.random.default_rng(0)
    write_shard(tmp_path / "t_train.bin", rng.integers(0, 50257, 4000))
    write_shard(tmp_path / "t_val.bin", rng.integers(0, 50257, 2000))
    hellaswag_jsonl(tmp_path / "h.jsonl", count=6)
    prepare_hellaswag(tmp_path, tmp_path / "h.jsonl")
    result = llmpy("train", "--model", "d2", "-B", "4", "-T", "32", "--steps", "4", "--val-every", "2",
                   "--val-batches", "1", "--eval-every", "2", "--sample-every", "0", "--lr", "1e-3", "--no-progress",
                   "--train-data", "t_train.bin", "--val-data", "t_val.bin", "--eval-file", "hellaswag_val.bin",
                   "--log-dir", "logs", "--output", "", "--metrics-dir", "", "--peak-gflops", "10", cwd=tmp_path)
    lines = (tmp_path / "logs" / "main.log").read_text().splitlines()
    kinds = [(int(line.split()[0][2:]), line.split()[1].split(":")[0]) for line in lines]
    # llm.c's loop: validation and eval before the step, the step's training loss after it; eval from step > 0
    assert kinds == [(0, "tel"), (0, "trl"), (1, "trl"), (2, "tel"), (2, "eval"), (2, "trl"), (3, "trl"),
                     (4, "tel"), (4, "eval")]
    trl = [TRL.match(line) for line in lines if " trl:" in line]
    assert all(trl)
    assert [float(m.group(2)) for m in trl] == [round(x, 4) for x in train_losses(result.stdout)]
    assert all(m.group(3) == "0.001000" and float(m.group(4)) > 0 for m in trl)
    val = [float(x) for x in re.findall(r"val loss ([0-9.]+)", result.stdout)]
    assert [float(TEL.match(line).group(2)) for line in lines if " tel:" in line] == [round(x, 4) for x in val]
    acc = [float(x) for x in re.findall(r"HellaSwag: \d+/6 = ([0-9.]+)", result.stdout)]
    assert len(acc) == 2
    assert [float(EVAL.match(line).group(2)) for line in lines if " eval:" in line] == [round(x, 4) for x in acc]

    monkeypatch.chdir(tmp_path)
    assert main(["plot", "log", "logs/main.log", "--output", "curves.png"]) == 0
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    (tmp_path / "other.log").write_text("step 1 loss 3.2\n")
    capsys.readouterr()
    assert main(["plot", "log", "other.log"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "other.log" in stderr
    # refused before anything runs
    assert main(["train", "--model", "d2", "--eval-every", "1", "--eval-file", "nope.bin", "--output", ""]) == 2
    stderr = capsys.readouterr().err
    assert "--eval-file nope.bin" in stderr and "prepare hellaswag" in stderr
