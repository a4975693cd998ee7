"""best.json: the run's best checkpoint so far by dev rsum, written by the evaluator
(:func:`update_best`) and read by the trainer, the evaluator and the report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from trainer.run.layout import BEST_FILE, checkpoint_name, location_of, read_json, utc_now, write_json

__all__ = ["best_dev_rsum", "load_best", "read_best", "update_best"]

logger = logging.getLogger(__name__)

def load_best(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The run's ``best.json`` payload, None when there is none; the one reader of the file.

    Raises ValueError naming the file when it is not a JSON object (StorageError when it is not
    UTF-8). The trainer and the evaluator use :func:`read_best`, which treats that as no best;
    trainer/report.py uses this to say so in its summary.
    """
    return read_json(location_of(run_dir, storage_options), BEST_FILE)


def read_best(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The run's ``best.json`` payload, or None when there is none (or it is unreadable: a damaged
    best.json must not stop training or evaluation; the next better checkpoint replaces it)."""
    try:
        return load_best(run_dir, storage_options)
    except (ValueError, UnicodeDecodeError, OSError) as error:
        logger.warning("ignoring %s: %s", location_of(run_dir, storage_options).child_url(BEST_FILE), error)
        return None


def best_dev_rsum(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> float | None:
    """The dev rsum recorded in the run's ``best.json`` (None: no best yet, or no number there)."""
    best = read_best(run_dir, storage_options)
    rsum = best.get("dev_rsum") if best is not None else None
    return float(rsum) if isinstance(rsum, (int, float)) and not isinstance(rsum, bool) else None


def update_best(run_dir: str, payload: dict[str, Any],
                storage_options: Mapping[str, Any] | None = None) -> bool:
    """Make the checkpoint of ``payload`` (a metrics.json payload) the run's best if its dev rsum
    beats the one in ``RUN_DIR/best.json`` (strictly, as the reference's ``rsum > best_rsum``);
    returns whether it did.

    best.json is replaced atomically. Two evaluators racing (a CronJob beside the training's
    actor) may both read the old file; the last writer wins, but readers never see a partial file.
    A checkpoint already recorded as best is rewritten with its new metrics.
    """
    rsum = payload.get("dev_rsum")
    if rsum is None:
        logger.info("%s has no dev rsum (no dev split): best.json not updated", payload.get("checkpoint"))
        return False
    location = location_of(run_dir, storage_options)
    current = read_best(run_dir, storage_options)
    dev_images = (payload.get("data") or {}).get("dev_images")
    if current is not None:
        recorded = current.get("dev_rsum")
        if current.get("dev_images") not in (None, dev_images):
            logger.warning("%s: comparing dev rsums over %s and %s dev images; evaluate with the same "
                           "eval.dev_images", location.child_url(BEST_FILE), current.get("dev_images"), dev_images)
        same = checkpoint_name(str(current.get("checkpoint", ""))) == checkpoint_name(payload["checkpoint"])
        if not same and isinstance(recorded, (int, float)) and not rsum > recorded:
            return False
    best = {
        "checkpoint": payload["checkpoint"],
        "step": payload.get("step"),
        "epoch": payload.get("epoch"),
        "dev_rsum": rsum,
        "dev_images": dev_images,
        "dev": payload.get("dev"),
        "metrics": payload.get("test", {}),
        "updated_at": utc_now(),
    }
    write_json(location, BEST_FILE, best)
    logger.info("new best checkpoint %s (step %s): dev rsum %.2f", payload["checkpoint"], payload.get("step"), rsum)
    return True
