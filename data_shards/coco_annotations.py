"""COCO 5K test ids and the ECCV Caption / CxC ground truths, from the ``eccv-caption`` package.

The package (naver-ai/eccv-caption, MIT, pinned in setup.py) ships, besides its metric functions,
the data this project evaluates with:

* ``Metrics().coco_ids``: the 25,000 COCO caption (annotation) ids of the Karpathy 5K test split
  in the standard order, five consecutive captions per image, the order of the SCAN / VSRN
  ``testall`` precomputed features;
* the original COCO pairs (caption id -> its image id), which give the image ids of that order;
* the ECCV Caption ground truth (1,261 image queries with up to 48 positive captions, 1,332
  caption queries with up to 19 positive images; a few positives are captions outside the 5K
  split) and the CrissCrossed Captions (CxC) one (5,000 image and 24,972 caption queries).

Only the package's public ``Metrics`` object is used (its ``coco_ids`` and the ground truths its
setters load); everything is read once per process and cached. Ground truths are returned as
plain ``{query id: positive ids}`` mappings of ints: turning them into gallery positions is the
evaluation's business (trainer/evaluation/annotated.py). data_shards/convert.py writes the COCO ids
into shards (`--coco-ids`); the evaluation ranks by them.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PACKAGE = "eccv-caption"
COCO_5K_IMAGES = 5000
COCO_5K_CAPTIONS_PER_IMAGE = 5


class AnnotationsUnavailableError(RuntimeError):
    """The eccv-caption package is not installed or its data is not what this module expects."""


@dataclass(frozen=True)
class GroundTruth:
    """Positives of both directions: image id -> caption ids (i2t), caption id -> image ids (t2i)."""

    name: str
    i2t: dict[int, tuple[int, ...]]
    t2i: dict[int, tuple[int, ...]]


@functools.lru_cache(maxsize=1)
def _metrics() -> Any:
    try:
        with warnings.catch_warnings():
            # The package warns at import when the optional ujson / tqdm are missing; json is fine.
            warnings.simplefilter("ignore")
            from eccv_caption import Metrics
            return Metrics()
    except ImportError as error:
        raise AnnotationsUnavailableError(
            f"the ECCV Caption / CxC protocols need the {PACKAGE} package (pip install {PACKAGE}): {error}"
        ) from None


def _as_int_mapping(raw: Any, what: str) -> dict[int, tuple[int, ...]]:
    if not isinstance(raw, dict) or not raw:
        raise AnnotationsUnavailableError(f"{PACKAGE}: {what} is not a non-empty mapping")
    return {int(key): tuple(int(v) for v in values) for key, values in raw.items()}


@functools.cache
def _ground_truth(attribute: str, name: str) -> GroundTruth:
    gts = getattr(_metrics(), attribute, None)
    if not isinstance(gts, dict) or "i2t" not in gts or "t2i" not in gts:
        raise AnnotationsUnavailableError(f"{PACKAGE}: Metrics().{attribute} lacks the i2t / t2i ground truths")
    return GroundTruth(name=name, i2t=_as_int_mapping(gts["i2t"], f"{attribute}['i2t']"),
                       t2i=_as_int_mapping(gts["t2i"], f"{attribute}['t2i']"))


def eccv_ground_truth() -> GroundTruth:
    """The ECCV Caption positives (machine- and human-verified, CxC included)."""
    return _ground_truth("eccv_gts", "ECCV Caption")


def cxc_ground_truth() -> GroundTruth:
    """The CrissCrossed Captions positives (the original COCO pairs plus CxC's)."""
    return _ground_truth("cxc_gts", "CxC")


@functools.lru_cache(maxsize=1)
def _coco_5k_ids() -> tuple[np.ndarray, np.ndarray]:
    metrics = _metrics()
    caption_ids = np.asarray(metrics.coco_ids, dtype=np.int64).reshape(-1)
    expected = COCO_5K_IMAGES * COCO_5K_CAPTIONS_PER_IMAGE
    if caption_ids.shape != (expected,):
        raise AnnotationsUnavailableError(f"{PACKAGE}: coco_ids has {caption_ids.size} ids, expected {expected}")
    caption_to_image = metrics.coco_gts["t2i"]
    try:
        owners = np.array([caption_to_image[int(c)][0] for c in caption_ids], dtype=np.int64)
    except (KeyError, IndexError) as error:
        raise AnnotationsUnavailableError(f"{PACKAGE}: caption id {error} of coco_ids has no COCO image") from None
    grouped = owners.reshape(COCO_5K_IMAGES, COCO_5K_CAPTIONS_PER_IMAGE)
    # The standard order is five consecutive captions per image; anything else would silently
    # misalign the ids with features converted in that order.
    if not (grouped == grouped[:, :1]).all() or np.unique(grouped[:, 0]).size != COCO_5K_IMAGES:
        raise AnnotationsUnavailableError(f"{PACKAGE}: coco_ids are not five consecutive captions per image")
    image_ids, caption_ids = grouped[:, 0].copy(), caption_ids.copy()
    image_ids.setflags(write=False)
    caption_ids.setflags(write=False)
    return image_ids, caption_ids


def coco_5k_test_ids() -> tuple[np.ndarray, np.ndarray]:
    """``(image_ids (5000,), caption_ids (25000,))`` of the COCO 5K test split in the standard
    order: image i owns captions 5i .. 5i+4 (read-only int64 arrays)."""
    return _coco_5k_ids()
