"""Recall evaluation for image-text matching, as in VSRN (ICCV 2019) and VSE++.

The test sets pair every image with five captions: image ``i`` owns captions ``5i .. 5i+4``.
Given image and caption embeddings (or a precomputed similarity matrix ``sims[i, j] =
image_i . caption_j``), this module computes the retrieval ranks in both directions and the
recall metrics that papers report:

* image-to-text (i2t): each image queries all captions; its rank is the 0-based position of its
  best-placed own caption.
* text-to-image (t2i): each caption queries all images; its rank is the 0-based position of its
  image ``j // 5``.
* R@K (K = 1, 5, 10) is the percentage of ranks below K, ``medr = floor(median(ranks)) + 1``,
  ``meanr = mean(ranks) + 1``, and ``rsum`` is the sum of the six recalls.

Two protocols are supported: ``"all"`` ranks every image against every caption (the COCO 5K
test when given 5000 images, the Flickr30K 1K test), and ``"1k-5fold"`` splits the first 5000
images into five folds of 1000 (with their 5000 captions each), ranks each fold on its own and
averages the per-fold metrics (the COCO 1K result). An ensemble of models is evaluated by
averaging their similarity matrices before ranking.

Two more protocols rank the COCO 5K test split against extra annotated positives (from the
``eccv-caption`` package, data_shards/coco_annotations.py), located by the COCO ids of the images and
captions (:class:`GalleryIds`; without ids the standard 5K order is assumed): ``"eccv"`` gives
ECCV Caption's mAP@R, R-Precision and R@1 and ``"cxc"`` CrissCrossed Captions' R@1/5/10, in both
directions and in percent, equal to the package's own functions on the same rankings (see
"Annotated protocols" below for how and for the tie rule). :func:`evaluate_embeddings_protocols`
computes ``"all"``, ``"eccv"`` and ``"cxc"`` in one pass over the similarity blocks.

The metric definitions are the ones of the reference ``evaluation.py`` (``i2t``, ``t2i``,
``evalrank``); the ranking is vectorized instead of looping over queries in Python. One pass
computes (or slices) the similarity matrix in blocks of image rows, whose size follows a memory
budget; a query's rank is the number of candidates that score strictly higher than its positive,
counted along the rows for i2t and accumulated down the columns for t2i, so every matrix product
is computed once for both directions. The reference's printed summary of the 5-fold results
mislabels rsum and the average recalls; here each metric is computed and named for what it is.

Example::

    from trainer.evaluation import evaluate_embeddings, evaluate_embeddings_protocols, format_table

    results = {p: evaluate_embeddings([(images, captions)], p) for p in ("1k-5fold", "all")}
    print(format_table(results))
    # COCO 5K in the standard order (else pass ids=GalleryIds.from_arrays(image_ids, caption_ids))
    print(format_table(evaluate_embeddings_protocols([(images, captions)], ["all", "eccv", "cxc"])))
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

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

# Working memory for the blocks of similarity scores (beyond the inputs). 256 MiB keeps 5000 x
# 25000 evaluations far below the 4 GB bound while the blocks (about 900 image queries of 25000
# captions in float32) stay large enough for matrix products to run at full speed.
DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20

# Above this many candidates, counting with float32 sums of 0/1 values would stop being exact.
_MAX_EXACT_FLOAT32_COUNT = 2**24


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


# ----------------------------------------------------------------------------------------------
# Metrics from ranks


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


# ----------------------------------------------------------------------------------------------
# Input handling


def _member_names(names: Sequence[str] | None, count: int) -> list[str]:
    if names is None:
        return [f"model {index}" for index in range(count)]
    if len(names) != count:
        raise EvaluationInputError(f"got {len(names)} names for {count} inputs")
    return list(names)


def _to_tensor(value: Any, what: str) -> torch.Tensor:
    """A tensor view of ``value`` (no copy for tensors and numpy arrays), checked to be 2-D."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        array = np.asarray(value)
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise EvaluationInputError(f"{what}: expected a numeric array, got dtype {array.dtype}")
        with warnings.catch_warnings():
            # Read-only arrays (np.load with mmap, say) are fine: the tensor is never written.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            try:
                tensor = torch.from_numpy(array)
            except (TypeError, ValueError):
                # Negative strides, non-native byte order or a dtype torch lacks: copy into a
                # layout torch can share.
                tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")))
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise EvaluationInputError(f"{what}: expected a real-valued array, got dtype {tensor.dtype}")
    if tensor.ndim != 2:
        raise EvaluationInputError(
            f"{what}: expected a 2-D array, got {tensor.ndim}-D with shape {tuple(tensor.shape)}"
        )
    return tensor


def _compute_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    # float32 accumulation at least (half-precision embeddings are upcast, so products neither
    # round to fp16 nor create ties); float64 inputs keep their precision.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _resolve_device(device: DeviceLike | None, tensors: Sequence[torch.Tensor]) -> torch.device:
    if device is None:
        # Tensors already on an accelerator stay there; numpy arrays are evaluated on the CPU.
        resolved = tensors[0].device if tensors else torch.device("cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError as error:
            raise EvaluationInputError(f"invalid device {device!r}: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationInputError(f"device {str(resolved)!r} requested but CUDA is not available")
    return resolved


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    """Refuse NaN and infinite values.

    A NaN positive compares as "nothing scores higher" and would report a perfect rank, so
    non-finite inputs are refused instead of silently producing flattering metrics. A plain sum
    is several times cheaper than ``isfinite()`` over a whole block and is non-finite whenever
    any value is; only then is the exact check run, so a sum that merely overflowed does not
    reject valid values.
    """
    if not math.isfinite(float(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
        raise EvaluationInputError(f"{what} contains NaN or infinite values")


def _validate_protocol_name(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise EvaluationInputError(
            f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}"
        )


def validate_protocol(protocol: str, num_images: int, ids: GalleryIds | None = None) -> None:
    """Raise :class:`EvaluationInputError` if ``protocol`` cannot run on ``num_images`` images
    (for ``eccv`` and ``cxc``: with the COCO ids ``ids``, or without ids in the standard order)."""
    _validate_protocol_name(protocol)
    if protocol == PROTOCOL_1K_5FOLD and num_images < FOLD_PROTOCOL_MIN_IMAGES:
        raise EvaluationInputError(
            f"protocol {PROTOCOL_1K_5FOLD!r} needs at least {FOLD_PROTOCOL_MIN_IMAGES} images "
            f"({NUM_FOLDS} folds of {FOLD_IMAGES}), got N={num_images}"
        )
    if protocol in ANNOTATED_PROTOCOLS:
        _resolve_ids(ids, num_images, protocol)


# ----------------------------------------------------------------------------------------------
# COCO ids of the ranked items (the annotated protocols)


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
        from data_shards.coco_annotations import (
            AnnotationsUnavailableError,
            coco_5k_test_ids,
        )

        try:
            images, captions = coco_5k_test_ids()
        except AnnotationsUnavailableError as error:
            raise EvaluationInputError(str(error)) from None
        return cls(images, captions)


def _standard_caption_ids(image_ids: np.ndarray, where: str) -> np.ndarray:
    standard = GalleryIds.standard_coco_5k()
    rows = _lookup(standard.image_ids, image_ids)
    if (rows < 0).any():
        raise EvaluationInputError(
            f"{where}: image id {int(image_ids[rows < 0][0])} is not in the COCO 5K test split, so its "
            "caption ids cannot be inferred; give the caption ids too"
        )
    grouped = standard.caption_ids.reshape(-1, CAPTIONS_PER_IMAGE)
    return grouped[rows].reshape(-1)


def _lookup(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Position of each value in ``table`` (distinct ids), -1 where it is absent."""
    order = np.argsort(table, kind="stable")
    ordered = table[order]
    where = np.searchsorted(ordered, values).clip(max=max(table.size - 1, 0))
    found = (ordered[where] == values) if table.size else np.zeros(values.shape, dtype=bool)
    return np.where(found, order[where], -1)


def _resolve_ids(ids: GalleryIds | None, num_images: int, protocol: str) -> GalleryIds:
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


# ----------------------------------------------------------------------------------------------
# Similarity sources: where blocks of query scores come from


class _SimilaritySource:
    """Where similarity scores come from: blocks of image rows, and each caption's positive.

    Both the embeddings path and the precomputed-similarities path go through this interface,
    so the ranking code is shared (:func:`_all_ranks`).
    """

    num_images: int
    num_members: int
    dtype: torch.dtype
    device: torch.device

    @property
    def num_captions(self) -> int:
        return CAPTIONS_PER_IMAGE * self.num_images

    def image_query_scores(self, start: int, stop: int, out: torch.Tensor) -> None:
        """Write the scores of images ``start:stop`` against all captions into ``out``,
        shape ``(stop-start, 5N)``."""
        raise NotImplementedError

    def positive_scores(self) -> torch.Tensor:
        """Score of every caption j with its own image j // 5, shape ``(5N,)``."""
        raise NotImplementedError

    def pair_scores(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Scores of the pairs (``images[p]``, ``captions[p]``) (index tensors on the device),
        computed as :meth:`positive_scores` computes its pairs."""
        raise NotImplementedError

    def restrict(self, image_start: int, image_stop: int) -> _SimilaritySource:
        """The same source limited to images ``image_start:image_stop`` and their captions."""
        raise NotImplementedError


class _EmbeddingSimilarities(_SimilaritySource):
    """Scores as (averaged) products of image and caption embeddings, one block at a time."""

    def __init__(self, members: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.members = list(members)
        images, _ = self.members[0]
        self.num_images = images.shape[0]
        self.num_members = len(self.members)
        self.dtype = images.dtype
        self.device = images.device

    def image_query_scores(self, start: int, stop: int, out: torch.Tensor) -> None:
        images, captions = self.members[0]
        torch.mm(images[start:stop], captions.T, out=out)
        for images, captions in self.members[1:]:
            # Accumulated in place: an ensemble needs no block buffer per model.
            out.addmm_(images[start:stop], captions.T)
        if self.num_members > 1:
            out /= self.num_members

    def positive_scores(self) -> torch.Tensor:
        total = None
        for images, captions in self.members:
            # One (1 x D) @ (D x 5) product per image: N x 5 x D work, no (5N, D) temporary.
            grouped = captions.reshape(self.num_images, CAPTIONS_PER_IMAGE, -1)
            scores = torch.einsum("nd,nkd->nk", images, grouped).reshape(-1)
            total = scores if total is None else total.add_(scores)
        assert total is not None
        if self.num_members > 1:
            total /= self.num_members
        return total

    def pair_scores(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        total = None
        for image_embeddings, caption_embeddings in self.members:
            scores = (image_embeddings[images] * caption_embeddings[captions]).sum(dim=1)
            total = scores if total is None else total.add_(scores)
        assert total is not None
        if self.num_members > 1:
            total /= self.num_members
        return total

    def restrict(self, image_start: int, image_stop: int) -> _EmbeddingSimilarities:
        caption_start, caption_stop = (CAPTIONS_PER_IMAGE * image_start, CAPTIONS_PER_IMAGE * image_stop)
        return _EmbeddingSimilarities(
            [
                (images[image_start:image_stop], captions[caption_start:caption_stop])
                for images, captions in self.members
            ]
        )


class _PrecomputedSimilarities(_SimilaritySource):
    """Scores sliced from (N, 5N) similarity matrices, averaged over an ensemble.

    The matrices stay where they are (usually host memory); only one block of rows at a time is
    copied to the compute device and dtype, which bounds device memory as for embeddings.
    """

    def __init__(
        self,
        matrices: Sequence[torch.Tensor],
        labels: Sequence[str],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.matrices = list(matrices)
        self.labels = list(labels)
        self.num_images = self.matrices[0].shape[0]
        self.num_members = len(self.matrices)
        self.dtype = dtype
        self.device = device

    def _average(self, take: Callable[[torch.Tensor], torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        # The same element-wise operations, in the same order, for blocks and for positives, so
        # that a caption's positive equals its entry in the block bit for bit.
        out.copy_(take(self.matrices[0]))
        _check_finite(out, f"{self.labels[0]}: similarity matrix")
        for label, matrix in zip(self.labels[1:], self.matrices[1:]):
            part = take(matrix).to(self.device, self.dtype)
            _check_finite(part, f"{label}: similarity matrix")
            out += part
        if self.num_members > 1:
            out /= self.num_members
        return out

    def image_query_scores(self, start: int, stop: int, out: torch.Tensor) -> None:
        self._average(lambda sims: sims[start:stop], out)

    def positive_scores(self) -> torch.Tensor:
        captions = torch.arange(self.num_captions)
        images = captions // CAPTIONS_PER_IMAGE
        out = torch.empty(self.num_captions, dtype=self.dtype, device=self.device)
        return self._average(lambda sims: sims[images.to(sims.device), captions.to(sims.device)], out)

    def pair_scores(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        out = torch.empty(images.shape[0], dtype=self.dtype, device=self.device)
        return self._average(lambda sims: sims[images.to(sims.device), captions.to(sims.device)], out)

    def restrict(self, image_start: int, image_stop: int) -> _PrecomputedSimilarities:
        caption_start, caption_stop = (CAPTIONS_PER_IMAGE * image_start, CAPTIONS_PER_IMAGE * image_stop)
        return _PrecomputedSimilarities(
            [sims[image_start:image_stop, caption_start:caption_stop] for sims in self.matrices],
            self.labels,
            self.dtype,
            self.device,
        )


def _embedding_source(
    models: Sequence[tuple[ArrayLike, ArrayLike]],
    device: DeviceLike | None,
    names: Sequence[str] | None,
) -> _EmbeddingSimilarities:
    if len(models) == 0:
        raise EvaluationInputError("no models given: expected at least one (images, captions) pair")
    labels = _member_names(names, len(models))
    members: list[tuple[torch.Tensor, torch.Tensor]] = []
    for label, model in zip(labels, models):
        if not isinstance(model, (tuple, list)) or len(model) != 2:
            raise EvaluationInputError(f"{label}: expected an (images, captions) pair")
        images = _to_tensor(model[0], f"{label}: images")
        captions = _to_tensor(model[1], f"{label}: captions")
        num_images, image_dim = images.shape
        if num_images == 0:
            raise EvaluationInputError(f"{label}: images is empty, shape {tuple(images.shape)}")
        if captions.shape[0] != CAPTIONS_PER_IMAGE * num_images:
            raise EvaluationInputError(
                f"{label}: captions must have {CAPTIONS_PER_IMAGE} x images rows: images has shape "
                f"{tuple(images.shape)}, so {CAPTIONS_PER_IMAGE * num_images} captions are "
                f"expected, but captions has shape {tuple(captions.shape)}"
            )
        if captions.shape[1] != image_dim:
            raise EvaluationInputError(
                f"{label}: images and captions must have the same dimension D: images has shape "
                f"{tuple(images.shape)}, captions has shape {tuple(captions.shape)}"
            )
        members.append((images, captions))

    first_label, (first_images, _) = labels[0], members[0]
    for label, (images, _) in zip(labels[1:], members[1:]):
        # The ensemble averages similarity matrices, which needs the same N. The same D is
        # required too: ensemble members are meant to be models of one architecture, and a
        # differing D almost always means a wrong file was passed.
        if images.shape != first_images.shape:
            what = "number of images N" if images.shape[0] != first_images.shape[0] else "dimension D"
            raise EvaluationInputError(
                f"ensemble members differ in {what}: {first_label} images have shape "
                f"{tuple(first_images.shape)}, {label} images have shape {tuple(images.shape)}"
            )

    all_tensors = [t for pair in members for t in pair]
    resolved_device = _resolve_device(device, all_tensors)
    dtype = _compute_dtype(all_tensors)
    moved = []
    for label, (images, captions) in zip(labels, members):
        # A no-op (no copy) for float32 CPU inputs evaluated on the CPU.
        images = images.to(resolved_device, dtype)
        captions = captions.to(resolved_device, dtype)
        _check_finite(images, f"{label}: images")
        _check_finite(captions, f"{label}: captions")
        moved.append((images, captions))
    return _EmbeddingSimilarities(moved)


def _similarity_source(
    sims_list: Sequence[ArrayLike],
    device: DeviceLike | None,
    names: Sequence[str] | None,
) -> _PrecomputedSimilarities:
    if len(sims_list) == 0:
        raise EvaluationInputError("no similarity matrices given: expected at least one")
    labels = _member_names(names, len(sims_list))
    matrices = [_to_tensor(sims, f"{label}: similarity matrix") for label, sims in zip(labels, sims_list)]
    for label, sims in zip(labels, matrices):
        num_images, num_captions = sims.shape
        if num_images == 0 or num_captions != CAPTIONS_PER_IMAGE * num_images:
            raise EvaluationInputError(
                f"{label}: similarity matrix must have shape (N, {CAPTIONS_PER_IMAGE}N) with N >= 1 "
                f"(images x captions), got {tuple(sims.shape)}"
            )
    for label, sims in zip(labels[1:], matrices[1:]):
        if sims.shape != matrices[0].shape:
            raise EvaluationInputError(
                f"ensemble members differ in shape: {labels[0]} similarity matrix has shape "
                f"{tuple(matrices[0].shape)}, {label} has shape {tuple(sims.shape)}"
            )
    return _PrecomputedSimilarities(
        matrices, labels, _compute_dtype(matrices), _resolve_device(device, matrices)
    )


# ----------------------------------------------------------------------------------------------
# Ranking


@contextlib.contextmanager
def full_float32_matmul() -> Iterator[None]:
    """Full-precision float32 matrix products inside the block, whatever the process allows.

    A trainer may let float32 matmuls run as TF32 (CUDA) or bf16 (oneDNN on CPU) to train
    faster; those round the inputs to 10 or 7 mantissa bits, enough to reorder close scores and
    change ranks. The setting is process-wide, so it is switched for the evaluation and restored
    afterwards (which also means it is not thread-safe against a concurrent training step).
    """
    backends = [
        backend
        for backend in (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
        if hasattr(backend, "fp32_precision")
    ]
    if backends:  # torch >= 2.9: per-backend settings; restoring them restores the exact state
        saved = [backend.fp32_precision for backend in backends]
        for backend in backends:
            backend.fp32_precision = "ieee"
        try:
            yield
        finally:
            for backend, value in zip(backends, saved):
                backend.fp32_precision = value
    else:
        saved_precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(saved_precision)



def choose_block_size(
    num_candidates: int,
    dtype: torch.dtype = torch.float32,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    buffers: int = 3,
) -> int:
    """How many image queries to score at once so that the working set fits the budget.

    Per query the working set holds its scores against all candidates, the same again for the
    comparison results, and room for one transient of that size (an ensemble member's product,
    or a converted slice of a similarity matrix): ``buffers`` = 3 rows of scores per query.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    bytes_per_query = num_candidates * buffers * itemsize
    return max(1, int(memory_budget_bytes // bytes_per_query))


def _all_ranks(
    source: _SimilaritySource,
    block_size: int | None,
    memory_budget_bytes: int,
    observers: Sequence[_BlockObserver] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """0-based i2t ranks (one per image) and t2i ranks (one per caption) of ``source``.

    One pass over blocks of image rows of the similarity matrix serves both directions, so the
    (dominant) matrix products are computed once:

    * i2t: image i's rank is the number of captions scoring strictly higher than the best of its
      own captions 5i .. 5i+4, counted along the block's row.
    * t2i: caption j's rank is the number of other images scoring strictly higher on it than its
      own image j // 5 does; each block adds its images' votes to the column counts.

    Tie convention: "strictly higher". With distinct scores this is exactly the reference's rank,
    the position of the first positive in ``argsort`` of descending scores: every candidate
    before it scores higher, and for i2t the best-placed of the five captions is the
    highest-scoring one, so the minimum position over the five equals the count above their
    maximum. With ties, the reference's position depends on numpy's unstable argsort; counting
    strictly higher scores resolves ties in the query's favour, deterministically.

    The t2i positives are taken from :meth:`_SimilaritySource.positive_scores` before the pass.
    For similarity matrices they are the matrix entries themselves. For embeddings they are
    per-image dot products, which can differ from the same entry of the block's matrix product
    in the last bit; the caption's own image is therefore never counted against itself, and only
    another image scoring within float rounding of the positive could be counted either way, as
    in any floating-point implementation (the reference's numpy loop included).

    ``observers`` see every block of scores before it is overwritten (the annotated protocols
    collect their top scores from it), so that they cost no matrix product of their own.
    """
    num_images, num_captions = source.num_images, source.num_captions
    device, dtype = source.device, source.dtype
    if block_size is None:
        # Observers hold about one more block (top-k and gathered copies) besides the three.
        block_size = choose_block_size(num_captions, dtype, memory_budget_bytes, 4 if observers else 3)
    elif block_size < 1:
        raise EvaluationInputError(f"block_size must be >= 1, got {block_size}")
    block_size = min(block_size, num_images)

    positives = source.positive_scores()
    _check_finite(positives, "positive similarity scores")
    # Sums of 0/1 values are exact in float32 below 2**24 terms, and float sums of a comparison
    # written in place run several times faster than bool masks with integer sums.
    exact = max(block_size, num_captions) < _MAX_EXACT_FLOAT32_COUNT or dtype == torch.float64
    count_dtype = dtype if exact else torch.float64

    # Two block buffers, reused: the scores, then the t2i comparison (the i2t comparison
    # overwrites the scores in place once they are no longer needed).
    scores_buffer = torch.empty((block_size, num_captions), dtype=dtype, device=device)
    above_buffer = torch.empty_like(scores_buffer)
    caption_offsets = torch.arange(CAPTIONS_PER_IMAGE, device=device)
    i2t = torch.empty(num_images, dtype=torch.int64, device=device)
    t2i = torch.zeros(num_captions, dtype=torch.int64, device=device)

    for start in range(0, num_images, block_size):
        stop = min(start + block_size, num_images)
        scores, above = scores_buffer[: stop - start], above_buffer[: stop - start]
        source.image_query_scores(start, stop, out=scores)
        # Checked per block, not only on the inputs: products of finite embeddings can overflow.
        _check_finite(scores, f"similarity scores of images {start}:{stop}")
        for observer in observers:
            observer.observe(start, stop, scores)

        own_columns = CAPTIONS_PER_IMAGE * torch.arange(start, stop, device=device)[:, None] + caption_offsets
        own_scores = scores.gather(1, own_columns)  # (B, 5): each image with its own captions

        # t2i: count the images of this block that beat each caption's own image...
        torch.gt(scores, positives[None, :], out=above)
        t2i += above.sum(dim=0, dtype=count_dtype).to(torch.int64)
        # ...except the caption's own image, which is in this block for captions 5start:5stop.
        own_captions = slice(CAPTIONS_PER_IMAGE * start, CAPTIONS_PER_IMAGE * stop)
        t2i[own_captions] -= (own_scores.reshape(-1) > positives[own_captions]).to(torch.int64)

        # i2t: count the captions that beat the image's best own caption.
        best_own = own_scores.amax(dim=1, keepdim=True)
        i2t[start:stop] = scores.gt_(best_own).sum(dim=1, dtype=count_dtype).to(torch.int64)

    return i2t.cpu().numpy(), t2i.cpu().numpy()


def i2t_ranks(
    sims: ArrayLike,
    *,
    device: DeviceLike | None = None,
    block_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> np.ndarray:
    """0-based image-to-text rank of every image, from an (N, 5N) similarity matrix.

    Rank of image i = number of captions scoring strictly higher than the best of its own five
    captions ``5i .. 5i+4`` (see :func:`_all_ranks` for the tie convention).
    """
    return similarity_ranks(
        [sims], device=device, block_size=block_size, memory_budget_bytes=memory_budget_bytes, names=["sims"]
    )[0]


def t2i_ranks(
    sims: ArrayLike,
    *,
    device: DeviceLike | None = None,
    block_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> np.ndarray:
    """0-based text-to-image rank of every caption, from an (N, 5N) similarity matrix.

    Rank of caption j = number of images scoring strictly higher on it than its image ``j // 5``.
    """
    return similarity_ranks(
        [sims], device=device, block_size=block_size, memory_budget_bytes=memory_budget_bytes, names=["sims"]
    )[1]


def embedding_ranks(
    models: Sequence[tuple[ArrayLike, ArrayLike]],
    *,
    device: DeviceLike | None = None,
    block_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """0-based ``(i2t, t2i)`` ranks over all images and captions of a model or an ensemble.

    The ranks of the ``"all"`` protocol (per image, per caption), for analyses beyond the
    summary metrics; arguments as for :func:`evaluate_embeddings`.
    """
    with torch.inference_mode(), full_float32_matmul():
        return _all_ranks(_embedding_source(models, device, names), block_size, memory_budget_bytes)


def similarity_ranks(
    sims_list: Sequence[ArrayLike],
    *,
    device: DeviceLike | None = None,
    block_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """0-based ``(i2t, t2i)`` ranks from (N, 5N) similarity matrices, averaged if several."""
    with torch.inference_mode(), full_float32_matmul():
        return _all_ranks(_similarity_source(sims_list, device, names), block_size, memory_budget_bytes)


# ----------------------------------------------------------------------------------------------
# Annotated protocols: ECCV Caption (mAP@R, R-Precision, R@1) and CxC (R@K)
#
# Both give a query several positives (annotated by ids) instead of the five captions / one
# image of the recall protocols. Every metric needs only the positions of a query's positives
# among the first K candidates (mAP@R and R-Precision: K = R, the number of positives; R@K: K),
# so the block pass collects, per query, its K highest scores and its positives' scores, and
# the positions follow without sorting any full ranking:
#
#   position of the k-th best positive (0-based) = k + #(candidates scoring strictly higher
#   that are not positives) = k + #(top-K scores > s_k) - #(positives > s_k),
#
# exact whenever it is below K (if K or more candidates score higher, the position is >= K and
# counts for nothing). Tie rule: a positive is placed before every non-positive with the same
# score (the "strictly higher" rule of the recall protocols, in the query's favour); ties among
# positives do not change which positions they occupy. It equals ranking each query's
# candidates by a stable sort on (score descending, positives first) and handing the lists to
# the eccv-caption package (tests/trainer/test_evaluation_eccv_cxc.py checks exactly that).
#
# CxC's caption queries need only their best positive's rank (R@K), which is counted instead,
# one comparison per block as the "all" protocol counts t2i ranks (_CaptionQueryBestPositive).


class _BlockObserver:
    """Sees each block of image-query scores of :func:`_all_ranks` (and must not modify it)."""

    def observe(self, start: int, stop: int, scores: torch.Tensor) -> None:
        raise NotImplementedError


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
    query_index = _lookup(query_ids, keys)
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
    gallery = _lookup(candidate_ids, flat)
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


class _ImageQueryTopK(_QueryTopK, _BlockObserver):
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


class _CaptionQueryTopK(_QueryTopK, _BlockObserver):
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


class _CaptionQueryBestPositive(_BlockObserver):
    """t2i for R@K only (CxC): a query's rank is that of its best positive, the number of
    non-positive images scoring strictly higher than it, counted down the columns block by block
    as the recall protocols count t2i ranks (one comparison per block instead of a top K).

    The best positive's score is taken before the pass from the pairs' own scores
    (:meth:`_SimilaritySource.pair_scores`), and every positive is excluded from the count by
    its block entry, so that a positive is never counted against the query: as for the ``all``
    protocol's t2i ranks, only a non-positive within float rounding of the best positive could
    count either way (for similarity matrices the scores are the entries themselves).
    """

    def __init__(self, relevance: _Relevance, source: _SimilaritySource) -> None:
        self.relevance = relevance
        device, dtype = source.device, source.dtype
        query_of, slot_of = np.nonzero(relevance.positives >= 0)
        images = torch.as_tensor(relevance.positives[query_of, slot_of], device=device)
        columns = torch.as_tensor(relevance.queries[query_of], device=device)
        pair_scores = source.pair_scores(images, columns)
        _check_finite(pair_scores, "positive similarity scores")
        num_queries = relevance.queries.size
        best = torch.full((num_queries,), -math.inf, dtype=dtype, device=device)
        best.scatter_reduce_(0, torch.as_tensor(query_of, device=device), pair_scores, reduce="amax")
        # Thresholds per caption column; columns that are not queries count nothing (+inf).
        self.threshold = torch.full((source.num_captions,), math.inf, dtype=dtype, device=device)
        self.columns = torch.as_tensor(relevance.queries, device=device)
        self.threshold[self.columns] = best
        self.counts = torch.zeros(source.num_captions, dtype=torch.int64, device=device)
        self.count_dtype = dtype if source.num_images < _MAX_EXACT_FLOAT32_COUNT else torch.float64
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
    from data_shards.coco_annotations import (
        AnnotationsUnavailableError,
        cxc_ground_truth,
        eccv_ground_truth,
    )

    try:
        return eccv_ground_truth() if protocol == PROTOCOL_ECCV else cxc_ground_truth()
    except AnnotationsUnavailableError as error:
        raise EvaluationInputError(str(error)) from None


class _AnnotatedProtocol:
    """The collectors of one annotated protocol (both directions) and its metrics."""

    def __init__(self, protocol: str, source: _SimilaritySource, ids: GalleryIds) -> None:
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
    def observers(self) -> tuple[_BlockObserver, ...]:
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


# ----------------------------------------------------------------------------------------------
# Protocols


def _metrics_of(source: _SimilaritySource, block_size: int | None, memory_budget_bytes: int) -> RecallMetrics:
    return metrics_from_ranks(*_all_ranks(source, block_size, memory_budget_bytes))


def _evaluate_source(
    source: _SimilaritySource,
    protocols: Sequence[str],
    ids: GalleryIds | None,
    block_size: int | None,
    memory_budget_bytes: int,
) -> dict[str, dict[str, Any]]:
    """Every protocol of ``protocols`` on ``source``: ``all``, ``eccv`` and ``cxc`` share one
    pass over the similarity blocks; ``1k-5fold`` ranks its folds separately."""
    protocols = list(dict.fromkeys(protocols))
    for protocol in protocols:
        validate_protocol(protocol, source.num_images, ids)
    results: dict[str, dict[str, Any]] = {}
    shared = [p for p in protocols if p != PROTOCOL_1K_5FOLD]
    if shared:
        started = time.perf_counter()
        annotated = [
            _AnnotatedProtocol(p, source, _resolve_ids(ids, source.num_images, p))
            for p in shared if p in ANNOTATED_PROTOCOLS
        ]
        observers = [observer for protocol in annotated for observer in protocol.observers]
        ranks = _all_ranks(source, block_size, memory_budget_bytes, observers)
        if PROTOCOL_ALL in shared:
            results[PROTOCOL_ALL] = metrics_from_ranks(*ranks).to_dict()
        for protocol in annotated:
            results[protocol.protocol] = protocol.metrics()
        _log_results(source, shared, results, time.perf_counter() - started)
    if PROTOCOL_1K_5FOLD in protocols:
        started = time.perf_counter()
        if source.num_images > FOLD_PROTOCOL_MIN_IMAGES:
            logger.warning(
                "protocol %s uses the first %d of %d images; the others are ignored",
                PROTOCOL_1K_5FOLD, FOLD_PROTOCOL_MIN_IMAGES, source.num_images,
            )
        folds = [
            _metrics_of(source.restrict(k * FOLD_IMAGES, (k + 1) * FOLD_IMAGES), block_size, memory_budget_bytes)
            for k in range(NUM_FOLDS)
        ]
        result = RecallMetrics.mean(folds).to_dict()
        result["folds"] = [fold.to_dict() for fold in folds]
        results[PROTOCOL_1K_5FOLD] = result
        _log_results(source, [PROTOCOL_1K_5FOLD], results, time.perf_counter() - started)
    return {protocol: results[protocol] for protocol in protocols}


def _log_results(source: _SimilaritySource, protocols: Sequence[str], results: dict[str, dict[str, Any]],
                 elapsed: float) -> None:
    summary = ", ".join(
        f"{p}: " + (f"rsum {results[p]['rsum']:.2f}" if "rsum" in results[p]
                    else " ".join(f"{k} {v:.2f}" for k, v in results[p].items()))
        for p in protocols
    )
    logger.info(
        "protocol(s) %s: %d images, %d captions, %d model(s), %s on %s: %s in %.2f s",
        "+".join(protocols), source.num_images, source.num_captions, source.num_members, source.dtype,
        source.device, summary, elapsed,
    )


def evaluate_embeddings(
    models: Sequence[tuple[ArrayLike, ArrayLike]],
    protocol: str,
    *,
    device: DeviceLike | None = None,
    block_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    names: Sequence[str] | None = None,
    ids: GalleryIds | None = None,
) -> dict[str, Any]:
    """Recall metrics of one model, or of an ensemble, from embeddings.

    Args:
        models: one ``(images (N, D), captions (5N, D))`` pair per model; two or more pairs form
            an ensemble whose similarity matrices are averaged before ranking. Embeddings are
            expected l2-normalized: the dot product is the similarity.
        protocol: ``"1k-5fold"`` (needs N >= 5000), ``"all"``, or the annotated ``"eccv"`` and
            ``"cxc"`` (the COCO 5K test split, see ``ids``).
        device: where to compute; defaults to the device of the first tensor (CPU for numpy).
        block_size: queries per block; by default chosen from ``memory_budget_bytes``.
        memory_budget_bytes: working memory for the blocks of scores (beyond the inputs).
        names: labels of the models used in error messages (file names, say).
        ids: the COCO ids of the images and captions, for ``eccv`` and ``cxc``; without them
            the inputs must be the COCO 5K test split in the standard order (N = 5000).

    Returns:
        The metrics as a dict with the keys of :class:`RecallMetrics`; for ``"1k-5fold"`` the
        field-wise mean over the folds plus ``"folds"``, the list of the five per-fold dicts;
        for ``"eccv"`` the keys :data:`ECCV_KEYS`, for ``"cxc"`` :data:`CXC_KEYS`.
    """
    return evaluate_embeddings_protocols(
        models, [protocol], device=device, block_size=block_size,
        memory_budget_bytes=memory_budget_bytes, names=names, ids=ids,
    )[protocol]


def evaluate_embeddings_protocols(
    models: Sequence[tuple[ArrayLike, ArrayLike]],
    protocols: Sequence[str],
    *,
    device: DeviceLike | None = None,
    block_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    names: Sequence[str] | None = None,
    ids: GalleryIds | None = None,
) -> dict[str, dict[str, Any]]:
    """Several protocols at once, keyed by protocol (arguments as for :func:`evaluate_embeddings`):
    ``all``, ``eccv`` and ``cxc`` share one pass of matrix products."""
    for protocol in protocols:
        _validate_protocol_name(protocol)
    with torch.inference_mode(), full_float32_matmul():
        source = _embedding_source(models, device, names)
        return _evaluate_source(source, protocols, ids, block_size, memory_budget_bytes)


def evaluate_similarities(
    sims_list: Sequence[ArrayLike],
    protocol: str,
    *,
    device: DeviceLike | None = None,
    block_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    names: Sequence[str] | None = None,
    ids: GalleryIds | None = None,
) -> dict[str, Any]:
    """Recall metrics from precomputed (N, 5N) similarity matrices, averaged if several.

    Same protocols and result as :func:`evaluate_embeddings`; ``sims[i, j]`` scores image i
    against caption j.
    """
    return evaluate_similarities_protocols(
        sims_list, [protocol], device=device, block_size=block_size,
        memory_budget_bytes=memory_budget_bytes, names=names, ids=ids,
    )[protocol]


def evaluate_similarities_protocols(
    sims_list: Sequence[ArrayLike],
    protocols: Sequence[str],
    *,
    device: DeviceLike | None = None,
    block_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    names: Sequence[str] | None = None,
    ids: GalleryIds | None = None,
) -> dict[str, dict[str, Any]]:
    """Several protocols at once from similarity matrices (see :func:`evaluate_embeddings_protocols`)."""
    for protocol in protocols:
        _validate_protocol_name(protocol)
    with torch.inference_mode(), full_float32_matmul():
        source = _similarity_source(sims_list, device, names)
        return _evaluate_source(source, protocols, ids, block_size, memory_budget_bytes)


# ----------------------------------------------------------------------------------------------
# Reporting

_TABLE_COLUMNS = (
    ("R@1", "r1", "{:6.2f}"),
    ("R@5", "r5", "{:6.2f}"),
    ("R@10", "r10", "{:6.2f}"),
    ("medr", "medr", "{:7.1f}"),
    ("meanr", "meanr", "{:8.2f}"),
)


def _table_row(label: str, metrics: dict[str, Any], label_width: int) -> str:
    cells = []
    for direction in ("i2t", "t2i"):
        cells.append(" ".join(fmt.format(metrics[f"{direction}_{key}"]) for _, key, fmt in _TABLE_COLUMNS))
    return f"{label:<{label_width}} | {cells[0]} | {cells[1]} | {metrics['rsum']:7.2f}"


_ECCV_COLUMNS = (("mAP@R", "map_at_r"), ("R-P", "rprecision"), ("R@1", "r1"))


def _is_recall_row(metrics: dict[str, Any]) -> bool:
    return all(key in metrics for key in METRIC_KEYS)


def _annotated_table(rows: list[tuple[str, dict[str, Any]]], columns: Sequence[tuple[str, str]],
                     label_width: int, title: str) -> list[str]:
    cell = "{:6.2f}"
    headers = " ".join(f"{name:>6}" for name, _ in columns)
    width = len(headers)
    lines = [
        f"{'':<{label_width}} | {'image-to-text':^{width}} | {'text-to-image':^{width}} |",
        f"{title:<{label_width}} | {headers} | {headers} |",
    ]
    lines.append("-" * len(lines[1]))
    for label, metrics in rows:
        cells = [" ".join(cell.format(metrics[f"{d}_{key}"]) for _, key in columns) for d in ("i2t", "t2i")]
        lines.append(f"{label:<{label_width}} | {cells[0]} | {cells[1]} |")
    return lines


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A readable text table of results keyed by protocol (or any row label); ``1k-5fold`` also
    lists its folds. Rows of ECCV Caption metrics (mAP@R, R-Precision, R@1) and of CxC recalls
    (R@1/5/10 only) follow in tables of their own, recognised by their keys."""
    recall_rows = {label: m for label, m in results.items() if _is_recall_row(m)}
    eccv_rows = [(label, m) for label, m in results.items() if "i2t_map_at_r" in m]
    cxc_rows = [(label, m) for label, m in results.items()
                if label not in recall_rows and "i2t_map_at_r" not in m and "i2t_r10" in m]
    labels = list(results)
    for protocol, metrics in recall_rows.items():
        labels += [f"  fold {k}" for k in range(len(metrics.get("folds", [])))]
    label_width = max([len("protocol")] + [len(label) for label in labels])
    lines: list[str] = []
    if recall_rows:
        widths = [len(fmt.format(0.0)) for _, _, fmt in _TABLE_COLUMNS]
        headers = " ".join(f"{name:>{width}}" for (name, _, _), width in zip(_TABLE_COLUMNS, widths))
        block_width = len(headers)
        lines += [
            f"{'':<{label_width}} | {'image-to-text':^{block_width}} | {'text-to-image':^{block_width}} |",
            f"{'protocol':<{label_width}} | {headers} | {headers} | {'rsum':>7}",
        ]
        lines.append("-" * len(lines[1]))
        for protocol, metrics in recall_rows.items():
            lines.append(_table_row(protocol, metrics, label_width))
            for k, fold in enumerate(metrics.get("folds", [])):
                lines.append(_table_row(f"  fold {k}", fold, label_width))
    if cxc_rows:
        if lines:
            lines.append("")
        lines += _annotated_table(cxc_rows, [(f"R@{k}", f"r{k}") for k in RECALL_KS], label_width, "CxC")
    if eccv_rows:
        if lines:
            lines.append("")
        lines += _annotated_table(eccv_rows, _ECCV_COLUMNS, label_width, "ECCV")
    return "\n".join(lines)


def set_tf32(enabled: bool) -> None:
    """The one TF32 switch of evaluation and encoding: cuDNN runs fp32 GRUs in TF32 by default,
    which moved tiny-model embeddings by ~7e-5 on an H200 (seen), enough to move recalls; metrics
    and embeddings meant to reproduce the reference's are computed in full fp32 (enabled=False)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
