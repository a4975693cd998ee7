"""The paper's interpretation method (Sec. 4.5): which regions the image representation holds.

For an image with k regions, the reasoned region features V* = {v*_1 .. v*_k} (after the RRR
layers, as the global reasoning reads them) and the final image representation I:

1. correlation c_i = v*_i . I, the inner product of Eq. 8's similarity;
2. regions ranked by descending correlation, rank r_i = 1 for the highest;
3. score s_i = lambda (k - r_i)^2, lambda = 50 in the paper: the top region gets lambda (k-1)^2,
   the last 0, so high ranks dominate the map;
4. the attention map: the value at a pixel is the sum of the scores of the regions whose box holds it.

Regions are reported in stored order whatever `config.region_order` the GRU reads them in: every
step before the GRU is permutation-equivariant (`ImageEncoder.reason`), so V* is computed on the
stored order and I by the encoder as it is used for matching.

A pixel (x, y) (column x, row y, from 0) is held by a box (x1, y1, x2, y2) in pixels when its
centre is inside it: x1 <= x + 0.5 <= x2 and y1 <= y + 0.5 <= y2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.vsrn import VSRN

PAPER_LAMBDA = 50.0


@dataclass(frozen=True)
class RegionAttention:
    """The interpretation of one image: per region (stored order) its correlation, rank and score."""

    reasoned: np.ndarray  # (k, D) V*, float32
    image: np.ndarray  # (D,) I, float32
    correlation: np.ndarray  # (k,) v*_i . I
    rank: np.ndarray  # (k,) int, 1 = highest correlation
    score: np.ndarray  # (k,) lambda (k - rank)^2

    @property
    def regions(self) -> int:
        return int(self.correlation.shape[0])


def correlation_ranks(correlation: np.ndarray) -> np.ndarray:
    """1-based ranks by descending correlation; equal correlations keep stored order (stable)."""
    order = np.argsort(-np.asarray(correlation, dtype=np.float64), kind="stable")
    ranks = np.empty(order.shape[0], dtype=np.int64)
    ranks[order] = np.arange(1, order.shape[0] + 1)
    return ranks


def rank_scores(ranks: np.ndarray, lam: float = PAPER_LAMBDA) -> np.ndarray:
    """s_i = lambda (k - r_i)^2 for 1-based ranks r_i of k regions."""
    ranks = np.asarray(ranks, dtype=np.int64)
    k = ranks.shape[0]
    if k and (ranks.min() < 1 or ranks.max() > k):
        raise ValueError(f"ranks must be in 1..{k}, got {ranks.min()}..{ranks.max()}")
    if not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"lambda must be a positive number, got {lam}")
    return lam * (k - ranks).astype(np.float64) ** 2


@torch.no_grad()
def region_attention(model: VSRN, regions: Tensor, boxes: Tensor | None = None,
                     lam: float = PAPER_LAMBDA, feed_order: Tensor | None = None) -> list[RegionAttention]:
    """The Sec. 4.5 interpretation of a batch of images.

    Args:
        model: the VSRN (put in eval mode here; it stays so).
        regions: (B, k, img_dim) region features in stored order.
        boxes: (B, k, 4) boxes in the same order (needed only for `region_order="area"`).
        lam: the paper's lambda.
        feed_order: (B, k) int64: the model is fed `regions[b, feed_order[b]]` (a reader that
            reorders regions, data.region_order); None: stored order. Results stay in stored order.
    """
    model.eval()
    encoder = model.image_encoder
    reasoned = encoder.reason(regions).float()
    fed, fed_boxes = regions, boxes
    if feed_order is not None:
        fed = torch.gather(regions, 1, feed_order.unsqueeze(-1).expand_as(regions))
        if boxes is not None:
            fed_boxes = torch.gather(boxes, 1, feed_order.unsqueeze(-1).expand_as(boxes))
    image = model.encode_images(fed, fed_boxes).float()
    correlation = torch.einsum("bkd,bd->bk", reasoned, image)
    out = []
    for b in range(regions.shape[0]):
        corr = correlation[b].cpu().numpy()
        ranks = correlation_ranks(corr)
        out.append(RegionAttention(reasoned=reasoned[b].cpu().numpy(), image=image[b].cpu().numpy(),
                                   correlation=corr, rank=ranks, score=rank_scores(ranks, lam)))
    return out


def _pixel_span(low: float, high: float, limit: int) -> tuple[int, int]:
    """Pixels [start, stop) whose centres p + 0.5 lie in [low, high], clipped to [0, limit)."""
    start = max(0, math.ceil(low - 0.5))
    stop = min(limit, math.floor(high - 0.5) + 1)
    return start, max(start, stop)


def attention_map(boxes: np.ndarray, scores: np.ndarray, width: int, height: int) -> np.ndarray:
    """(height, width) float64 map: each pixel sums the scores of the regions whose box holds it.

    Built from a 2-D difference array (one corner update per box, then two cumulative sums), so the
    cost is O(k + width x height) rather than a pass over the image per region.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] != scores.shape[0]:
        raise ValueError(f"boxes must be ({scores.shape[0]}, 4), got {boxes.shape}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    diff = np.zeros((height + 1, width + 1), dtype=np.float64)
    for (x1, y1, x2, y2), score in zip(boxes, scores):
        xs, xe = _pixel_span(x1, x2, width)
        ys, ye = _pixel_span(y1, y2, height)
        if xs == xe or ys == ye:
            continue  # the box holds no pixel centre
        diff[ys, xs] += score
        diff[ys, xe] -= score
        diff[ye, xs] -= score
        diff[ye, xe] += score
    return diff.cumsum(axis=0).cumsum(axis=1)[:height, :width]
