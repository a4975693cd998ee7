"""The training worker: `train_loop_per_worker(config)`, what Ray Train runs on every worker.

Process group: Ray's TorchTrainer creates it (gloo on CPU, NCCL on GPU) before this function
runs; DeepSpeed finds it initialized and uses it as it is. The worker builds the model and the
DeepSpeed engine (trainer/training/engine.py), resumes from the checkpoint Ray hands it
(trainer/training/checkpoint.py), opens its share of the sharded reader (global batch / W pairs a
step: optim.global_batch_size is fixed) and runs the loop (trainer/training/loop.py), which
records through trainer/training/recorder.py. The loss is trainer/training/loss.py's, the step
trainer/training/step.py's (no host sync in a non-logging step).

Errors that a restart cannot fix (trainer/training/failures.py) leave as FatalTrainingError,
which stops the run instead of spending Ray's restarts on it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch

from data_shards.reader import ReaderConfig, TrainReader
from model.vocab import Vocabulary
from model.vsrn import VSRN, VSRNConfig
from monitoring.recorders import RayBackend, TrainingMetrics
from trainer.config import config_from_dict
from trainer.run.step_log import StepLog
from trainer.training import allocator
from trainer.training.checkpoint import (
    needs_universal,
    read_train_state,
    require_shared_storage,
    restore_checkpoint,
    seed_everything,
)
from trainer.training.control import StepControl, StopWatcher
from trainer.training.engine import build_engine
from trainer.training.failures import FATAL_ERRORS, fatal_training_error
from trainer.training.loop import TrainingLoop
from trainer.training.recorder import Recorder

log = logging.getLogger(__name__)


def _setup_logging(rank: int) -> None:
    """INFO from this project's packages, warnings from the rest (Ray logs every report at INFO)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s", force=True)
    for package in ("trainer", "data_shards", "model"):
        logging.getLogger(package).setLevel(logging.INFO)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config`: {"train": TrainConfig as a dict, "data": PreparedData as a
    dict, "vocab_words": [...], "run_dir": RUN_DIR, "run_name": name, "control": {"name",
    "namespace"} of the driver's RunControl actor (trainer/training/control.py)} (built by
    trainer/launch.py).

    Errors that a restart cannot fix (trainer/training/failures.py: a damaged shard, a configuration, data
    or checkpoint error, a non-finite loss) leave as FatalTrainingError, which stops the run
    instead of spending Ray's restarts on it."""
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _setup_logging(rank)
    try:
        _train(config, rank, world)
    except FATAL_ERRORS as error:
        fatal = fatal_training_error(error, rank)
        log.error("stopping: %s", fatal)
        raise fatal from error  # type: ignore[misc]  # never None for FATAL_ERRORS


def _train(config: dict[str, Any], rank: int, world: int) -> None:
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(config["train"])
    data = config["data"]
    run_dir: str = config["run_dir"]
    storage_options = data.get("storage_options") or None
    host = ray.util.get_node_ip_address()
    log.info("rank %d of %d on node %s (%s)", rank, world, ray.get_runtime_context().get_node_id(), host)
    # The driver checked the nodes it saw; a node added since (an autoscaler) is checked here.
    require_shared_storage(cfg, [host], config.get("driver_host", host))
    if world != cfg.distributed.workers:
        raise RuntimeError(f"Ray started {world} workers but distributed.workers is {cfg.distributed.workers}")

    vocab = Vocabulary(config["vocab_words"])
    model_config = VSRNConfig.from_dict({**cfg.model.to_dict(), "vocab_size": len(vocab)})
    seed_everything(cfg.optim.seed)  # the same initial weights on every rank (DeepSpeed broadcasts rank 0's anyway)
    model = VSRN(model_config)
    device = ray.train.torch.get_device() if cfg.distributed.use_gpu else torch.device("cpu")
    model.to(device)

    checkpoint = ray.train.get_checkpoint()
    saved = read_train_state(checkpoint) if checkpoint is not None else None
    universal = saved is not None and needs_universal(saved, world, cfg.distributed.zero_stage)
    engine = build_engine(cfg, model, universal)
    step_log = StepLog(run_dir, storage_options) if rank == 0 else None

    seed_everything(cfg.optim.seed + 1 + rank)  # per-rank dropout masks
    epoch, start_batch, step = 0, 0, 0
    if checkpoint is not None:
        saved = restore_checkpoint(engine, checkpoint, rank=rank, world_size=world,
                                   zero_stage=cfg.distributed.zero_stage, seed=cfg.optim.seed)
        epoch, start_batch = saved.next_position()
        step = saved.step
        if rank == 0:
            log.info("resuming at step %d: epoch %d, batch %d (checkpoint %s)", step, epoch, start_batch,
                     checkpoint.path)
        if saved.global_batch_size != cfg.optim.global_batch_size:
            log.warning("the checkpoint was trained with a global batch of %d, this run uses %d",
                        saved.global_batch_size, cfg.optim.global_batch_size)

    if step_log is not None:
        # Steps logged after the checkpoint we continue from (or all, when there is none) are redone now.
        step_log.truncate_after(step)
    reader = TrainReader(
        ReaderConfig(location=data["train"], batch_size=cfg.per_worker_batch_size,
                     num_workers=cfg.data.loader_workers, seed=cfg.optim.seed,
                     pool_images=max(cfg.per_worker_batch_size, cfg.data.pool_images),
                     region_order=cfg.data.region_order, bad_data=cfg.data.bad_data,
                     # the shards' dtype as it is: the model casts the regions on its device
                     output_dtype="stored", storage_options=storage_options),
        vocab.encode, rank=rank, world_size=world)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        log.info("training %d parameters on %d %s worker(s): global batch %d (%d per worker), %s, ZeRO %d, "
                 "epochs %d, lr %.2e; malloc: %s", params, world, "GPU" if cfg.distributed.use_gpu else "CPU",
                 cfg.optim.global_batch_size, cfg.per_worker_batch_size, cfg.distributed.precision,
                 cfg.distributed.zero_stage, cfg.optim.epochs, cfg.optim.learning_rate,
                 allocator.describe())

    run_name = config.get("run_name", "")
    metrics = TrainingMetrics(RayBackend(), run=run_name, rank=rank) if cfg.monitoring.enabled else None
    recorder = Recorder(cfg, reader, step_log, rank, world, device, metrics)
    control_actor = config.get("control") or {}
    watcher = StopWatcher(control_actor["name"], control_actor.get("namespace")) if control_actor else None
    control = StepControl(watcher, world, in_ray_train=True)
    try:
        TrainingLoop(cfg, engine, reader, vocab, recorder, rank, world, run_dir, storage_options, run_name,
                     control).run(epoch, start_batch, step)
    finally:
        control.close()
