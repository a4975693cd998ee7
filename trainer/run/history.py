"""evaluations.jsonl: the run's evaluation history, one line per evaluated checkpoint, never pruned
(:func:`record_evaluation`, :func:`read_evaluations`); each line is an :class:`EvaluationRecord`
(records.py) in its history shape.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

from trainer.run.layout import CHECKPOINT_PREFIX, EVALUATIONS_FILE, location_of
from trainer.run.records import EvaluationRecord, read_result

__all__ = ["read_evaluations", "record_evaluation"]


def read_evaluations(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> list[EvaluationRecord]:
    """The run's evaluation history, one record per evaluated checkpoint in the order recorded (its
    ``checkpoint`` is the checkpoint's directory name);
    [] when there is none. A line that is not a JSON object raises ValueError naming the file and
    line (the history is written whole and atomically, so a bad line is damage, not a race)."""
    location = location_of(run_dir, storage_options)
    try:
        text = location.read_text(EVALUATIONS_FILE)
    except FileNotFoundError:
        return []
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{location.child_url(EVALUATIONS_FILE)}: line {number}: not valid JSON: {error}") from None
        if not isinstance(entry, dict) or "checkpoint" not in entry:
            raise ValueError(f"{location.child_url(EVALUATIONS_FILE)}: line {number}: expected a JSON object with "
                             "a \"checkpoint\"")
        entries.append(EvaluationRecord.from_history_line(entry))
    return entries


def record_evaluation(run_dir: str, record: EvaluationRecord,
                      storage_options: Mapping[str, Any] | None = None) -> bool:
    """Add the checkpoint of ``record`` to RUN_DIR/evaluations.jsonl,
    once per checkpoint name: a second evaluator (``evaluate.py --watch`` beside the training's
    actor) that evaluates it again leaves the first line. Returns whether a line was added.

    Each call re-reads the file and writes it back whole and atomically (locally: temporary file +
    rename) with the new line at the end, and adds any evaluated checkpoint still on disk that the
    history lacks, so a lost line comes back at the next evaluation unless its checkpoint was pruned
    in between.
    """
    # Two writers: the training's evaluation actor and `evaluate.py --watch` (a CronJob) may record
    # at the same moment. Locally they take the file's lock (`Location.locked`) around the re-read
    # and the write, so neither loses the other's line. S3 cannot append and has no locks; the
    # options were a whole-object rewrite that may lose a line to a concurrent upload (the race
    # best.json accepts), one object per checkpoint under a prefix (no race, but the pinned file
    # becomes a prefix and a report lists and reads an object per checkpoint), or conditional
    # writes (If-Match), which not every S3-compatible store implements. The rewrite is taken: the
    # window is one GET and one PUT, only two *different* checkpoints finishing together can lose
    # a line, and the self-repair above restores it from the checkpoint's metrics.json.
    location = location_of(run_dir, storage_options)
    with location.locked(EVALUATIONS_FILE):
        entries = read_evaluations(run_dir, storage_options)
        names = {entry.name for entry in entries}
        own = record.name
        added = []
        for name in location.subdirectories():
            if name.startswith(CHECKPOINT_PREFIX) and name not in names and name != own:
                with contextlib.suppress(ValueError, UnicodeDecodeError, OSError):
                    metrics = read_result(location.child(name))
                    if metrics is not None and metrics.checkpoint:
                        added.append(metrics)
                        names.add(name)
        new = own not in names
        if new:
            added.append(record)
        if added:
            added.sort(key=lambda e: (e.step if isinstance(e.step, int) else -1, e.name))
            lines = [json.dumps(entry.to_history_line(), allow_nan=False) for entry in entries + added]
            location.write_bytes_atomic(EVALUATIONS_FILE, ("\n".join(lines) + "\n").encode("utf-8"))
    return new
