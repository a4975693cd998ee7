"""The COCO ids of the ranked items, what the annotated protocols (``eccv``, ``cxc``) locate their
positives by: :class:`GalleryIds` (checked, or the COCO 5K test split in its standard order from
data_shards/coco_annotations.py), and the rule for a gallery without ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from data_shards.coco_annotations import AnnotationsUnavailableError, coco_5k_test_ids
from trainer.evaluation.metrics import (
    CAPTIONS_PER_IMAGE,
    FOLD_PROTOCOL_MIN_IMAGES,
    EvaluationInputError,
)

def _id_array(values: Any, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise EvaluationInputError(f"{what}: expected a 1-D array of ids, got shape {array.shape}")
    if array.dtype.kind in "iu":
        return array.astype(np.int64, copy=False)
    if array.dtype.kind in "USO":  # shards store source ids as strings
        try:
            return np.array([int(str(v)) for v in array], dtype=np.int64)
        except ValueError as error:
            raise EvaluationInputError(f"{what}: COCO ids must be integers: {error}") from None
    raise EvaluationInputError(f"{what}: expected integer ids, got dtype {array.dtype}")


@dataclass(frozen=True, eq=False)  # arrays: compare with np.array_equal, not ==
class GalleryIds:
    """The COCO ids of the ranked items, in ranking order: image i owns captions 5i .. 5i+4.

    ``image_ids`` has N entries and ``caption_ids`` 5N (COCO annotation ids), all distinct.
    """

    image_ids: np.ndarray
    caption_ids: np.ndarray

    @classmethod
    def from_arrays(cls, image_ids: Any, caption_ids: Any | None = None, where: str = "ids") -> GalleryIds:
        """Checked ids; without ``caption_ids`` each image's five captions are taken to be its
        captions of the COCO 5K test split in the standard order (that of the SCAN / VSRN
        precomputed features and of Karpathy's split), which needs every image in that split."""
        images = _id_array(image_ids, f"{where}: image ids")
        if caption_ids is None:
            captions = _standard_caption_ids(images, where)
        else:
            captions = _id_array(caption_ids, f"{where}: caption ids")
        if captions.shape[0] != CAPTIONS_PER_IMAGE * images.shape[0]:
            raise EvaluationInputError(
                f"{where}: {images.shape[0]} image ids need {CAPTIONS_PER_IMAGE * images.shape[0]} caption ids, "
                f"got {captions.shape[0]}"
            )
        for what, array in (("image", images), ("caption", captions)):
            unique, counts = np.unique(array, return_counts=True)
            if unique.size != array.size:
                raise EvaluationInputError(f"{where}: {what} id {int(unique[counts > 1][0])} occurs more than once")
        return cls(images, captions)

    @classmethod
    def standard_coco_5k(cls) -> GalleryIds:
        """The COCO 5K test split in the standard order (the package's ``coco_test_ids.npy``)."""
        try:
            images, captions = coco_5k_test_ids()
        except AnnotationsUnavailableError as error:
            raise EvaluationInputError(str(error)) from None
        return cls(images, captions)


def _standard_caption_ids(image_ids: np.ndarray, where: str) -> np.ndarray:
    standard = GalleryIds.standard_coco_5k()
    rows = lookup_positions(standard.image_ids, image_ids)
    if (rows < 0).any():
        raise EvaluationInputError(
            f"{where}: image id {int(image_ids[rows < 0][0])} is not in the COCO 5K test split, so its "
            "caption ids cannot be inferred; give the caption ids too"
        )
    grouped = standard.caption_ids.reshape(-1, CAPTIONS_PER_IMAGE)
    return grouped[rows].reshape(-1)


def lookup_positions(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Position of each value in ``table`` (distinct ids), -1 where it is absent."""
    order = np.argsort(table, kind="stable")
    ordered = table[order]
    where = np.searchsorted(ordered, values).clip(max=max(table.size - 1, 0))
    found = (ordered[where] == values) if table.size else np.zeros(values.shape, dtype=bool)
    return np.where(found, order[where], -1)


def resolve_ids(ids: GalleryIds | None, num_images: int, protocol: str) -> GalleryIds:
    if ids is None:
        expected = FOLD_PROTOCOL_MIN_IMAGES  # the COCO 5K test split
        if num_images != expected:
            raise EvaluationInputError(
                f"protocol {protocol!r} ranks the COCO 5K test split by COCO ids: give the image and caption "
                "ids (an --embeddings file's 'image_ids' and 'caption_ids' arrays, or test shards converted "
                f"with --coco-ids), or the split itself in the standard order ({expected} images x "
                f"{CAPTIONS_PER_IMAGE * expected} captions); got N={num_images} images without ids"
            )
        return GalleryIds.standard_coco_5k()
    if ids.image_ids.shape[0] != num_images:
        raise EvaluationInputError(
            f"protocol {protocol!r}: {ids.image_ids.shape[0]} image ids for N={num_images} ranked images"
        )
    return ids
