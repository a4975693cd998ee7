"""best.json, the run's best checkpoint so far by dev rsum, and the one rule of which checkpoint is
the best (:func:`best_checkpoint`), used by pruning (retention.py) and by the report alike.

best.json is an :class:`EvaluationRecord` (records.py) in its best.json shape, written by the
evaluator (:func:`update_best`) and read by :func:`load_best` alone: :func:`read_best` (the
trainer, the evaluator), :func:`best_dev_rsum` (the metrics exporters) and :func:`best_summary`
(the run summary launch.py prints and the evaluation actor returns) ask it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

from trainer.run.layout import BEST_FILE, location_of, read_json, utc_now, write_json
from trainer.run.records import EvaluationRecord

__all__ = ["best_checkpoint", "best_dev_rsum", "best_summary", "load_best", "read_best", "update_best"]

logger = logging.getLogger(__name__)


def _is_rsum(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_best(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> EvaluationRecord | None:
    """The run's ``best.json``, None when there is none; the one reader of the file.

    Raises ValueError naming the file when it is not a JSON object (StorageError when it is not
    UTF-8). The trainer and the evaluator use :func:`read_best`, which treats that as no best;
    trainer/report.py uses this to say so in its summary.
    """
    payload = read_json(location_of(run_dir, storage_options), BEST_FILE)
    return None if payload is None else EvaluationRecord.from_best_json(payload)


def read_best(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> EvaluationRecord | None:
    """The run's ``best.json``, or None when there is none (or it is unreadable: a damaged
    best.json must not stop training or evaluation; the next better checkpoint replaces it)."""
    try:
        return load_best(run_dir, storage_options)
    except (ValueError, UnicodeDecodeError, OSError) as error:
        logger.warning("ignoring %s: %s", location_of(run_dir, storage_options).child_url(BEST_FILE), error)
        return None


def best_summary(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """best.json as the run's summary shows it (launch.py's last line, the evaluation actor's
    ``best()``): the file's payload, or None when there is no (readable) best."""
    best = read_best(run_dir, storage_options)
    return None if best is None else best.to_best_json()


def best_dev_rsum(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> float | None:
    """The dev rsum recorded in the run's ``best.json`` (None: no best yet, or no number there)."""
    best = read_best(run_dir, storage_options)
    rsum = best.dev_rsum if best is not None else None
    return float(rsum) if isinstance(rsum, (int, float)) and not isinstance(rsum, bool) else None


def best_checkpoint(recorded: EvaluationRecord | None,
                    evaluated: Mapping[str, EvaluationRecord]) -> tuple[str, EvaluationRecord] | None:
    """Which checkpoint is the run's best, as (its directory name, its evaluation); None when no
    checkpoint has a dev rsum.

    ``recorded`` is best.json (None: none, or none usable) and decides, as it does for the trainer;
    the evaluation returned is the checkpoint's own in ``evaluated`` when it is there (its
    metrics.json may be newer), else best.json's copy. Without it, the highest dev rsum among
    ``evaluated`` (the run's evaluated checkpoints by directory name, in step order; on a tie the
    earlier one, as :func:`update_best` keeps the earlier checkpoint on a tie). Pruning keeps both
    answers, with and without best.json, which may lag a metrics.json or have lost a race.
    """
    if recorded is not None and recorded.checkpoint:
        return recorded.name, evaluated.get(recorded.name, recorded)
    top: tuple[str, EvaluationRecord] | None = None
    for name, record in evaluated.items():
        if _is_rsum(record.dev_rsum) and (top is None or record.dev_rsum > top[1].dev_rsum):  # type: ignore[operator]
            top = (name, record)
    return top


def update_best(run_dir: str, record: EvaluationRecord,
                storage_options: Mapping[str, Any] | None = None) -> bool:
    """Make the checkpoint of ``record`` the run's best if its dev rsum beats the one in
    ``RUN_DIR/best.json`` (strictly, as the reference's ``rsum > best_rsum``); returns whether it did.

    best.json is replaced atomically. Two evaluators racing (a CronJob beside the training's
    actor) may both read the old file; the last writer wins, but readers never see a partial file.
    A checkpoint already recorded as best is rewritten with its new metrics.
    """
    rsum = record.dev_rsum
    if rsum is None:
        logger.info("%s has no dev rsum (no dev split): best.json not updated", record.checkpoint)
        return False
    location = location_of(run_dir, storage_options)
    current = read_best(run_dir, storage_options)
    if current is not None:
        if current.dev_images not in (None, record.dev_images):
            logger.warning("%s: comparing dev rsums over %s and %s dev images; evaluate with the same "
                           "eval.dev_images", location.child_url(BEST_FILE), current.dev_images, record.dev_images)
        recorded = current.dev_rsum
        if current.name != record.name and isinstance(recorded, (int, float)) and not rsum > recorded:
            return False
    write_json(location, BEST_FILE, dataclasses.replace(record, updated_at=utc_now()).to_best_json())
    logger.info("new best checkpoint %s (step %s): dev rsum %.2f", record.checkpoint, record.step, rsum)
    return True
