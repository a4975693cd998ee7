"""A real Prometheus server on 127.0.0.1 scrapes a short training run (Ray's metrics endpoint, the
training workers and the evaluation actor) and the standalone evaluation job (through a real
Pushgateway); the expected series arrive, under their contract names, with plausible values."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from prometheus_servers import prometheus, pushgateway

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = ROOT / "monitoring" / "prometheus" / "prometheus.yml"


def strip_ray_prefix() -> list[dict[str, Any]]:
    """The relabelling the shipped scrape configuration applies to Ray's endpoints (so this test
    checks the shipped rule, not a copy of it)."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    for job in config["scrape_configs"]:
        for rule in job.get("metric_relabel_configs", []):
            if "ray_" in str(rule.get("regex", "")) and rule.get("target_label") == "__name__":
                return [rule]
    raise AssertionError(f"{SHIPPED_CONFIG}: no metric_relabel_configs rule strips Ray's ray_ prefix")


def values(result: list[dict[str, Any]]) -> list[float]:
    return [float(item["value"][1]) for item in result]


@pytest.mark.slow
@pytest.mark.distributed
def test_prometheus_scrapes_training_and_the_standalone_evaluation(ray_local: Any, tmp_path: Path) -> None:
    ray = ray_local
    metrics_port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    with pushgateway(tmp_path) as gateway:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                 "metric_relabel_configs": strip_ray_prefix()},
                {"job_name": "pushgateway", "honor_labels": True,
                 "static_configs": [{"targets": [gateway.removeprefix("http://")]}]},
            ],
        }
        with prometheus(tmp_path / "prometheus", config) as server:
            # A short run on the session's Ray (as under `ray job submit`): 2 workers, the
            # evaluator scoring each of the 2 epoch checkpoints.
            runs = tmp_path / "runs"
            run = subprocess.run(
                [sys.executable, "trainer/launch.py", "--set", f"data.cache_dir={tmp_path / 'cache'}",
                 "--set", f"checkpoint.storage_path={runs}", "--set", "checkpoint.run_name=prom",
                 "--set", "distributed.cpus_per_worker=0.75", "--set", "eval.cpus=0.5",
                 "--set", "data.synthetic_train_images=120", "--set", "optim.epochs=2",
                 "--set", "optim.warmup_epochs=1", "--set", "logging.interval_steps=5"],
                cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address})
            assert run.returncode == 0, run.stderr[-4000:]
            summary = json.loads(run.stdout.strip().splitlines()[-1])
            steps = 2 * math.ceil(120 * 5 / 32)  # 2 epochs of 600 pairs in global batches of 32

            # Training series, per rank, under the contract names (ray_ stripped at scrape time).
            # last_over_time: the workers have exited; their last samples are what counts.
            done = server.wait_for('last_over_time(vsrn_train_steps_total{run="prom"}[10m]) > 0')
            assert {item["metric"]["rank"] for item in done} == {"0", "1"}, done
            assert all(0 < v <= steps for v in values(done))
            assert not server.query('ray_vsrn_train_steps_total')  # every Ray series was renamed
            losses = server.query('last_over_time(vsrn_train_loss{run="prom"}[10m])')
            terms = {item["metric"]["term"]: float(item["value"][1]) for item in losses}
            assert set(terms) == {"matching", "caption", "total"}
            assert all(math.isfinite(v) and v > 0 for v in terms.values())
            assert values(server.query('max(last_over_time(vsrn_train_learning_rate{run="prom"}[10m]))')) == \
                [pytest.approx(5e-4)]  # configs/tiny.yaml
            step_time = values(server.query(
                'max(last_over_time(vsrn_train_step_duration_seconds_count{run="prom"}[10m]))'))
            assert step_time and 0 < step_time[0] <= steps
            saved = values(server.query(
                'max(last_over_time(vsrn_train_checkpoint_save_duration_seconds_count{run="prom"}[10m]))'))
            assert saved and saved[0] >= 1

            # The evaluation actor's series.
            rsum = server.wait_for('last_over_time(vsrn_eval_rsum{run="prom", split="test"}[10m])')
            assert rsum and all(32 < v <= 600 for v in values(rsum)), rsum  # chance on 100 images is ~32
            best = values(server.wait_for('last_over_time(vsrn_eval_best_rsum{run="prom"}[10m])'))
            assert best == [pytest.approx(summary["best"]["dev_rsum"], abs=1e-3)]
            recall = server.query('last_over_time(vsrn_eval_recall_ratio{run="prom", split="test", k="10"}[10m])')
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
