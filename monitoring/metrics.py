"""The metrics the system exports: one table, the contract between the code that records them
(monitoring/recorders.py), the Prometheus rules and alerts (monitoring/prometheus/), the Grafana
dashboard (monitoring/grafana/) and the Kubernetes objects that carry both (k8s/).

Names follow Prometheus conventions: the application prefix ``vsrn_``, base units as suffixes
(``_seconds``, ``_bytes``, ``_ratio``), counters ending in ``_total``. Recall is exported as a ratio
(0–1) as Prometheus recommends; ``rsum`` keeps the paper's unit (the sum of six recalls in percent,
0–600) because that is the number every VSRN user compares.

Inside Ray, metrics go through ``ray.util.metrics``, and Ray exposes them with a ``ray_`` prefix
(``ray_vsrn_train_steps_total``) plus its own labels (SessionName, NodeAddress, WorkerId, ...). The
scrape configurations in this repository strip the prefix (``metric_relabel_configs`` /
PodMonitor ``metricRelabelings``), so rules and dashboards use the names below for both Ray runs and
the standalone evaluation job, which exports through prometheus-client without a prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PREFIX = "vsrn_"
RAY_PREFIX = "ray_"  # what Ray puts in front of application metrics when it exposes them

Kind = Literal["counter", "gauge", "histogram"]

STEP_SECONDS_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)
SAVE_SECONDS_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
EVAL_SECONDS_BUCKETS: tuple[float, ...] = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    description: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    def series_names(self) -> tuple[str, ...]:
        """The series names Prometheus stores for this metric (histograms have three)."""
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


_TRAIN = ("run", "rank")

TRAIN_STEPS = MetricSpec("vsrn_train_steps_total", "counter", "Optimizer steps completed.", _TRAIN)
TRAIN_SAMPLES = MetricSpec("vsrn_train_samples_total", "counter",
                           "(image, caption) pairs trained on, over all workers (counted by each rank "
                           "for its share).", _TRAIN)
TRAIN_EPOCH = MetricSpec("vsrn_train_epoch", "gauge", "Current epoch (0-based).", _TRAIN)
TRAIN_LOSS = MetricSpec("vsrn_train_loss", "gauge",
                        "Loss of the last step over the global batch; term is matching (L_M), caption "
                        "(L_G) or total (L_M + lambda * L_G).", (*_TRAIN, "term"))
TRAIN_LEARNING_RATE = MetricSpec("vsrn_train_learning_rate", "gauge", "Learning rate of the last step.", _TRAIN)
TRAIN_STEP_DURATION = MetricSpec("vsrn_train_step_duration_seconds", "histogram",
                                 "Time of one training step (forward, backward, optimizer), data wait excluded.",
                                 _TRAIN, STEP_SECONDS_BUCKETS)
TRAIN_DATA_WAIT = MetricSpec("vsrn_train_data_wait_seconds_total", "counter",
                             "Time spent waiting for the data loader.", _TRAIN)
TRAIN_LAST_STEP = MetricSpec("vsrn_train_last_step_timestamp_seconds", "gauge",
                             "Unix time at which the last step finished.", _TRAIN)
TRAIN_SAMPLES_SKIPPED = MetricSpec("vsrn_train_samples_skipped_total", "counter",
                                   "Samples the reader skipped under bad_data=skip, by reason.", (*_TRAIN, "reason"))
TRAIN_CHECKPOINT_SAVE = MetricSpec("vsrn_train_checkpoint_save_duration_seconds", "histogram",
                                   "Time to write and report one checkpoint.", _TRAIN, SAVE_SECONDS_BUCKETS)
TRAIN_CHECKPOINT_FAILURES = MetricSpec("vsrn_train_checkpoint_failures_total", "counter",
                                       "Checkpoint saves that raised.", _TRAIN)
TRAIN_ACCELERATOR_MEMORY = MetricSpec("vsrn_train_accelerator_memory_bytes", "gauge",
                                      "Accelerator memory of the worker; kind is allocated, reserved or "
                                      "max_allocated. Only exported where an accelerator is used.",
                                      (*_TRAIN, "kind"))

# Hard-negative diagnostics (trainer/training/diagnostics.py), one value per logging interval over the global
# batch (the same on every rank). "Gap": positive score minus the score of the anchor's hardest
# negative (cosine similarities); direction i2t: image anchors against captions, t2i: captions
# against images. The collapsed solution has every gap at 0, every hinge active and L_M at
# 2 * global batch * margin.
TRAIN_HARDEST_NEGATIVE_GAP = MetricSpec("vsrn_train_hardest_negative_gap", "gauge",
                                        "Positive score minus hardest-negative score over the last logging "
                                        "interval; direction i2t or t2i, statistic mean or p10 (10th "
                                        "percentile).", (*_TRAIN, "direction", "statistic"))
TRAIN_ACTIVE_HINGES = MetricSpec("vsrn_train_active_hinges_ratio", "gauge",
                                 "Fraction of the matching loss's hinge terms that are active (> 0) over the last "
                                 "logging interval: one term per query under hardest negatives, one per "
                                 "(query, negative) pair during the all-negatives warm-up.", _TRAIN)
TRAIN_REMOTE_HARDEST = MetricSpec("vsrn_train_remote_hardest_negatives_ratio", "gauge",
                                  "Share of hardest negatives found in another worker's part of the global "
                                  "batch over the last logging interval (0 with one worker).", _TRAIN)
TRAIN_COLLAPSED = MetricSpec("vsrn_train_collapsed", "gauge",
                             "1 while the collapse detector holds (L_M within 1 % of 2 * global batch * "
                             "margin for monitoring.collapse_intervals logging intervals under hardest "
                             "negatives), else 0.", _TRAIN)

_EVAL = ("run",)

EVAL_RECALL = MetricSpec("vsrn_eval_recall_ratio", "gauge",
                         "Recall@K of the last evaluated checkpoint (0-1); split dev or test, protocol all or "
                         "1k-5fold (dev is always all), direction i2t or t2i, k 1, 5 or 10.",
                         (*_EVAL, "split", "protocol", "direction", "k"))
EVAL_RSUM = MetricSpec("vsrn_eval_rsum", "gauge",
                       "rsum of the last evaluated checkpoint: the sum of the six recalls in percent (0-600).",
                       (*_EVAL, "split", "protocol"))
EVAL_BEST_RSUM = MetricSpec("vsrn_eval_best_rsum", "gauge", "Dev rsum of the run's best checkpoint.", _EVAL)
EVAL_CHECKPOINT_STEP = MetricSpec("vsrn_eval_checkpoint_step", "gauge",
                                  "Training step of the last evaluated checkpoint.", _EVAL)
EVAL_LAST_SUCCESS = MetricSpec("vsrn_eval_last_success_timestamp_seconds", "gauge",
                               "Unix time of the last successful checkpoint evaluation.", _EVAL)
EVAL_CHECKPOINTS = MetricSpec("vsrn_eval_checkpoints_total", "counter", "Checkpoints evaluated successfully.", _EVAL)
EVAL_FAILURES = MetricSpec("vsrn_eval_failures_total", "counter", "Checkpoint evaluations that failed.", _EVAL)
EVAL_DURATION = MetricSpec("vsrn_eval_duration_seconds", "histogram", "Time to evaluate one checkpoint.",
                           _EVAL, EVAL_SECONDS_BUCKETS)

TRAIN_METRICS: tuple[MetricSpec, ...] = (
    TRAIN_STEPS, TRAIN_SAMPLES, TRAIN_EPOCH, TRAIN_LOSS, TRAIN_LEARNING_RATE, TRAIN_STEP_DURATION,
    TRAIN_DATA_WAIT, TRAIN_LAST_STEP, TRAIN_SAMPLES_SKIPPED, TRAIN_CHECKPOINT_SAVE, TRAIN_CHECKPOINT_FAILURES,
    TRAIN_ACCELERATOR_MEMORY, TRAIN_HARDEST_NEGATIVE_GAP, TRAIN_ACTIVE_HINGES, TRAIN_REMOTE_HARDEST, TRAIN_COLLAPSED,
)
EVAL_METRICS: tuple[MetricSpec, ...] = (
    EVAL_RECALL, EVAL_RSUM, EVAL_BEST_RSUM, EVAL_CHECKPOINT_STEP, EVAL_LAST_SUCCESS, EVAL_CHECKPOINTS,
    EVAL_FAILURES, EVAL_DURATION,
)
ALL_METRICS: tuple[MetricSpec, ...] = TRAIN_METRICS + EVAL_METRICS


def exported_series_names() -> frozenset[str]:
    """Every series name a query may use (after the ``ray_`` prefix is stripped at scrape time)."""
    return frozenset(name for spec in ALL_METRICS for name in spec.series_names())
