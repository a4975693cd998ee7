"""The train state of a checkpoint, train_state.json: where training stands (epoch, step, position in
the epoch, world size, global batch). Written last into every checkpoint (trainer/training/checkpoint.py),
so its presence marks a complete checkpoint; read back to resume (:class:`TrainState`) and, without
a format check, to list and label checkpoints (:func:`read_train_state_fields`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from data_shards.storage import Location
from trainer.run.layout import TRAIN_STATE_FILE, read_json

__all__ = ["TRAIN_STATE_FORMAT_VERSION", "TrainState", "TrainStateError", "read_train_state_fields", "state_int"]

TRAIN_STATE_FORMAT_VERSION = 1


class TrainStateError(ValueError):
    """train_state.json is not a train state this code reads; the message names the file."""


@dataclasses.dataclass
class TrainState:
    """Where training stands after `step` optimizer steps: the content of train_state.json, written
    by trainer/training/checkpoint.py (last, so its presence marks a complete checkpoint) and read back
    to resume."""

    epoch: int  # the epoch of the last step taken
    step: int  # optimizer steps taken since the start of the run
    batch_in_epoch: int  # batches of `epoch` consumed by every rank
    epoch_complete: bool  # `epoch` is finished: continue with epoch + 1, batch 0
    world_size: int
    global_batch_size: int
    format_version: int = TRAIN_STATE_FORMAT_VERSION

    def next_position(self) -> tuple[int, int]:
        """(epoch, first batch) to continue with."""
        return (self.epoch + 1, 0) if self.epoch_complete else (self.epoch, self.batch_in_epoch)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> TrainState:
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as error:
            raise TrainStateError(f"{where}: not valid JSON ({error})") from None
        if not isinstance(payload, dict) or payload.get("format_version") != TRAIN_STATE_FORMAT_VERSION:
            raise TrainStateError(f"{where}: unsupported train state (format_version "
                                  f"{payload.get('format_version') if isinstance(payload, dict) else None!r}, "
                                  f"this code reads {TRAIN_STATE_FORMAT_VERSION})")
        # Fields this code does not know are ignored: older files carry a "best_rsum" nothing read.
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in payload.items() if k in known})


def read_train_state_fields(checkpoint: Location) -> dict[str, Any] | None:
    """A checkpoint's train_state.json as a plain object, for listing and labelling (None: absent,
    the checkpoint is incomplete); no format check, unlike `TrainState.from_json`, which resuming
    needs: the evaluator only reads "step" and "epoch" (`state_int`)."""
    return read_json(checkpoint, TRAIN_STATE_FILE)


def state_int(state: dict[str, Any] | None, key: str) -> int | None:
    value = None if state is None else state.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
