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

The metric definitions are the ones of the reference ``evaluation.py`` (``i2t``, ``t2i``,
``evalrank``); the ranking is vectorized instead of looping over queries in Python. One pass
computes (or slices) the similarity matrix in blocks of image rows, whose size follows a memory
budget; a query's rank is the number of candidates that score strictly higher than its positive,
counted along the rows for i2t and accumulated down the columns for t2i, so every matrix product
is computed once for both directions. The reference's printed summary of the 5-fold results
mislabels rsum and the average recalls; here each metric is computed and named for what it is.

Example::

    from trainer.evaluation import evaluate_embeddings, format_table

    results = {p: evaluate_embeddings([(images, captions)], p) for p in ("1k-5fold", "all")}
    print(format_table(results))
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

ArrayLike = Union[torch.Tensor, np.ndarray]
DeviceLike = Union[str, torch.device]

CAPTIONS_PER_IMAGE = 5
RECALL_KS = (1, 5, 10)

PROTOCOL_1K_5FOLD = "1k-5fold"
PROTOCOL_ALL = "all"
PROTOCOLS = (PROTOCOL_1K_5FOLD, PROTOCOL_ALL)
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


def validate_protocol(protocol: str, num_images: int) -> None:
    """Raise :class:`EvaluationInputError` if ``protocol`` cannot run on ``num_images`` images."""
    _validate_protocol_name(protocol)
    if protocol == PROTOCOL_1K_5FOLD and num_images < FOLD_PROTOCOL_MIN_IMAGES:
        raise EvaluationInputError(
            f"protocol {PROTOCOL_1K_5FOLD!r} needs at least {FOLD_PROTOCOL_MIN_IMAGES} images "
            f"({NUM_FOLDS} folds of {FOLD_IMAGES}), got N={num_images}"
        )


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
def _ieee_float32_matmul() -> Iterator[None]:
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
) -> int:
    """How many image queries to score at once so that the working set fits the budget.

    Per query the working set holds its scores against all candidates, the same again for the
    comparison results, and room for one transient of that size (an ensemble member's product,
    or a converted slice of a similarity matrix).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    bytes_per_query = num_candidates * 3 * itemsize
    return max(1, int(memory_budget_bytes // bytes_per_query))


def _all_ranks(
    source: _SimilaritySource,
    block_size: int | None,
    memory_budget_bytes: int,
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
    """
    num_images, num_captions = source.num_images, source.num_captions
    device, dtype = source.device, source.dtype
    if block_size is None:
        block_size = choose_block_size(num_captions, dtype, memory_budget_bytes)
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
    with torch.inference_mode(), _ieee_float32_matmul():
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
    with torch.inference_mode(), _ieee_float32_matmul():
        return _all_ranks(_similarity_source(sims_list, device, names), block_size, memory_budget_bytes)


# ----------------------------------------------------------------------------------------------
# Protocols


def _metrics_of(source: _SimilaritySource, block_size: int | None, memory_budget_bytes: int) -> RecallMetrics:
    return metrics_from_ranks(*_all_ranks(source, block_size, memory_budget_bytes))


def _evaluate_source(
    source: _SimilaritySource,
    protocol: str,
    block_size: int | None,
    memory_budget_bytes: int,
) -> dict[str, Any]:
    validate_protocol(protocol, source.num_images)
    started = time.perf_counter()
    if protocol == PROTOCOL_ALL:
        result: dict[str, Any] = _metrics_of(source, block_size, memory_budget_bytes).to_dict()
    else:
        if source.num_images > FOLD_PROTOCOL_MIN_IMAGES:
            logger.warning(
                "protocol %s uses the first %d of %d images; the others are ignored",
                protocol, FOLD_PROTOCOL_MIN_IMAGES, source.num_images,
            )
        folds = [
            _metrics_of(source.restrict(k * FOLD_IMAGES, (k + 1) * FOLD_IMAGES), block_size, memory_budget_bytes)
            for k in range(NUM_FOLDS)
        ]
        result = RecallMetrics.mean(folds).to_dict()
        result["folds"] = [fold.to_dict() for fold in folds]
    logger.info(
        "protocol %s: %d images, %d captions, %d model(s), %s on %s: rsum %.2f in %.2f s",
        protocol, source.num_images, source.num_captions, source.num_members, source.dtype,
        source.device, result["rsum"], time.perf_counter() - started,
    )
    return result


def evaluate_embeddings(
    models: Sequence[tuple[ArrayLike, ArrayLike]],
    protocol: str,
    *,
    device: DeviceLike | None = None,
    block_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Recall metrics of one model, or of an ensemble, from embeddings.

    Args:
        models: one ``(images (N, D), captions (5N, D))`` pair per model; two or more pairs form
            an ensemble whose similarity matrices are averaged before ranking. Embeddings are
            expected l2-normalized: the dot product is the similarity.
        protocol: ``"1k-5fold"`` (needs N >= 5000) or ``"all"``.
        device: where to compute; defaults to the device of the first tensor (CPU for numpy).
        block_size: queries per block; by default chosen from ``memory_budget_bytes``.
        memory_budget_bytes: working memory for the blocks of scores (beyond the inputs).
        names: labels of the models used in error messages (file names, say).

    Returns:
        The metrics as a dict with the keys of :class:`RecallMetrics`; for ``"1k-5fold"`` the
        field-wise mean over the folds plus ``"folds"``, the list of the five per-fold dicts.
    """
    _validate_protocol_name(protocol)
    with torch.inference_mode(), _ieee_float32_matmul():
        source = _embedding_source(models, device, names)
        return _evaluate_source(source, protocol, block_size, memory_budget_bytes)


def evaluate_similarities(
    sims_list: Sequence[ArrayLike],
    protocol: str,
    *,
    device: DeviceLike | None = None,
    block_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Recall metrics from precomputed (N, 5N) similarity matrices, averaged if several.

    Same protocols and result as :func:`evaluate_embeddings`; ``sims[i, j]`` scores image i
    against caption j.
    """
    _validate_protocol_name(protocol)
    with torch.inference_mode(), _ieee_float32_matmul():
        source = _similarity_source(sims_list, device, names)
        return _evaluate_source(source, protocol, block_size, memory_budget_bytes)


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


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A readable text table of results keyed by protocol; ``1k-5fold`` also lists its folds."""
    labels = list(results)
    for protocol, metrics in results.items():
        labels += [f"  fold {k}" for k in range(len(metrics.get("folds", [])))]
    label_width = max([len("protocol")] + [len(label) for label in labels])
    widths = [len(fmt.format(0.0)) for _, _, fmt in _TABLE_COLUMNS]
    headers = " ".join(f"{name:>{width}}" for (name, _, _), width in zip(_TABLE_COLUMNS, widths))
    block_width = len(headers)
    lines = [
        f"{'':<{label_width}} | {'image-to-text':^{block_width}} | {'text-to-image':^{block_width}} |",
        f"{'protocol':<{label_width}} | {headers} | {headers} | {'rsum':>7}",
    ]
    lines.append("-" * len(lines[1]))
    for protocol, metrics in results.items():
        lines.append(_table_row(protocol, metrics, label_width))
        for k, fold in enumerate(metrics.get("folds", [])):
            lines.append(_table_row(f"  fold {k}", fold, label_width))
    return "\n".join(lines)


def set_tf32(enabled: bool) -> None:
    """The one TF32 switch of evaluation and encoding: cuDNN runs fp32 GRUs in TF32 by default,
    which moved tiny-model embeddings by ~7e-5 on an H200 (seen), enough to move recalls; metrics
    and embeddings meant to reproduce the reference's are computed in full fp32 (enabled=False)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
