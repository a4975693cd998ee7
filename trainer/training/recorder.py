"""What a training run records of its steps: the step log, the Ray metrics, the progress line, the
hard-negative diagnostics and the collapse detector.

The steps' losses stay on the device (trainer/training/step.py). At a step that closes a logging
interval (and before a checkpoint or a simulated failure) `flush` brings the pending steps' losses
and the interval's hard-negative summary to the host in one collective and one copy (the one host
sync of the interval), checks them (a non-finite loss stops the run, naming the step), and records
each step in order: its line of RUN_DIR/train_log.jsonl (rank 0; trainer/run/step_log.py), the
Ray metrics, and, on the interval's last step, the progress line (rank 0) and the collapse
detector, which every rank runs on the same global numbers.

Logged values are global-batch ones (L_M of the global batch, L_G's mean over it), so the numbers
do not depend on the worker count. The means since the previous checkpoint and the reader's
counters are reported to Ray with each checkpoint (`checkpoint_metrics`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from data_shards.reader import TrainReader
from model.loss import HardNegativeStats
from monitoring.recorders import TrainingMetrics
from trainer.config import TrainConfig
from trainer.run.step_log import StepLog, step_line
from trainer.training.diagnostics import CollapseDetector, HardNegativeInterval, HardNegativeSummary

log = logging.getLogger(__name__)


@dataclass
class Interval:
    """Sums over a span of steps (since the last progress line, or since the last checkpoint)."""

    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    data_wait: float = 0.0
    loss_matching: float = 0.0
    loss_caption: float = 0.0
    hardest_steps: int = 0  # steps with hardest negatives (the collapse detector wants only those)

    def add(self, samples: int, seconds: float, wait: float, matching: float, caption: float,
            hardest: bool = False) -> None:
        self.steps += 1
        self.samples += samples
        self.seconds += seconds
        self.data_wait += wait
        self.loss_matching += matching
        self.loss_caption += caption
        self.hardest_steps += int(hardest)

    def metrics(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        return {"loss_matching": self.loss_matching / steps, "loss_caption": self.loss_caption / steps,
                "samples_per_s": self.samples / max(self.seconds, 1e-9), "data_wait_s": self.data_wait / steps,
                "step_time_s": (self.seconds - self.data_wait) / steps}


@dataclass
class PendingStep:
    """A step whose losses are still on the device (recorded at the next flush)."""

    epoch: int
    position: int
    batches: int
    step: int
    lr: float
    hardest: bool
    seconds: float
    wait: float
    losses: torch.Tensor  # (2,): this rank's L_M, L_G
    finished_at: float = 0.0  # time.time() at the end of the step


class Recorder:
    """The records of one worker's steps (module doc)."""

    def __init__(self, cfg: TrainConfig, reader: TrainReader, step_log: StepLog | None, rank: int, world: int,
                 device: torch.device, metrics: TrainingMetrics | None = None) -> None:
        self.cfg, self.reader, self.step_log, self.rank, self.world = cfg, reader, step_log, rank, world
        self.device, self.metrics = device, metrics
        self.interval = Interval()  # since the last progress line
        self.since_checkpoint = Interval()  # since the last checkpoint (reported to Ray with it)
        self.hard_negatives = HardNegativeInterval()  # the loss's stats since the last progress line
        self.collapse = CollapseDetector(cfg.optim.global_batch_size, cfg.optim.margin,
                                         cfg.monitoring.collapse_intervals)
        self.pending: list[PendingStep] = []  # steps since the last flush, their losses on the device

    def add(self, step: PendingStep, stats: HardNegativeStats) -> None:
        """A finished step, its numbers still on the device."""
        self.pending.append(step)
        self.hard_negatives.add(stats)

    def flush(self, closes_interval: bool) -> None:
        """Bring the pending steps' losses (and, when the last one closes a logging interval, the
        hard-negative summary) to the host in one collective and one copy, then check and record
        them in order. A collective: every rank flushes at the same steps."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        local = torch.stack([p.losses for p in pending]).flatten()
        summary: HardNegativeSummary | None = None
        interval_steps = self.hard_negatives.steps
        gathered = self.hard_negatives.summarize_on_device(self.world, extra=local) if closes_interval else None
        if gathered is not None:
            summary_values, losses = gathered
            host = torch.cat([summary_values, losses]).cpu().tolist()  # the one host sync of the interval
            summary = HardNegativeSummary.from_values(host[:6], interval_steps)
            host = host[6:]
        else:
            if self.world > 1:
                dist.all_reduce(local)  # on the losses' device: NCCL reduces GPU tensors only
            host = local.cpu().tolist()
        for i, p in enumerate(pending):
            matching, caption = host[2 * i], host[2 * i + 1] / self.world
            if not (math.isfinite(matching) and math.isfinite(caption)):
                if self.metrics is not None:  # what the loss-NaN alert looks for, before this worker fails
                    self.metrics.record_losses({"matching": matching, "caption": caption,
                                                "total": matching + self.cfg.model.caption_loss_weight * caption})
                raise FloatingPointError(f"non-finite loss at step {p.step}: L_M {matching}, L_G {caption}")
            last = i == len(pending) - 1
            self.record(p.epoch, p.position, p.batches, p.step, p.lr, p.hardest, matching, caption, p.seconds,
                        p.wait, summary=summary if last else None, closes=closes_interval if last else None,
                        finished_at=p.finished_at or None)

    def record(self, epoch: int, position: int, batches: int, step: int, lr: float, hardest: bool,
               matching: float, caption: float, seconds: float, wait: float,
               summary: HardNegativeSummary | None = None, closes: bool | None = None,
               finished_at: float | None = None) -> None:
        """Record one step from host numbers. ``summary``: the hard-negative summary of the logging
        interval this step closes (`flush`), which also runs the collapse detector. ``closes``:
        whether the step closes a logging interval (default: from the step and position).
        ``finished_at``: when the step ended (default: now)."""
        cfg = self.cfg
        samples = cfg.optim.global_batch_size
        self.interval.add(samples, seconds + wait, wait, matching, caption, hardest)
        self.since_checkpoint.add(samples, seconds + wait, wait, matching, caption, hardest)
        closes_interval = closes if closes is not None else (
            step % cfg.logging.interval_steps == 0 or position + 1 == batches)
        collapsed = self.check_collapse(step, summary) if summary is not None else None
        if self.step_log is not None:
            self.step_log.append(step_line(
                step=step, epoch=epoch, batch=position, loss_matching=matching, loss_caption=caption,
                caption_loss_weight=cfg.model.caption_loss_weight, lr=lr, hardest=hardest, samples=samples,
                step_time_s=seconds, data_wait_s=wait, time=finished_at if finished_at is not None else time.time(),
                diagnostics=None if summary is None else summary.log_fields(), collapsed=collapsed))
        if self.metrics is not None:
            self.record_metrics(epoch, lr, matching, caption, seconds, wait, closes_interval, summary, collapsed)
        if not closes_interval:
            return
        if self.rank == 0:
            self.progress_line(epoch, step, position, batches, lr, hardest, summary, collapsed)
        self.interval = Interval()  # on every rank: the collapse detector reads it everywhere

    def record_metrics(self, epoch: int, lr: float, matching: float, caption: float, seconds: float, wait: float,
                       closes_interval: bool, summary: HardNegativeSummary | None, collapsed: bool | None) -> None:
        assert self.metrics is not None
        total = self.cfg.model.caption_loss_weight * caption + matching
        self.metrics.record_step(epoch=epoch, samples=self.cfg.per_worker_batch_size, learning_rate=lr,
                                 losses={"matching": matching, "caption": caption, "total": total},
                                 step_seconds=seconds, data_wait_seconds=wait)
        if not closes_interval:
            return
        self.metrics.record_reader_stats(self.reader.stats.as_dict())
        if self.device.type == "cuda":
            self.metrics.record_accelerator_memory(
                torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device),
                torch.cuda.max_memory_allocated(self.device))
        if summary is not None:
            self.metrics.record_hard_negatives(
                gap_mean=summary.gap_mean, gap_p10=summary.gap_p10,
                active_hinge_ratio=summary.active_hinge_ratio, remote_hardest_ratio=summary.remote_hardest_ratio)
        if collapsed is not None:
            self.metrics.record_collapse(collapsed)

    def progress_line(self, epoch: int, step: int, position: int, batches: int, lr: float, hardest: bool,
                      summary: HardNegativeSummary | None, collapsed: bool | None) -> None:
        iv = self.interval
        m = iv.metrics()
        log.info("epoch %d step %d (batch %d/%d)  L_M %.4f  L_G %.4f  lr %.2e  %.0f samples/s  "
                 "data wait %.3fs/step (%.0f%%)  %s%s", epoch, step, position + 1, batches, m["loss_matching"],
                 m["loss_caption"], lr, m["samples_per_s"], m["data_wait_s"],
                 100 * iv.data_wait / max(iv.seconds, 1e-9), "hardest negatives" if hardest else "all negatives",
                 "" if summary is None else "  " + summary.progress() + ("  COLLAPSED" if collapsed else ""))

    def check_collapse(self, step: int, summary: HardNegativeSummary | None) -> bool:
        """Feed the closing interval to the collapse detector; warn (rank 0) when it trips or clears.

        Every rank runs it on the same global numbers, so all ranks agree on the state."""
        iv = self.interval
        mean_matching = iv.loss_matching / max(iv.steps, 1)
        update = self.collapse.update(mean_matching, hardest_only=iv.steps > 0 and iv.hardest_steps == iv.steps)
        if self.rank == 0 and update.started:
            log.warning("%s", self.collapse.warning(step, mean_matching, summary))
        elif self.rank == 0 and update.ended:
            log.info("step %d: L_M (%.4g) has left the collapse level %.4g; the collapse warning no longer holds",
                     step, mean_matching, self.collapse.level)
        return update.collapsed

    def checkpoint_metrics(self, epoch: int, step: int, lr: float) -> dict[str, Any]:
        """What goes to Ray with a checkpoint: the means since the previous one, the reader's counters."""
        metrics = {"epoch": epoch, "step": step, "lr": lr, **self.since_checkpoint.metrics(),
                   **{f"data/{k}": v for k, v in self.reader.stats.as_dict().items()}}
        self.since_checkpoint = Interval()
        return metrics
