"""One checkpoint's evaluation as one type, :class:`EvaluationRecord`, and the records the
evaluator writes beside a checkpoint: ``metrics.json`` (the evaluation, :func:`record_result`)
and ``eval_error.json`` (instead of it, when evaluating the checkpoint failed, :func:`record_failure`).

The same record is what three files of the run directory hold, each in its pinned shape
(docs/run_layout.md); the record converts to and from each, and nothing else spells their fields:

    metrics.json        every field (:meth:`EvaluationRecord.to_metrics_json`, ``from_metrics_json``)
    evaluations.jsonl   a line per checkpoint: the checkpoint's directory name, no "qualitative" and
                        no "format_version" (``to_history_line``, ``from_history_line``; history.py)
    best.json           the checkpoint, its dev metrics, ``"dev_images"`` and its test metrics under
                        ``"metrics"``, stamped ``"updated_at"`` (``to_best_json``, ``from_best_json``;
                        best.py)

Reading is lenient, as the files' readers always were: a field a file lacks takes its default, so
older and hand-written records still read; what the numbers must be is checked by their users
(trainer/report.py validates what it plots).
"""

from __future__ import annotations

import dataclasses
import enum
import traceback
from collections.abc import Mapping
from typing import Any

from data_shards.storage import Location
from trainer.run.layout import (
    ERROR_FILE,
    METRICS_FILE,
    checkpoint_name,
    location_of,
    read_json,
    remove_if_present,
    utc_now,
    write_json,
)

__all__ = ["METRICS_FORMAT_VERSION", "NO_PAGE", "EvaluationRecord", "NoPage", "read_result", "record_failure",
           "record_result"]

METRICS_FORMAT_VERSION = 1


class NoPage(enum.Enum):
    """The type of :data:`NO_PAGE`."""

    NO_PAGE = "no page"


# EvaluationRecord.qualitative when no qualitative page was asked for: metrics.json has no
# "qualitative" key then (None is a page that could not be written).
NO_PAGE = NoPage.NO_PAGE


@dataclasses.dataclass(frozen=True)
class EvaluationRecord:
    """One checkpoint's evaluation: the dev metrics that select the best checkpoint and the test
    metrics of each protocol (the keys evaluate.py writes, in percent)."""

    checkpoint: str  # the checkpoint's path or URL (in the history: its directory name)
    step: int | None = None
    epoch: int | None = None
    dev: dict[str, Any] | None = None  # protocol "all" on the first eval.dev_images dev images
    dev_rsum: float | None = None  # what the best checkpoint is chosen by; None: no dev split
    test: dict[str, Any] = dataclasses.field(default_factory=dict)  # protocol -> its metrics
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # protocol -> why it did not run
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # dev, dev_images, test, test_images
    qualitative: str | None | NoPage = NO_PAGE  # the qualitative page's name; None: not written
    evaluated_at: str | None = None
    elapsed_s: float | None = None
    format_version: int = METRICS_FORMAT_VERSION
    updated_at: str | None = None  # best.json only: when the checkpoint became the best

    @property
    def name(self) -> str:
        """The checkpoint's directory name (``checkpoint_<step>``)."""
        return checkpoint_name(str(self.checkpoint))

    @property
    def dev_images(self) -> int | None:
        """How many dev images the dev metrics ranked (dev rsums compare over the same number)."""
        return (self.data or {}).get("dev_images")

    # ---- metrics.json

    def to_metrics_json(self) -> dict[str, Any]:
        payload = {"checkpoint": self.checkpoint, "step": self.step, "epoch": self.epoch, "dev": self.dev,
                   "dev_rsum": self.dev_rsum, "test": self.test, "skipped": self.skipped, "data": self.data}
        if self.qualitative is not NO_PAGE:
            payload["qualitative"] = self.qualitative
        payload.update(evaluated_at=self.evaluated_at, elapsed_s=self.elapsed_s, format_version=self.format_version)
        return payload

    @classmethod
    def from_metrics_json(cls, payload: Mapping[str, Any]) -> EvaluationRecord:
        return cls(checkpoint=payload.get("checkpoint", ""), step=payload.get("step"), epoch=payload.get("epoch"),
                   dev=payload.get("dev"), dev_rsum=payload.get("dev_rsum"), test=payload.get("test", {}),
                   skipped=payload.get("skipped", {}), data=payload.get("data", {}),
                   qualitative=payload.get("qualitative", NO_PAGE), evaluated_at=payload.get("evaluated_at"),
                   elapsed_s=payload.get("elapsed_s"),
                   format_version=payload.get("format_version", METRICS_FORMAT_VERSION))

    # ---- a line of evaluations.jsonl

    def to_history_line(self) -> dict[str, Any]:
        return {"checkpoint": self.name, "step": self.step, "epoch": self.epoch, "dev_rsum": self.dev_rsum,
                "dev": self.dev, "test": self.test, "skipped": self.skipped, "data": self.data,
                "evaluated_at": self.evaluated_at or utc_now(), "elapsed_s": self.elapsed_s}

    @classmethod
    def from_history_line(cls, line: Mapping[str, Any]) -> EvaluationRecord:
        return cls(checkpoint=str(line["checkpoint"]), step=line.get("step"), epoch=line.get("epoch"),
                   dev=line.get("dev"), dev_rsum=line.get("dev_rsum"), test=line.get("test", {}),
                   skipped=line.get("skipped", {}), data=line.get("data", {}), evaluated_at=line.get("evaluated_at"),
                   elapsed_s=line.get("elapsed_s"))

    # ---- best.json

    def to_best_json(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "step": self.step, "epoch": self.epoch, "dev_rsum": self.dev_rsum,
                "dev_images": self.dev_images, "dev": self.dev, "metrics": self.test, "updated_at": self.updated_at}

    @classmethod
    def from_best_json(cls, payload: Mapping[str, Any]) -> EvaluationRecord:
        return cls(checkpoint=payload.get("checkpoint") or "", step=payload.get("step"), epoch=payload.get("epoch"),
                   dev=payload.get("dev"), dev_rsum=payload.get("dev_rsum"), test=payload.get("metrics") or {},
                   data={"dev_images": payload.get("dev_images")}, updated_at=payload.get("updated_at"))


def record_result(checkpoint: str, record: EvaluationRecord,
                  storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``metrics.json`` beside the checkpoint (atomically) and drop a stale eval_error.json."""
    location = location_of(checkpoint, storage_options)
    write_json(location, METRICS_FILE, record.to_metrics_json())
    # metrics.json now says this checkpoint was evaluated; an older failure record would only
    # contradict it (it exists after a successful --retry-failed).
    remove_if_present(location, ERROR_FILE)


def read_result(checkpoint: Location) -> EvaluationRecord | None:
    """A checkpoint's ``metrics.json``; None when it has none. Raises ValueError naming the file
    when it is not a JSON object (StorageError when it is not UTF-8)."""
    payload = read_json(checkpoint, METRICS_FILE)
    return None if payload is None else EvaluationRecord.from_metrics_json(payload)


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
