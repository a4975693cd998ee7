"""Region order (paper Table 5): the one definition of the orders the readers can present an
image's regions in, and the index that puts them so.

"stored" (detector confidence, as the shards hold them), "area" (descending box area, stable;
needs boxes), "random" (a permutation drawn from the caller's generator). The model library
(model/vsrn.py) has an equivalent `order_regions` for tensors, for callers that feed it regions
directly; it cannot import this package (model/ imports nothing of the rest), and a run reorders
in the reader or in the model, not both.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

RegionOrder = Literal["stored", "area", "random"]
REGION_ORDERS: tuple[RegionOrder, ...] = ("stored", "area", "random")


def region_index(boxes: np.ndarray | None, regions: int, order: RegionOrder,
                 rng: np.random.Generator | None) -> np.ndarray | None:
    """(R,) index putting one image's regions in `order`; None for stored order.

    "area": descending box area, stable; "random": a permutation drawn from `rng`.
    """
    if order == "stored":
        return None
    if order == "area":
        if boxes is None:
            raise ValueError("region_order='area' needs boxes")  # readers check each sample before
        area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
        return np.argsort(-area, kind="stable")
    if rng is None:
        raise ValueError("region_order='random' needs a generator")
    return rng.permutation(regions)
