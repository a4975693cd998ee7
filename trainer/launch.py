"""The main job: `python trainer/launch.py [--config FILE] [--set section.key=value ...]`.

Without --config it runs configs/tiny.yaml: generates the synthetic dataset into a cache
directory if missing and shards it, starts a local Ray, trains a small VSRN with 2 CPU workers
(Ray Train + DeepSpeed on gloo), scores each checkpoint with the evaluation worker, and prints the
best checkpoint's recall table.

Steps: configuration (errors exit 2 naming the key, before any Ray work) -> the lease on RUN_DIR
(trainer/run/lease.py: when another trainer holds the run, exit 2 with one line naming the holder
and the age of its heartbeat; renewed by a thread of this driver, released at the end, success or
failure) -> data (trainer/training/data.py) -> Ray: the cluster of the job submission or RAY_ADDRESS, else
a local one sized for the job -> RUN_DIR/config.yaml (the resolved configuration) -> a TorchTrainer
(trainer/training/worker.py on every worker; RunConfig with the run name and storage path, local or
s3://, FailureConfig, and a callback that hands each checkpoint to the evaluation worker as soon
as Ray has committed it) -> wait for the evaluator -> the table and, as the LAST line of stdout,
one JSON object: {"run_dir", "best" (best.json: checkpoint, step, epoch, dev_rsum, metrics),
"latest_checkpoint", "run_name", "wall_s"}.

Re-running with the same checkpoint.run_name (and storage path) resumes that run from its latest
checkpoint (trainer/training/checkpoint.py), once the previous trainer of the run released its lease or
its heartbeat is older than checkpoint.lease_timeout_s (a killed driver; checkpoint.lease_wait_s
waits for that); checkpoint.force_lease=true takes over a live lease, and the trainer that held it
stops its workers and exits 1.

SIGTERM and SIGINT: the workers checkpoint the step they are on and return, the lease is released,
and the driver exits 143 (130) with a last line naming the checkpoint a relaunch resumes from,
within checkpoint.stop_grace_s; past it, or on a second signal, it exits without one and says so
(trainer/training/control.py; docs/operations.md, "Preemption and restarts").
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

if __name__ == "__main__" and __package__ in (None, ""):  # `python trainer/launch.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_shards.storage import is_s3_url
from trainer.config import ConfigError, TrainConfig, config_to_dict, load_config
from trainer.training.data import DataError, PreparedData, prepare_data, storage_options_for
from trainer.training.failures import failure_summary, stop_on_fatal_error_callback
from trainer.training.checkpoint import require_shared_storage, storage_error
from trainer.training.control import Interrupted, Interrupts, start_run_control
from trainer.training.placement import ClusterResourcesError, wait_for_resources
from trainer.run.best import best_summary
from trainer.run.config_yaml import write_run_config
from trainer.run.lease import LeaseHeldError, LeaseLostError, RunLease
from trainer.run.retention import prune_checkpoints

log = logging.getLogger("trainer.launch")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "tiny.yaml"
EVAL_WAIT_S = 3600.0


# --------------------------------------------------------------------------------------------------
# Run directory, storage, Ray
# --------------------------------------------------------------------------------------------------


def resolve_run(config: TrainConfig) -> tuple[TrainConfig, str]:
    """The config with a run name (timestamped when empty) and an absolute local storage path,
    and RUN_DIR = storage_path/run_name."""
    checkpoint = config.checkpoint
    name = checkpoint.run_name or time.strftime("vsrn-%Y%m%d-%H%M%S")
    storage = checkpoint.storage_path.rstrip("/")
    if not is_s3_url(storage):
        storage = os.path.abspath(os.path.expanduser(storage))
    config = replace(config, checkpoint=replace(checkpoint, run_name=name, storage_path=storage))
    return config, f"{storage}/{name}"


def effective_config(config: TrainConfig, data: PreparedData) -> TrainConfig:
    """The configuration the workers train with: resolved data locations and the vocabulary's size."""
    feature_dim = data.feature_shape[1]
    if config.model.img_dim != feature_dim:
        raise ConfigError(f"model.img_dim is {config.model.img_dim} but the features of {data.train} have "
                          f"{feature_dim} dimensions")
    if config.model.vocab_size != data.vocab_size:
        log.info("model.vocab_size: %d -> %d (the vocabulary's size)", config.model.vocab_size, data.vocab_size)
    return replace(config, model=replace(config.model, vocab_size=data.vocab_size),
                   data=replace(config.data, train=data.train, dev=data.dev, test=data.test, vocab=data.vocab))


def pyarrow_s3_filesystem(config: TrainConfig) -> Any:
    """Ray's storage filesystem for an s3:// storage path, with the endpoint of data.s3_endpoint_url
    or the environment (credentials: the default AWS chain of each process)."""
    import pyarrow.fs

    options = storage_options_for(config.data)
    kwargs: dict[str, Any] = {}
    endpoint = options.get("endpoint_url")
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = options.get("client_kwargs", {}).get("region_name")
    if region:
        kwargs["region"] = region
    return pyarrow.fs.S3FileSystem(**kwargs)


def connect_ray(config: TrainConfig) -> bool:
    """Attach to the job's cluster (RAY_ADDRESS, set by `ray job submit`) or start a local one
    with enough logical CPUs for the workers and the evaluator. True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
        return True
    dist = config.distributed
    needed = dist.workers * dist.cpus_per_worker + (config.eval.cpus if config.eval.enabled else 0)
    cpus = max(os.cpu_count() or 1, math.ceil(needed))
    log.info("starting a local Ray instance with %d CPUs", cpus)
    # address="local": a plain ray.init() would attach to any cluster recorded in /tmp/ray.
    # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls (it logs
    # a warning every few seconds without it); it picks the next free port when 8265 is taken.
    # Ray's metrics endpoint (monitoring.metrics_export_port) listens on 127.0.0.1 when main()
    # kept the cluster on loopback (keep_local_ray_on_loopback), else on every interface.
    extra: dict[str, Any] = {}
    if config.monitoring.metrics_export_port:
        extra["_metrics_export_port"] = config.monitoring.metrics_export_port
    ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             logging_level=logging.WARNING, **extra)
    return True


def cluster_hosts() -> tuple[str, list[str]]:
    """(the driver's node IP, the IPs of the alive nodes with CPUs: those that can run workers)."""
    import ray

    driver_node = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    driver_host = next((n["NodeManagerAddress"] for n in nodes if n["NodeID"] == driver_node),
                       ray.util.get_node_ip_address())
    return driver_host, [n["NodeManagerAddress"] for n in nodes if n.get("Resources", {}).get("CPU", 0) > 0]


# --------------------------------------------------------------------------------------------------
# Checkpoints -> evaluation worker
# --------------------------------------------------------------------------------------------------


def _make_callback(evaluator: Any, run_dir: str, keep_last: int, storage_options: dict[str, Any] | None) -> Any:
    from ray.train import UserCallback

    class EvaluateCheckpoints(UserCallback):
        """Runs in Ray Train's controller after every report whose checkpoint Ray has committed:
        queues it on the evaluation actor (submit only enqueues, so training is not held up) and
        prunes evaluated checkpoints beyond the newest `keep_last` and the best."""

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if checkpoint is None:
                return
            url = f"s3://{checkpoint.path}" if is_s3_url(run_dir) else checkpoint.path
            if evaluator is not None:
                evaluator.submit.remote(url)
            prune(run_dir, keep_last, storage_options)

    return EvaluateCheckpoints()


def prune(run_dir: str, keep_last: int, storage_options: dict[str, Any] | None) -> None:
    try:
        prune_checkpoints(run_dir, keep_last, storage_options)
    except Exception as error:  # noqa: BLE001 - pruning is housekeeping; never stop training for it
        log.warning("pruning checkpoints of %s failed: %s", run_dir, error)


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def run(config: TrainConfig, interrupts: Interrupts | None = None) -> dict[str, Any]:
    """Train (or resume) the run of `config` through Ray Train; returns the summary (see module doc).

    Takes the lease on RUN_DIR first (trainer/run/lease.py; LeaseHeldError when another trainer
    holds it) and releases it when the run ends, however it ends; LeaseLostError when another
    trainer took it over meanwhile. SIGTERM and SIGINT stop the workers after the step they are on
    with a checkpoint (trainer/training/control.py; the summary's "stopped" says where), or raise
    Interrupted where no worker can. Uses the Ray instance of this process if there is one, else
    connects/starts one (and leaves it running: main() shuts it down).
    """
    started = time.perf_counter()
    interrupts = interrupts or Interrupts(config.checkpoint.stop_grace_s)
    interrupts.install()
    try:
        return _run_holding_lease(config, interrupts, started)
    finally:
        interrupts.restore()


def _run_holding_lease(config: TrainConfig, interrupts: Interrupts, started: float) -> dict[str, Any]:
    """run() with the signal handlers installed."""
    config, run_dir = resolve_run(config)
    interrupts.run_dir = run_dir
    checkpoint = config.checkpoint
    lease = RunLease.acquire(run_dir, timeout_s=checkpoint.lease_timeout_s, force=checkpoint.force_lease,
                             wait_s=checkpoint.lease_wait_s,
                             storage_options=storage_options_for(config.data) if is_s3_url(run_dir) else None,
                             ray=f"ray cluster {os.environ['RAY_ADDRESS']}" if os.environ.get("RAY_ADDRESS") else "")

    def on_lost(lost: LeaseLostError) -> None:
        """In the heartbeat thread: another trainer owns RUN_DIR now; the workers stop at once,
        writing nothing (fit() then returns and run() raises `lost`)."""
        if interrupts.control is not None:
            log.error("stopping the training run: the lease is lost")
            interrupts.control.request_stop.remote("the lease was lost", False)

    lease.start_heartbeat(on_lost=on_lost)
    try:
        summary = _train(config, run_dir, lease, interrupts)
        lease.check()
    finally:
        lease.release()
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    return summary


def _train(config: TrainConfig, run_dir: str, lease: RunLease, interrupts: Interrupts) -> dict[str, Any]:
    """run() while holding the lease."""
    data = prepare_data(config.data)
    config = effective_config(config, data)
    connect_ray(config)
    interrupts.install()  # again: ray.init installs its own SIGTERM handler
    import ray

    context = ray.get_runtime_context()
    lease.set_ray(f"ray job {context.get_job_id()} on {context.gcs_address}")
    driver_host, node_hosts = cluster_hosts()
    require_shared_storage(config, node_hosts, driver_host)
    wait_for_resources(config)
    lease.check()
    write_run_config(config, run_dir)
    log.info("run directory %s", run_dir)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from model.vocab import Vocabulary
    from trainer.training import allocator
    from trainer.training.worker import train_loop_per_worker

    storage_options = data.storage_options or None
    # The workers and the evaluation actor allocate large tensors: glibc settings that keep them on
    # the heap (trainer/training/allocator.py), unless the job's runtime_env chose its own.
    worker_env = {"env_vars": allocator.env_vars(ray.get_runtime_context().runtime_env.get("env_vars") or {})}
    evaluator = None
    if config.eval.enabled:
        from trainer.evaluator.actor import make_evaluation_actor

        evaluator = make_evaluation_actor(config.eval, dev=data.dev, test=data.test, run_dir=run_dir,
                                          storage_options=storage_options, region_order=config.data.region_order,
                                          metrics_run=config.checkpoint.run_name if config.monitoring.enabled else None,
                                          runtime_env=worker_env)
    control_name = f"vsrn-control-{config.checkpoint.run_name}-{uuid.uuid4().hex[:8]}"
    control = start_run_control(control_name, config.distributed.workers)
    dist = config.distributed
    resources = {"CPU": dist.cpus_per_worker, **({"GPU": dist.gpus_per_worker} if dist.use_gpu else {})}
    storage_path, storage_fs = config.checkpoint.storage_path, None
    if is_s3_url(storage_path):
        storage_path, storage_fs = storage_path[len("s3://"):], pyarrow_s3_filesystem(config)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": config_to_dict(config), "data": data.to_dict(),
                           "vocab_words": Vocabulary.load_json(data.vocab).idx2word, "run_dir": run_dir,
                           "run_name": config.checkpoint.run_name, "driver_host": driver_host,
                           "control": {"name": control_name, "namespace": context.namespace}},
        scaling_config=ScalingConfig(num_workers=dist.workers, use_gpu=dist.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=config.checkpoint.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            # A drained (preempted) node's workers are moved by Ray Train itself; those restarts
            # count apart from max_failures (trainer/training/control.py).
            failure_config=FailureConfig(max_failures=config.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # pruned by prune(): keeps the best too
            worker_runtime_env=worker_env,
            callbacks=[_make_callback(evaluator, run_dir, config.checkpoint.keep_last, storage_options),
                       stop_on_fatal_error_callback()]),
    )
    try:
        lease.check()
        result = fit_interruptible(trainer, interrupts, control)
    except BaseException:
        if evaluator is not None:
            ray.kill(evaluator)  # its queue is the next run's (its actor catches up) or the CronJob's
        if lease.lost is not None:
            raise lease.lost from None
        raise
    finally:
        ray.kill(control)
    lease.check()
    latest = None
    if result.checkpoint is not None:
        latest = f"s3://{result.checkpoint.path}" if is_s3_url(run_dir) else result.checkpoint.path
    summary: dict[str, Any] = {"run_dir": run_dir, "best": None, "latest_checkpoint": latest,
                               "run_name": config.checkpoint.run_name}
    if interrupts.signum is not None:  # the workers stopped on a signal and checkpointed
        # The evaluator is not waited for: its queue (the stop checkpoint among it) is left to the
        # next run's actor, which evaluates what it finds unevaluated, or to the CronJob.
        if evaluator is not None:
            ray.kill(evaluator)
        summary["stopped"] = {"signal": signal.Signals(interrupts.signum).name,
                              "exit_status": 128 + interrupts.signum, "checkpoint": latest}
        return summary
    if evaluator is not None:
        log.info("waiting for the evaluation worker")
        try:
            ray.get(evaluator.wait_idle.remote(EVAL_WAIT_S))
            summary["best"] = ray.get(evaluator.best.remote())
        except ray.exceptions.RayActorError as error:  # lost more often than Ray restarts it
            log.warning("the evaluation worker is gone (%s); checkpoints without metrics.json are left to "
                        "`python trainer/evaluate.py --watch %s`", type(error).__name__, run_dir)
            summary["best"] = best_summary(run_dir, storage_options)
        prune(run_dir, config.checkpoint.keep_last, storage_options)
        ray.kill(evaluator)
    return summary


def fit_interruptible(trainer: Any, interrupts: Interrupts, control: Any) -> Any:
    """`trainer.fit()` on a thread of its own, the main thread left to the signal handlers.

    Why: fit() on the main thread installs Ray's SIGINT handler (it aborts the controller, no
    checkpoint) and Ray's SIGTERM handler raises SystemExit inside it (the driver then dies with
    SIGABRT). Here a signal becomes the run's stop request (Interrupts), and the main thread
    enforces checkpoint.stop_grace_s while the workers checkpoint and return."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    interrupts.training(control)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
            interrupts.check()
    finally:
        interrupts.training(None)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help=f"YAML configuration (default: {DEFAULT_CONFIG.relative_to(ROOT)})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one configuration value (YAML syntax); repeatable, applied in order")
    return parser


def keep_local_ray_on_loopback() -> None:
    """A local cluster (no RAY_ADDRESS) binds its services and its metrics endpoint to 127.0.0.1.

    Ray turns a loopback node address into the machine's address on Linux, so its ports (the
    metrics endpoint among them) listen on the network; the switch below is the one Ray itself
    uses on laptops (macOS, Windows) to stay on loopback. It is read when ray is imported, so this
    runs first; setting the variable to 1 restores Ray's default.
    """
    if not os.environ.get("RAY_ADDRESS") and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def main(argv: list[str] | None = None) -> int:
    keep_local_ray_on_loopback()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config or DEFAULT_CONFIG, args.overrides)
    except ConfigError as error:
        print(f"launch: configuration error: {error}", file=sys.stderr)
        return 2
    started_ray = False
    failure: tuple[int, str] | None = None  # (exit status, last line of stderr)
    interrupts = Interrupts(config.checkpoint.stop_grace_s)
    try:
        started_ray = not _ray_initialized()
        summary = run(config, interrupts)
    except Interrupted as error:  # nothing checkpointed for this signal
        failure = error.exit_status, (f"launch: {error}: nothing was checkpointed for it; "
                                      f"{_resume_point(interrupts.run_dir, config)}")
        if "did not checkpoint within" in error.why or "second signal" in error.why:
            print(failure[1], file=sys.stderr, flush=True)  # Ray may be busy: leave without shutting it down
            logging.shutdown()
            os._exit(failure[0])
    except ConfigError as error:
        failure = 2, f"launch: configuration error: {error}"
    except LeaseHeldError as error:  # another trainer writes this run: nothing was written
        failure = 2, f"launch: {error}"
    except LeaseLostError as error:  # taken over while training: this run stopped
        failure = 1, f"launch: {error}"
    except DataError as error:
        failure = 1, f"launch: data error: {error}"
    except ClusterResourcesError as error:  # refused before training: nothing was written
        failure = 2, f"launch: {error}"
    except Exception as error:
        lasting = storage_error(error, config.checkpoint.storage_path, "the run directory")
        if lasting is not None and not _is_training_failure(error):  # the driver's own writes (lease, config.yaml)
            failure = 1, f"launch: {lasting}"
        elif not _is_training_failure(error):
            raise
        else:
            log.error("training failed", exc_info=error)
            failure = 1, f"launch: {failure_summary(error, config.checkpoint.storage_path, _checkpoint_bytes(interrupts.run_dir, config))}"
    finally:
        if started_ray:
            # Also stops the streaming of worker logs, so the JSON line (or the failure) stays last.
            _shutdown_ray()
    if failure is not None:
        print(failure[1], file=sys.stderr)
        return failure[0]
    stopped = summary.get("stopped")
    if stopped:
        where = (f"checkpoint {stopped['checkpoint']} is committed and a relaunch with the same checkpoint.run_name "
                 "resumes from it" if stopped["checkpoint"] else "no checkpoint was committed: a relaunch starts anew")
        print(f"launch: stopped by {stopped['signal']}: {where}", file=sys.stderr)
        return int(stopped["exit_status"])
    from trainer.evaluation import format_table

    best = summary["best"]
    if best and best.get("metrics"):
        print(f"best checkpoint: {best['checkpoint']} (step {best.get('step')}, epoch {best.get('epoch')}, "
              f"dev rsum {best.get('dev_rsum')})")
        print(format_table(best["metrics"]))
    print(json.dumps(summary))
    return 0


def _resume_point(run_dir: str | None, config: TrainConfig) -> str:
    """Where a relaunch of the run resumes from: its latest complete checkpoint, if any."""
    from trainer.run.checkpoints import list_checkpoints

    if run_dir is None:
        return "nothing of the run was written"
    try:
        complete = list_checkpoints(run_dir, storage_options_for(config.data) if is_s3_url(run_dir) else None)
    except Exception:  # noqa: BLE001 - the line is informative; the storage may be what failed
        return f"a relaunch resumes from the latest complete checkpoint of {run_dir}"
    if not complete:
        return f"a relaunch starts {run_dir} anew (no complete checkpoint)"
    return f"a relaunch with the same checkpoint.run_name resumes from {complete[-1].url}"


def _checkpoint_bytes(run_dir: str | None, config: TrainConfig) -> int | None:
    """The size of the run's latest complete checkpoint (for a full disk's message), if any."""
    from trainer.run.checkpoints import list_checkpoints
    from trainer.run.layout import location_of

    if run_dir is None:
        return None
    try:
        options = storage_options_for(config.data) if is_s3_url(run_dir) else None
        complete = list_checkpoints(run_dir, options)
        if not complete:
            return None
        return location_of(complete[-1].url, options).total_bytes() or None
    except Exception:  # noqa: BLE001 - informative only; the storage may be what failed
        return None


def _is_training_failure(error: BaseException) -> bool:
    """Whether `error` is Ray Train's report of a failed run (raised by TorchTrainer.fit())."""
    if "ray" not in sys.modules:
        return False
    from ray.train import TrainingFailedError

    return isinstance(error, TrainingFailedError)


def _ray_initialized() -> bool:
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized()


def _shutdown_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
