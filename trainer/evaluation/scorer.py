"""The block-wise scorer: one pass over blocks of image rows of the similarity matrix gives the
ranks of both directions (:func:`all_ranks`), each matrix product computed once and the working
memory held to a budget; observers (the annotated protocols) see every block on the way. Also the
precision switches of evaluation and encoding (:func:`full_float32_matmul`, :func:`set_tf32`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from trainer.evaluation.inputs import check_finite
from trainer.evaluation.metrics import (
    CAPTIONS_PER_IMAGE,
    ArrayLike,
    DeviceLike,
    EvaluationInputError,
)
from trainer.evaluation.sources import SimilaritySource, embedding_source, similarity_source

# Working memory for the blocks of similarity scores (beyond the inputs). 256 MiB keeps 5000 x
# 25000 evaluations far below the 4 GB bound while the blocks (about 900 image queries of 25000
# captions in float32) stay large enough for matrix products to run at full speed.
DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20

# Above this many candidates, counting with float32 sums of 0/1 values would stop being exact.
MAX_EXACT_FLOAT32_COUNT = 2**24


class BlockObserver:
    """Sees each block of image-query scores of :func:`all_ranks` (and must not modify it)."""

    def observe(self, start: int, stop: int, scores: torch.Tensor) -> None:
        raise NotImplementedError


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


def all_ranks(
    source: SimilaritySource,
    block_size: int | None,
    memory_budget_bytes: int,
    observers: Sequence[BlockObserver] = (),
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

    The t2i positives are taken from :meth:`SimilaritySource.positive_scores` before the pass.
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
    check_finite(positives, "positive similarity scores")
    # Sums of 0/1 values are exact in float32 below 2**24 terms, and float sums of a comparison
    # written in place run several times faster than bool masks with integer sums.
    exact = max(block_size, num_captions) < MAX_EXACT_FLOAT32_COUNT or dtype == torch.float64
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
        check_finite(scores, f"similarity scores of images {start}:{stop}")
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
    captions ``5i .. 5i+4`` (see :func:`all_ranks` for the tie convention).
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
        return all_ranks(embedding_source(models, device, names), block_size, memory_budget_bytes)


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
        return all_ranks(similarity_source(sims_list, device, names), block_size, memory_budget_bytes)


def set_tf32(enabled: bool) -> None:
    """The one TF32 switch of evaluation and encoding: cuDNN runs fp32 GRUs in TF32 by default,
    which moved tiny-model embeddings by ~7e-5 on an H200 (seen), enough to move recalls; metrics
    and embeddings meant to reproduce the reference's are computed in full fp32 (enabled=False)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
