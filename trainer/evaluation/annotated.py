"""Annotated protocols: ECCV Caption (mAP@R, R-Precision, R@1) and CxC (R@K).

Both give a query several positives (annotated by ids) instead of the five captions / one
image of the recall protocols. Every metric needs only the positions of a query's positives
among the first K candidates (mAP@R and R-Precision: K = R, the number of positives; R@K: K),
so the block pass collects, per query, its K highest scores and its positives' scores, and
the positions follow without sorting any full ranking:

  position of the k-th best positive (0-based) = k + #(candidates scoring strictly higher
  that are not positives) = k + #(top-K scores > s_k) - #(positives > s_k),

exact whenever it is below K (if K or more candidates score higher, the position is >= K and
counts for nothing). Tie rule: a positive is placed before every non-positive with the same
score (the "strictly higher" rule of the recall protocols, in the query's favour); ties among
positives do not change which positions they occupy. It equals ranking each query's
candidates by a stable sort on (score descending, positives first) and handing the lists to
the eccv-caption package (tests/trainer/evaluation/test_annotated.py checks exactly that).

CxC's caption queries need only their best positive's rank (R@K), which is counted instead,
one comparison per block as the "all" protocol counts t2i ranks (_CaptionQueryBestPositive).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_shards.coco_annotations import (
    AnnotationsUnavailableError,
    cxc_ground_truth,
    eccv_ground_truth,
)
from trainer.evaluation.coco_ids import GalleryIds, lookup_positions
from trainer.evaluation.inputs import check_finite
from trainer.evaluation.metrics import (
    CXC_KEYS,
    ECCV_KEYS,
    PROTOCOL_ECCV,
    RECALL_KS,
    EvaluationInputError,
)
from trainer.evaluation.scorer import MAX_EXACT_FLOAT32_COUNT, BlockObserver
from trainer.evaluation.sources import SimilaritySource

@dataclass(frozen=True, eq=False)
class _Relevance:
    """The positives of one direction's queries, as positions in the ranked gallery."""

    queries: np.ndarray  # (Q,) int64: gallery index of each query, ascending
    positives: np.ndarray  # (Q, P) int64: gallery indices of its positives that are ranked, -1 padding
    num_relevant: np.ndarray  # (Q,) int64: R, all its positives (also those not in the ranked gallery)


def _relevance(
    mapping: dict[int, tuple[int, ...]],
    query_ids: np.ndarray,
    candidate_ids: np.ndarray,
    protocol: str,
    what: str,
) -> _Relevance:
    keys = np.fromiter(mapping.keys(), dtype=np.int64, count=len(mapping))
    query_index = lookup_positions(query_ids, keys)
    if (query_index < 0).any():
        missing = keys[query_index < 0]
        raise EvaluationInputError(
            f"protocol {protocol!r}: {missing.size} of its {keys.size} {what} queries are not among the ranked "
            f"ids (e.g. COCO id {int(missing[0])}); it needs the COCO 5K test split"
        )
    counts = np.fromiter((len(v) for v in mapping.values()), dtype=np.int64, count=len(mapping))
    flat = np.fromiter((i for v in mapping.values() for i in v), dtype=np.int64, count=int(counts.sum()))
    rows = np.repeat(np.arange(keys.size), counts)
    # Positives form a set per query, as the package counts them (duplicates would inflate R).
    pairs = np.unique(np.stack([rows, flat], axis=1), axis=0)
    rows, flat = pairs[:, 0], pairs[:, 1]
    num_relevant = np.bincount(rows, minlength=keys.size)
    gallery = lookup_positions(candidate_ids, flat)
    ranked = gallery >= 0
    rows, gallery = rows[ranked], gallery[ranked]
    in_gallery = np.bincount(rows, minlength=keys.size)
    width = max(int(in_gallery.max(initial=0)), 1)
    slots = np.arange(rows.size) - np.repeat(np.cumsum(in_gallery) - in_gallery, in_gallery)
    positives = np.full((keys.size, width), -1, dtype=np.int64)
    positives[rows, slots] = gallery
    order = np.argsort(query_index, kind="stable")
    return _Relevance(query_index[order], positives[order], num_relevant[order])


class _QueryTopK:
    """Per query, its K highest scores and its positives' scores (``-inf`` in padding slots)."""

    def __init__(self, relevance: _Relevance, k: int, num_candidates: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.relevance = relevance
        self.k = max(1, min(k, num_candidates))
        num_queries, width = relevance.positives.shape
        self.positive_scores = torch.full((num_queries, width), -math.inf, dtype=dtype, device=device)

    def positions(self, top: torch.Tensor) -> np.ndarray:
        """0-based positions of each query's positives, best first, (Q, P) float64; ``inf``
        where a position is K or beyond (or the slot is padding)."""
        ascending = self.positive_scores.sort(dim=1).values.contiguous()
        ordered = ascending.flip(1).contiguous()
        # Counts of scores strictly above each positive: binary searches in the sorted rows.
        top_ascending = top.sort(dim=1).values.contiguous()
        above = top.shape[1] - torch.searchsorted(top_ascending, ordered, right=True)
        positives_above = ordered.shape[1] - torch.searchsorted(ascending, ordered, right=True)
        slot = torch.arange(ordered.shape[1], device=ordered.device)
        position = (slot + above - positives_above).to(torch.float64)
        beyond = (above >= self.k) | torch.isinf(ordered)
        return position.masked_fill_(beyond, math.inf).cpu().numpy()


class _ImageQueryTopK(_QueryTopK, BlockObserver):
    """i2t: a query's scores are one row of a block, all there at once."""

    def __init__(self, relevance: _Relevance, k: int, num_captions: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(relevance, k, num_captions, dtype, device)
        self.rows = torch.as_tensor(relevance.queries, device=device)
        positives = torch.as_tensor(relevance.positives, device=device)
        self.valid = positives >= 0
        self.gather_index = positives.clamp(min=0)
        self.top = torch.full((relevance.queries.size, self.k), -math.inf, dtype=dtype, device=device)

    def observe(self, start: int, stop: int, scores: torch.Tensor) -> None:
        low, high = np.searchsorted(self.relevance.queries, (start, stop))
        if low == high:
            return
        # Queries are distinct and ascending: as many as rows means every row, in order.
        block = scores if high - low == stop - start else scores.index_select(0, self.rows[low:high] - start)
        # Unsorted: only how many top scores beat a positive matters, not their order.
        self.top[low:high] = torch.topk(block, self.k, dim=1, sorted=False).values
        gathered = block.gather(1, self.gather_index[low:high])
        self.positive_scores[low:high] = gathered.masked_fill_(~self.valid[low:high], -math.inf)

    def result(self) -> np.ndarray:
        return self.positions(self.top)


class _CaptionQueryTopK(_QueryTopK, BlockObserver):
    """t2i: a query's scores are one column spread over every block: each block's top K is kept
    and merged after the pass, and each positive's score is taken from the block that holds its
    image (the very value the top K sees, so that ties compare exactly)."""

    def __init__(self, relevance: _Relevance, k: int, num_images: int, num_captions: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(relevance, k, num_images, dtype, device)
        num_queries, width = relevance.positives.shape
        # With most captions as queries (CxC: 24,972 of 25,000) every column is kept, and the
        # queries picked from the merged top K: cheaper than copying nearly all of each block.
        self.all_columns = 2 * num_queries > num_captions
        self.columns = torch.as_tensor(relevance.queries, device=device)
        # Each block's own top K, merged once at the end (cheaper than merging every block).
        self.block_tops: list[torch.Tensor] = []
        query_of, slot_of = np.nonzero(relevance.positives >= 0)
        images = relevance.positives[query_of, slot_of]
        order = np.argsort(images, kind="stable")
        self.pair_images_np = images[order]
        self.pair_images = torch.as_tensor(self.pair_images_np, device=device)
        self.pair_columns = torch.as_tensor(relevance.queries[query_of[order]], device=device)
        self.pair_slots = torch.as_tensor((query_of * width + slot_of)[order], device=device)

    def observe(self, start: int, stop: int, scores: torch.Tensor) -> None:
        block = scores if self.all_columns else scores.index_select(1, self.columns)
        self.block_tops.append(torch.topk(block, min(self.k, stop - start), dim=0, sorted=False).values)
        low, high = np.searchsorted(self.pair_images_np, (start, stop))
        if low < high:
            values = scores[self.pair_images[low:high] - start, self.pair_columns[low:high]]
            self.positive_scores.view(-1)[self.pair_slots[low:high]] = values

    def result(self) -> np.ndarray:
        merged = torch.cat(self.block_tops)
        top = torch.topk(merged, min(self.k, merged.shape[0]), dim=0, sorted=False).values
        if self.all_columns:
            top = top.index_select(1, self.columns)
        return self.positions(top.T)


class _CaptionQueryBestPositive(BlockObserver):
    """t2i for R@K only (CxC): a query's rank is that of its best positive, the number of
    non-positive images scoring strictly higher than it, counted down the columns block by block
    as the recall protocols count t2i ranks (one comparison per block instead of a top K).

    The best positive's score is taken before the pass from the pairs' own scores
    (:meth:`SimilaritySource.pair_scores`), and every positive is excluded from the count by
    its block entry, so that a positive is never counted against the query: as for the ``all``
    protocol's t2i ranks, only a non-positive within float rounding of the best positive could
    count either way (for similarity matrices the scores are the entries themselves).
    """

    def __init__(self, relevance: _Relevance, source: SimilaritySource) -> None:
        self.relevance = relevance
        device, dtype = source.device, source.dtype
        query_of, slot_of = np.nonzero(relevance.positives >= 0)
        images = torch.as_tensor(relevance.positives[query_of, slot_of], device=device)
        columns = torch.as_tensor(relevance.queries[query_of], device=device)
        pair_scores = source.pair_scores(images, columns)
        check_finite(pair_scores, "positive similarity scores")
        num_queries = relevance.queries.size
        best = torch.full((num_queries,), -math.inf, dtype=dtype, device=device)
        best.scatter_reduce_(0, torch.as_tensor(query_of, device=device), pair_scores, reduce="amax")
        # Thresholds per caption column; columns that are not queries count nothing (+inf).
        self.threshold = torch.full((source.num_captions,), math.inf, dtype=dtype, device=device)
        self.columns = torch.as_tensor(relevance.queries, device=device)
        self.threshold[self.columns] = best
        self.counts = torch.zeros(source.num_captions, dtype=torch.int64, device=device)
        self.count_dtype = dtype if source.num_images < MAX_EXACT_FLOAT32_COUNT else torch.float64
        order = np.argsort(relevance.positives[query_of, slot_of], kind="stable")
        self.pair_images_np = relevance.positives[query_of, slot_of][order]
        self.pair_images = torch.as_tensor(self.pair_images_np, device=device)
        self.pair_columns = columns[torch.as_tensor(order, device=device)]
        self.buffer: torch.Tensor | None = None

    def observe(self, start: int, stop: int, scores: torch.Tensor) -> None:
        if self.buffer is None or self.buffer.shape[0] < scores.shape[0]:
            self.buffer = torch.empty_like(scores)
        above = self.buffer[: scores.shape[0]]
        torch.gt(scores, self.threshold[None, :], out=above)
        self.counts += above.sum(dim=0, dtype=self.count_dtype).to(torch.int64)
        low, high = np.searchsorted(self.pair_images_np, (start, stop))
        if low < high:
            columns = self.pair_columns[low:high]
            positives = scores[self.pair_images[low:high] - start, columns]
            self.counts.index_add_(0, columns, -(positives > self.threshold[columns]).to(torch.int64))

    def result(self) -> np.ndarray:
        """(Q, 1) float64: the 0-based rank of each query's best positive (``inf``: none ranked)."""
        ranks = self.counts[self.columns].to(torch.float64)
        ranks[torch.isinf(self.threshold[self.columns])] = math.inf
        return ranks[:, None].cpu().numpy()


def _ground_truth(protocol: str) -> Any:
    try:
        return eccv_ground_truth() if protocol == PROTOCOL_ECCV else cxc_ground_truth()
    except AnnotationsUnavailableError as error:
        raise EvaluationInputError(str(error)) from None


class AnnotatedProtocol:
    """The collectors of one annotated protocol (both directions) and its metrics."""

    def __init__(self, protocol: str, source: SimilaritySource, ids: GalleryIds) -> None:
        self.protocol = protocol
        truth = _ground_truth(protocol)
        i2t = _relevance(truth.i2t, ids.image_ids, ids.caption_ids, protocol, "image")
        t2i = _relevance(truth.t2i, ids.caption_ids, ids.image_ids, protocol, "caption")
        if protocol == PROTOCOL_ECCV:  # mAP@R and R-Precision look as deep as R
            k_i2t, k_t2i = int(i2t.num_relevant.max()), int(t2i.num_relevant.max())
        else:
            k_i2t = k_t2i = max(RECALL_KS)
        args = (source.dtype, source.device)
        self.i2t = _ImageQueryTopK(i2t, k_i2t, source.num_captions, *args)
        self.t2i: _CaptionQueryTopK | _CaptionQueryBestPositive
        if protocol == PROTOCOL_ECCV:
            self.t2i = _CaptionQueryTopK(t2i, k_t2i, source.num_images, source.num_captions, *args)
        else:  # R@K needs only the best positive: one comparison per block, as for "all"
            self.t2i = _CaptionQueryBestPositive(t2i, source)

    @property
    def observers(self) -> tuple[BlockObserver, ...]:
        return (self.i2t, self.t2i)

    def metrics(self) -> dict[str, float]:
        result: dict[str, float] = {}
        for direction, collector in (("i2t", self.i2t), ("t2i", self.t2i)):
            positions = collector.result()
            if self.protocol == PROTOCOL_ECCV:
                result.update(
                    {f"{direction}_{key}": value
                     for key, value in eccv_metrics(positions, collector.relevance.num_relevant).items()}
                )
            else:
                for k in RECALL_KS:
                    result[f"{direction}_r{k}"] = 100.0 * float(np.mean(positions[:, 0] < k))
        keys = ECCV_KEYS if self.protocol == PROTOCOL_ECCV else CXC_KEYS
        return {key: result[key] for key in keys}


def eccv_metrics(positions: np.ndarray, num_relevant: np.ndarray) -> dict[str, float]:
    """ECCV Caption's mAP@R, R-Precision and R@1, in percent, from positive positions.

    Args:
        positions: (Q, P) 0-based positions of each query's ranked positives in ascending order
            (``inf`` for padding and for positions that do not count).
        num_relevant: (Q,) R of each query, its number of positives (ranked or not).

    mAP@R averages, over the first R positions, the precision at each position that holds a
    positive (0 elsewhere); the k-th positive (0-based) at position p < R adds (k + 1) / (p + 1).
    R-Precision is the fraction of the first R positions holding positives; R@1 whether the
    first holds one.
    """
    relevant = num_relevant.astype(np.float64)[:, None]
    hits = positions < relevant
    count = np.arange(1, positions.shape[1] + 1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(hits, count / (positions + 1.0), 0.0)
    return {
        "map_at_r": 100.0 * float(np.mean(precision.sum(axis=1) / relevant[:, 0])),
        "rprecision": 100.0 * float(np.mean(hits.sum(axis=1) / relevant[:, 0])),
        "r1": 100.0 * float(np.mean(positions[:, 0] == 0)),
    }
