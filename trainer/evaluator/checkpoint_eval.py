"""Evaluating one checkpoint and recording the outcome: what the evaluation actor (actor.py) and
``python trainer/evaluate.py --checkpoint/--watch`` share.

For a checkpoint directory (local or ``s3://``) this module encodes the dev and test shards with the
checkpoint's inference model (trainer/inference/encoding.py), computes

* the dev metrics (protocol ``all`` on the first ``eval.dev_images`` dev images) whose ``rsum``
  selects the best model, as the reference's validation does, and
* the test metrics of each protocol in ``eval.test_protocols`` (COCO: ``1k-5fold`` and ``all``
  = 5K, optionally ``eccv`` and ``cxc`` on the 5K split by the shards' COCO ids or its standard
  order; Flickr30K: ``all``; a protocol that cannot run on the split, such as ``1k-5fold``
  below 5000 images, is skipped and the skip recorded),

and writes the qualitative page (trainer/inference/qualitative.py), as the ``metrics.json``
payload (:func:`evaluate_checkpoint`), and records it (:func:`record_evaluated`): ``metrics.json``
beside the checkpoint, the checkpoint's line in ``RUN_DIR/evaluations.jsonl`` and
``RUN_DIR/best.json`` when its dev rsum beats the recorded best, all three from one
:class:`trainer.run.records.EvaluationRecord`. A checkpoint that cannot be evaluated gets an
``eval_error.json`` instead (:func:`evaluate_and_record`, which never raises for one bad
checkpoint). :func:`evaluate_run` is ``evaluate.py --watch``: every complete checkpoint of a run
without ``metrics.json`` or ``eval_error.json``, in step order, with the settings of the run's
config.yaml.

What the files are called and hold, and how they are read and written, is trainer/run/'s
(docs/run_layout.md); this module decides what to evaluate and in which order to record it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from data_shards.lookup import SplitIndex
from data_shards.reader import ReaderConfig, load_split
from data_shards.storage import Location, open_location
from model.checkpoint import load_inference_checkpoint
from model.vsrn import VSRN
from monitoring.recorders import EvaluationMetrics
from trainer.config import EvalConfig
from trainer.evaluation import (
    ANNOTATED_PROTOCOLS,
    FOLD_PROTOCOL_MIN_IMAGES,
    PROTOCOL_1K_5FOLD,
    PROTOCOL_ALL,
    EvaluationInputError,
    GalleryIds,
    evaluate_embeddings,
    evaluate_embeddings_protocols,
    results_table,
    validate_protocol,
)
from trainer.inference.checkpoint import local_inference_dir
from trainer.inference.encoding import encode_split
from trainer.inference.qualitative import build_page, query_positions, write_page
from trainer.inference.retrieval import Gallery
from trainer.run.best import best_dev_rsum, update_best
from trainer.run.checkpoints import list_checkpoints
from trainer.run.config_yaml import read_run_settings
from trainer.run.history import record_evaluation
from trainer.run.layout import (
    BEST_FILE,
    CONFIG_YAML,
    ERROR_FILE,
    EVALUATIONS_FILE,
    QUALITATIVE_FILE,
    run_dir_of,
    utc_now,
)
from trainer.run.records import NO_PAGE, EvaluationRecord, NoPage, record_failure, record_result
from trainer.run.train_state import read_train_state_fields, state_int

__all__ = [
    "Recorded",
    "evaluate_and_record",
    "evaluate_checkpoint",
    "evaluate_run",
    "evaluation_summary",
    "record_evaluated",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# One checkpoint
# --------------------------------------------------------------------------------------------------


def evaluate_checkpoint(
    checkpoint: str,
    dev: str | None,
    test: str | None,
    eval_config: EvalConfig,
    storage_options: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    *,
    loader_workers: int = 0,
    region_order: str = "stored",
) -> dict[str, Any]:
    """Evaluate one checkpoint; returns the ``metrics.json`` payload.

    Nothing is written but the qualitative page (``eval_config.qualitative_queries`` > 0 and test
    shards given: trainer/inference/qualitative.py, beside the checkpoint; the payload's
    ``"qualitative"`` names it, or is None when it could not be written).

    Args:
        checkpoint: a run checkpoint directory (local or ``s3://``) holding ``inference/`` and
            ``train_state.json``, or an inference checkpoint directory itself.
        dev: dev shards (directory with manifest.json) or None: the first ``eval_config.dev_images``
            images are ranked with protocol ``all``; their rsum is ``dev_rsum``.
        test: test shards or None: every protocol of ``eval_config.test_protocols``; ``1k-5fold``
            is skipped (recorded under ``"skipped"``) when the split has fewer than 5000 images.
        eval_config: protocols, dev subset size, encoding batch size.
        storage_options: s3fs options for checkpoint and shards (None: the environment).
        device: where the model and the ranking run.
        loader_workers: DataLoader worker processes reading shards (0: in this process, which
            suits an evaluator with one CPU).
        region_order: the reader's region order (data.region_order of the run).
    """
    if dev is None and test is None:
        raise ValueError("nothing to evaluate: give dev and/or test shards")
    started = time.perf_counter()
    location = open_location(checkpoint, storage_options)
    state = read_train_state_fields(location)
    device = torch.device(device)
    with local_inference_dir(location) as inference:
        model, vocab = load_inference_checkpoint(inference, device=device)
    options = dict(storage_options) if storage_options is not None else None

    def encode(split: str, max_images: int | None, ids: list[GalleryIds | None] | None = None,
               listing: list[tuple[str, tuple[str, ...]]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        reader_config = ReaderConfig(location=split, batch_size=eval_config.batch_size, num_workers=loader_workers,
                                     storage_options=options, region_order=region_order,  # type: ignore[arg-type]
                                     bad_data="strict", output_dtype="stored")  # encode_split casts on the device
        return encode_split(model, vocab, reader_config, eval_config.batch_size, device, max_images=max_images,
                            ids=ids, listing=listing)

    step, epoch = state_int(state, "step"), state_int(state, "epoch")
    data = {"dev": dev, "dev_images": 0, "test": test, "test_images": 0}
    dev_metrics: dict[str, Any] | None = None
    test_metrics: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    qualitative: str | None | NoPage = NO_PAGE
    if dev is not None:
        images, captions = encode(dev, eval_config.dev_images)
        if images.shape[0] < eval_config.dev_images:
            logger.info("%s has %d images, fewer than eval.dev_images = %d: the dev metrics use all of them",
                        dev, images.shape[0], eval_config.dev_images)
        dev_metrics = evaluate_embeddings([(images, captions)], PROTOCOL_ALL, device=device)
        data["dev_images"] = int(images.shape[0])
    if test is not None:
        found_ids: list[GalleryIds | None] = []
        listing: list[tuple[str, tuple[str, ...]]] = []
        images, captions = encode(test, None, found_ids, listing)
        test_ids = found_ids[0] if found_ids else None
        data["test_images"] = int(images.shape[0])
        runnable = []
        for protocol in dict.fromkeys(eval_config.test_protocols):
            reason = None
            if protocol == PROTOCOL_1K_5FOLD and images.shape[0] < FOLD_PROTOCOL_MIN_IMAGES:
                reason = (f"needs at least {FOLD_PROTOCOL_MIN_IMAGES} test images, "
                          f"the test split has {images.shape[0]}")
            elif protocol in ANNOTATED_PROTOCOLS:
                try:  # the COCO 5K test split, by the shards' ids or in the standard order
                    validate_protocol(protocol, images.shape[0], test_ids)
                except EvaluationInputError as error:
                    reason = str(error)
            if reason is not None:
                logger.warning("%s: protocol %s skipped: %s", location.display, protocol, reason)
                skipped[protocol] = reason
                continue
            runnable.append(protocol)
        # One call: all, eccv and cxc share the matrix products.
        test_metrics = evaluate_embeddings_protocols([(images, captions)], runnable, device=device, ids=test_ids)
        if eval_config.qualitative_queries > 0:
            qualitative = _write_qualitative_page(
                location, model, images, captions, listing, test, eval_config.qualitative_queries, options,
                region_order, device, title=f"{location.display} (step {step}, epoch {epoch})")
    return EvaluationRecord(
        checkpoint=location.display, step=step, epoch=epoch, dev=dev_metrics,
        dev_rsum=None if dev_metrics is None else dev_metrics["rsum"], test=test_metrics, skipped=skipped, data=data,
        qualitative=qualitative, evaluated_at=utc_now(), elapsed_s=round(time.perf_counter() - started, 3),
    ).to_metrics_json()


def _write_qualitative_page(checkpoint: Location, model: VSRN, images: np.ndarray, captions: np.ndarray,
                            listing: list[tuple[str, tuple[str, ...]]], test: str, queries: int,
                            storage_options: dict[str, Any] | None, region_order: str, device: torch.device,
                            title: str) -> str | None:
    """The checkpoint's qualitative page from the test embeddings just computed (and the keys and
    captions of their encoding); a failure is logged and returns None (the metrics matter more)."""
    started = time.perf_counter()
    try:
        index = SplitIndex.from_listing(test, listing)
        gallery = Gallery(index, images, captions)
        page = build_page(model, gallery, query_positions(len(index), queries), title=title, split_location=test,
                          storage_options=storage_options, region_order=region_order, device=device)
        write_page(checkpoint, page)
    except Exception as error:  # noqa: BLE001 - any failure here must not lose the metrics
        logger.warning("%s: qualitative page not written: %s: %s", checkpoint.display, type(error).__name__, error)
        return None
    logger.info("%s: qualitative page (%d queries, %d figures) in %.1f s", checkpoint.display, queries,
                len(page.figures), time.perf_counter() - started)
    return QUALITATIVE_FILE


# --------------------------------------------------------------------------------------------------
# Recording an evaluation
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What :func:`record_evaluated` wrote besides metrics.json."""

    is_best: bool  # the checkpoint is now the run's best (best.json rewritten)
    problem: str | None = None  # why the run's records (evaluations.jsonl, best.json) were not updated


def record_evaluated(checkpoint: str, payload: dict[str, Any], run_dir: str | None,
                     storage_options: Mapping[str, Any] | None = None) -> Recorded:
    """The one record sequence of a successful evaluation (the actor, ``--watch`` and
    ``--checkpoint``): ``metrics.json`` beside the checkpoint, then, for a checkpoint of a run
    (``run_dir`` given), its evaluations.jsonl line and best.json.

    Raises when metrics.json cannot be written: without it the checkpoint is not evaluated (the
    caller records the failure). A failure after it is returned in ``problem`` instead: the
    evaluation itself is recorded. The history and best.json are tried independently, so that a
    damaged history does not stop model selection; the next evaluation repairs a missing line
    (trainer/run/history.py, record_evaluation).
    """
    record = EvaluationRecord.from_metrics_json(payload)
    record_result(checkpoint, record, storage_options)
    if run_dir is None:
        return Recorded(is_best=False)
    problems = []
    try:
        record_evaluation(run_dir, record, storage_options)
    except Exception as error:  # noqa: BLE001 - e.g. a damaged line or the store is down; keep the rest
        logger.error("%s: cannot update %s: %s: %s", checkpoint, EVALUATIONS_FILE, type(error).__name__, error)
        problems.append(f"{EVALUATIONS_FILE} not updated: {type(error).__name__}: {error}")
    is_best = False
    try:
        is_best = update_best(run_dir, record, storage_options)
    except Exception as error:  # noqa: BLE001 - metrics.json is written: the evaluation itself succeeded
        logger.error("%s: cannot update %s: %s: %s", checkpoint, BEST_FILE, type(error).__name__, error)
        problems.append(f"{BEST_FILE} not updated: {type(error).__name__}: {error}")
    return Recorded(is_best=is_best, problem="; ".join(problems) or None)


# --------------------------------------------------------------------------------------------------
# A run: every checkpoint not yet evaluated
# --------------------------------------------------------------------------------------------------


def evaluation_summary(checkpoint: str, step: int | None, epoch: int | None, *, status: str,
                       dev_rsum: float | None = None, error: str | None = None, is_best: bool = False,
                       elapsed_s: float | None = None) -> dict[str, Any]:
    """What :func:`evaluate_and_record` returns per checkpoint (the actor's ``results``)."""
    return {"path": checkpoint, "step": step, "epoch": epoch, "dev_rsum": dev_rsum, "status": status,
            "error": error, "is_best": is_best, "elapsed_s": elapsed_s}


def evaluate_and_record(
    checkpoint: str,
    dev: str | None,
    test: str | None,
    eval_config: EvalConfig,
    run_dir: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    *,
    loader_workers: int = 0,
    region_order: str = "stored",
    metrics: EvaluationMetrics | None = None,
) -> dict[str, Any]:
    """Evaluate one checkpoint and record the outcome (:func:`record_evaluated`, or eval_error.json,
    and the Prometheus series through ``metrics`` when given); never raises for a bad checkpoint or
    bad data: returns a summary with status ok/failed."""
    started = time.perf_counter()
    display = checkpoint
    with contextlib.suppress(Exception):
        display = open_location(checkpoint, storage_options).display
    try:
        payload = evaluate_checkpoint(checkpoint, dev, test, eval_config, storage_options, device,
                                      loader_workers=loader_workers, region_order=region_order)
        recorded = record_evaluated(checkpoint, payload, run_dir or run_dir_of(checkpoint), storage_options)
    except Exception as error:  # noqa: BLE001 - one bad checkpoint must not stop the others
        logger.error("evaluating %s failed: %s: %s", checkpoint, type(error).__name__, error)
        step = epoch = None
        with contextlib.suppress(Exception):
            state = read_train_state_fields(open_location(checkpoint, storage_options))
            step, epoch = state_int(state, "step"), state_int(state, "epoch")
        try:
            record_failure(checkpoint, error, storage_options)
        except Exception as record_error:  # noqa: BLE001 - e.g. the store is down; keep going
            logger.error("cannot write %s for %s: %s", ERROR_FILE, checkpoint, record_error)
        if metrics is not None:
            metrics.record_failure(time.perf_counter() - started)
        return evaluation_summary(display, step, epoch, status="failed", error=f"{type(error).__name__}: {error}",
                                  elapsed_s=round(time.perf_counter() - started, 3))
    is_best = recorded.is_best
    if metrics is not None:
        metrics.record_evaluation(payload, best_dev_rsum(run_dir or run_dir_of(checkpoint), storage_options),
                                  time.perf_counter() - started)
    logger.info("checkpoint %s (step %s, epoch %s): dev rsum %s%s\n%s", payload["checkpoint"], payload["step"],
                payload["epoch"], "n/a" if payload["dev_rsum"] is None else f"{payload['dev_rsum']:.2f}",
                " (new best)" if is_best else "", results_table(payload))
    return evaluation_summary(payload["checkpoint"], payload["step"], payload["epoch"], status="ok",
                              error=recorded.problem, dev_rsum=payload["dev_rsum"], is_best=is_best,
                              elapsed_s=payload["elapsed_s"])


def _check_split_reachable(location: str, storage_options: Mapping[str, Any] | None) -> None:
    """Fail before touching any checkpoint when a split cannot even be opened: a wrong --data
    must not stamp eval_error.json on every checkpoint of the run."""
    load_split(ReaderConfig(location=location, num_workers=0,
                            storage_options=dict(storage_options) if storage_options is not None else None))


def evaluate_run(
    run_dir: str,
    dev: str | None = None,
    test: str | None = None,
    eval_config: EvalConfig | None = None,
    storage_options: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    *,
    retry_failed: bool = False,
    loader_workers: int = 0,
    metrics: EvaluationMetrics | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every complete checkpoint of ``run_dir`` that has neither metrics.json nor
    eval_error.json (with ``retry_failed``, also those with eval_error.json), in step order.

    Dev/test shards and the eval settings come from ``RUN_DIR/config.yaml`` unless given here.
    Failures are recorded per checkpoint and the others still evaluated. Returns one summary per
    evaluated checkpoint: path, step, epoch, dev_rsum, status ("ok"/"failed"), error, is_best.

    Raises (before evaluating anything) when there is nothing to evaluate against: no dev/test
    shards given or configured, an unreadable config.yaml, or a split whose manifest cannot be read.
    """
    settings = read_run_settings(run_dir, storage_options)
    if settings is None:
        logger.info("%s: no %s; using the settings given", run_dir, CONFIG_YAML)
    dev = dev if dev is not None else (settings.dev if settings else None)
    test = test if test is not None else (settings.test if settings else None)
    eval_config = eval_config if eval_config is not None else (settings.eval if settings else EvalConfig())
    region_order = settings.region_order if settings else "stored"
    if dev is None and test is None:
        raise ValueError(f"{run_dir}: no dev or test shards to evaluate on: give them (--data/--dev) or set "
                         f"data.dev / data.test in {CONFIG_YAML}")
    for split in (dev, test):
        if split is not None:
            _check_split_reachable(split, storage_options)
    entries = list_checkpoints(run_dir, storage_options)
    pending = [e for e in entries if not e.evaluated and (retry_failed or not e.failed)]
    logger.info("%s: %d complete checkpoint(s), %d to evaluate", run_dir, len(entries), len(pending))
    summaries = []
    for entry in pending:
        logger.info("evaluating %s (step %s)", entry.url, entry.step)
        summaries.append(evaluate_and_record(entry.url, dev, test, eval_config, run_dir, storage_options, device,
                                             loader_workers=loader_workers, region_order=region_order,
                                             metrics=metrics))
    return summaries
