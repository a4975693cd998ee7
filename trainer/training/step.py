"""One training step on the device: the data hand-off, forward, both losses, backward and the
optimizer, with nothing read back to the host (bench/step_profile.py counts the syncs: none).

The batch's caption shape facts (bucketed width, last positions, L_G's labels) are made on the
host from its lengths (model.vsrn.caption_inputs) and sent with non-blocking copies; the batch size
is checked on the host instead of by the loss's collective; the losses stay on the device until
the recorder brings a logging interval's worth back at once (trainer/training/recorder.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from data_shards.reader import TrainBatch
from model.loss import HardNegativeStats
from model.vsrn import CaptionInputs, caption_inputs
from trainer.config import TrainConfig
from trainer.training.loss import step_losses, training_loss_with_stats


@dataclass
class StepInputs:
    """A training batch on the device, its caption shape facts made on the host (no sync)."""

    regions: torch.Tensor
    captions: CaptionInputs
    boxes: torch.Tensor | None
    image_ids: torch.Tensor


def step_inputs(batch: TrainBatch, cfg: TrainConfig, device: torch.device) -> StepInputs:
    """The data hand-off: the batch's host lengths give the caption bucket, each caption's last
    position and L_G's labels (model.vsrn.caption_inputs), sent with the tokens in one copy; all
    copies to the device are non-blocking (pinned batches on a GPU). Checks on the host that the
    batch has the configured per-worker size: every rank then has the same local shape, which the
    gathered loss needs (so it does not check it with a collective and a sync every step)."""
    if batch.tokens.shape[0] != cfg.per_worker_batch_size:
        raise ValueError(f"a training batch of {batch.tokens.shape[0]} pairs, the configuration says "
                         f"{cfg.per_worker_batch_size} per worker: the reader must give full batches")
    captions = caption_inputs(batch.tokens, batch.lengths, cfg.model.max_caption_len, device=device,
                              counted_positions=not cfg.model.compile)  # one shape per bucket when compiled
    return StepInputs(regions=batch.regions.to(device, non_blocking=True), captions=captions,
                      boxes=None if batch.boxes is None else batch.boxes.to(device, non_blocking=True),
                      image_ids=batch.image_ids.to(device, non_blocking=True))


def train_step(engine: Any, cfg: TrainConfig, world: int, inputs: StepInputs,
               hardest: bool) -> tuple[torch.Tensor, HardNegativeStats]:
    """Forward, both losses, backward and the optimizer step on `inputs`: (this rank's (L_M, L_G) as
    a device tensor, the loss's hard-negative stats). Nothing is read back from the device."""
    if cfg.model.compile and inputs.regions.is_cuda:
        torch.compiler.cudagraph_mark_step_begin()  # a new iteration for the CUDA graphs of mode="reduce-overhead"
    out = engine(inputs.regions, inputs.captions, None, inputs.boxes)
    loss, matching, stats = training_loss_with_stats(out, inputs.image_ids, cfg, world, hardest, check_sizes=False)
    engine.backward(loss)
    engine.step()
    return step_losses(matching, out.caption_loss), stats
