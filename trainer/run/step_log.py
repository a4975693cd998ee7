"""train_log.jsonl, the step log: one JSON object per optimizer step, written by rank 0 of the
training through :class:`StepLog` (appended locally, uploaded whole at each checkpoint on s3://;
after a resume the replayed steps' lines are dropped first, so every step appears once) from
:func:`step_line`.

Its field names are spelled here, for the writer and the readers alike:

* on every line, STEP_FIELDS (finite numbers): step, epoch, loss (L_M + lambda L_G), loss_matching,
  loss_caption, lr, samples_per_s, data_wait_s, step_time_s, time (Unix seconds at the end of the
  step); and BATCH_FIELD (the batch's position in its epoch) and HARDEST_FIELD (true: hardest
  negatives; false: the all-negatives warm-up);
* on the step that closes a logging interval, LOG_FIELDS: the interval's hard-negative diagnostics
  (trainer/training/diagnostics.py: gap_{i2t,t2i}_{mean,p10}, active_hinge_ratio, remote_hardest_ratio; null
  when nothing was counted), and COLLAPSED_FIELD, the collapse detector's state.

Readers: :func:`read_step_lines` gives the lines as written (bench/gpu_check.py checks that every
step is there once), :func:`read_step_log` checks them and gives the log as columns in step order
(trainer/report.py plots them). A line that is not a JSON object, or lacks a field, is a
:class:`StepLogError` naming the file and the line; an unparsable last line without a trailing
newline is a line the trainer is still appending, skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_shards.storage import Location, open_location
from trainer.run.layout import TRAIN_LOG

__all__ = [
    "ACTIVE_FIELD",
    "BATCH_FIELD",
    "COLLAPSED_FIELD",
    "DIRECTIONS",
    "GAP_FIELDS",
    "GAP_MEAN_FIELD",
    "GAP_P10_FIELD",
    "HARDEST_FIELD",
    "LOG_FIELDS",
    "REMOTE_FIELD",
    "STEP_FIELDS",
    "StepLog",
    "StepLogError",
    "StepSeries",
    "read_step_lines",
    "read_step_log",
    "step_line",
]

logger = logging.getLogger(__name__)

# The numbers on every line.
STEP_FIELDS = ("step", "epoch", "loss", "loss_matching", "loss_caption", "lr", "samples_per_s",
               "data_wait_s", "step_time_s", "time")
BATCH_FIELD = "batch"
HARDEST_FIELD = "hardest_negatives"
# The hard-negative diagnostics, on the step that closes a logging interval (absent on other steps).
DIRECTIONS = ("i2t", "t2i")
GAP_MEAN_FIELD = "gap_{direction}_mean"
GAP_P10_FIELD = "gap_{direction}_p10"
ACTIVE_FIELD = "active_hinge_ratio"
REMOTE_FIELD = "remote_hardest_ratio"
COLLAPSED_FIELD = "collapsed"
GAP_FIELDS = tuple(field.format(direction=d) for d in DIRECTIONS for field in (GAP_MEAN_FIELD, GAP_P10_FIELD))
LOG_FIELDS = (*GAP_FIELDS, ACTIVE_FIELD, REMOTE_FIELD)  # numbers; COLLAPSED_FIELD is a bool


def step_line(*, step: int, epoch: int, batch: int, loss_matching: float, loss_caption: float,
              caption_loss_weight: float, lr: float, hardest: bool, samples: int, step_time_s: float,
              data_wait_s: float, time: float, diagnostics: dict[str, float | None] | None = None,
              collapsed: bool | None = None) -> dict[str, Any]:
    """One step's line: STEP_FIELDS, BATCH_FIELD and HARDEST_FIELD; on a step that closes a logging
    interval also its diagnostics (LOG_FIELDS) and COLLAPSED_FIELD. samples_per_s counts the data
    wait in (samples / (step time + wait))."""
    line: dict[str, Any] = {
        "step": step, "epoch": epoch, BATCH_FIELD: batch,
        "loss": loss_matching + caption_loss_weight * loss_caption, "loss_matching": loss_matching,
        "loss_caption": loss_caption, "lr": lr, HARDEST_FIELD: hardest,
        "samples_per_s": samples / max(step_time_s + data_wait_s, 1e-9), "data_wait_s": data_wait_s,
        "step_time_s": step_time_s, "time": time}
    if diagnostics is not None:
        line.update({key: diagnostics[key] for key in LOG_FIELDS})
        line[COLLAPSED_FIELD] = bool(collapsed)
    return line


class StepLog:
    """The writer: RUN_DIR/train_log.jsonl, one line per step, written by rank 0.

    Local run directories are appended to line by line. On s3:// the file is kept locally and
    uploaded whole at every checkpoint (objects cannot be appended to). After a restart, lines
    of steps beyond the restored checkpoint (replayed now) are dropped first, so every step
    appears once.
    """

    def __init__(self, run_dir: str, storage_options: dict[str, Any] | None) -> None:
        self.location = open_location(run_dir, storage_options)
        if self.location.is_s3:
            self.path = os.path.join(tempfile.mkdtemp(prefix="vsrn-trainlog-"), TRAIN_LOG)
            try:
                existing = self.location.read_bytes(TRAIN_LOG)
            except FileNotFoundError:
                existing = b""
            with open(self.path, "wb") as stream:
                stream.write(existing)
        else:
            self.location.makedirs()
            self.path = self.location.child_path(TRAIN_LOG)

    def truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as stream:
            lines = [line for line in stream if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w", encoding="utf-8") as stream:
            stream.writelines(lines)

    def append(self, line: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(line) + "\n")

    def sync(self) -> None:
        if self.location.is_s3 and os.path.exists(self.path):
            with open(self.path, "rb") as stream:
                self.location.write_bytes_atomic(TRAIN_LOG, stream.read())


class StepLogError(ValueError):
    """A line of the step log cannot be read; the message names the file and the line."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbered_lines(run: Location) -> tuple[str, list[tuple[int, dict[str, Any]]]] | None:
    """(the file's URL, its JSON objects with their line numbers); None when there is no file."""
    try:
        text = run.read_text(TRAIN_LOG)
    except FileNotFoundError:
        return None
    where = run.child_url(TRAIN_LOG)
    lines = text.split("\n")  # a complete file ends with "\n": the last element is then ""
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it: still being written
                logger.warning("%s line %d: incomplete last line (being written?), skipped", where, number)
                continue
            raise StepLogError(f"{where} line {number}: not valid JSON ({error.msg} at column "
                               f"{error.colno})") from None
        if not isinstance(record, dict):
            raise StepLogError(f"{where} line {number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return where, records


def read_step_lines(run: Location) -> list[dict[str, Any]] | None:
    """The step log's lines in file order, as written; None when the file does not exist."""
    found = _numbered_lines(run)
    return None if found is None else [record for _, record in found[1]]


@dataclass
class StepSeries:
    """The step log as columns, in step order."""

    step: np.ndarray
    epoch: np.ndarray
    loss: np.ndarray
    loss_matching: np.ndarray
    loss_caption: np.ndarray
    lr: np.ndarray
    samples_per_s: np.ndarray
    data_wait_s: np.ndarray
    step_time_s: np.ndarray
    time: np.ndarray
    hardest_negatives: np.ndarray
    # Hard-negative diagnostics (LOG_FIELDS -> column, NaN on the steps that do not close a
    # logging interval or where nothing was counted) and the collapse flag.
    diagnostics: dict[str, np.ndarray] = field(default_factory=dict)
    collapsed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def __len__(self) -> int:
        return int(self.step.size)

    @property
    def has_diagnostics(self) -> bool:
        return bool(self.diagnostics) and any(np.isfinite(c).any() for c in self.diagnostics.values())

    @property
    def diagnostic_rows(self) -> np.ndarray:
        """Indices of the steps that carry diagnostics (those closing a logging interval)."""
        present = np.zeros(len(self), dtype=bool)
        for column in self.diagnostics.values():
            present |= np.isfinite(column)
        return np.nonzero(present)[0]

    @property
    def samples(self) -> np.ndarray:
        """Pairs trained per step: the writer logs samples / (step time + data wait)."""
        return self.samples_per_s * (self.step_time_s + self.data_wait_s)


def read_step_log(run: Location) -> StepSeries | None:
    """``train_log.jsonl`` as columns; None when the file does not exist.

    Raises StepLogError naming the file and line for a line that is not a JSON object with the
    numeric fields of STEP_FIELDS (or with a diagnostic that is not a number). A step logged twice
    keeps its later line, with a warning (the writer drops replayed steps on resume).
    """
    found = _numbered_lines(run)
    if found is None:
        return None
    where, lines = found
    by_step: dict[int, dict[str, Any]] = {}
    for number, record in lines:
        for key in STEP_FIELDS:
            if key not in record:
                raise StepLogError(f"{where} line {number}: no {key!r} field")
            if not _is_number(record[key]):
                raise StepLogError(f"{where} line {number}: {key!r} is {record[key]!r}, not a finite number")
        for key in LOG_FIELDS:  # optional: only on the steps that close a logging interval; null: nothing counted
            if record.get(key) is not None and not _is_number(record[key]):
                raise StepLogError(f"{where} line {number}: {key!r} is {record[key]!r}, not a finite number")
        step = int(record["step"])
        if step in by_step:  # StepLog truncates replayed steps on resume; keep the newer line if not
            logger.warning("%s line %d: step %d logged twice; keeping this later line", where, number, step)
        by_step[step] = record
    records = [by_step[s] for s in sorted(by_step)]

    def column(key: str, dtype: type = float) -> np.ndarray:
        return np.array([r[key] for r in records], dtype=dtype)

    return StepSeries(
        step=column("step", int), epoch=column("epoch", int), loss=column("loss"),
        loss_matching=column("loss_matching"), loss_caption=column("loss_caption"), lr=column("lr"),
        samples_per_s=column("samples_per_s"), data_wait_s=column("data_wait_s"),
        step_time_s=column("step_time_s"), time=column("time"),
        hardest_negatives=np.array([bool(r.get(HARDEST_FIELD, False)) for r in records], dtype=bool),
        diagnostics={key: np.array([np.nan if r.get(key) is None else float(r[key]) for r in records], dtype=float)
                     for key in LOG_FIELDS},
        collapsed=np.array([bool(r.get(COLLAPSED_FIELD, False)) for r in records], dtype=bool))
