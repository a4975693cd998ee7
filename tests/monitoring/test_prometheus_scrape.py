"""A real Prometheus server on 127.0.0.1 scrapes the main job (the session's embedded default run,
tests/conftest.py: Ray's metrics endpoint, the training workers and the evaluation actor) and the
standalone evaluation job (through a real Pushgateway); the expected series arrive, under their
contract names, with plausible values."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def values(result: list[dict[str, Any]]) -> list[float]:
    return [float(item["value"][1]) for item in result]


@pytest.mark.slow
@pytest.mark.distributed
def test_prometheus_scrapes_training_and_the_standalone_evaluation(embedded_default_run: Any, tmp_path: Path) -> None:
    # The main job on the session's Ray (as under `ray job submit`): 2 workers, the evaluator
    # scoring each epoch's checkpoint; Prometheus scraped Ray's endpoint every second meanwhile.
    run = embedded_default_run.result
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    server, gateway = embedded_default_run.prometheus, embedded_default_run.pushgateway
    log = [json.loads(line) for line in (embedded_default_run.run_dir / "train_log.jsonl").read_text().splitlines()]
    steps, last_lr = log[-1]["step"], log[-1]["lr"]
    # Training series, per rank, under the contract names (ray_ stripped at scrape time).
    # last_over_time (over an hour: other tests may run between the job and this one): the
    # workers have exited; their last samples are what counts.
    done = server.wait_for('last_over_time(vsrn_train_steps_total{run="embedded"}[1h]) > 0')
    assert {item["metric"]["rank"] for item in done} == {"0", "1"}, done
    assert all(0 < v <= steps for v in values(done))
    assert not server.query('ray_vsrn_train_steps_total')  # every Ray series was renamed
    losses = server.query('last_over_time(vsrn_train_loss{run="embedded"}[1h])')
    terms = {item["metric"]["term"]: float(item["value"][1]) for item in losses}
    assert set(terms) == {"matching", "caption", "total"}
    assert all(math.isfinite(v) and v > 0 for v in terms.values())
    assert values(server.query('max(last_over_time(vsrn_train_learning_rate{run="embedded"}[1h]))')) == \
        [pytest.approx(last_lr)]  # each rank's last: the lr of the last step
    step_time = values(server.query(
        'max(last_over_time(vsrn_train_step_duration_seconds_count{run="embedded"}[1h]))'))
    assert step_time and 0 < step_time[0] <= steps
    saved = values(server.query(
        'max(last_over_time(vsrn_train_checkpoint_save_duration_seconds_count{run="embedded"}[1h]))'))
    assert saved and saved[0] >= 1

    # The evaluation actor's series.
    rsum = server.wait_for('last_over_time(vsrn_eval_rsum{run="embedded", split="test"}[1h])')
    assert rsum and all(32 < v <= 600 for v in values(rsum)), rsum  # chance on 100 images is ~32
    best = values(server.wait_for('last_over_time(vsrn_eval_best_rsum{run="embedded"}[1h])'))
    assert best == [pytest.approx(summary["best"]["dev_rsum"], abs=1e-3)]
    recall = server.query('last_over_time(vsrn_eval_recall_ratio{run="embedded", split="test", k="10"}[1h])')
    assert {item["metric"]["direction"] for item in recall} == {"i2t", "t2i"}
    assert all(0 < v <= 1 for v in values(recall))

    # The standalone evaluation job (as a CronJob runs it), pushing to the Pushgateway.
    checkpoint = summary["best"]["checkpoint"]
    config_yaml = yaml.safe_load((Path(summary["run_dir"]) / "config.yaml").read_text())
    job = subprocess.run(
        [sys.executable, "trainer/evaluate.py", "--checkpoint", checkpoint,
         "--data", config_yaml["data"]["test"], "--protocol", "all",
         "--output", str(tmp_path / "standalone.json"), "--pushgateway", gateway, "--run-name", "cron"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert job.returncode == 0, job.stderr[-3000:]
    expected = json.loads((tmp_path / "standalone.json").read_text())["test"]["all"]
    pushed = server.wait_for('vsrn_eval_rsum{run="cron", job="vsrn_eval"}', timeout=30)
    assert values(pushed) == [pytest.approx(expected["rsum"], abs=1e-6)]
    r1 = values(server.query('vsrn_eval_recall_ratio{run="cron", direction="i2t", k="1"}'))
    assert r1 == [pytest.approx(expected["i2t_r1"] / 100, abs=1e-9)]
    assert values(server.query('vsrn_eval_checkpoints_total{run="cron"}')) == [1]
    assert values(server.query('vsrn_eval_failures_total{run="cron"}')) == [0]
