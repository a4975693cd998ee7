"""The protocol drivers: every protocol asked for on embeddings or similarity matrices, of one
model or an ensemble (``all``, ``eccv`` and ``cxc`` share one pass of the scorer; ``1k-5fold``
ranks its five folds of 1000 images separately and averages them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from trainer.evaluation.annotated import AnnotatedProtocol
from trainer.evaluation.coco_ids import GalleryIds, resolve_ids
from trainer.evaluation.inputs import validate_protocol, validate_protocol_name
from trainer.evaluation.metrics import (
    ANNOTATED_PROTOCOLS,
    FOLD_IMAGES,
    FOLD_PROTOCOL_MIN_IMAGES,
    NUM_FOLDS,
    PROTOCOL_1K_5FOLD,
    PROTOCOL_ALL,
    ArrayLike,
    DeviceLike,
    RecallMetrics,
    metrics_from_ranks,
)
from trainer.evaluation.scorer import DEFAULT_MEMORY_BUDGET_BYTES, all_ranks, full_float32_matmul
from trainer.evaluation.sources import SimilaritySource, embedding_source, similarity_source

logger = logging.getLogger(__name__)


def _metrics_of(source: SimilaritySource, block_size: int | None, memory_budget_bytes: int) -> RecallMetrics:
    return metrics_from_ranks(*all_ranks(source, block_size, memory_budget_bytes))


def _evaluate_source(
    source: SimilaritySource,
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
            AnnotatedProtocol(p, source, resolve_ids(ids, source.num_images, p))
            for p in shared if p in ANNOTATED_PROTOCOLS
        ]
        observers = [observer for protocol in annotated for observer in protocol.observers]
        ranks = all_ranks(source, block_size, memory_budget_bytes, observers)
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


def _log_results(source: SimilaritySource, protocols: Sequence[str], results: dict[str, dict[str, Any]],
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
        validate_protocol_name(protocol)
    with torch.inference_mode(), full_float32_matmul():
        source = embedding_source(models, device, names)
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
        validate_protocol_name(protocol)
    with torch.inference_mode(), full_float32_matmul():
        source = similarity_source(sims_list, device, names)
        return _evaluate_source(source, protocols, ids, block_size, memory_budget_bytes)
