"""What the readers give: `TrainBatch`, `EvalBatch`, and `TrainPart`, what a loader worker sends
for a training batch (everything but the regions, which the main process gathers from the slot's
`RowPool`, data_shards/shared_rows.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


class _BatchTensors:
    """pin_memory/to for the batch dataclasses (torch's pin_memory calls `.pin_memory()`)."""

    _TENSORS: tuple[str, ...] = ()

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        changes = {name: fn(getattr(self, name)) for name in self._TENSORS if getattr(self, name) is not None}
        return type(self)(**{**self.__dict__, **changes})

    def pin_memory(self) -> Any:
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Any:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


@dataclass
class TrainBatch(_BatchTensors):
    """B (image, caption) pairs; row i pairs image image_ids[i] with its caption caption_index[i]."""

    regions: torch.Tensor  # (B, R, D) in the output dtype, regions in config.region_order
    boxes: torch.Tensor | None  # (B, R, 4) float32 in the same order, if every image has boxes
    tokens: torch.Tensor  # (B, T) int64, padded with 0
    lengths: torch.Tensor  # (B,) int64
    image_ids: torch.Tensor  # (B,) int64: meta index, the position in the source split
    caption_index: torch.Tensor  # (B,) int64: position of the caption among its image's captions
    keys: list[str]
    captions: list[str]
    epoch: int
    index: int  # position of this batch in the rank's epoch (resume with start_batch=index + 1)
    slot: int  # the reading slot (loader worker role) that made it
    stats: dict[str, int] = field(default_factory=dict)  # counter increments since the slot's previous batch

    _TENSORS = ("regions", "boxes", "tokens", "lengths", "image_ids", "caption_index")


@dataclass
class TrainPart:
    """What a loader worker sends for one training batch: everything but the regions, which the
    main process gathers from the slot's `RowPool` (`TrainReader.epoch`). The arrays are small
    and travel by value through the DataLoader's pipe: a shared-memory tensor would cost a
    file-descriptor handshake between the processes per batch, more than copying them."""

    index_rows: np.ndarray  # (B,) pool rows, or (B x R,) region rows when `reordered`
    reordered: bool
    boxes: np.ndarray | None  # (B, R, 4) float32
    tokens: np.ndarray  # (B, T) int64
    lengths: np.ndarray
    image_ids: np.ndarray
    caption_index: np.ndarray
    keys: list[str]
    captions: list[str]
    epoch: int
    index: int
    slot: int
    made: int  # the batch's number within its slot's epoch (what RowPool.mark_gathered counts)
    stats: dict[str, int]


@dataclass
class EvalBatch(_BatchTensors):
    """Consecutive images of one shard in source order, with all their captions in order."""

    regions: torch.Tensor  # (N, R, D)
    boxes: torch.Tensor | None  # (N, R, 4) or None
    image_ids: torch.Tensor  # (N,) int64, strictly increasing across an evaluation
    keys: list[str]
    captions: list[str]  # the N images' captions, image by image, each image's in stored order
    tokens: torch.Tensor  # (C, T) int64, padded with 0
    lengths: torch.Tensor  # (C,) int64
    caption_image_ids: torch.Tensor  # (C,) int64: the image id of each caption
    shard_position: int  # internal: position of the shard in the selection, for reordering
    chunk: int
    last_in_shard: bool
    stats: dict[str, int] = field(default_factory=dict)
    # The source datasets' ids (meta source_id / caption_ids), None where the shards have none:
    # per image, and per caption in the order of `captions`.
    source_ids: list[str | None] = field(default_factory=list)
    caption_source_ids: list[str | None] = field(default_factory=list)

    _TENSORS = ("regions", "boxes", "image_ids", "tokens", "lengths", "caption_image_ids")


# --------------------------------------------------------------------------------------------------
# The split: manifest and shard selection (main process)
# --------------------------------------------------------------------------------------------------
