"""Recording the metrics of monitoring/metrics.py, through Ray or through prometheus-client.

Two backends, one interface:

* :class:`RayBackend` — ``ray.util.metrics``. Used inside Ray (training workers, the evaluation
  actor): each node's metrics agent exposes the series on the node's metrics export port, where
  Ray's Prometheus service discovery (``/tmp/ray/prom_metrics_service_discovery.json``) and
  KubeRay's PodMonitors find them. Ray prefixes the names with ``ray_``; the scrape configs strip it.
* :class:`PrometheusBackend` — a prometheus-client registry for processes outside Ray (the
  standalone ``trainer/evaluate.py``): served over HTTP (127.0.0.1 by default) and/or pushed to a
  Pushgateway, since a scheduled job may exit before Prometheus scrapes it.

:class:`TrainingMetrics` and :class:`EvaluationMetrics` turn what the trainer and the evaluator
know (a step's losses, a metrics.json payload) into those series, so neither knows about labels or
instruments. Nothing here imports the rest of the project (monitoring/ is used by trainer/, never
the other way round), and nothing here imports torch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

from monitoring import metrics as m
from monitoring.metrics import MetricSpec

__all__ = [
    "Backend",
    "EvaluationMetrics",
    "Instrument",
    "PrometheusBackend",
    "RayBackend",
    "TrainingMetrics",
]

logger = logging.getLogger(__name__)

SKIPPED_PREFIX = "skipped_samples/"  # the reader's per-reason counters (data_shards/reader.py ReaderStats)
RECALL_KS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")


class Instrument(Protocol):
    """One metric; ``labels`` must give every label of its spec."""

    def inc(self, value: float, labels: Mapping[str, str]) -> None: ...

    def set(self, value: float, labels: Mapping[str, str]) -> None: ...

    def observe(self, value: float, labels: Mapping[str, str]) -> None: ...

    def zero(self, labels: Mapping[str, str]) -> None:
        """Export a counter at 0 before its first increment: `increase()` over a series that appears
        at 1 reads 0, so an alert on the first failure would never fire."""


class Backend(Protocol):
    def instrument(self, spec: MetricSpec) -> Instrument: ...

    def push(self) -> None:
        """Deliver what was recorded now, where the backend does not wait to be scraped."""


def _check_labels(spec: MetricSpec, labels: Mapping[str, str]) -> dict[str, str]:
    if set(labels) != set(spec.labels):
        raise ValueError(f"metric {spec.name}: labels {sorted(labels)} given, {sorted(spec.labels)} expected")
    return {key: str(value) for key, value in labels.items()}


# --------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------


class _RayInstrument:
    def __init__(self, spec: MetricSpec) -> None:
        from ray.util import metrics as ray_metrics

        self.spec = spec
        if spec.kind == "counter":
            self._metric: Any = ray_metrics.Counter(spec.name, description=spec.description, tag_keys=spec.labels)
        elif spec.kind == "gauge":
            self._metric = ray_metrics.Gauge(spec.name, description=spec.description, tag_keys=spec.labels)
        else:
            self._metric = ray_metrics.Histogram(spec.name, description=spec.description,
                                                 boundaries=list(spec.buckets), tag_keys=spec.labels)

    def inc(self, value: float, labels: Mapping[str, str]) -> None:
        self._metric.inc(value, tags=_check_labels(self.spec, labels))

    def set(self, value: float, labels: Mapping[str, str]) -> None:
        self._metric.set(value, tags=_check_labels(self.spec, labels))

    def observe(self, value: float, labels: Mapping[str, str]) -> None:
        self._metric.observe(value, tags=_check_labels(self.spec, labels))

    def zero(self, labels: Mapping[str, str]) -> None:
        # Counter.inc refuses 0; _record is what inc calls after its check (Ray 2.4x-2.60).
        record = getattr(self._metric, "_record", None)
        if record is not None:
            record(0.0, tags=_check_labels(self.spec, labels))


class RayBackend:
    """``ray.util.metrics`` instruments, one per metric name in this process (Ray registers each
    name with the process's metrics agent; re-creating them per recorder would be wasteful).

    Ray's histograms export a ``_sum`` estimated from bucket midpoints, not the exact sum of the
    observations; quantiles from ``_bucket`` are unaffected.
    """

    _instruments: ClassVar[dict[str, _RayInstrument]] = {}  # per process, shared by all recorders
    _lock = threading.Lock()

    def instrument(self, spec: MetricSpec) -> Instrument:
        with self._lock:
            if spec.name not in self._instruments:
                self._instruments[spec.name] = _RayInstrument(spec)
            return self._instruments[spec.name]

    def push(self) -> None:
        """Nothing to do: Ray's workers report to the node's metrics agent on their own."""


# --------------------------------------------------------------------------------------------------
# prometheus-client
# --------------------------------------------------------------------------------------------------


class _ClientInstrument:
    def __init__(self, spec: MetricSpec, registry: Any) -> None:
        import prometheus_client

        self.spec = spec
        if spec.kind == "counter":
            # prometheus-client appends _total itself: give it the base name.
            self._metric: Any = prometheus_client.Counter(spec.name.removesuffix("_total"), spec.description,
                                                          spec.labels, registry=registry)
        elif spec.kind == "gauge":
            self._metric = prometheus_client.Gauge(spec.name, spec.description, spec.labels, registry=registry)
        else:
            self._metric = prometheus_client.Histogram(spec.name, spec.description, spec.labels,
                                                       buckets=spec.buckets, registry=registry)

    def inc(self, value: float, labels: Mapping[str, str]) -> None:
        self._metric.labels(**_check_labels(self.spec, labels)).inc(value)

    def set(self, value: float, labels: Mapping[str, str]) -> None:
        self._metric.labels(**_check_labels(self.spec, labels)).set(value)

    def observe(self, value: float, labels: Mapping[str, str]) -> None:
        self._metric.labels(**_check_labels(self.spec, labels)).observe(value)

    def zero(self, labels: Mapping[str, str]) -> None:
        self._metric.labels(**_check_labels(self.spec, labels))  # a new child starts at 0


class PrometheusBackend:
    """A private prometheus-client registry (not the process-global one, so two recorders in one
    process, e.g. in tests, never collide), optionally served and/or pushed."""

    def __init__(self) -> None:
        import prometheus_client

        # The `_created` series prometheus-client adds to counters and histograms are not in the
        # contract (monitoring/metrics.py); this switch is process-wide, as the library offers it.
        prometheus_client.disable_created_metrics()
        self.registry = prometheus_client.CollectorRegistry()
        self._instruments: dict[str, _ClientInstrument] = {}
        self._server: Any = None
        self._pushgateway: str | None = None
        self._push_job = ""
        self._grouping: dict[str, str] = {}

    def instrument(self, spec: MetricSpec) -> Instrument:
        if spec.name not in self._instruments:
            self._instruments[spec.name] = _ClientInstrument(spec, self.registry)
        return self._instruments[spec.name]

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on host:port (port 0: any free port); returns the port."""
        import prometheus_client

        server, _thread = prometheus_client.start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        bound = int(server.server_address[1])
        logger.info("serving metrics on http://%s:%d/metrics", host, bound)
        return bound

    def push_to(self, gateway: str, job: str, grouping_key: Mapping[str, str]) -> None:
        """Push the registry to ``gateway`` after each :meth:`push` (``job`` and ``grouping_key``
        name the group the Pushgateway replaces on each push)."""
        self._pushgateway, self._push_job, self._grouping = gateway, job, dict(grouping_key)

    def push(self) -> None:
        """Push now, if a Pushgateway is configured. A Pushgateway that is down is logged, not
        raised: losing metrics must not fail the evaluation that produced them."""
        if self._pushgateway is None:
            return
        import prometheus_client

        try:
            prometheus_client.push_to_gateway(self._pushgateway, job=self._push_job, registry=self.registry,
                                              grouping_key=self._grouping, timeout=10)
        except OSError as error:
            logger.error("cannot push metrics to the Pushgateway at %s: %s", self._pushgateway, error)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# --------------------------------------------------------------------------------------------------
# What the trainer and the evaluator record
# --------------------------------------------------------------------------------------------------


class TrainingMetrics:
    """The training series of one worker (rank) of one run."""

    def __init__(self, backend: Backend, run: str, rank: int) -> None:
        self._labels = {"run": run, "rank": str(rank)}
        self._i = {spec.name: backend.instrument(spec) for spec in m.TRAIN_METRICS}
        self._skipped_seen: dict[str, int] = {}
        for spec in (m.TRAIN_STEPS, m.TRAIN_SAMPLES, m.TRAIN_DATA_WAIT, m.TRAIN_CHECKPOINT_FAILURES):
            self._get(spec).zero(self._labels)
        # Exported from the start, so "not collapsed" is a value and not a missing series.
        self._get(m.TRAIN_COLLAPSED).set(0, self._labels)

    def _get(self, spec: MetricSpec) -> Instrument:
        return self._i[spec.name]

    def record_step(self, *, epoch: int, samples: int, learning_rate: float, losses: Mapping[str, float],
                    step_seconds: float, data_wait_seconds: float) -> None:
        """After each optimizer step. ``samples``: this rank's pairs; ``losses``: term -> value
        (matching, caption, total), over the global batch. NaN losses are recorded as NaN: that is
        what the NaN alert looks for."""
        labels = self._labels
        self._get(m.TRAIN_STEPS).inc(1, labels)
        self._get(m.TRAIN_SAMPLES).inc(samples, labels)
        self._get(m.TRAIN_EPOCH).set(epoch, labels)
        self._get(m.TRAIN_LEARNING_RATE).set(learning_rate, labels)
        for term, value in losses.items():
            self._get(m.TRAIN_LOSS).set(value, {**labels, "term": term})
        self._get(m.TRAIN_STEP_DURATION).observe(step_seconds, labels)
        self._get(m.TRAIN_DATA_WAIT).inc(max(data_wait_seconds, 0.0), labels)
        self._get(m.TRAIN_LAST_STEP).set(time.time(), labels)

    def record_losses(self, losses: Mapping[str, float]) -> None:
        """Loss values alone (e.g. a non-finite loss seen before the step is abandoned)."""
        for term, value in losses.items():
            self._get(m.TRAIN_LOSS).set(value, {**self._labels, "term": term})

    def record_reader_stats(self, stats: Mapping[str, int]) -> None:
        """The reader's cumulative counters (ReaderStats.as_dict()); the skipped-sample counts
        grow the counter by what is new since the last call. A count that went down means a new
        reader (a new epoch's stats): all of it is new."""
        for key, value in stats.items():
            if not key.startswith(SKIPPED_PREFIX):
                continue
            reason = key[len(SKIPPED_PREFIX):]
            seen = self._skipped_seen.get(reason, 0)
            delta = value - seen if value >= seen else value
            self._skipped_seen[reason] = value
            if delta > 0:
                self._get(m.TRAIN_SAMPLES_SKIPPED).inc(delta, {**self._labels, "reason": reason})

    def record_checkpoint(self, seconds: float) -> None:
        self._get(m.TRAIN_CHECKPOINT_SAVE).observe(seconds, self._labels)

    def record_checkpoint_failure(self) -> None:
        self._get(m.TRAIN_CHECKPOINT_FAILURES).inc(1, self._labels)

    def record_hard_negatives(self, *, gap_mean: Mapping[str, float], gap_p10: Mapping[str, float],
                              active_hinge_ratio: float, remote_hardest_ratio: float) -> None:
        """At each logging interval: the hard-negative diagnostics over the global batch
        (trainer/training/diagnostics.py). ``gap_mean``/``gap_p10``: direction (i2t, t2i) -> value."""
        gap = self._get(m.TRAIN_HARDEST_NEGATIVE_GAP)
        for statistic, values in (("mean", gap_mean), ("p10", gap_p10)):
            for direction in DIRECTIONS:
                gap.set(values[direction], {**self._labels, "direction": direction, "statistic": statistic})
        self._get(m.TRAIN_ACTIVE_HINGES).set(active_hinge_ratio, self._labels)
        self._get(m.TRAIN_REMOTE_HARDEST).set(remote_hardest_ratio, self._labels)

    def record_collapse(self, collapsed: bool) -> None:
        """The collapse detector's state after each logging interval."""
        self._get(m.TRAIN_COLLAPSED).set(1.0 if collapsed else 0.0, self._labels)

    def record_accelerator_memory(self, allocated: int, reserved: int, max_allocated: int) -> None:
        for kind, value in (("allocated", allocated), ("reserved", reserved), ("max_allocated", max_allocated)):
            self._get(m.TRAIN_ACCELERATOR_MEMORY).set(value, {**self._labels, "kind": kind})


class EvaluationMetrics:
    """The evaluation series of one run: the evaluator's outcome for each checkpoint."""

    def __init__(self, backend: Backend, run: str) -> None:
        self._labels = {"run": run}
        self._i = {spec.name: backend.instrument(spec) for spec in m.EVAL_METRICS}
        self.backend = backend
        for spec in (m.EVAL_CHECKPOINTS, m.EVAL_FAILURES):
            self._get(spec).zero(self._labels)

    def _get(self, spec: MetricSpec) -> Instrument:
        return self._i[spec.name]

    def _recalls(self, split: str, protocol: str, result: Mapping[str, Any]) -> None:
        labels = {**self._labels, "split": split, "protocol": protocol}
        for direction in DIRECTIONS:
            for k in RECALL_KS:
                value = result.get(f"{direction}_r{k}")
                if isinstance(value, (int, float)):
                    # metrics.json holds percent; the series is a ratio (Prometheus convention).
                    self._get(m.EVAL_RECALL).set(value / 100.0, {**labels, "direction": direction, "k": str(k)})
        if isinstance(result.get("rsum"), (int, float)):
            self._get(m.EVAL_RSUM).set(result["rsum"], labels)

    def record_evaluation(self, payload: Mapping[str, Any], best_rsum: float | None, seconds: float) -> None:
        """A successful evaluation: ``payload`` is the metrics.json payload
        (trainer/evaluator/checkpoint_eval.py), ``best_rsum`` the run's best dev rsum after it."""
        if payload.get("dev"):
            self._recalls("dev", "all", payload["dev"])
        for protocol, result in (payload.get("test") or {}).items():
            self._recalls("test", protocol, result)
        if best_rsum is not None:
            self._get(m.EVAL_BEST_RSUM).set(best_rsum, self._labels)
        if isinstance(payload.get("step"), int):
            self._get(m.EVAL_CHECKPOINT_STEP).set(payload["step"], self._labels)
        self._get(m.EVAL_CHECKPOINTS).inc(1, self._labels)
        self._get(m.EVAL_DURATION).observe(seconds, self._labels)
        self._get(m.EVAL_LAST_SUCCESS).set(time.time(), self._labels)
        self.backend.push()

    def record_failure(self, seconds: float | None = None) -> None:
        self._get(m.EVAL_FAILURES).inc(1, self._labels)
        if seconds is not None:
            self._get(m.EVAL_DURATION).observe(seconds, self._labels)
        self.backend.push()
