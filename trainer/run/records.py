"""The records the evaluator writes beside a checkpoint: ``metrics.json`` (the evaluation) and
``eval_error.json`` (instead of it, when evaluating the checkpoint failed).
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from typing import Any

from trainer.run.layout import ERROR_FILE, METRICS_FILE, location_of, remove_if_present, utc_now, write_json

__all__ = ["record_failure", "record_result"]

def record_result(checkpoint: str, payload: dict[str, Any],
                  storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``metrics.json`` beside the checkpoint (atomically) and drop a stale eval_error.json."""
    location = location_of(checkpoint, storage_options)
    write_json(location, METRICS_FILE, payload)
    # metrics.json now says this checkpoint was evaluated; an older failure record would only
    # contradict it (it exists after a successful --retry-failed).
    remove_if_present(location, ERROR_FILE)


def record_failure(checkpoint: str, error: BaseException,
                   storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``eval_error.json`` beside the checkpoint; returns its payload."""
    location = location_of(checkpoint, storage_options)
    payload = {
        "checkpoint": location.display,
        "error": f"{type(error).__name__}: {error}",
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        "failed_at": utc_now(),
    }
    write_json(location, ERROR_FILE, payload)
    return payload
