"""Plots and a markdown summary of a training run: ``python trainer/report.py RUN_DIR --output DIR``.

RUN_DIR is a run directory as docs/run_layout.md describes it, local or ``s3://`` (read through
data_shards/storage.py; S3 endpoint from ``--endpoint-url``, else ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``, credentials from the environment). DIR is a local directory; it receives

* ``losses.png``: L_M (matching), L_G (caption) and the total loss over the steps, raw and smoothed,
  and the learning rate in its own panel; epoch boundaries and the switch to hardest negatives
  are marked;
* ``throughput.png``: samples/s and data wait per step (rolling mean, raw values faint);
* ``diagnostics.png``: the hard-negative diagnostics of each logging interval (trainer/diagnostics.py):
  the gap between positive and hardest-negative scores (mean and 10th percentile, both directions)
  with the margin, and the fractions of active hinges and of hardest negatives from other workers;
  the switch to hardest negatives and the intervals the collapse detector flagged are marked (only
  for step logs that carry the diagnostics);
* ``recall.png``: R@1/5/10 (image-to-text and text-to-image) of every test protocol present and the
  dev and test rsum by checkpoint step, the best checkpoint marked;
* ``summary.md``: run name, configuration highlights (from ``RUN_DIR/config.yaml``), steps and
  epochs done, wall time, mean throughput, final losses, the last hard-negative diagnostics and
  whether the collapse detector tripped, the best checkpoint's recall table (the
  layout the evaluation worker logs), every checkpoint with its rsum, and links to the plots;
* ``qualitative.md`` and ``qualitative/*.png``: the best checkpoint's qualitative page (top-3
  retrievals and attention maps of fixed test queries, trainer/qualitative.py), copied from the
  checkpoint and linked from summary.md, when it has one.

The inputs are ``train_log.jsonl`` (one JSON object per step, trainer/worker.py's ``StepLog``),
``evaluations.jsonl`` (the evaluation history, which keeps the checkpoints that pruning deleted),
the ``checkpoint_*/metrics.json`` and ``eval_error.json`` files and ``best.json`` (written by
trainer/checkpoint_eval.py), all named and read through trainer/run/. Every evaluated
checkpoint is plotted: those of the history and, for a run without one (written before it
existed), those whose metrics.json is still there. A run with missing pieces (no step log yet, no
evaluation yet, a checkpoint whose evaluation failed) gives the plots it can, and summary.md says
what is missing. A corrupt step-log line, history line or metrics.json stops the report with a
message naming the file (and the line); the exception is an unparsable *last* step-log line
without a newline, which is a line still being written by a live run and is skipped with a
warning.

Exit status: 0 on success, printing the paths written (one per line) on stdout; 2 when the run
directory cannot be read or an input is corrupt (a one-line message on stderr). Logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

if __name__ == "__main__" and __package__ in (None, ""):  # `python trainer/report.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede the pyplot import

import itertools

import matplotlib.pyplot as plt
import numpy as np
import yaml
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from data_shards.storage import (
    Location,
    StorageError,
    is_s3_url,
    open_location,
    s3_storage_options,
)
from trainer.evaluation import CXC_KEYS, ECCV_KEYS, PROTOCOL_CXC, PROTOCOL_ECCV, results_table
from trainer.diagnostics import (
    ACTIVE_FIELD,
    COLLAPSED_FIELD,
    DIRECTIONS,
    GAP_MEAN_FIELD,
    GAP_P10_FIELD,
    LOG_FIELDS,
    REMOTE_FIELD,
)
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
    QUALITATIVE_DIR,
    QUALITATIVE_FILE,
    TRAIN_LOG,
    read_json,
    utc_now,
)
from trainer.run.records import EvaluationRecord, read_result

logger = logging.getLogger("trainer.report")

T = TypeVar("T")

EXIT_OK = 0
EXIT_BAD_INPUT = 2

LOSSES_PNG = "losses.png"
THROUGHPUT_PNG = "throughput.png"
DIAGNOSTICS_PNG = "diagnostics.png"
RECALL_PNG = "recall.png"
SUMMARY_MD = "summary.md"
PLOT_FILES = (LOSSES_PNG, THROUGHPUT_PNG, DIAGNOSTICS_PNG, RECALL_PNG)

# The fields of a step-log record this report uses (trainer/worker.py `_Loop.record` writes them).
STEP_FIELDS = ("step", "epoch", "loss", "loss_matching", "loss_caption", "lr", "samples_per_s",
               "data_wait_s", "step_time_s", "time")
# The keys evaluate.py writes per protocol (trainer/evaluation/metrics.py), and the recalls plotted.
METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
               "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum")
# The annotation protocols' blocks hold other keys (trainer/evaluation/metrics.py) and no rsum.
ANNOTATED_KEYS = {PROTOCOL_ECCV: ECCV_KEYS, PROTOCOL_CXC: CXC_KEYS}
RECALL_KS = (1, 5, 10)
FIGSIZE = (9.0, 6.0)


class ReportInputError(ValueError):
    """An input of the run cannot be used; the message names the file (and line)."""


# --------------------------------------------------------------------------------------------------
# Reading the run
# --------------------------------------------------------------------------------------------------


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
    # Hard-negative diagnostics (trainer/diagnostics.py LOG_FIELDS -> column, NaN on the steps that
    # do not close a logging interval or where nothing was counted) and the collapse flag.
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
        return float(value) if _is_number(value) else None

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


def _is_number(value: Any) -> bool:
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


def read_step_log(run: Location) -> StepSeries | None:
    """``train_log.jsonl`` as columns; None when the file does not exist.

    Raises ReportInputError naming the file and line for a line that is not a JSON object with
    the numeric fields of STEP_FIELDS. An unparsable last line without a trailing newline is a
    line the trainer is still appending: it is skipped with a warning.
    """
    text = _read_text(run, TRAIN_LOG)
    if text is None:
        return None
    where = run.child_url(TRAIN_LOG)
    lines = text.split("\n")  # a complete file ends with "\n": the last element is then ""
    by_step: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it: still being written
                logger.warning("%s line %d: incomplete last line (being written?), skipped", where, number)
                continue
            raise ReportInputError(f"{where} line {number}: not valid JSON ({error.msg} at column "
                                   f"{error.colno})") from None
        if not isinstance(record, dict):
            raise ReportInputError(f"{where} line {number}: expected a JSON object, got {type(record).__name__}")
        for key in STEP_FIELDS:
            if key not in record:
                raise ReportInputError(f"{where} line {number}: no {key!r} field")
            if not _is_number(record[key]):
                raise ReportInputError(f"{where} line {number}: {key!r} is {record[key]!r}, not a finite number")
        for key in LOG_FIELDS:  # optional: only on the steps that close a logging interval; null: nothing counted
            if record.get(key) is not None and not _is_number(record[key]):
                raise ReportInputError(f"{where} line {number}: {key!r} is {record[key]!r}, not a finite number")
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
        hardest_negatives=np.array([bool(r.get("hardest_negatives", False)) for r in records], dtype=bool),
        diagnostics={key: np.array([np.nan if r.get(key) is None else float(r[key]) for r in records], dtype=float)
                     for key in LOG_FIELDS},
        collapsed=np.array([bool(r.get(COLLAPSED_FIELD, False)) for r in records], dtype=bool))


def _validate_metrics(record: EvaluationRecord, where: str) -> None:
    """The parts of an evaluation record the report reads (docs/run_layout.md)."""
    if record.dev is not None:
        _check_metric_block(record.dev, f"{where}: dev")
    if record.dev_rsum is not None and not _is_number(record.dev_rsum):
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
        if not _is_number(block.get(key)):
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

    steps = read_step_log(location)
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


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` values; the first values average what exists so far."""
    if window <= 1 or values.size == 0:
        return values.astype(float)
    sums = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def segmented_rolling_mean(values: np.ndarray, window: int, segments: np.ndarray) -> np.ndarray:
    """:func:`rolling_mean` restarted wherever ``segments`` changes value: L_M with hardest
    negatives is a different sum than with all negatives, so no mean may span the switch."""
    result = np.empty(values.size, dtype=float)
    bounds = [0, *(np.nonzero(np.diff(segments.astype(int)) != 0)[0] + 1).tolist(), values.size]
    for start, end in itertools.pairwise(bounds):
        result[start:end] = rolling_mean(values[start:end], window)
    return result


def smoothing_window(count: int) -> int:
    """About 5 % of the run, between 1 and 50 steps: visible trends without hiding epochs."""
    return max(1, min(50, count // 20))


def _epoch_starts(steps: StepSeries) -> list[int]:
    """Steps that begin a new epoch (not the first epoch logged)."""
    changes = np.nonzero(np.diff(steps.epoch) != 0)[0] + 1
    return [int(steps.step[i]) for i in changes]


def _mark_epochs(axes: Sequence[Axes], starts: Sequence[int]) -> None:
    for ax in axes:
        for step in starts:
            ax.axvline(step - 0.5, color="0.6", linewidth=0.6, alpha=0.5, zorder=0)


def _log_scale_if_wide(ax: Axes, values: np.ndarray) -> None:
    """Log scale when the values are positive and span more than a factor 20 (loss drops, lr decays)."""
    positive = values[np.isfinite(values)]
    if positive.size and positive.min() > 0 and positive.max() / positive.min() > 20:
        ax.set_yscale("log")


def _save(figure: Figure, path: Path, dpi: int) -> Path:
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    logger.info("wrote %s", path)
    return path


def plot_losses(steps: StepSeries, path: Path, dpi: int) -> Path:
    window = smoothing_window(len(steps))
    figure, (loss_ax, lr_ax) = plt.subplots(2, 1, sharex=True, figsize=FIGSIZE,
                                            gridspec_kw={"height_ratios": [3, 1]}, layout="constrained")
    for values, label, color in ((steps.loss, "total", "black"), (steps.loss_matching, "L_M (matching)", "tab:blue"),
                                 (steps.loss_caption, "L_G (caption)", "tab:orange")):
        loss_ax.plot(steps.step, values, color=color, alpha=0.2, linewidth=0.7)
        loss_ax.plot(steps.step, segmented_rolling_mean(values, window, steps.hardest_negatives), color=color,
                     linewidth=1.4, label=label)
    _log_scale_if_wide(loss_ax, np.concatenate([steps.loss, steps.loss_matching, steps.loss_caption]))
    switch = np.nonzero(steps.hardest_negatives)[0]
    if switch.size and switch[0] > 0:  # the hardest-negative warm-up ended inside the logged range
        loss_ax.axvline(steps.step[switch[0]] - 0.5, color="tab:red", linestyle="--", linewidth=0.8,
                        label="hardest negatives from here")
    loss_ax.set_ylabel("loss per step")
    loss_ax.set_title(f"Losses (lines: rolling mean over {window} steps; faint: per step)")
    loss_ax.legend(loc="upper right", fontsize="small")
    lr_ax.plot(steps.step, steps.lr, color="tab:green", linewidth=1.2, drawstyle="steps-post")
    _log_scale_if_wide(lr_ax, steps.lr)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step (grey lines: epoch boundaries)")
    _mark_epochs((loss_ax, lr_ax), _epoch_starts(steps))
    return _save(figure, path, dpi)


def plot_throughput(steps: StepSeries, path: Path, dpi: int) -> Path:
    window = smoothing_window(len(steps))
    figure, (rate_ax, wait_ax) = plt.subplots(2, 1, sharex=True, figsize=FIGSIZE, layout="constrained")
    rate_ax.plot(steps.step, steps.samples_per_s, color="tab:blue", alpha=0.25, linewidth=0.7)
    rate_ax.plot(steps.step, rolling_mean(steps.samples_per_s, window), color="tab:blue", linewidth=1.4)
    rate_ax.set_ylabel("samples/s")
    rate_ax.set_ylim(bottom=0)
    rate_ax.set_title(f"Throughput and data wait (lines: rolling mean over {window} steps; faint: per step)")
    wait_ms = 1000.0 * steps.data_wait_s
    wait_ax.plot(steps.step, wait_ms, color="tab:purple", alpha=0.25, linewidth=0.7)
    wait_ax.plot(steps.step, rolling_mean(wait_ms, window), color="tab:purple", linewidth=1.4)
    wait_ax.set_ylabel("data wait (ms/step)")
    wait_ax.set_ylim(bottom=0)
    wait_ax.set_xlabel("step (grey lines: epoch boundaries)")
    _mark_epochs((rate_ax, wait_ax), _epoch_starts(steps))
    return _save(figure, path, dpi)


def plot_diagnostics(steps: StepSeries, margin: float | None, path: Path, dpi: int) -> Path | None:
    """Hard-negative gaps, active hinges and remote hardest negatives by logging interval; None when
    the step log carries no diagnostics (written before they existed)."""
    if not steps.has_diagnostics:
        return None
    rows = steps.diagnostic_rows
    x = steps.step[rows]
    figure, (gap_ax, ratio_ax) = plt.subplots(2, 1, sharex=True, figsize=FIGSIZE, layout="constrained")
    colors = {"i2t": "tab:blue", "t2i": "tab:orange"}
    for direction in DIRECTIONS:
        gap_ax.plot(x, steps.diagnostics[GAP_MEAN_FIELD.format(direction=direction)][rows], color=colors[direction], marker="o",
                    markersize=2, linewidth=1.2, label=f"{direction} mean")
        gap_ax.plot(x, steps.diagnostics[GAP_P10_FIELD.format(direction=direction)][rows], color=colors[direction], linestyle="--",
                    linewidth=1.0, label=f"{direction} 10th percentile")
    gap_ax.axhline(0.0, color="0.3", linewidth=0.8)
    if margin is not None:
        gap_ax.axhline(margin, color="tab:green", linestyle=":", linewidth=1.0,
                       label=f"margin {margin:g} (below: hinge active)")
    gap_ax.set_ylabel("positive - hardest negative")
    gap_ax.set_title("Hard negatives per logging interval (i2t: image anchors, t2i: caption anchors)")
    gap_ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="x-small")
    ratio_ax.plot(x, 100 * steps.diagnostics[ACTIVE_FIELD][rows], color="black", marker="o", markersize=2,
                  linewidth=1.2, label="active hinges")
    ratio_ax.plot(x, 100 * steps.diagnostics[REMOTE_FIELD][rows], color="tab:purple", linewidth=1.0,
                  label="hardest negative from another worker")
    ratio_ax.set_ylim(-2, 102)
    ratio_ax.set_ylabel("% per interval")
    ratio_ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="x-small")
    switch = np.nonzero(steps.hardest_negatives)[0]
    collapsed = x[steps.collapsed[rows]]
    for ax in (gap_ax, ratio_ax):
        if switch.size and switch[0] > 0:
            ax.axvline(steps.step[switch[0]] - 0.5, color="tab:red", linestyle="--", linewidth=0.8)
        for step in collapsed:  # intervals the collapse detector flagged
            ax.axvline(step, color="tab:red", linewidth=2.0, alpha=0.25)
    ratio_ax.set_xlabel("step (red dashes: hardest negatives from here; red bands: collapse detected; "
                        "grey lines: epochs)")
    _mark_epochs((gap_ax, ratio_ax), _epoch_starts(steps))
    return _save(figure, path, dpi)


def plot_recall(run: Run, best: CheckpointInfo | None, path: Path, dpi: int) -> Path | None:
    """Recalls per test protocol and rsums by checkpoint step; None when nothing is evaluated."""
    evaluated = [c for c in run.evaluated() if c.step is not None]
    if not evaluated:
        return None
    protocols = run.protocols()
    figure, axes = plt.subplots(len(protocols) + 1, 1, sharex=True, squeeze=False,
                                figsize=(FIGSIZE[0], 2.6 * (len(protocols) + 1)), layout="constrained")
    colors = {1: "tab:blue", 5: "tab:orange", 10: "tab:green"}
    for ax, protocol in zip(axes[:-1, 0], protocols):
        points = [(c.step, c.test(protocol)) for c in evaluated if c.test(protocol) is not None]
        xs = [step for step, _ in points]
        for k in RECALL_KS:
            for direction, style, marker in (("i2t", "-", "o"), ("t2i", "--", "s")):
                ax.plot(xs, [m[f"{direction}_r{k}"] for _, m in points], linestyle=style, marker=marker,
                        markersize=3, color=colors[k], label=f"{direction} R@{k}")
        ax.set_ylabel("recall (%)")
        ax.set_title(f"test {protocol} (solid: image-to-text, dashed: text-to-image)", fontsize="medium")
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="x-small")
    rsum_ax = axes[-1, 0]
    dev = [(c.step, c.dev_rsum) for c in evaluated if c.dev_rsum is not None]
    if dev:
        rsum_ax.plot([s for s, _ in dev], [r for _, r in dev], marker="o", markersize=3, color="black",
                     label="dev rsum")
    for protocol in protocols:
        points = [(c.step, c.test(protocol)) for c in evaluated if c.test(protocol) is not None]
        rsum_ax.plot([s for s, _ in points], [float(m["rsum"]) for _, m in points], marker="s", markersize=3,
                     linestyle="--", label=f"test {protocol} rsum")
    if best is not None and best.step is not None:
        for ax in axes[:, 0]:
            ax.axvline(best.step, color="tab:red", linewidth=0.8, alpha=0.6)
        if best.dev_rsum is not None:
            rsum_ax.plot([best.step], [best.dev_rsum], marker="*", markersize=12, color="tab:red", linestyle="",
                         label=f"best (step {best.step})")
    if run.steps is not None and len(run.steps) > 0:  # the training's whole step range, as the other plots
        rsum_ax.set_xlim(0, max(int(run.steps.step[-1]), max(c.step or 0 for c in evaluated)) * 1.02)
    rsum_ax.set_ylabel("rsum")
    rsum_ax.set_xlabel("checkpoint step (red line: best checkpoint by dev rsum)")
    rsum_ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="x-small")
    return _save(figure, path, dpi)


# --------------------------------------------------------------------------------------------------
# summary.md
# --------------------------------------------------------------------------------------------------

# (section, key, label) of the configuration shown in the summary.
CONFIG_HIGHLIGHTS = (
    ("model", "embed_size", "embedding size"),
    ("model", "num_reasoning_layers", "reasoning layers"),
    ("model", "aggregation", "aggregation"),
    ("model", "caption_loss_weight", "caption loss weight (lambda)"),
    ("data", "train", "train shards"),
    ("data", "dev", "dev shards"),
    ("data", "test", "test shards"),
    ("optim", "epochs", "epochs"),
    ("optim", "global_batch_size", "global batch size"),
    ("optim", "learning_rate", "learning rate"),
    ("optim", "lr_decay_every_epochs", "lr decay every (epochs)"),
    ("optim", "warmup_epochs", "all-negatives warm-up (epochs)"),
    ("optim", "warmup_steps", "all-negatives warm-up (steps)"),
    ("optim", "margin", "hinge margin"),
    ("monitoring", "collapse_intervals", "collapse detector (logging intervals, 0: off)"),
    ("distributed", "workers", "workers"),
    ("distributed", "use_gpu", "GPUs"),
    ("distributed", "precision", "precision"),
    ("distributed", "zero_stage", "ZeRO stage"),
    ("checkpoint", "every_steps", "checkpoint every (steps, 0: per epoch)"),
    ("checkpoint", "keep_last", "checkpoints kept"),
    ("eval", "test_protocols", "test protocols"),
    ("eval", "dev_images", "dev images"),
)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _config_section(run: Run) -> list[str]:
    if run.config is None:
        return ["Not available (see above)."]
    lines = ["| setting | value |", "| --- | --- |"]
    for section, key, label in CONFIG_HIGHLIGHTS:
        value = run.config_value(section, key)
        if value is None:
            continue
        shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        lines.append(f"| {label} (`{section}.{key}`) | {shown} |")
    return lines


def _training_section(run: Run) -> list[str]:
    steps = run.steps
    if steps is None or len(steps) == 0:
        return ["No steps logged."]
    epochs_configured = run.config_value("optim", "epochs")
    first_epoch, last_epoch = int(steps.epoch.min()), int(steps.epoch.max())
    seconds = steps.step_time_s + steps.data_wait_s
    # The first record's time marks the end of its step: the run started one step duration before.
    wall = float(steps.time[-1] - (steps.time[0] - seconds[0]))
    samples = float(steps.samples.sum())
    tail = smoothing_window(len(steps))
    lines = [
        f"- steps logged: {len(steps)} (steps {int(steps.step[0])}-{int(steps.step[-1])})",
        f"- epochs reached: {first_epoch}-{last_epoch} (0-based), i.e. {last_epoch + 1}"
        + (f" of {epochs_configured} configured" if epochs_configured is not None else ""),
        f"- training wall time: {wall:.1f} s (start of the first logged step to the end of the last)",
        (f"- mean throughput: {samples / max(float(seconds.sum()), 1e-9):.1f} samples/s "
         f"({samples:.0f} samples in {float(seconds.sum()):.1f} s of steps); data wait "
         f"{1000 * float(steps.data_wait_s.mean()):.1f} ms/step "
         f"({100 * float(steps.data_wait_s.sum()) / max(float(seconds.sum()), 1e-9):.1f} % of step time)"),
        (f"- final losses (last step; mean of the last {tail} steps): "
         f"L_M {steps.loss_matching[-1]:.4f} ({steps.loss_matching[-tail:].mean():.4f}), "
         f"L_G {steps.loss_caption[-1]:.4f} ({steps.loss_caption[-tail:].mean():.4f}), "
         f"total {steps.loss[-1]:.4f} ({steps.loss[-tail:].mean():.4f})"),
        f"- final learning rate: {steps.lr[-1]:.3g}",
    ]
    if run.is_s3:
        lines.append("- on s3:// the step log is uploaded at each checkpoint: steps after the last checkpoint "
                     "are not in it yet")
    lines += _diagnostics_lines(steps)
    return lines


def _diagnostics_lines(steps: StepSeries) -> list[str]:
    """The summary's lines on the hard-negative diagnostics and the collapse detector."""
    if not steps.has_diagnostics:
        return []
    last = int(steps.diagnostic_rows[-1])
    d = {key: (float(column[last]) if np.isfinite(column[last]) else None) for key, column in steps.diagnostics.items()}
    gaps = ", ".join(f"{direction} {_fmt(d[GAP_MEAN_FIELD.format(direction=direction)], 3)} / "
                     f"{_fmt(d[GAP_P10_FIELD.format(direction=direction)], 3)}" for direction in DIRECTIONS)
    active, remote = d[ACTIVE_FIELD], d[REMOTE_FIELD]
    lines = [(f"- hard negatives, last logging interval (step {int(steps.step[last])}): gap positive - hardest "
              f"negative (mean / 10th percentile) {gaps}; active hinges "
              f"{_fmt(None if active is None else 100 * active, 1)} %; hardest negatives from other workers "
              f"{_fmt(None if remote is None else 100 * remote, 1)} %")]
    flagged = steps.step[steps.collapsed]
    if flagged.size:
        lines.append(f"- **collapse detected** (L_M at 2 x global batch x margin under hardest negatives) at "
                     f"{flagged.size} logging interval(s), first at step {int(flagged[0])}, last at step "
                     f"{int(flagged[-1])}: try a longer all-negatives warm-up or a lower learning rate "
                     f"(docs/operations.md, \"Collapse\")")
    else:
        lines.append("- collapse detector: did not trip")
    return lines


def copy_qualitative_page(run: Run, best: CheckpointInfo | None, output: Path,
                          storage_options: Mapping[str, Any] | None) -> str | None:
    """Copy the best checkpoint's qualitative page (qualitative.md and its PNGs, trainer/qualitative.py)
    into ``output``, so the report links it with the same relative paths; returns where it came
    from, or None when the checkpoint has none (evaluated without eval.qualitative_queries, pruned)."""
    stale = output / QUALITATIVE_DIR
    if stale.is_dir():
        shutil.rmtree(stale)  # an earlier report's figures: never show another checkpoint's
    (output / QUALITATIVE_FILE).unlink(missing_ok=True)
    if best is None or best.pruned:
        return None
    checkpoint = open_location(run.url, storage_options).child(best.name)
    try:
        page = checkpoint.read_bytes(QUALITATIVE_FILE)
    except FileNotFoundError:
        return None
    figures = checkpoint.child(QUALITATIVE_DIR)
    (output / QUALITATIVE_DIR).mkdir(parents=True, exist_ok=True)
    for name in figures.list(".png"):
        (output / QUALITATIVE_DIR / name).write_bytes(figures.read_bytes(name))
    (output / QUALITATIVE_FILE).write_bytes(page)
    return checkpoint.child_url(QUALITATIVE_FILE)


def _best_section(best: CheckpointInfo | None, record: EvaluationRecord | None, source: str,
                  qualitative: str | None = None) -> list[str]:
    if record is None:
        return ["No checkpoint with a dev rsum yet: no best checkpoint."]
    lines = [(f"`{record.name}` (step {record.step}, epoch {record.epoch}): dev rsum "
              f"**{_fmt(record.dev_rsum)}** (chosen by: {source})"), "",
             "```text", results_table(record.to_metrics_json()), "```"]
    for protocol, reason in (record.skipped or {}).items():
        lines.append(f"- test protocol `{protocol}` skipped: {reason}")
    if qualitative is not None:
        lines += ["", f"Qualitative results (top-3 retrievals and attention maps of fixed test queries): "
                      f"[{QUALITATIVE_FILE}]({QUALITATIVE_FILE}), copied from `{qualitative}`."]
    else:
        lines += ["", "No qualitative page for this checkpoint (`eval.qualitative_queries` 0, or not written)."]
    return lines


def _checkpoints_section(run: Run, best: CheckpointInfo | None) -> list[str]:
    if not run.checkpoints and not run.incomplete:
        return ["No checkpoints yet."]
    protocols = run.protocols()
    header = "| checkpoint | step | epoch | dev rsum | " + " | ".join(f"test {p} rsum" for p in protocols) \
        + (" | " if protocols else "") + "evaluation |"
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for checkpoint in run.checkpoints:
        if checkpoint.metrics is not None:
            status = "**best**" if best is not None and checkpoint.name == best.name else "evaluated"
            if checkpoint.pruned:
                status += f" (pruned; from {EVALUATIONS_FILE})"
        elif checkpoint.error is not None:
            status = "failed: " + checkpoint.error.splitlines()[0].replace("|", "\\|")[:200]
        else:
            status = "not evaluated yet"
        tests = [_fmt(float(m["rsum"])) if (m := checkpoint.test(p)) is not None else "n/a" for p in protocols]
        lines.append(f"| `{checkpoint.name}` | {checkpoint.step} | {checkpoint.epoch} | {_fmt(checkpoint.dev_rsum)} | "
                     + "".join(f"{t} | " for t in tests) + f"{status} |")
    for name in run.incomplete:
        lines.append(f"| `{name}` | | | n/a | " + "n/a | " * len(protocols)
                     + "incomplete (no readable train_state.json) |")
    keep_last = run.config_value("checkpoint", "keep_last")
    if keep_last is not None:
        lines += ["", (f"Pruning deletes evaluated checkpoints beyond the newest {keep_last} (`checkpoint.keep_last`) "
                       f"and keeps the best; the pruned ones are listed from {EVALUATIONS_FILE}.")]
    return lines


def write_summary(run: Run, best: CheckpointInfo | None, best_payload: EvaluationRecord | None, best_source: str,
                  plots: Mapping[str, Path | None], path: Path, qualitative: str | None = None) -> Path:
    titles = {LOSSES_PNG: "Losses and learning rate", THROUGHPUT_PNG: "Throughput and data wait",
              DIAGNOSTICS_PNG: "Hard-negative diagnostics", RECALL_PNG: "Recall and rsum by checkpoint"}
    notes = list(run.notes)
    if run.config_value("eval", "enabled") is False:
        notes.append("evaluation is disabled in this run (`eval.enabled: false`)")
    failed = [c for c in run.checkpoints if c.error is not None]
    if failed:
        notes.append(f"evaluation failed for {len(failed)} checkpoint(s) ({', '.join(c.name for c in failed)}); "
                     f"see their {ERROR_FILE}")
    pending = [c for c in run.checkpoints if c.metrics is None and c.error is None]
    if pending:
        notes.append(f"{len(pending)} checkpoint(s) not evaluated yet ({', '.join(c.name for c in pending)})")
    if not run.evaluated():
        notes.append("no evaluated checkpoint: recall plot and best-checkpoint table not produced")
    if run.incomplete:
        notes.append(f"incomplete checkpoint(s) being written or abandoned: {', '.join(run.incomplete)}")
    lines = [f"# Run report: {run.name}", "",
             f"Run directory: `{run.url}`  ",
             (f"Report written {utc_now()} "
              f"by `trainer/report.py`."), ""]
    if notes:
        lines += ["## Missing or incomplete", ""] + [f"- {note}" for note in notes] + [""]
    lines += ["## Configuration", "", f"From `{CONFIG_YAML}` (the resolved configuration of the run).", ""]
    lines += _config_section(run) + ["", "## Training", ""] + _training_section(run)
    lines += ["", "## Best checkpoint", ""] + _best_section(best, best_payload, best_source, qualitative)
    lines += ["", "## Checkpoints", ""] + _checkpoints_section(run, best)
    lines += ["", "## Plots", ""]
    for name, written in plots.items():
        if written is None:
            lines.append(f"- {titles[name]}: not produced (see above)")
        else:
            lines += [f"- [{titles[name]}]({written.name})", "", f"  ![{titles[name]}]({written.name})", ""]
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    logger.info("wrote %s", path)
    return path


# --------------------------------------------------------------------------------------------------
# The report and the CLI
# --------------------------------------------------------------------------------------------------


def make_report(run_dir: str, output: Path, storage_options: Mapping[str, Any] | None = None,
                dpi: int = 100) -> list[Path]:
    """Write the plots and summary.md of ``run_dir`` into ``output``; returns the files written.

    Plot files of an earlier report in ``output`` that this run cannot produce are removed, so the
    directory never shows a stale plot beside the new summary.
    """
    run = read_run(run_dir, storage_options)
    output.mkdir(parents=True, exist_ok=True)
    best, best_payload, best_source = find_best(run)
    plots: dict[str, Path | None] = {LOSSES_PNG: None, THROUGHPUT_PNG: None, DIAGNOSTICS_PNG: None, RECALL_PNG: None}
    if run.steps is not None and len(run.steps) > 0:
        plots[LOSSES_PNG] = plot_losses(run.steps, output / LOSSES_PNG, dpi)
        plots[THROUGHPUT_PNG] = plot_throughput(run.steps, output / THROUGHPUT_PNG, dpi)
        margin = run.config_value("optim", "margin")
        plots[DIAGNOSTICS_PNG] = plot_diagnostics(run.steps, float(margin) if _is_number(margin) else None,
                                                  output / DIAGNOSTICS_PNG, dpi)
        if plots[DIAGNOSTICS_PNG] is None:
            run.notes.append(f"{TRAIN_LOG} has no hard-negative diagnostics (written before they existed): "
                             "diagnostics plot not produced")
    plots[RECALL_PNG] = plot_recall(run, best, output / RECALL_PNG, dpi)
    for name, written in plots.items():
        stale = output / name
        if written is None and stale.exists():
            logger.info("removing %s from an earlier report", stale)
            stale.unlink()
    qualitative = copy_qualitative_page(run, best, output, storage_options)
    summary = write_summary(run, best, best_payload, best_source, plots, output / SUMMARY_MD, qualitative)
    copied = [output / QUALITATIVE_FILE] if qualitative is not None else []
    return [p for p in plots.values() if p is not None] + copied + [summary]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer/report.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (local or s3://)")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR",
                        help="local directory for the PNG plots and summary.md (created if missing)")
    parser.add_argument("--endpoint-url", default=None,
                        help="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    parser.add_argument("--dpi", type=int, default=100, help="resolution of the plots (default: 100)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="verbosity of the log on stderr (default: INFO)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (argparse itself exits 2 on usage errors)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    storage_options = s3_storage_options(endpoint_url=args.endpoint_url) if is_s3_url(args.run_dir) else None
    try:
        written = make_report(args.run_dir, args.output, storage_options, args.dpi)
    except (ReportInputError, StorageError) as error:  # StorageError: a malformed location
        logger.error("%s", error)
        return EXIT_BAD_INPUT
    except OSError as error:  # an unreachable store or a permission problem: no traceback needed
        logger.error("%s: cannot read the run or write the report: %s", args.run_dir, error)
        return EXIT_BAD_INPUT
    for path in written:
        print(os.fspath(path))  # the CLI's result: the files written
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
