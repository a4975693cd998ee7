"""What the evaluation measures: the protocols and their pinned output keys, the input error, and
the recall metrics of a protocol from 0-based ranks (R@K, medr, meanr, rsum; the reference's
``evaluation.py`` definitions, see the package docstring).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]
DeviceLike = Union[str, torch.device]

CAPTIONS_PER_IMAGE = 5
RECALL_KS = (1, 5, 10)

PROTOCOL_1K_5FOLD = "1k-5fold"
PROTOCOL_ALL = "all"
PROTOCOL_ECCV = "eccv"
PROTOCOL_CXC = "cxc"
PROTOCOLS = (PROTOCOL_1K_5FOLD, PROTOCOL_ALL, PROTOCOL_ECCV, PROTOCOL_CXC)
# The protocols of the reference's evaluation (the defaults where none are named).
RECALL_PROTOCOLS = (PROTOCOL_1K_5FOLD, PROTOCOL_ALL)
# Protocols whose positives come from extra annotations (the eccv-caption package) and so need
# the COCO ids of the ranked images and captions; both are defined on the COCO 5K test split.
ANNOTATED_PROTOCOLS = (PROTOCOL_ECCV, PROTOCOL_CXC)
# The pinned output keys of the annotated protocols, in percent like the recalls.
ECCV_KEYS = ("i2t_map_at_r", "i2t_rprecision", "i2t_r1", "t2i_map_at_r", "t2i_rprecision", "t2i_r1")
CXC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
FOLD_IMAGES = 1000
NUM_FOLDS = 5
FOLD_PROTOCOL_MIN_IMAGES = FOLD_IMAGES * NUM_FOLDS


class EvaluationInputError(ValueError):
    """The inputs cannot be evaluated: wrong shapes, mismatched models, unknown protocol, ..."""


@dataclass(frozen=True)
class RecallMetrics:
    """Recall metrics of one evaluation (or the mean over the folds of ``1k-5fold``).

    Recalls are percentages; medr and meanr are 1-based ranks, as the papers report them.
    """

    i2t_r1: float
    i2t_r5: float
    i2t_r10: float
    i2t_medr: float
    i2t_meanr: float
    t2i_r1: float
    t2i_r5: float
    t2i_r10: float
    t2i_medr: float
    t2i_meanr: float
    rsum: float

    def to_dict(self) -> dict[str, float]:
        """The metrics as a JSON-ready mapping in field order (the pinned output keys)."""
        return {key: float(value) for key, value in asdict(self).items()}

    @classmethod
    def mean(cls, metrics: Sequence[RecallMetrics]) -> RecallMetrics:
        """Field-wise mean, as the reference averages the per-fold results of ``1k-5fold``.

        Every field is averaged, medr and rsum included: the mean rsum equals the sum of the mean
        recalls, but the mean medr is not the median over the pooled folds, and papers report
        the mean.
        """
        if not metrics:
            raise EvaluationInputError("cannot average an empty list of metrics")
        return cls(
            **{
                name: float(np.mean([getattr(m, name) for m in metrics]))
                for name in METRIC_KEYS
            }
        )


METRIC_KEYS: tuple[str, ...] = tuple(f.name for f in fields(RecallMetrics))


def _as_rank_array(ranks: ArrayLike, name: str) -> np.ndarray:
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.detach().cpu().numpy()
    array = np.asarray(ranks)
    if array.ndim != 1 or array.size == 0:
        raise EvaluationInputError(
            f"{name} must be a non-empty 1-D array of ranks, got shape {array.shape}"
        )
    return array


def recall_at_k(ranks: ArrayLike, k: int) -> float:
    """Percentage of queries whose 0-based rank is below ``k`` (R@K)."""
    array = _as_rank_array(ranks, "ranks")
    return 100.0 * np.count_nonzero(array < k) / array.size


def _median_rank(ranks: np.ndarray) -> float:
    # np.median averages the two middle values of an even count; the reference floors that
    # before making the rank 1-based, so a median of 2.5 (0-based) reports medr = 3.
    return float(np.floor(np.median(ranks)) + 1)


def _mean_rank(ranks: np.ndarray) -> float:
    return float(ranks.mean() + 1)


def metrics_from_ranks(i2t: ArrayLike, t2i: ArrayLike) -> RecallMetrics:
    """Recall metrics from 0-based i2t ranks (one per image) and t2i ranks (one per caption)."""
    i2t_array = _as_rank_array(i2t, "i2t ranks")
    t2i_array = _as_rank_array(t2i, "t2i ranks")
    i2t_r1, i2t_r5, i2t_r10 = (recall_at_k(i2t_array, k) for k in RECALL_KS)
    t2i_r1, t2i_r5, t2i_r10 = (recall_at_k(t2i_array, k) for k in RECALL_KS)
    return RecallMetrics(
        i2t_r1=i2t_r1,
        i2t_r5=i2t_r5,
        i2t_r10=i2t_r10,
        i2t_medr=_median_rank(i2t_array),
        i2t_meanr=_mean_rank(i2t_array),
        t2i_r1=t2i_r1,
        t2i_r5=t2i_r5,
        t2i_r10=t2i_r10,
        t2i_medr=_median_rank(t2i_array),
        t2i_meanr=_mean_rank(t2i_array),
        rsum=i2t_r1 + i2t_r5 + i2t_r10 + t2i_r1 + t2i_r5 + t2i_r10,
    )
