"""Hard-negative diagnostics and the collapse detector (trainer/training/diagnostics.py) in the training loop.

The loop of trainer/training/loop.py (`TrainingLoop.run`: the step, the recorder, the step log, the metrics) runs
here on a stand-in engine and reader, no Ray and no DeepSpeed, so each run takes well under a
second: one model whose embeddings are all the same vector (the collapsed solution, a fixed point
of the loss: its gradient is 0 there) and one whose pairs are perfectly separated. One real run
through Ray Train and DeepSpeed (2 workers, the tiny configuration) provokes the collapse the way
users meet it, with hardest negatives from the first step and a learning rate far too high.
tests/trainer/test_collapse_distributed.py checks the interval summary over 2 gloo ranks.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from prometheus_client.parser import text_string_to_metric_families
from torch import Tensor, nn

from data_shards.batches import TrainBatch
from model.vsrn import VSRNOutput
from monitoring.recorders import PrometheusBackend, TrainingMetrics
from train_run_helpers import tiny_run_config
from trainer.config import TrainConfig, load_config
from trainer.training.diagnostics import CollapseDetector, collapse_level
from trainer.run.step_log import LOG_FIELDS
from trainer.run.step_log import StepLog
from trainer.training.loop import TrainingLoop
from trainer.training.recorder import Recorder

ROOT = Path(__file__).resolve().parents[3]
BATCH, DIM = 8, 8
STEPS = 12  # one epoch; logging every 2 steps: intervals close at steps 2, 4, ..., 12
WARMUP_STEPS = 4  # all negatives for steps 1-4
COLLAPSE_INTERVALS = 3  # hardest-negative intervals at 6, 8, 10: the detector trips at step 10


def config(*extra: str) -> TrainConfig:
    return load_config(ROOT / "configs" / "tiny.yaml", [
        "distributed.workers=1", f"optim.global_batch_size={BATCH}", "optim.epochs=1", "optim.warmup_epochs=0",
        f"optim.warmup_steps={WARMUP_STEPS}", "logging.interval_steps=2", "checkpoint.every_steps=0",
        f"monitoring.collapse_intervals={COLLAPSE_INTERVALS}", *extra])


class IdenticalEmbeddings(nn.Module):
    """Every image and caption embedding is the same unit vector: the collapsed solution."""

    def __init__(self) -> None:
        super().__init__()
        self.vector = nn.Parameter(torch.ones(DIM))

    def forward(self, regions: Tensor, *_: Any) -> VSRNOutput:
        emb = F.normalize(self.vector, dim=0).expand(regions.shape[0], DIM)
        return VSRNOutput(emb, emb, None)


class SeparatedPairs(nn.Module):
    """Pair i gets the unit vector e_i for both its image and its caption: every gap is 1."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, regions: Tensor, *_: Any) -> VSRNOutput:
        emb = F.normalize(self.scale * torch.eye(DIM)[: regions.shape[0]], dim=1)
        return VSRNOutput(emb, emb, None)


class Engine:
    """What the training loop uses of a DeepSpeed engine: call, backward, step, `.module` and `.optimizer`."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.optimizer = torch.optim.SGD(module.parameters(), lr=1.0)

    def __call__(self, *inputs: Any) -> VSRNOutput:
        return self.module(*inputs)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()


class ReaderStats:
    def as_dict(self) -> dict[str, int]:
        return {}


class Reader:
    """What the training loop uses of a TrainReader: one epoch of STEPS batches of distinct images."""

    stats = ReaderStats()

    def batches_per_epoch(self, epoch: int) -> int:
        return STEPS

    def epoch(self, epoch: int, first: int, pin_memory: bool = False) -> Iterator[TrainBatch]:
        for index in range(first, STEPS):
            yield TrainBatch(regions=torch.zeros(BATCH, 2, 4), boxes=None, tokens=torch.ones(BATCH, 3, dtype=torch.long),
                             lengths=torch.full((BATCH,), 3), image_ids=torch.arange(BATCH) + index * BATCH,
                             caption_index=torch.zeros(BATCH, dtype=torch.long), keys=[""] * BATCH,
                             captions=[""] * BATCH, epoch=epoch, index=index, slot=0)


def train(module: nn.Module, tmp_path: Path, *extra: str) -> tuple[list[dict[str, Any]], PrometheusBackend]:
    """Run the worker's loop for one epoch; returns the step log's records and the metrics registry."""
    cfg = config(*extra)
    backend = PrometheusBackend()
    metrics = TrainingMetrics(backend, run="r", rank=0)
    reader = Reader()
    recorder = Recorder(cfg, reader, StepLog(str(tmp_path), None), 0, 1, torch.device("cpu"), metrics)  # type: ignore[arg-type]
    loop = TrainingLoop(cfg, Engine(module), reader, None, recorder, 0, 1, str(tmp_path), None, "r")  # type: ignore[arg-type]
    loop.checkpoint = lambda state: None  # type: ignore[method-assign]  # checkpoints are not under test here
    loop.run(0, 0, 0)
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    return records, backend


def gauge(backend: PrometheusBackend, name: str, **labels: str) -> float | None:
    return backend.registry.get_sample_value(name, {"run": "r", "rank": "0", **labels})


def test_identical_embeddings_trip_the_detector(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="trainer"):
        records, backend = train(IdenticalEmbeddings(), tmp_path)
    level = collapse_level(BATCH, 0.2)
    # The collapsed loss: every hardest-negative hinge at the margin, L_M = 2 * B * margin.
    assert all(math.isclose(r["loss_matching"], level, rel_tol=1e-6) for r in records if r["hardest_negatives"])
    closing = {r["step"]: r for r in records if "collapsed" in r}
    assert sorted(closing) == [2, 4, 6, 8, 10, 12]  # diagnostics only on the steps that close an interval
    assert all(set(LOG_FIELDS) <= set(r) for r in closing.values())
    assert [closing[s]["collapsed"] for s in sorted(closing)] == [False, False, False, False, True, True]
    for record in closing.values():
        assert record["gap_i2t_mean"] == pytest.approx(0.0, abs=1e-6)
        assert record["gap_t2i_p10"] == pytest.approx(0.0, abs=1e-6)
        assert record["active_hinge_ratio"] == 1.0  # under the warm-up too: all B - 1 negatives at the margin
        assert record["remote_hardest_ratio"] == 0.0  # one worker: nothing comes from another
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "trainer.training.recorder"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "collapsed at step 10" in message and f"= {level:g}" in message
    assert "warm-up" in message and "learning_rate" in message
    assert gauge(backend, "vsrn_train_collapsed") == 1.0
    assert gauge(backend, "vsrn_train_active_hinges_ratio") == 1.0
    assert gauge(backend, "vsrn_train_hardest_negative_gap", direction="i2t", statistic="mean") == \
        pytest.approx(0.0, abs=1e-6)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 0 step 12 ")]
    assert len(progress) == 1 and "active hinges 100%" in progress[0] and "COLLAPSED" in progress[0]


def test_separated_pairs_do_not_trip_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="trainer"):
        records, backend = train(SeparatedPairs(), tmp_path)
    closing = [r for r in records if "collapsed" in r]
    assert len(closing) == 6 and not any(r["collapsed"] for r in closing)
    assert all(r["gap_i2t_mean"] == pytest.approx(1.0) and r["gap_t2i_p10"] == pytest.approx(1.0) for r in closing)
    assert all(r["active_hinge_ratio"] == 0.0 for r in closing)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("trainer")]
    assert gauge(backend, "vsrn_train_collapsed") == 0.0
    assert gauge(backend, "vsrn_train_hardest_negative_gap", direction="t2i", statistic="p10") == pytest.approx(1.0)


def test_the_detector_can_be_turned_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="trainer"):
        records, backend = train(IdenticalEmbeddings(), tmp_path, "monitoring.collapse_intervals=0")
    assert not any(r.get("collapsed") for r in records)
    assert not caplog.records and gauge(backend, "vsrn_train_collapsed") == 0.0


def test_detector_streaks() -> None:
    detector = CollapseDetector(global_batch=128, margin=0.2, intervals=2)
    assert detector.level == pytest.approx(51.2)  # VSE++ issue #27: "the loss stays at 51.2"
    # 1 % band: 50.7 and 51.7 are in it; a warm-up interval or a loss outside the band breaks the streak.
    steps = [(51.7, True), (60.0, True), (50.7, True), (51.2, False), (51.0, True), (51.3, True), (51.25, True),
             (40.0, True)]
    states = [(u.collapsed, u.started, u.ended) for u in (detector.update(v, h) for v, h in steps)]
    assert states == [(False, False, False)] * 5 + [(True, True, False), (True, False, False), (False, False, True)]
    assert not CollapseDetector(128, 0.0, 2).update(0.0, True).collapsed  # margin 0: L_M = 0 is no collapse


def test_the_report_plots_the_diagnostics_and_flags_the_collapse(tmp_path: Path) -> None:
    from trainer import report
    from trainer.config import config_to_yaml

    for name, module in (("collapsed", IdenticalEmbeddings()), ("healthy", SeparatedPairs())):
        run_dir = tmp_path / name
        run_dir.mkdir()
        train(module, run_dir)  # the step log as the worker writes it
        (run_dir / "config.yaml").write_text(config_to_yaml(config()), encoding="utf-8")
        output = tmp_path / f"{name}-report"
        assert report.main([str(run_dir), "--output", str(output)]) == 0
        png = (output / "diagnostics.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        summary = (output / "summary.md").read_text()
        assert "](diagnostics.png)" in summary
        assert "- hard negatives, last logging interval (step 12): gap positive - hardest negative" in summary
        assert "hard-negative diagnostics (written before they existed)" not in summary
        if name == "collapsed":
            assert "active hinges 100.0 %" in summary
            assert "**collapse detected** (L_M at 2 x global batch x margin under hardest negatives) at 2 " \
                   "logging interval(s), first at step 10, last at step 12" in summary
        else:
            assert "i2t 1.000 / 1.000" in summary and "active hinges 0.0 %" in summary
            assert "- collapse detector: did not trip" in summary


def _ray_series(port: int, name: str, run: str) -> list[float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return [sample.value for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == name and sample.labels.get("run") == run]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_learning_rate_far_too_high_collapses_a_real_run(ray_local: Any, tmp_path: Path,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    from trainer.launch import run

    # lr 0.05 (100x the tiny configuration's) with hardest negatives from step 1: the embeddings
    # collapse within ~20 steps of 30 (checked: L_M 6.49 at step 15, 6.41 at 20, 6.40 at 25 and 30).
    name = "collapse-lr"
    run(tiny_run_config(tmp_path, name, "optim.epochs=1", "optim.warmup_epochs=0", "optim.learning_rate=0.05",
                        "logging.interval_steps=5", "monitoring.collapse_intervals=2", "checkpoint.every_steps=0"))
    records = [json.loads(line) for line in (tmp_path / "runs" / name / "train_log.jsonl").read_text().splitlines()]
    closing = {r["step"]: r for r in records if "collapsed" in r}
    assert sorted(closing) == [5, 10, 15, 20, 25, 30]
    level = collapse_level(16, 0.2)  # the global batch of tiny_run_config
    last = closing[30]
    assert last["collapsed"] and last["loss_matching"] == pytest.approx(level, rel=0.01)
    assert last["active_hinge_ratio"] == 1.0 and abs(last["gap_i2t_mean"]) < 0.01 and abs(last["gap_t2i_p10"]) < 0.01
    assert 0.3 < last["remote_hardest_ratio"] < 0.7  # 2 workers: about half the hardest negatives are remote
    assert not closing[5]["collapsed"]

    # The gauge, on Ray's metrics endpoint (a finished worker's series stay for RAY_WORKER_TIMEOUT_S).
    port = next(n["MetricsExportPort"] for n in ray_local.nodes() if n["Alive"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sorted(_ray_series(port, "ray_vsrn_train_collapsed", name)) != [1.0, 1.0]:
        time.sleep(1)
    assert sorted(_ray_series(port, "ray_vsrn_train_collapsed", name)) == [1.0, 1.0]  # both ranks
    # The warning, in rank 0's log (Ray streams the workers' logs to the driver, here the test).
    seen = ""
    deadline = time.monotonic() + 30
    while "training has likely collapsed" not in seen and time.monotonic() < deadline:
        out, err = capfd.readouterr()
        seen += out + err
        time.sleep(0.5)
    warning = next(line for line in seen.splitlines() if "training has likely collapsed" in line)
    assert "WARNING rank0 trainer.training.recorder" in warning and "warm-up" in warning and "learning_rate" in warning
