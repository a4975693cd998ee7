"""The training loss of one rank: L = L_M + lambda L_G (model.caption_loss_weight = lambda).

* L_M is the hinge loss with hardest negatives over the GLOBAL batch: the embeddings of all workers
  are gathered with autograd and each rank's loss is the sum over its own anchors (model/loss.py),
  so the ranks' losses sum to the reference's loss of one batch of `global` pairs. DeepSpeed
  averages gradients over ranks (a factor 1/W), so each rank's L_M is multiplied by W: the averaged
  gradient is then exactly the reference's single-process gradient of the global batch, and
  clipping at 2.0 and the learning rate mean what they mean in the reference, for any W.
* L_G (caption NLL summed over tokens / local batch) is already a per-pair mean: the average over
  ranks is the mean over the global batch, as in the reference. No factor.
Similarities, hinges and the hardest-negative max run in float32 whatever the precision.
"""

from __future__ import annotations

import torch

from model.loss import HardNegativeStats, gathered_hardest_negative_loss
from model.vsrn import VSRNOutput
from trainer.config import TrainConfig


def training_loss(out: VSRNOutput, image_ids: torch.Tensor, cfg: TrainConfig, world: int,
                  hardest: bool, check_sizes: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss this rank back-propagates, this rank's share of L_M).

    L_M is this rank's anchors against the gathered global batch, times W: DeepSpeed averages the
    gradients over the W ranks, and the reference sums L_M over the whole batch, so the averaged
    gradient equals the reference's gradient of one global batch (see the module docstring).
    L_G is a per-pair mean already: the average over ranks is the global mean, no factor.
    """
    matching = gathered_hardest_negative_loss(out.image_emb, out.caption_emb, image_ids,
                                              margin=cfg.optim.margin, max_violation=hardest,
                                              check_sizes=check_sizes)
    return _total_loss(matching, out, cfg, world), matching


def training_loss_with_stats(out: VSRNOutput, image_ids: torch.Tensor, cfg: TrainConfig, world: int,
                             hardest: bool, check_sizes: bool = True
                             ) -> tuple[torch.Tensor, torch.Tensor, HardNegativeStats]:
    """:func:`training_loss` plus the loss's hard-negative stats of this rank's anchors (the same
    loss and gradients: the stats are computed without autograd from the loss's own scores).
    `check_sizes=False`: the caller has checked on the host that every rank's local batch has the
    same shape (the trainer: each batch has the configured per-worker size)."""
    matching, stats = gathered_hardest_negative_loss(out.image_emb, out.caption_emb, image_ids,
                                                     margin=cfg.optim.margin, max_violation=hardest,
                                                     with_stats=True, check_sizes=check_sizes)
    return _total_loss(matching, out, cfg, world), matching, stats


def _total_loss(matching: torch.Tensor, out: VSRNOutput, cfg: TrainConfig, world: int) -> torch.Tensor:
    loss = matching * world
    if out.caption_loss is not None:
        loss = loss + cfg.model.caption_loss_weight * out.caption_loss.float()
    return loss


def step_losses(matching: torch.Tensor, caption: torch.Tensor | None) -> torch.Tensor:
    """This rank's (L_M, L_G) of a step as one detached float32 device tensor (2,): summed over the
    ranks at the next logging step (L_M of the global batch is the sum, L_G's mean the sum / W)."""
    values = [matching.detach().float()]
    values.append(caption.detach().float() if caption is not None else torch.zeros_like(values[0]))
    return torch.stack(values)
