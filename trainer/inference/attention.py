"""The Sec. 4.5 attention of a checkpoint's image representation over image records
(model/interpret.py), the model fed each record's regions as its run's reader fed them in training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from data_shards.format import ImageRecord
from data_shards.regions import region_index
from model.interpret import RegionAttention, region_attention
from model.vsrn import VSRN

__all__ = ["feed_order", "records_attention"]


def feed_order(record: ImageRecord, region_order: str) -> np.ndarray | None:
    """The index that puts a record's regions in the order its run's reader fed them to the model
    (data.region_order; None: stored order). "random" draws one fixed permutation (seed 0), so
    that a tool's output is reproducible."""
    return region_index(record.boxes, record.regions.shape[0], region_order,  # type: ignore[arg-type]
                        np.random.default_rng(0) if region_order == "random" else None)


def records_attention(model: VSRN, records: Sequence[ImageRecord], lam: float, region_order: str,
                      device: str | torch.device = "cpu") -> list[RegionAttention]:
    """The Sec. 4.5 attention of each record (model/interpret.py), the model fed as its run's
    reader feeds it; regions reported in stored order."""
    out = []
    for record in records:
        regions = torch.from_numpy(np.asarray(record.regions, dtype=np.float32)).unsqueeze(0).to(device)
        boxes = torch.from_numpy(record.boxes).unsqueeze(0).to(device) if record.boxes is not None else None
        index = feed_order(record, region_order)
        feed = torch.from_numpy(index).unsqueeze(0).to(device) if index is not None else None
        out.append(region_attention(model, regions, boxes, lam=lam, feed_order=feed)[0])
    return out
