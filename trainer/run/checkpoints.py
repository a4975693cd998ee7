"""The checkpoints of a run: the complete ``checkpoint_<step>/`` directories (train_state.json
present) with what the evaluator recorded for each (metrics.json, eval_error.json), in step order.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from trainer.run.layout import (
    CHECKPOINT_PREFIX,
    ERROR_FILE,
    METRICS_FILE,
    TRAIN_STATE_FILE,
    location_of,
)
from trainer.run.train_state import read_train_state_fields, state_int

__all__ = ["CheckpointEntry", "is_run_checkpoint", "list_checkpoints"]

logger = logging.getLogger(__name__)

def is_run_checkpoint(checkpoint: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``checkpoint`` is a complete checkpoint of a run (train_state.json present), as
    opposed to a bare inference checkpoint."""
    return location_of(checkpoint, storage_options).exists(TRAIN_STATE_FILE)


@dataclasses.dataclass
class CheckpointEntry:
    """A complete checkpoint directory of a run and what the evaluator has recorded for it."""

    name: str
    url: str
    step: int | None
    epoch: int | None
    evaluated: bool  # metrics.json present
    failed: bool  # eval_error.json present


def list_checkpoints(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> list[CheckpointEntry]:
    """The complete ``checkpoint_*`` directories of a run (train_state.json present: it is written
    last), in step order (ties and missing steps: by name)."""
    run = location_of(run_dir, storage_options)
    entries = []
    for name in run.subdirectories():
        if not name.startswith(CHECKPOINT_PREFIX):
            continue
        checkpoint = run.child(name)
        try:
            state = read_train_state_fields(checkpoint)
        except (ValueError, UnicodeDecodeError) as error:
            # Written last and atomically, so unreadable means damaged, not in progress.
            logger.warning("%s: %s; treating the checkpoint as incomplete", checkpoint.display, error)
            continue
        if state is None:
            logger.debug("%s: no %s yet (incomplete)", checkpoint.display, TRAIN_STATE_FILE)
            continue
        entries.append(CheckpointEntry(
            name=name, url=checkpoint.display, step=state_int(state, "step"), epoch=state_int(state, "epoch"),
            evaluated=checkpoint.exists(METRICS_FILE), failed=checkpoint.exists(ERROR_FILE)))
    entries.sort(key=lambda e: (e.step if e.step is not None else -1, e.name))
    return entries
