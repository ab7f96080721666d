"""`llmpy report DIR`: the HTML page of a real small run (2 MPI ranks, traced) and benchmark, read as text and
opened in a real headless browser (Chromium from the distribution's packages, through selenium)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmpy.commands.cli import main
from llmpy.execution.threads import available_cores
from llmpy.io.formats import write_shard
from llmpy.observe.html_report import SECTIONS, find_inputs, steps_section, summary_section, write_report

MPIEXEC = Path(sys.executable).parent / "mpiexec"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# the tiny model, few steps, fixed peak: the run takes seconds; the trace gives POP, roofline and timeline
TRAIN = ["train", "--model", "tiny", "-B", "2", "-T", "32", "--steps", "3", "--val-every", "0", "--sample-every",
         "0", "--peak-gflops", "10", "--no-progress", "--train-data", "tiny_train.bin", "--output", "",
         "--metrics-dir", "run", "--trace", "run/trace"]
PREDICTION = {"target": {"ranks": 2, "strategy": "allreduce", "link": {"gbits": 1.0}}, "step_ms": 30.0,
              "measured_step_ms": 25.0,
              "components": [{"name": "allreduce", "predicted_ms": 9.0, "measured_ms": 10.0},
                             {"name": "<script>alert(1)</script>", "predicted_ms": 1.0, "measured_ms": None}],
              "gradient_timeline": {
                  "predicted": {"update_start_ms": 20.0, "buckets": [{"part": 0, "bytes": 4e6, "start_ms": 0.0,
                                                                      "done_ms": 12.5}]},
                  "measured": {"update_start_ms": 21.0, "buckets": [{"part": 0, "bytes": 4e6, "start_ms": 0.0,
                                                                     "done_ms": 17.25}]}}}

needs_two_ranks = pytest.mark.skipif(not MPIEXEC.exists() or available_cores() < 2,
                                     reason=f"needs {MPIEXEC} (pip install mpich) and 2 cores for 2 ranks")


def llmpy(args, cwd, ranks=None):
    command = [sys.executable, "-m", "llmpy", *map(str, args)]
    if ranks:
        command = [str(MPIEXEC), "-n", str(ranks), *command]
    result = subprocess.run(command, cwd=cwd, check=False, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A folder holding what every section shows: an mpi run's metrics and trace, a benchmark's results and a
    prediction.json as `llmpy predict` writes it."""
    if not MPIEXEC.exists() or available_cores() < 2:
        pytest.skip(f"needs {MPIEXEC} (pip install mpich) and 2 cores for 2 ranks")
    work = tmp_path_factory.mktemp("report")
    tokens = np.random.default_rng(0).integers(0, 97, size=4096)
    write_shard(work / "tiny_train.bin", tokens.astype(np.uint16))
    llmpy([*TRAIN, "--mode", "mpi", "--threads", "1"], work, ranks=2)
    threads = "1,2" if available_cores() >= 2 else "1"
    llmpy(["bench", "--model", "tiny", "-B", "2", "-T", "32", "--steps", "2", "--modes", "sequential,forkjoin",
           "--threads", threads, "--peak-gflops", "10", "--json", "run/results.json"], work)
    (work / "run" / "prediction.json").write_text(json.dumps(PREDICTION))
    return work / "run"


@pytest.fixture(scope="module")
def report_page(run_dir):
    result = llmpy(["report", run_dir], run_dir.parent)
    page = run_dir / "report.html"
    assert result.stdout.strip() == f"wrote {page}"
    return page


@needs_two_ranks
def test_every_section_is_filled_from_a_real_run(report_page):
    text = report_page.read_text()
    for section_id, title in SECTIONS:
        assert re.search(f'<section id="{section_id}"><h2>{re.escape(title)}</h2>', text), section_id
    assert 'class="missing"' not in text  # every section found its data
    assert not re.search(r"https?://", text)  # offline: no CDN, no external URL at all
    links = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", text)
    assert links and all(link.startswith(("data:", "#")) for link in links), links  # every resource inline
    images = re.findall(r'<img src="data:image/png;base64,', text)
    assert len(images) >= 5  # roofline, timeline, three scaling plots
    assert "MPI_Iallreduce" in text and "allreduce" in text  # per-rank communication by collective
    assert "+20.0%" in text and "-10.0%" in text  # the step and allreduce errors of the prediction
    assert "Gradient timeline" in text and ">12<" in text and ">17<" in text  # its buckets, predicted and measured
    assert "&lt;script&gt;" in text and "<script>" not in text  # text is escaped


@needs_two_ranks
def test_a_metrics_folder_alone_says_what_is_not_recorded(run_dir, tmp_path):
    for name in ("metrics.json", "steps.csv", "kernels.csv"):
        shutil.copy(run_dir / name, tmp_path / name)
    page = Path(write_report(str(tmp_path))).read_text()
    for section_id, title in SECTIONS:
        assert f'<section id="{section_id}"><h2>{title}</h2>' in page
    sections = dict(re.findall(r'<section id="(\w+)">(.*?)</section>', page, flags=re.DOTALL))
    for filled in ("summary", "steps", "kernels", "communication"):
        assert 'class="missing"' not in sections[filled], filled
    for empty, hint in (("pop", "--trace"), ("roofline", "--trace"), ("timeline", "--trace"),
                        ("scaling", "llmpy bench --json"), ("prediction", "llmpy predict")):
        assert 'class="missing"' in sections[empty] and hint in sections[empty], empty


@needs_two_ranks
def test_a_trace_folder_alone_gives_the_summary_and_steps_from_the_trace(run_dir):
    inputs = find_inputs(str(run_dir / "trace"))
    assert inputs.trace is not None and not inputs.summary and not inputs.bench_results
    summary, steps = summary_section(inputs), steps_section(inputs)
    assert "tiny" in summary and "mpi" in summary
    assert steps.count("<tr>") == 1 + 3  # the header and rank 0's three steps


def _headless_chromium():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e .[test])")
    from selenium.webdriver.chrome.service import Service

    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.path.isfile(path):
            pytest.skip(f"{path} not installed (Debian: apt-get install {package})")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


@needs_two_ranks
def test_the_page_loads_in_a_headless_browser(report_page):
    browser = _headless_chromium()  # skips without selenium, chromium or chromedriver
    from selenium.webdriver.common.by import By

    try:
        browser.get(report_page.as_uri())
        assert browser.title.startswith("llmpy report")
        severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not severe, severe
        for section_id, title in SECTIONS:
            section = browser.find_element(By.ID, section_id)
            assert section.is_displayed(), section_id
            assert section.find_element(By.TAG_NAME, "h2").text == title
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);")
        assert len(images) >= 5
        assert all(complete and width > 0 for _, complete, width in images), images
    finally:
        browser.quit()


def test_a_missing_folder_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llmpy", "report", str(tmp_path / "nothere")], cwd=tmp_path,
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmpy report: error: ")
    assert str(tmp_path / "nothere") in lines[0] and "llmpy train --metrics-dir" in lines[0]


def test_empty_folder_and_unreadable_metrics_are_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "nothing to report" in error[0] and str(empty) in error[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text("{not json")
    assert main(["report", str(broken)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(broken / "metrics.json") in error[0] and "llmpy train --metrics-dir" in error[0]
    assert not (broken / "report.html").exists()
