"""The epoch and step loop of a training worker, reading top to bottom: schedule, step, record,
checkpoint when due.

Every rank runs the same loop over its share of the global batch (data_shards/reader.py gives
every rank the same number of batches) and takes the same decisions at the same steps: flushes
(trainer/training/recorder.py) and checkpoints are collectives. A checkpoint is written at the end
of every epoch, every `checkpoint.every_steps` steps and at `debug.max_steps`
(trainer/training/checkpoint.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from data_shards.reader import TrainBatch, TrainReader
from model.loss import HardNegativeStats
from model.vocab import Vocabulary
from trainer.config import TrainConfig
from trainer.run.train_state import TrainState
from trainer.training.checkpoint import save_checkpoint
from trainer.training.control import Decision, StepControl
from trainer.training.engine import hardest_negatives, learning_rate, set_learning_rate
from trainer.training.faults import fail_once
from trainer.training.recorder import PendingStep, Recorder
from trainer.training.step import step_inputs, train_step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Due:
    """What a finished step calls for; the same on every rank (a function of the step, the position
    and the ranks' shared control decision)."""

    closes_interval: bool  # the end of a logging interval: flush, progress line
    checkpoint: bool  # the end of an epoch, checkpoint.every_steps, debug.max_steps, a stop, a drain
    end_of_epoch: bool
    stop: bool  # debug.max_steps or the driver's stop request: checkpoint (unless abandoned), return
    abandon: bool  # the driver lost the lease: return at once, writing nothing more
    fail_step: bool  # debug.fail_at_step: flush, then the failing rank exits

    @property
    def flush(self) -> bool:
        # The host learns the steps' numbers only here: never checkpoint past a non-finite loss.
        return self.closes_interval or self.checkpoint or self.fail_step


class TrainingLoop:
    """One worker's training from a position to the last epoch (module doc)."""

    def __init__(self, cfg: TrainConfig, engine: Any, reader: TrainReader, vocab: Vocabulary, recorder: Recorder,
                 rank: int, world: int, run_dir: str, storage_options: dict[str, Any] | None, run_name: str,
                 control: StepControl | None = None) -> None:
        self.cfg, self.engine, self.reader, self.vocab, self.recorder = cfg, engine, reader, vocab, recorder
        self.rank, self.world, self.run_dir, self.storage_options, self.run_name = (
            rank, world, run_dir, storage_options, run_name)
        self.control = control
        self.device = next(engine.module.parameters()).device

    def run(self, first_epoch: int, start_batch: int, step: int) -> None:
        for epoch in range(first_epoch, self.cfg.optim.epochs):
            step, stopped = self.run_epoch(epoch, start_batch if epoch == first_epoch else 0, step)
            if stopped:
                return

    def run_epoch(self, epoch: int, first: int, step: int) -> tuple[int, bool]:
        """Train `epoch` from its batch `first`: (the step reached, whether the run stops here)."""
        cfg = self.cfg
        lr = learning_rate(cfg.optim, epoch)
        set_learning_rate(self.engine, lr)
        batches = self.reader.batches_per_epoch(epoch)
        if first >= batches:  # a checkpoint at the very end of an epoch not marked complete
            return step, False
        pinned = self.device.type == "cuda"  # the copy to the device can overlap the step
        with contextlib.closing(iter(self.reader.epoch(epoch, first, pin_memory=pinned))) as batches_in:
            for position in range(first, batches):
                batch, wait = self.next_batch(batches_in)
                hardest = hardest_negatives(cfg.optim, epoch, step)
                started = time.perf_counter()
                losses, stats = self.train_step(batch, hardest)
                step += 1
                self.recorder.add(PendingStep(epoch, position, batches, step, lr, hardest,
                                              time.perf_counter() - started, wait, losses, time.time()), stats)
                due = self.due(step, position, batches)
                if due.abandon:
                    return step, True
                if due.flush:
                    self.recorder.flush(due.closes_interval)
                if due.fail_step and self.rank == cfg.debug.fail_rank:
                    fail_once(self.run_dir, self.storage_options, step)
                if due.checkpoint:
                    self.checkpoint(TrainState(epoch=epoch, step=step, batch_in_epoch=position + 1,
                                               epoch_complete=due.end_of_epoch, world_size=self.world,
                                               global_batch_size=cfg.optim.global_batch_size))
                if due.stop:
                    return step, True
        return step, False

    def next_batch(self, batches: Iterator[TrainBatch]) -> tuple[TrainBatch, float]:
        """(the next batch, the seconds waited for it)."""
        waited = time.perf_counter()
        # torch's DataLoader draws its base seed from the global RNG when its iterator starts (at
        # the first batch of an epoch, or of a resumed epoch); keep that draw off the RNG the model
        # uses (dropout), or a resumed run would diverge from an uninterrupted one.
        with torch.random.fork_rng(devices=[]):
            batch = next(batches)
        return batch, time.perf_counter() - waited

    def train_step(self, batch: TrainBatch, hardest: bool) -> tuple[torch.Tensor, HardNegativeStats]:
        """One step (trainer/training/step.py): this rank's (L_M, L_G) on the device and the loss's stats."""
        return train_step(self.engine, self.cfg, self.world, step_inputs(batch, self.cfg, self.device), hardest)

    def due(self, step: int, position: int, batches: int) -> Due:
        """What this step calls for; with a StepControl, also the driver's stop request and a
        drained node's (a collective: every rank calls it after every step)."""
        cfg = self.cfg
        end_of_epoch = position + 1 == batches
        max_steps = bool(cfg.debug.max_steps) and step >= cfg.debug.max_steps
        periodic = bool(cfg.checkpoint.every_steps) and step % cfg.checkpoint.every_steps == 0
        decision = self.control.decide() if self.control is not None else Decision()
        preempted = decision.check_preemption and self.preemption_notice(step)
        if self.rank == 0 and decision.stop:
            log.warning("stop requested (%s): %s after step %d", decision.reason,
                        "checkpointing it, then stopping" if decision.checkpoint_before_stop
                        else "stopping without a checkpoint (the run belongs to another trainer now)", step)
        elif self.rank == 0 and max_steps:
            log.info("debug.max_steps: stopping after step %d; re-run with the same checkpoint.run_name to continue",
                     step)
        return Due(closes_interval=step % cfg.logging.interval_steps == 0 or end_of_epoch,
                   checkpoint=end_of_epoch or max_steps or periodic or decision.stop or preempted,
                   end_of_epoch=end_of_epoch, stop=max_steps or decision.stop,
                   abandon=decision.stop and not decision.checkpoint_before_stop,
                   fail_step=cfg.debug.fail_at_step == step)

    def preemption_notice(self, step: int) -> bool:
        """Whether Ray Train reports a drained node of this run (the first time): then this step
        is checkpointed before the drain's deadline, and training goes on until Ray Train moves the
        workers (trainer/training/control.py)."""
        assert self.control is not None
        info = self.control.preempted()
        if info is None:
            return False
        self.control.preemption_handled = True
        if self.rank == 0:
            left = info.deadline_ms / 1000.0 - time.time() if info.deadline_ms else float("nan")
            log.warning("node(s) %s of rank(s) %s drained for preemption, deadline in %.0f s: checkpointing step %d; "
                        "Ray Train moves the workers to other nodes at the deadline", ", ".join(info.preempted_node_ids),
                        ", ".join(map(str, info.preempted_ranks)), left, step)
        return True

    def checkpoint(self, state: TrainState) -> None:
        """Write and report this step's checkpoint (every rank: a collective)."""
        if self.recorder.step_log is not None:
            self.recorder.step_log.sync()
        # Metrics go to Ray with the checkpoints only: the controller collects one report per worker
        # per poll (every ~2 s) and a worker's next report waits for that, so reporting every
        # logging interval would throttle fast steps.
        metrics = self.recorder.checkpoint_metrics(state.epoch, state.step, learning_rate(self.cfg.optim, state.epoch))
        started = time.perf_counter()
        try:
            save_checkpoint(self.engine, self.vocab, state, metrics, rank=self.rank, run_name=self.run_name,
                            storage_path=self.cfg.checkpoint.storage_path, world_size=self.world)
        except Exception:
            if self.recorder.metrics is not None:
                self.recorder.metrics.record_checkpoint_failure()
            raise
        if self.recorder.metrics is not None:
            self.recorder.metrics.record_checkpoint(time.perf_counter() - started)
        if self.rank == 0:
            log.info("checkpoint at step %d (epoch %d, batch %d) in %.1fs", state.step, state.epoch,
                     state.batch_in_epoch, time.perf_counter() - started)
