"""trainer/report.py: plots and summary.md of a run directory built with the trainer's own writers.

The run directories here are written by the code that writes real runs: the step log by
trainer/run/step_log.py's ``StepLog`` fed through the training's ``Recorder.record`` (which builds each line),
train_state.json by ``TrainState.to_json``, config.yaml by ``config_to_yaml``, and metrics.json,
eval_error.json, evaluations.jsonl and best.json by the evaluator itself (``evaluate_run``, the ``--watch`` path, on
tiny checkpoints and splits from tests/eval_run_helpers.py). The report runs as the CLI in a
subprocess for the complete local run, and in-process (the same ``main``, without a second
interpreter start) for the other cases: several test protocols, missing pieces, corrupt inputs
and a run on S3 (a local moto server).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import torch
from eval_run_helpers import EvalData, build_eval_data, make_model, write_checkpoint

from data_shards.storage import open_location
from trainer import report
from trainer.reporting import plots
from trainer.evaluation import results_table
from trainer.evaluator.checkpoint_eval import evaluate_run, record_evaluated
from trainer.config import TrainConfig, config_to_yaml
from trainer.evaluation import evaluate_embeddings, evaluate_embeddings_protocols
from trainer.run.layout import EVALUATIONS_FILE, checkpoint_dir_name
from trainer.run.retention import prune_checkpoints
from trainer.run.train_state import TrainState
from trainer.run.step_log import StepLog
from trainer.training.engine import hardest_negatives, learning_rate
from trainer.training.recorder import Recorder

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "trainer" / "report.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

EPOCHS, BATCHES = 3, 10  # 30 steps; checkpoints at the end of each epoch: steps 10, 20, 30
GLOBAL_BATCH = 32


# --------------------------------------------------------------------------------------------------
# Building runs with the trainer's writers
# --------------------------------------------------------------------------------------------------


def run_config(data: EvalData | None, name: str, protocols: list[str]) -> TrainConfig:
    config = TrainConfig()
    config.checkpoint.run_name = name
    config.checkpoint.keep_last = 5
    config.optim.epochs = EPOCHS
    config.optim.global_batch_size = GLOBAL_BATCH
    config.optim.warmup_epochs = 1  # hardest negatives from epoch 1: the loss plot marks the switch
    config.optim.lr_decay_every_epochs = 2
    if data is not None:
        config.data.dev, config.data.test = str(data.dev.shards), str(data.test.shards)
    config.eval.test_protocols = protocols
    config.eval.dev_images = 20
    config.eval.batch_size = 16
    return config


def step_inputs(step: int) -> tuple[float, float, float, float]:
    """(L_M, L_G, step seconds, data wait) fed to the trainer's record for ``step``."""
    return 100.0 / step, 40.0 - 0.5 * step, 0.05 + 0.002 * step, 0.01 + 0.001 * (step % 3)


def write_step_log(run_dir: str, config: TrainConfig, storage_options: dict[str, Any] | None = None,
                   steps: int = EPOCHS * BATCHES) -> None:
    """The step log as rank 0 writes it: the training's ``Recorder.record`` builds each line
    (trainer/run/step_log.py's ``step_line``) and appends it with ``StepLog``."""
    log = StepLog(run_dir, storage_options)
    recorder = Recorder(config, None, log, 0, 1, torch.device("cpu"))  # type: ignore[arg-type]  # no metrics: no reader
    step = 0
    for epoch in range(EPOCHS):
        lr = learning_rate(config.optim, epoch)
        for position in range(BATCHES):
            if step == steps:
                break
            hardest = hardest_negatives(config.optim, epoch, step)
            step += 1
            matching, caption, seconds, wait = step_inputs(step)
            recorder.record(epoch, position, BATCHES, step, lr, hardest, matching, caption, seconds, wait)
    log.sync()  # uploads the file on s3://; a no-op locally


def train_state(step: int) -> str:
    epoch = (step - 1) // BATCHES
    return TrainState(epoch=epoch, step=step, batch_in_epoch=BATCHES, epoch_complete=True, world_size=2,
                      global_batch_size=GLOBAL_BATCH).to_json()


def build_run(run_dir: Path, data: EvalData) -> None:
    """A finished-looking run: step log, three evaluated checkpoints, one whose evaluation failed,
    one complete but not evaluated yet, one incomplete (no train_state.json)."""
    config = run_config(data, "report-test", ["1k-5fold", "all"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(config), encoding="utf-8")
    write_step_log(str(run_dir), config)
    for seed, step in enumerate((10, 20, 30)):
        directory = write_checkpoint(run_dir, checkpoint_dir_name(step), make_model(data.vocab, seed), data.vocab,
                                     step, complete=False)
        (directory / "train_state.json").write_text(train_state(step), encoding="utf-8")
    broken = run_dir / checkpoint_dir_name(25)  # no inference/: the evaluator records eval_error.json
    broken.mkdir()
    (broken / "train_state.json").write_text(train_state(25), encoding="utf-8")
    summaries = evaluate_run(str(run_dir))  # the evaluator's --watch path: metrics.json, best.json
    assert sorted(s["status"] for s in summaries) == ["failed", "ok", "ok", "ok"], summaries
    pending = write_checkpoint(run_dir, checkpoint_dir_name(31), make_model(data.vocab, 7), data.vocab, 31,
                               complete=False)
    (pending / "train_state.json").write_text(train_state(31), encoding="utf-8")
    write_checkpoint(run_dir, checkpoint_dir_name(32), make_model(data.vocab, 8), data.vocab, 32, complete=False)


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> EvalData:
    return build_eval_data(tmp_path_factory.mktemp("eval-data"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, eval_data: EvalData) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "report-test"
    build_run(run_dir, eval_data)
    return run_dir


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def run_cli(run_dir: str, output: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPORT), run_dir, "--output", str(output)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def assert_png(path: Path, width: int, height: int) -> None:
    """A real PNG of the expected pixel size that is not a blank canvas."""
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    assert path.stat().st_size < 400_000, f"{path}: {path.stat().st_size} bytes; the plots should stay small"
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (height, width), (path, image.shape)
    assert float(np.asarray(image[..., :3]).std()) > 0.05, f"{path}: (almost) uniform image"


def checkpoint_rows(summary: str) -> dict[str, dict[str, str]]:
    """The checkpoint table of summary.md: {checkpoint name: {column: cell}}."""
    lines = summary.splitlines()
    start = lines.index("## Checkpoints") + 2
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        row = dict(zip(header, cells))
        rows[row["checkpoint"].strip("`")] = row
    return rows


def metrics_of(run_dir: Path, step: int) -> dict[str, Any]:
    return json.loads((run_dir / checkpoint_dir_name(step) / "metrics.json").read_text())


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_cli_reports_a_complete_run(full_run: Path, tmp_path: Path) -> None:
    output = tmp_path / "report"
    result = run_cli(str(full_run), output)
    assert result.returncode == 0, result.stderr[-3000:]
    # The best checkpoint's qualitative page (written by its evaluation) is copied beside the summary.
    written = [output / name for name in ("losses.png", "throughput.png", "recall.png", "qualitative.md", "summary.md")]
    assert result.stdout.split() == [str(path) for path in written]  # the CLI prints the files, nothing else

    width, height = (round(v * 100) for v in plots.FIGSIZE)  # dpi 100 by default
    assert_png(written[0], width, height)
    assert_png(written[1], width, height)
    assert_png(written[2], width, round(2.6 * 2 * 100))  # one test protocol with metrics ("all") + rsum

    summary = written[4].read_text()
    best = json.loads((full_run / "best.json").read_text())
    best_name = Path(best["checkpoint"]).name
    assert f"[qualitative.md](qualitative.md), copied from `{full_run / best_name / 'qualitative.md'}`" in summary
    # The best is what the evaluator recorded, and it is the highest dev rsum of the run.
    assert best["dev_rsum"] == max(metrics_of(full_run, s)["dev_rsum"] for s in (10, 20, 30))
    assert f"`{best_name}` (step {best['step']}, epoch {best['epoch']}): dev rsum **{best['dev_rsum']:.2f}**" \
        in summary
    assert results_table(metrics_of(full_run, best["step"])) in summary  # the evaluator's table, verbatim
    assert "test protocol `1k-5fold` skipped: needs at least 5000 test images" in summary

    rows = checkpoint_rows(summary)
    assert list(rows) == [checkpoint_dir_name(s) for s in (10, 20, 25, 30, 31, 32)]
    for step in (10, 20, 30):
        metrics = metrics_of(full_run, step)
        row = rows[checkpoint_dir_name(step)]
        assert row["dev rsum"] == f"{metrics['dev_rsum']:.2f}"
        assert row["test all rsum"] == f"{metrics['test']['all']['rsum']:.2f}"
        assert row["evaluation"] == ("**best**" if checkpoint_dir_name(step) == best_name else "evaluated")
    assert rows[checkpoint_dir_name(25)]["evaluation"].startswith("failed: CheckpointError")
    assert rows[checkpoint_dir_name(31)]["evaluation"] == "not evaluated yet"
    assert rows[checkpoint_dir_name(32)]["evaluation"] == "incomplete (no readable train_state.json)"

    # Training numbers, from the inputs fed to the trainer's record (not from the file).
    inputs = [step_inputs(step) for step in range(1, EPOCHS * BATCHES + 1)]
    total_seconds = sum(seconds + wait for _, _, seconds, wait in inputs)
    matching, caption, _, _ = inputs[-1]
    assert "- steps logged: 30 (steps 1-30)" in summary
    assert f"- epochs reached: 0-2 (0-based), i.e. 3 of {EPOCHS} configured" in summary
    assert f"- mean throughput: {GLOBAL_BATCH * len(inputs) / total_seconds:.1f} samples/s" in summary
    assert f"L_M {matching:.4f}" in summary and f"L_G {caption:.4f}" in summary
    assert f"total {matching + caption:.4f}" in summary  # caption_loss_weight 1
    assert "| global batch size (`optim.global_batch_size`) | 32 |" in summary
    assert "# Run report: report-test" in summary
    assert "evaluation failed for 1 checkpoint(s)" in summary
    assert "1 checkpoint(s) not evaluated yet" in summary

    # Links are relative and point at the files written beside summary.md.
    for name in ("losses.png", "throughput.png", "recall.png"):
        assert f"]({name})" in summary
        assert (written[3].parent / name).is_file()
    assert str(output) not in summary


def test_every_test_protocol_gets_a_recall_panel_and_a_column(tmp_path: Path) -> None:
    """Payloads as the evaluator writes them on a 5000-image test split (1k-5fold with its folds; the
    annotation protocols eccv and cxc, which have no rsum: rows in the best checkpoint's table, no
    panel or column), recorded with its record sequence (record_evaluated: metrics.json,
    evaluations.jsonl, best.json)."""
    run_dir = tmp_path / "run"
    config = run_config(None, "folds", ["1k-5fold", "all"])
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(config_to_yaml(config), encoding="utf-8")  # no step log: not needed here
    rng = np.random.default_rng(0)
    for noise, step in zip((1.0, 3.0), (10, 20)):  # the earlier checkpoint matches better: the best
        directory = run_dir / checkpoint_dir_name(step)
        directory.mkdir()
        (directory / "train_state.json").write_text(train_state(step), encoding="utf-8")
        images = rng.standard_normal((5000, 8)).astype(np.float32)
        captions = np.repeat(images, 5, axis=0) + noise * rng.standard_normal((25000, 8)).astype(np.float32)
        payload = {"checkpoint": str(directory), "step": step, "epoch": (step - 1) // BATCHES,
                   "dev": evaluate_embeddings([(images[:100], captions[:500])], "all"),
                   # "all" on the first 1000 images only: 5000 x 25000 similarities take seconds
                   "test": {"1k-5fold": evaluate_embeddings([(images, captions)], "1k-5fold"),
                            "all": evaluate_embeddings([(images[:1000], captions[:5000])], "all"),
                            **evaluate_embeddings_protocols([(images, captions)], ["eccv", "cxc"])},
                   "skipped": {}, "data": {"dev": "d", "dev_images": 100, "test": "t", "test_images": 5000}}
        payload["dev_rsum"] = payload["dev"]["rsum"]
        record_evaluated(str(directory), payload, str(run_dir))
    output = tmp_path / "report"
    assert report.main([str(run_dir), "--output", str(output)]) == 0
    width = round(plots.FIGSIZE[0] * 100)
    assert_png(output / "recall.png", width, round(2.6 * 3 * 100))  # 1k-5fold, all, rsum
    summary = (output / "summary.md").read_text()
    assert json.loads((run_dir / "best.json").read_text())["step"] == 10
    assert results_table(metrics_of(run_dir, 10)) in summary and "  fold 4" in summary
    assert "mAP@R" in results_table(metrics_of(run_dir, 10))  # the ECCV Caption rows are in that table
    rows = checkpoint_rows(summary)
    assert not any("eccv" in column or "cxc" in column for column in rows[checkpoint_dir_name(10)])
    for step in (10, 20):
        metrics = metrics_of(run_dir, step)
        row = rows[checkpoint_dir_name(step)]
        assert row["test 1k-5fold rsum"] == f"{metrics['test']['1k-5fold']['rsum']:.2f}"
        assert row["test all rsum"] == f"{metrics['test']['all']['rsum']:.2f}"
    assert rows[checkpoint_dir_name(10)]["evaluation"] == "**best**"
    assert rows[checkpoint_dir_name(20)]["evaluation"] == "evaluated"


def test_missing_pieces_give_what_they_can_and_say_what_is_missing(tmp_path: Path, eval_data: EvalData) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = run_config(eval_data, "young", ["all"])
    (run_dir / "config.yaml").write_text(config_to_yaml(config), encoding="utf-8")
    # A run restarted before its first checkpoint: the trainer drops the steps it will redo, which
    # leaves an empty step log until the next step finishes.
    write_step_log(str(run_dir), config, steps=3)
    StepLog(str(run_dir), None).truncate_after(0)
    assert (run_dir / "train_log.jsonl").read_text() == ""
    broken = run_dir / checkpoint_dir_name(10)
    broken.mkdir()
    (broken / "train_state.json").write_text(train_state(10), encoding="utf-8")
    assert [s["status"] for s in evaluate_run(str(run_dir))] == ["failed"]
    output = tmp_path / "report"
    output.mkdir()
    (output / "losses.png").write_bytes(b"stale plot of another run")

    assert report.main([str(run_dir), "--output", str(output)]) == 0
    assert sorted(p.name for p in output.iterdir()) == ["summary.md"]  # the stale plot is gone too
    summary = (output / "summary.md").read_text()
    assert "## Missing or incomplete" in summary
    assert "train_log.jsonl is empty (no step finished yet)" in summary
    assert "no evaluated checkpoint: recall plot and best-checkpoint table not produced" in summary
    assert f"evaluation failed for 1 checkpoint(s) ({checkpoint_dir_name(10)})" in summary
    assert "No checkpoint with a dev rsum yet: no best checkpoint." in summary
    assert "No steps logged." in summary
    assert checkpoint_rows(summary)[checkpoint_dir_name(10)]["evaluation"].startswith("failed: CheckpointError")
    assert "- Recall and rsum by checkpoint: not produced (see above)" in summary

    # Without config.yaml and step log: still a summary of the checkpoints, saying what is absent.
    (run_dir / "config.yaml").unlink()
    (run_dir / "train_log.jsonl").unlink()
    assert report.main([str(run_dir), "--output", str(output)]) == 0
    summary = (output / "summary.md").read_text()
    assert "no config.yaml: configuration highlights unavailable" in summary
    assert "no train_log.jsonl: loss, learning-rate and throughput plots not produced" in summary
    assert "# Run report: run" in summary  # the directory's name stands in for checkpoint.run_name


def test_corrupt_step_log_line_is_an_error_naming_file_and_line(
        full_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir, ignore=shutil.ignore_patterns("inference"))
    log_path = run_dir / "train_log.jsonl"
    lines = log_path.read_text().splitlines(keepends=True)
    output = tmp_path / "report"

    log_path.write_text("".join(lines[:2] + ['{"step": 3, "epoch": 0, "loss": \n'] + lines[3:]))
    with caplog.at_level(logging.ERROR):
        assert report.main([str(run_dir), "--output", str(output)]) == report.EXIT_BAD_INPUT
    assert f"{log_path} line 3: not valid JSON" in caplog.text
    assert not (output / "summary.md").exists()

    caplog.clear()
    record = json.loads(lines[4])
    del record["samples_per_s"]
    log_path.write_text("".join(lines[:4] + [json.dumps(record) + "\n"] + lines[5:]))
    with caplog.at_level(logging.ERROR):
        assert report.main([str(run_dir), "--output", str(output)]) == report.EXIT_BAD_INPUT
    assert f"{log_path} line 5: no 'samples_per_s' field" in caplog.text

    # A last line cut short without its newline is a line the trainer is appending: skipped.
    log_path.write_text("".join(lines) + lines[-1][:20])
    assert report.main([str(run_dir), "--output", str(output)]) == 0
    assert "- steps logged: 30 (steps 1-30)" in (output / "summary.md").read_text()


def test_corrupt_metrics_json_is_an_error_naming_the_file(
        full_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir, ignore=shutil.ignore_patterns("inference"))
    metrics = run_dir / checkpoint_dir_name(20) / "metrics.json"
    text = metrics.read_text()
    metrics.write_text(text[: len(text) // 2])  # cut in the middle
    with caplog.at_level(logging.ERROR):
        assert report.main([str(run_dir), "--output", str(tmp_path / "report")]) == report.EXIT_BAD_INPUT
    assert f"{metrics}: not valid JSON at line" in caplog.text

    caplog.clear()
    payload = json.loads(text)
    payload["test"]["all"]["rsum"] = "high"
    metrics.write_text(json.dumps(payload))
    with caplog.at_level(logging.ERROR):
        assert report.main([str(run_dir), "--output", str(tmp_path / "report")]) == report.EXIT_BAD_INPUT
    assert f"{metrics}: test all: rsum is 'high', not a number" in caplog.text


def test_a_directory_without_a_run_is_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert report.main([str(tmp_path / "nothing"), "--output", str(tmp_path / "out")]) == report.EXIT_BAD_INPUT
    assert "not a run directory" in caplog.text


def test_cli_reads_a_run_on_s3(full_run: Path, tmp_path: Path, s3_env: Any, s3_bucket: str) -> None:
    """The same run on S3, written with the S3 paths of the writers; the CLI finds the endpoint
    and credentials in the environment (set by the s3_env fixture), as on a cluster."""
    options = s3_env.storage_options
    run_url = f"s3://{s3_bucket}/runs/report-test"
    run = open_location(run_url, options)
    run.write_bytes_atomic("config.yaml", (full_run / "config.yaml").read_bytes())  # as launch.py does
    write_step_log(run_url, run_config(None, "report-test", ["all"]), options)
    for step in (10, 30):  # two checkpoints are enough here; every S3 request costs time
        checkpoint = run.child(checkpoint_dir_name(step))
        checkpoint.write_bytes_atomic("train_state.json", train_state(step).encode())
        payload = metrics_of(full_run, step)
        payload["checkpoint"] = checkpoint.url
        record_evaluated(checkpoint.url, payload, run_url, options)
    output = tmp_path / "report"
    assert report.main([run_url, "--output", str(output)]) == 0  # no options given: the environment's
    summary = (output / "summary.md").read_text()
    best = json.loads(run.read_text("best.json"))
    rows = checkpoint_rows(summary)
    assert rows[checkpoint_dir_name(best["step"])]["evaluation"] == "**best**"
    assert f"Run directory: `{run_url}`" in summary
    assert "- steps logged: 30 (steps 1-30)" in summary
    assert "on s3:// the step log is uploaded at each checkpoint" in summary
    assert_png(output / "recall.png", round(plots.FIGSIZE[0] * 100), round(2.6 * 2 * 100))


def test_unreadable_best_json_falls_back_to_the_highest_dev_rsum(full_run: Path, tmp_path: Path) -> None:
    """As the trainer does (run_layout.read_best treats it as absent): a note, not an error."""
    run_dir = tmp_path / "run"
    # Without the step log: only the recall plot is drawn, the part this test is about.
    shutil.copytree(full_run, run_dir, ignore=shutil.ignore_patterns("inference", "train_log.jsonl"))
    (run_dir / "best.json").write_text('{"checkpoint": ')
    output = tmp_path / "report"
    assert report.main([str(run_dir), "--output", str(output)]) == 0
    summary = (output / "summary.md").read_text()
    assert "best.json unreadable" in summary
    top = max((10, 20, 30), key=lambda step: metrics_of(run_dir, step)["dev_rsum"])
    assert checkpoint_rows(summary)[checkpoint_dir_name(top)]["evaluation"] == "**best**"
    assert "(chosen by: highest dev rsum (no best.json))" in summary


def recall_plot_lines(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[float]]:
    """Make report.main record the recall plot's lines: {label: x values (checkpoint steps)}."""
    lines: dict[str, list[float]] = {}
    save = plots._save

    def recording_save(figure: Any, path: Path, dpi: int) -> Path:
        if path.name == "recall.png":
            for ax in figure.axes:
                for line in ax.get_lines():
                    lines[str(line.get_label())] = [float(x) for x in line.get_xdata()]
        return save(figure, path, dpi)

    monkeypatch.setattr(plots, "_save", recording_save)
    return lines


def test_every_evaluated_checkpoint_is_plotted_after_pruning(tmp_path: Path, eval_data: EvalData,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Pruning deletes checkpoints with their metrics.json; evaluations.jsonl keeps them, and the
    report plots and lists every evaluated checkpoint, as the default run's report must."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = run_config(eval_data, "pruned", ["all"])
    (run_dir / "config.yaml").write_text(config_to_yaml(config), encoding="utf-8")
    steps = (10, 20, 30, 40, 50)
    for seed, step in enumerate(steps):
        directory = write_checkpoint(run_dir, checkpoint_dir_name(step), make_model(eval_data.vocab, seed),
                                     eval_data.vocab, step, complete=False)
        (directory / "train_state.json").write_text(train_state(step), encoding="utf-8")
    assert [s["status"] for s in evaluate_run(str(run_dir))] == ["ok"] * len(steps)
    pruned = prune_checkpoints(str(run_dir), keep_last=1)
    assert len(pruned) >= 2
    left = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint_"))
    assert len(left) == len(steps) - len(pruned)

    lines = recall_plot_lines(monkeypatch)
    output = tmp_path / "report"
    assert report.main([str(run_dir), "--output", str(output)]) == 0
    assert lines["dev rsum"] == [float(s) for s in steps]  # every evaluated checkpoint, pruned or not
    assert lines["test all rsum"] == [float(s) for s in steps]
    rows = checkpoint_rows((output / "summary.md").read_text())
    assert list(rows) == [checkpoint_dir_name(s) for s in steps]
    for name in (Path(p).name for p in pruned):
        assert rows[name]["evaluation"] == f"evaluated (pruned; from {EVALUATIONS_FILE})"
        assert rows[name]["dev rsum"] != "n/a"

    # A run without a history (written before evaluations.jsonl existed): what metrics.json is left.
    (run_dir / EVALUATIONS_FILE).unlink()
    lines.clear()
    assert report.main([str(run_dir), "--output", str(output)]) == 0
    assert lines["dev rsum"] == [float(name.rsplit("_", 1)[1]) for name in left]
    assert f"no {EVALUATIONS_FILE}: only the checkpoints still in the run are plotted" in \
        (output / "summary.md").read_text()

    # A damaged history line stops the report with the file and the line.
    (run_dir / EVALUATIONS_FILE).write_text('{"checkpoint": "checkpoint_000000010"}\n{cut\n')
    with caplog.at_level(logging.ERROR):
        assert report.main([str(run_dir), "--output", str(output)]) == report.EXIT_BAD_INPUT
    assert f"{run_dir / EVALUATIONS_FILE}: line 2: not valid JSON" in caplog.text

