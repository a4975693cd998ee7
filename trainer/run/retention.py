"""Retention: which checkpoints of a run to delete (:func:`checkpoints_to_prune`, the policy) and
deleting them (:func:`prune_checkpoints`, called by trainer/launch.py). A property of the run
directory, not of the evaluator: it never deletes an unevaluated checkpoint, nor the best.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from trainer.run.best import best_checkpoint, read_best
from trainer.run.checkpoints import CheckpointEntry, list_checkpoints
from trainer.run.layout import location_of
from trainer.run.records import EvaluationRecord, read_result

__all__ = ["checkpoints_to_prune", "prune_checkpoints"]

logger = logging.getLogger(__name__)


def checkpoints_to_prune(entries: Sequence[CheckpointEntry], keep_last: int, best_name: str | None,
                         top_dev_name: str | None) -> list[CheckpointEntry]:
    """The retention policy: of a run's complete checkpoints (step order), those to delete. Kept:
    the newest ``keep_last``, the best (``best_name``, from best.json) and the one with the top dev
    rsum (``top_dev_name``: best.json may lag a metrics.json, or a racing writer may have lost),
    and everything not yet evaluated (neither metrics.json nor eval_error.json)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    keep = {e.name for e in entries[-keep_last:]} | {name for name in (best_name, top_dev_name) if name}
    return [e for e in entries if e.name not in keep and (e.evaluated or e.failed)]


def prune_checkpoints(run_dir: str, keep_last: int, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Delete the checkpoint directories `checkpoints_to_prune` chooses; returns them.

    Ray's own ``num_to_keep`` cannot keep "the best" here: the metrics arrive asynchronously.
    evaluations.jsonl keeps every evaluated checkpoint's metrics after its directory is gone.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    run = location_of(run_dir, storage_options)
    entries = list_checkpoints(run_dir, storage_options)
    evaluated: dict[str, EvaluationRecord] = {}
    for entry in entries:
        if entry.evaluated:
            with contextlib.suppress(ValueError, UnicodeDecodeError, OSError):
                record = read_result(run.child(entry.name))
                if record is not None:
                    evaluated[entry.name] = record
    # The best as best.json has it, and as the metrics have it (best.json may lag behind them).
    best, top = best_checkpoint(read_best(run_dir, storage_options), evaluated), best_checkpoint(None, evaluated)
    deleted = []
    for entry in checkpoints_to_prune(entries, keep_last, best[0] if best else None, top[0] if top else None):
        logger.info("pruning %s (step %s)", entry.url, entry.step)
        run.remove_tree(entry.name)
        deleted.append(entry.url)
    return deleted
