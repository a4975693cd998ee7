"""monitoring/recorders.py: the series each backend exposes match the contract of
monitoring/metrics.py, carry the recorded values, and pass `promtool check metrics`."""

from __future__ import annotations

import math
import shutil
import subprocess
import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitoring import metrics as m
from monitoring.recorders import EvaluationMetrics, PrometheusBackend, TrainingMetrics

PAYLOAD: dict[str, Any] = {  # a metrics.json payload (trainer/evaluator/), numbers in percent
    "checkpoint": "/runs/r/checkpoint_000000030", "step": 30, "epoch": 0, "dev_rsum": 240.0,
    "dev": {"i2t_r1": 40.0, "i2t_r5": 50.0, "i2t_r10": 60.0, "t2i_r1": 20.0, "t2i_r5": 30.0, "t2i_r10": 40.0,
            "rsum": 240.0},
    "test": {"all": {"i2t_r1": 10.0, "i2t_r5": 20.0, "i2t_r10": 30.0, "t2i_r1": 5.0, "t2i_r5": 15.0,
                     "t2i_r10": 25.0, "rsum": 105.0}},
}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return parsed[(name, frozenset(labels.items()))]


@pytest.fixture
def backend() -> Any:
    backend = PrometheusBackend()
    yield backend
    backend.close()


def test_training_and_evaluation_series_follow_the_contract(backend: PrometheusBackend) -> None:
    train = TrainingMetrics(backend, run="r", rank=1)
    train.record_step(epoch=2, samples=64, learning_rate=2e-4, losses={"matching": 3.5, "caption": 40.0,
                                                                        "total": 43.5},
                      step_seconds=0.3, data_wait_seconds=0.05)
    train.record_step(epoch=2, samples=64, learning_rate=2e-4, losses={"matching": 3.0, "caption": 38.0,
                                                                        "total": 41.0},
                      step_seconds=0.7, data_wait_seconds=0.15)
    train.record_reader_stats({"images_read": 10, "skipped_samples": 3, "skipped_samples/nonfinite": 2,
                               "skipped_samples/captions": 1})
    train.record_reader_stats({"skipped_samples/nonfinite": 5, "skipped_samples/captions": 1})
    train.record_checkpoint(1.5)
    train.record_checkpoint_failure()
    train.record_accelerator_memory(allocated=1 << 30, reserved=2 << 30, max_allocated=3 << 30)
    train.record_hard_negatives(gap_mean={"i2t": 0.12, "t2i": 0.08}, gap_p10={"i2t": -0.05, "t2i": -0.11},
                                active_hinge_ratio=0.75, remote_hardest_ratio=0.5)
    train.record_collapse(True)
    evaluation = EvaluationMetrics(backend, run="r")
    before = time.time()
    evaluation.record_evaluation(PAYLOAD, best_rsum=250.0, seconds=12.0)
    evaluation.record_failure(3.0)
    port = backend.serve(0)

    text = scrape(port)
    parsed = samples(text)
    # Every exposed series is in the contract, and every metric of the contract is exposed.
    names = {name for name, _ in parsed}
    assert names <= m.exported_series_names(), names - m.exported_series_names()
    assert {spec.name for spec in m.ALL_METRICS} <= {n.removesuffix("_bucket").removesuffix("_count")
                                                     .removesuffix("_sum") for n in names}
    t = {"run": "r", "rank": "1"}
    assert value(parsed, "vsrn_train_steps_total", **t) == 2
    assert value(parsed, "vsrn_train_samples_total", **t) == 128
    assert value(parsed, "vsrn_train_epoch", **t) == 2
    assert value(parsed, "vsrn_train_loss", **t, term="matching") == 3.0  # the last step
    assert value(parsed, "vsrn_train_loss", **t, term="total") == 41.0
    assert value(parsed, "vsrn_train_learning_rate", **t) == pytest.approx(2e-4)
    assert value(parsed, "vsrn_train_step_duration_seconds_count", **t) == 2
    assert value(parsed, "vsrn_train_step_duration_seconds_sum", **t) == pytest.approx(1.0)
    assert value(parsed, "vsrn_train_step_duration_seconds_bucket", **t, le="0.5") == 1
    assert value(parsed, "vsrn_train_data_wait_seconds_total", **t) == pytest.approx(0.2)
    assert before - 60 < value(parsed, "vsrn_train_last_step_timestamp_seconds", **t) <= time.time()
    # cumulative reader counts -> counter increments: 2 then 5 nonfinite = 5; captions stays 1
    assert value(parsed, "vsrn_train_samples_skipped_total", **t, reason="nonfinite") == 5
    assert value(parsed, "vsrn_train_samples_skipped_total", **t, reason="captions") == 1
    assert value(parsed, "vsrn_train_checkpoint_save_duration_seconds_sum", **t) == 1.5
    assert value(parsed, "vsrn_train_checkpoint_failures_total", **t) == 1
    assert value(parsed, "vsrn_train_accelerator_memory_bytes", **t, kind="reserved") == 2 << 30
    assert value(parsed, "vsrn_train_hardest_negative_gap", **t, direction="i2t", statistic="mean") == 0.12
    assert value(parsed, "vsrn_train_hardest_negative_gap", **t, direction="t2i", statistic="p10") == -0.11
    assert value(parsed, "vsrn_train_active_hinges_ratio", **t) == 0.75
    assert value(parsed, "vsrn_train_remote_hardest_negatives_ratio", **t) == 0.5
    assert value(parsed, "vsrn_train_collapsed", **t) == 1

    e = {"run": "r"}
    assert value(parsed, "vsrn_eval_recall_ratio", **e, split="dev", protocol="all", direction="i2t",
                 k="1") == pytest.approx(0.40)
    assert value(parsed, "vsrn_eval_recall_ratio", **e, split="test", protocol="all", direction="t2i",
                 k="10") == pytest.approx(0.25)
    assert value(parsed, "vsrn_eval_rsum", **e, split="dev", protocol="all") == 240.0
    assert value(parsed, "vsrn_eval_rsum", **e, split="test", protocol="all") == 105.0
    assert value(parsed, "vsrn_eval_best_rsum", **e) == 250.0
    assert value(parsed, "vsrn_eval_checkpoint_step", **e) == 30
    assert value(parsed, "vsrn_eval_checkpoints_total", **e) == 1
    assert value(parsed, "vsrn_eval_failures_total", **e) == 1
    assert value(parsed, "vsrn_eval_duration_seconds_count", **e) == 2
    assert before <= value(parsed, "vsrn_eval_last_success_timestamp_seconds", **e) <= time.time()

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install Debian's prometheus package (`make test` does so as root)")
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), (lint.stdout, lint.stderr)


def test_counters_are_exported_at_zero_before_the_first_event(backend: PrometheusBackend) -> None:
    # increase() over a series that first appears at 1 reads 0: the first failure would never alert.
    TrainingMetrics(backend, run="r", rank=0)
    EvaluationMetrics(backend, run="r")
    parsed = samples(scrape(backend.serve(0)))
    assert value(parsed, "vsrn_eval_failures_total", run="r") == 0
    assert value(parsed, "vsrn_train_checkpoint_failures_total", run="r", rank="0") == 0
    assert value(parsed, "vsrn_train_steps_total", run="r", rank="0") == 0
    # not a counter, but exported from the start as well: "not collapsed" is a value, not a gap
    assert value(parsed, "vsrn_train_collapsed", run="r", rank="0") == 0


def test_a_nan_loss_is_exported_as_nan(backend: PrometheusBackend) -> None:
    TrainingMetrics(backend, run="r", rank=0).record_losses({"matching": float("nan"), "caption": 1.0,
                                                             "total": float("nan")})
    parsed = samples(scrape(backend.serve(0)))
    assert math.isnan(value(parsed, "vsrn_train_loss", run="r", rank="0", term="matching"))


def test_labels_that_do_not_match_the_contract_are_refused(backend: PrometheusBackend) -> None:
    instrument = backend.instrument(m.TRAIN_STEPS)
    with pytest.raises(ValueError, match=r"vsrn_train_steps_total: labels \['run'\] given, \['rank', 'run'\]"):
        instrument.inc(1, {"run": "r"})


def test_served_on_loopback_by_default(backend: PrometheusBackend) -> None:
    EvaluationMetrics(backend, run="r")
    port = backend.serve(0)
    assert backend._server.server_address[0] == "127.0.0.1"  # noqa: SLF001 - what a local run binds
    assert "vsrn_eval_failures_total" in scrape(port)


def test_the_ray_backend_exposes_the_series_on_the_node_metrics_port(ray_local: Any) -> None:
    """Through ray.util.metrics in an actor, as the training workers and the evaluation actor do:
    the node's metrics agent exposes them with Ray's `ray_` prefix."""
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Recorder:
        def record(self) -> None:
            from monitoring.recorders import EvaluationMetrics, RayBackend, TrainingMetrics

            train = TrainingMetrics(RayBackend(), run="ray-test", rank=0)
            train.record_step(epoch=1, samples=16, learning_rate=1e-3,
                              losses={"matching": 2.5, "caption": 9.0, "total": 11.5},
                              step_seconds=0.2, data_wait_seconds=0.01)
            EvaluationMetrics(RayBackend(), run="ray-test").record_evaluation(PAYLOAD, 240.0, 5.0)

    recorder = Recorder.remote()
    ray.get(recorder.record.remote())
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    deadline = time.monotonic() + 60  # workers report to the agent every few seconds
    wanted = {"ray_vsrn_train_steps_total", "ray_vsrn_train_loss", "ray_vsrn_eval_rsum",
              "ray_vsrn_train_step_duration_seconds_count"}
    found: dict[str, list[Any]] = {}
    while time.monotonic() < deadline:
        found = {}
        for family in text_string_to_metric_families(scrape(port)):
            for s in family.samples:
                if s.name in wanted and s.labels.get("run") == "ray-test":
                    found.setdefault(s.name, []).append(s)
        if set(found) == wanted:
            break
        time.sleep(1)
    assert set(found) == wanted, f"missing on the Ray metrics port: {wanted - set(found)}"
    assert found["ray_vsrn_train_steps_total"][0].value == 1
    loss = {s.labels["term"]: s.value for s in found["ray_vsrn_train_loss"]}
    assert loss == {"matching": 2.5, "caption": 9.0, "total": 11.5}
    rsum = {(s.labels["split"], s.labels["protocol"]): s.value for s in found["ray_vsrn_eval_rsum"]}
    assert rsum == {("dev", "all"): 240.0, ("test", "all"): 105.0}
    ray.kill(recorder)
