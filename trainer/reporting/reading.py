"""The run as the report reads it (:func:`read_run`): its configuration, the step log, every
checkpoint with what the evaluator recorded for it (those pruned since included, from the
evaluation history), best.json, and what was missing or odd; each input read through trainer/run/
and checked for what the report uses (a damaged one is a :class:`ReportInputError` naming the
file). :func:`find_best` asks trainer/run/best.py which checkpoint is the best, as pruning does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from data_shards.storage import Location, StorageError, open_location
from trainer.evaluation import CXC_KEYS, ECCV_KEYS, METRIC_KEYS, PROTOCOL_CXC, PROTOCOL_ECCV
from trainer.run.best import best_checkpoint, load_best
from trainer.run.checkpoints import list_checkpoints
from trainer.run.history import read_evaluations
from trainer.run.layout import (
    BEST_FILE,
    CHECKPOINT_PREFIX,
    CONFIG_YAML,
    ERROR_FILE,
    EVALUATIONS_FILE,
    METRICS_FILE,
    TRAIN_LOG,
    read_json,
)
from trainer.run.records import EvaluationRecord, read_result
from trainer.run.step_log import StepSeries, read_step_log

__all__ = ["ANNOTATED_KEYS", "CheckpointInfo", "ReportInputError", "Run", "find_best", "is_number", "read_run"]

logger = logging.getLogger("trainer.report")

T = TypeVar("T")


class ReportInputError(ValueError):
    """An input of the run cannot be used; the message names the file (and line)."""


# The annotation protocols' blocks hold other keys (trainer/evaluation/metrics.py) and no rsum.
ANNOTATED_KEYS = {PROTOCOL_ECCV: ECCV_KEYS, PROTOCOL_CXC: CXC_KEYS}


@dataclass
class CheckpointInfo:
    """A complete (or pruned, but evaluated) checkpoint of the run and what the evaluator recorded for it."""

    name: str
    step: int | None
    epoch: int | None
    metrics: EvaluationRecord | None = None  # metrics.json, or its evaluations.jsonl line
    error: str | None = None  # from eval_error.json
    pruned: bool = False  # the directory is gone; the metrics come from evaluations.jsonl

    @property
    def dev_rsum(self) -> float | None:
        value = None if self.metrics is None else self.metrics.dev_rsum
        return float(value) if is_number(value) else None

    def test(self, protocol: str) -> dict[str, Any] | None:
        return None if self.metrics is None else (self.metrics.test or {}).get(protocol)


@dataclass
class Run:
    """Everything read from a run directory, and what was missing or odd about it."""

    url: str
    name: str
    is_s3: bool
    config: dict[str, Any] | None
    steps: StepSeries | None
    checkpoints: list[CheckpointInfo]
    incomplete: list[str]  # checkpoint_* directories without train_state.json
    best_file: EvaluationRecord | None  # best.json
    notes: list[str] = field(default_factory=list)  # what is missing, for summary.md

    def config_value(self, section: str, key: str) -> Any:
        return _config_value(self.config, section, key)

    def protocols(self) -> list[str]:
        """The recall test protocols (R@K, rsum) present in any metrics.json, in order of first
        appearance; the annotation protocols (eccv, cxc) have no rsum and appear in the best
        checkpoint's table only."""
        found: dict[str, None] = {}
        for checkpoint in self.checkpoints:
            for protocol in ((checkpoint.metrics.test if checkpoint.metrics else None) or {}):
                if protocol not in ANNOTATED_KEYS:
                    found[protocol] = None
        return list(found)

    def evaluated(self) -> list[CheckpointInfo]:
        return [c for c in self.checkpoints if c.metrics is not None]


def _config_value(config: dict[str, Any] | None, section: str, key: str) -> Any:
    """``config[section][key]``, or None where the file lacks it (an older or hand-edited config)."""
    block = (config or {}).get(section)
    return block.get(key) if isinstance(block, dict) else None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_text(location: Location, name: str) -> str | None:
    """The text of file ``name`` in ``location``; None if it does not exist."""
    try:
        return location.read_text(name)
    except FileNotFoundError:
        return None
    except StorageError as error:  # not UTF-8
        raise ReportInputError(str(error)) from None


def _read_record(read: Callable[[], T]) -> T:
    """A record of the run read by trainer/run/ (None if absent); damage is a ReportInputError."""
    try:
        return read()
    except (ValueError, StorageError) as error:  # not a JSON object; not UTF-8
        raise ReportInputError(str(error)) from None


def _validate_metrics(record: EvaluationRecord, where: str) -> None:
    """The parts of an evaluation record the report reads (docs/run_layout.md)."""
    if record.dev is not None:
        _check_metric_block(record.dev, f"{where}: dev")
    if record.dev_rsum is not None and not is_number(record.dev_rsum):
        raise ReportInputError(f"{where}: dev_rsum is {record.dev_rsum!r}, not a number")
    test = record.test
    if not isinstance(test, dict):
        raise ReportInputError(f"{where}: 'test' is {type(test).__name__}, expected an object of protocols")
    for protocol, block in test.items():
        _check_metric_block(block, f"{where}: test {protocol}", ANNOTATED_KEYS.get(protocol, METRIC_KEYS))


def _check_metric_block(block: Any, where: str, keys: Sequence[str] = METRIC_KEYS) -> None:
    if not isinstance(block, dict):
        raise ReportInputError(f"{where} is {type(block).__name__}, expected an object of metrics")
    for key in keys:
        if not is_number(block.get(key)):
            raise ReportInputError(f"{where}: {key} is {block.get(key)!r}, not a number")


def _checkpoint_directories(run: Location) -> list[str]:
    """Names of the checkpoint_* directories directly under the run, complete or not."""
    return [name for name in run.subdirectories() if name.startswith(CHECKPOINT_PREFIX)]


def read_run(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> Run:
    """Read everything the report needs; raises ReportInputError for corrupt inputs and when the
    location holds no run at all."""
    location = open_location(run_dir, storage_options)
    options = dict(storage_options) if storage_options is not None else None
    notes: list[str] = []

    config: dict[str, Any] | None = None
    config_text = _read_text(location, CONFIG_YAML)
    if config_text is None:
        notes.append(f"no {CONFIG_YAML}: configuration highlights unavailable")
    else:
        try:
            loaded = yaml.safe_load(config_text)
        except yaml.YAMLError as error:
            loaded = None
            notes.append(f"{CONFIG_YAML} is not valid YAML ({error}); configuration highlights unavailable")
        if isinstance(loaded, dict):
            config = loaded
        elif loaded is not None:
            notes.append(f"{CONFIG_YAML} is not a mapping of sections; configuration highlights unavailable")

    steps = _read_record(lambda: read_step_log(location))
    if steps is None:
        notes.append(f"no {TRAIN_LOG}: loss, learning-rate and throughput plots not produced")
    elif len(steps) == 0:
        notes.append(f"{TRAIN_LOG} is empty (no step finished yet): loss, learning-rate and throughput "
                     "plots not produced")

    checkpoints = []
    for entry in list_checkpoints(location.url, options):
        info = CheckpointInfo(name=entry.name, step=entry.step, epoch=entry.epoch)
        checkpoint = location.child(entry.name)
        if entry.evaluated:
            info.metrics = _read_record(lambda: read_result(checkpoint))  # None: pruned between listing and reading
            if info.metrics is not None:
                _validate_metrics(info.metrics, checkpoint.child_url(METRICS_FILE))
        elif entry.failed:
            try:
                info.error = str((_read_record(lambda: read_json(checkpoint, ERROR_FILE)) or {}).get("error")
                                 or "no error message recorded")
            except ReportInputError as error:  # the failure record itself is damaged: still a failure
                info.error = f"{ERROR_FILE} unreadable: {error}"
        checkpoints.append(info)
    complete = {c.name for c in checkpoints}
    incomplete = [name for name in _checkpoint_directories(location) if name not in complete]
    checkpoints = _with_history(location, checkpoints, options, notes)

    best_file: EvaluationRecord | None = None
    try:
        best_file = load_best(location.url, options)
        best_found = best_file is not None
    except (ValueError, StorageError) as error:
        # The trainer itself treats an unreadable best.json as absent (trainer/run/best.py, read_best).
        best_found = True
        logger.warning("%s", error)
        notes.append(f"{BEST_FILE} unreadable ({error}); the best checkpoint is the highest dev rsum found")

    if config is None and config_text is None and steps is None and not checkpoints and not incomplete \
            and not best_found:
        raise ReportInputError(f"{location.url}: not a run directory (no {CONFIG_YAML}, {TRAIN_LOG}, "
                               f"{BEST_FILE} or checkpoint_* found)")
    name = str(_config_value(config, "checkpoint", "run_name") or location.url.rstrip("/").rsplit("/", 1)[-1])
    return Run(url=location.url, name=name, is_s3=location.is_s3, config=config, steps=steps,
               checkpoints=checkpoints, incomplete=incomplete, best_file=best_file, notes=notes)


def _with_history(location: Location, checkpoints: list[CheckpointInfo], options: dict[str, Any] | None,
                  notes: list[str]) -> list[CheckpointInfo]:
    """The checkpoints on disk plus those of the evaluation history (evaluations.jsonl) whose
    directories were pruned, in step order: the history keeps every evaluated checkpoint."""
    try:
        history = read_evaluations(location.url, options)
    except ValueError as error:
        raise ReportInputError(str(error)) from None
    by_name = {c.name: c for c in checkpoints}
    for line in history:
        where = f"{location.child_url(EVALUATIONS_FILE)} ({line.checkpoint})"
        _validate_metrics(line, where)
        entry = by_name.get(line.checkpoint)
        if entry is None:
            entry = by_name[line.checkpoint] = CheckpointInfo(name=line.checkpoint, step=line.step, epoch=line.epoch,
                                                             pruned=True)
        if entry.metrics is None:
            entry.metrics = line
    if not history and any(c.metrics is not None for c in checkpoints):
        notes.append(f"no {EVALUATIONS_FILE}: only the checkpoints still in the run are plotted")
    return sorted(by_name.values(), key=lambda c: (c.step if c.step is not None else -1, c.name))


def find_best(run: Run) -> tuple[CheckpointInfo | None, EvaluationRecord | None, str]:
    """The best checkpoint, chosen by trainer/run/best.py's ``best_checkpoint`` as pruning chooses
    it: (its entry if still in the run, the evaluation for its recall table, where the choice came
    from). best.json decides; without a usable one, the highest dev rsum among the metrics."""
    by_name = {c.name: c for c in run.checkpoints}
    evaluated = {c.name: c.metrics for c in run.evaluated() if c.metrics is not None}
    fallback = f"highest dev rsum (no {BEST_FILE})"
    if run.best_file is not None and run.best_file.checkpoint:
        name, record = best_checkpoint(run.best_file, evaluated)  # type: ignore[misc]
        if record is not run.best_file:
            return by_name[name], record, BEST_FILE
        # best.json outlives its checkpoint's metrics.json only if someone deleted files by hand;
        # its own copy of the metrics still gives the table (dev, dev_images, the test blocks).
        try:
            _validate_metrics(record, BEST_FILE)
        except ReportInputError as error:  # unusable like an unreadable best.json: fall back
            logger.warning("%s", error)
            run.notes.append(f"{BEST_FILE} unusable ({error}); the best checkpoint is the highest dev rsum found")
            fallback = f"highest dev rsum ({BEST_FILE} unusable)"
        else:
            entry = by_name.get(name)
            missing = "directory" if entry is None else METRICS_FILE
            return entry, record, f"{BEST_FILE} (the checkpoint's {missing} is gone)"
    top = best_checkpoint(None, evaluated)
    if top is None:
        return None, None, ""
    return by_name[top[0]], top[1], fallback
