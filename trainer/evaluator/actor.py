"""The evaluation worker: a Ray actor that scores every checkpoint of a run while training goes on.

Training never waits for evaluation. The trainer hands each new checkpoint directory to an
:class:`EvaluationWorker` (a Ray actor with its own CPUs/GPUs, see :func:`make_evaluation_actor`),
whose ``submit`` only queues the path; a background thread in the actor evaluates the queued
checkpoints one at a time with checkpoint_eval.py's :func:`evaluate_and_record` (dev and
test metrics, recorded as ``metrics.json``, the ``evaluations.jsonl`` line and ``best.json``, or
``eval_error.json``; the recall table is logged), the same code ``python trainer/evaluate.py
--watch RUN_DIR`` runs as a scheduled job. This module holds only the actor: its queue, its
results, and how it catches up on what was left unevaluated (:meth:`EvaluationWorker._catch_up`).

Example (the trainer's side)::

    actor = make_evaluation_actor(config.eval, dev=config.data.dev, test=config.data.test,
                                  run_dir=run_dir)
    actor.submit.remote(checkpoint_dir)      # returns at once; evaluation runs in the actor
    ...
    ray.get(actor.wait_idle.remote(3600))    # at the end of training
    best = ray.get(actor.best.remote())
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import torch

from monitoring.recorders import EvaluationMetrics, RayBackend
from trainer.evaluator.checkpoint_eval import evaluate_and_record, evaluation_summary
from trainer.config import EvalConfig
from trainer.evaluation import set_tf32
from trainer.run.best import best_summary
from trainer.run.checkpoints import list_checkpoints
from trainer.run.layout import run_dir_of

__all__ = ["ACTOR_MAX_RESTARTS", "EvaluationWorker", "make_evaluation_actor"]

logger = logging.getLogger(__name__)


class EvaluationWorker:
    """Evaluates submitted checkpoints one at a time in a background thread.

    ``submit`` only puts the path on a queue, so it returns at once even while an evaluation runs
    (the actor is created with ``max_concurrency`` > 1, so its methods run on Ray's thread pool
    beside the evaluation thread; shared state is guarded by a lock). Use it through
    :func:`make_evaluation_actor`; the plain class also works in-process.
    """

    def __init__(
        self,
        eval_config: EvalConfig,
        dev: str | None,
        test: str | None,
        run_dir: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        device: str | None = None,
        loader_workers: int = 0,
        region_order: str = "stored",
        torch_threads: int | None = None,
        metrics_run: str | None = None,
    ) -> None:
        """Start the evaluation thread. ``torch_threads``: torch's intra-op threads in this process
        (the actor's CPU share; None leaves the process setting alone, e.g. when run in-process).
        ``metrics_run``: export the evaluation metrics through Ray with this run label (None: none)."""
        if dev is None and test is None:
            raise ValueError("EvaluationWorker needs dev and/or test shards")
        if not logging.getLogger().handlers:  # a Ray worker process: make INFO (the tables) visible
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.eval_config = eval_config
        self.dev, self.test, self.run_dir = dev, test, run_dir
        self.storage_options = dict(storage_options) if storage_options is not None else None
        self.device = device or ("cuda" if eval_config.gpus > 0 and torch.cuda.is_available() else "cpu")
        self.loader_workers = loader_workers
        self.region_order = region_order
        self.threads = torch_threads
        self.metrics = EvaluationMetrics(RayBackend(), metrics_run) if metrics_run is not None else None
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        if str(self.device).startswith("cuda"):
            set_tf32(False)  # full fp32 encodings: TF32 GRUs would move the metrics (evaluation.set_tf32)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._outstanding = 0  # submitted and not finished
        self._current: str | None = None
        self._results: list[dict[str, Any]] = []
        self._queued: set[str] = set()  # every path this instance has queued, so none is evaluated twice
        actor = _ray_actor_context()
        if actor is not None:
            import ray

            logger.info("evaluation worker on node %s (%s)", actor.get_node_id(), ray.util.get_node_ip_address())
            if run_dir is not None:
                # Whether Ray restarted this actor (its node died) or a relaunch started it (after
                # a stop, whose checkpoint was left unevaluated), the run's unevaluated checkpoints
                # are this instance's to evaluate. (Ray's was_current_actor_reconstructed reads
                # the deprecated runtime_context.actor_id and warns on every run.)
                self._catch_up(run_dir)
        self._thread = threading.Thread(target=self._run, name="evaluation-worker", daemon=True)
        self._thread.start()

    def _catch_up(self, run_dir: str) -> None:
        """Queue the run's complete checkpoints that have neither metrics.json nor eval_error.json:
        after Ray restarted this actor (its node died) what the previous instance had queued is
        gone, and a relaunched run's actor finds the checkpoints its predecessor left (a stopped
        run's last one). The trainer's submissions of the same checkpoints are skipped as already
        queued."""
        pending = [e.url for e in list_checkpoints(run_dir, self.storage_options) if not e.evaluated and not e.failed]
        if pending:
            logger.warning("evaluation worker: %d checkpoint(s) of %s not yet evaluated; queued", len(pending),
                           run_dir)
        for url in pending:
            self.submit(url)

    def submit(self, checkpoint_path: str) -> None:
        """Queue a checkpoint for evaluation (once: a path already queued is skipped); returns immediately."""
        path = str(checkpoint_path)
        with self._lock:
            if path in self._queued:
                logger.info("%s is already queued or evaluated", path)
                return
            self._queued.add(path)
            self._outstanding += 1
        self._queue.put(path)
        logger.info("queued %s for evaluation", path)

    def wait_idle(self, timeout: float | None = None) -> None:
        """Block until every submitted checkpoint is evaluated; TimeoutError after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._outstanding:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"{self._outstanding} checkpoint(s) still being evaluated after {timeout} s "
                                       f"(current: {self._current})")
                self._idle.wait(remaining)

    def pending(self) -> int:
        """Checkpoints submitted and not yet evaluated (the one running included)."""
        with self._lock:
            return self._outstanding

    def results(self) -> list[dict[str, Any]]:
        """One summary per evaluated checkpoint, in evaluation order: path, step, epoch, dev_rsum,
        status ("ok"/"failed"), error (why it failed; for "ok", a best.json that could not be
        written), is_best, elapsed_s."""
        with self._lock:
            return [dict(r) for r in self._results]

    def best(self) -> dict[str, Any] | None:
        """The run's best.json payload (None before any checkpoint with a dev rsum)."""
        with self._lock:
            run_dir = self.run_dir or next((run_dir_of(r["path"]) for r in self._results), None)
        return None if run_dir is None else best_summary(run_dir, self.storage_options)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the background thread after the queued checkpoints."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # OpenMP keeps the pool size per thread: set it here too
        while True:
            checkpoint = self._queue.get()
            if checkpoint is None:
                return
            with self._lock:
                self._current = checkpoint
            try:
                summary = evaluate_and_record(
                    checkpoint, self.dev, self.test, self.eval_config, self.run_dir, self.storage_options,
                    self.device, loader_workers=self.loader_workers, region_order=self.region_order,
                    metrics=self.metrics)
            except BaseException as error:  # the thread must survive anything
                logger.exception("evaluation worker: unexpected failure on %s", checkpoint)
                summary = evaluation_summary(checkpoint, None, None, status="failed", error=f"{type(error).__name__}: {error}")
            with self._idle:
                self._results.append(summary)
                self._current = None
                self._outstanding -= 1
                self._idle.notify_all()


def _ray_actor_context() -> Any:
    """Ray's runtime context when this code runs inside a Ray actor (the evaluation actor), else
    None (the CLI, a test in-process)."""
    if "ray" not in sys.modules:
        return None
    import ray

    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    return context if context.get_actor_id() is not None else None


# How often Ray recreates the evaluation actor after losing it (its node died): each time on another
# node with the resources, catching up on the checkpoints its predecessor had not finished.
ACTOR_MAX_RESTARTS = 3


def make_evaluation_actor(
    eval_config: EvalConfig,
    dev: str | None,
    test: str | None,
    run_dir: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    device: str | None = None,
    loader_workers: int = 0,
    region_order: str = "stored",
    name: str | None = None,
    metrics_run: str | None = None,
    runtime_env: Mapping[str, Any] | None = None,
) -> Any:
    """Start an :class:`EvaluationWorker` actor with ``eval_config.cpus`` CPUs and ``eval_config.gpus``
    GPUs (Ray must be initialized), in ``runtime_env`` if given; returns its handle.

    ``max_concurrency=4`` lets ``submit``/``results``/``wait_idle`` run while the evaluation thread
    works (a default actor would run one method call at a time).

    Losing the actor's node does not lose evaluations: Ray restarts it elsewhere (up to
    ``ACTOR_MAX_RESTARTS`` times) once a node has the resources, calls made meanwhile are retried
    on the new instance (``max_task_retries``), and the new instance queues the run's checkpoints
    that have no metrics.json yet (``EvaluationWorker._catch_up``). Callers never block on it:
    ``submit.remote`` returns at once whether the actor is alive, restarting or waiting for a node.
    """
    import ray  # only the actor needs Ray; the CLI and the library functions do not

    remote_class = ray.remote(num_cpus=eval_config.cpus, num_gpus=eval_config.gpus, max_concurrency=4,
                              max_restarts=ACTOR_MAX_RESTARTS, max_task_retries=-1)(EvaluationWorker)
    options: dict[str, Any] = {}
    if name is not None:
        options["name"] = name
    if runtime_env is not None:
        options["runtime_env"] = dict(runtime_env)
    # As many torch threads as CPUs reserved: more would compete with the training workers.
    return remote_class.options(**options).remote(eval_config, dev, test, run_dir, storage_options, device,
                                                  loader_workers, region_order, max(1, int(eval_config.cpus)),
                                                  metrics_run)
