"""The run directory: the one module that knows what RUN_DIR holds (docs/run_layout.md).

RUN_DIR = {checkpoint.storage_path}/{checkpoint.run_name}, a local directory or an s3:// prefix,
reached through data_shards/storage.py's `Location` only. Every file name of the run directory is
spelled here, and every reader and writer of those files asks this module:

    lease.json             the lease of the one trainer writing the run (trainer/run_lease.py:
                           owner, heartbeat; absent when none holds it); readers ignore it
    config.yaml            the resolved configuration (written by trainer/launch.py)
    train_log.jsonl        one line per training step (trainer/worker.py)
    best.json              the best checkpoint so far by dev rsum (`update_best`; read by
                           `load_best` alone, `read_best` and `best_dev_rsum` ask it)
    evaluations.jsonl      one line per evaluated checkpoint, never pruned (`record_evaluation`,
                           `read_evaluations`): the run's evaluation history
    checkpoint_<step>/     `checkpoint_dir_name`, listed by `list_checkpoints`, pruned by
                           `prune_checkpoints`
      train_state.json     written last: the checkpoint is complete (`TrainState`,
                           `read_train_state_fields`)
      deepspeed/           the engine checkpoint of all ranks
      inference/           model/checkpoint.py's inference format
      metrics.json         the evaluator's result (`record_result`)
      qualitative.md       top-3 retrievals and attention maps of fixed test queries, with its
      qualitative/         PNGs (trainer/qualitative.py; eval.qualitative_queries)
      gallery/             cached embeddings of splits (trainer/retrieval.py; safe to delete)
      eval_error.json      instead of metrics.json when evaluating failed (`record_failure`)

The retention policy (which checkpoints to delete) is here too (`checkpoints_to_prune`), not in
the evaluator: it is a property of the run directory, used by whoever prunes (trainer/launch.py).
What to evaluate and in which order to record it is trainer/checkpoint_eval.py's
(`record_evaluated`: metrics.json, then the history line and best.json).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from data_shards.storage import Location, open_location

__all__ = [
    "BEST_FILE",
    "CHECKPOINT_PREFIX",
    "CONFIG_YAML",
    "DEEPSPEED_DIR",
    "ERROR_FILE",
    "EVALUATIONS_FILE",
    "GALLERY_DIR",
    "INFERENCE_DIR",
    "LEASE_FILE",
    "METRICS_FILE",
    "QUALITATIVE_DIR",
    "QUALITATIVE_FILE",
    "TRAIN_LOG",
    "TRAIN_STATE_FILE",
    "TRAIN_STATE_FORMAT_VERSION",
    "CheckpointEntry",
    "TrainState",
    "TrainStateError",
    "best_dev_rsum",
    "checkpoint_dir_name",
    "checkpoints_to_prune",
    "evaluation_line",
    "is_run_checkpoint",
    "list_checkpoints",
    "load_best",
    "prune_checkpoints",
    "read_best",
    "read_evaluations",
    "read_json",
    "read_train_state_fields",
    "record_evaluation",
    "record_failure",
    "record_result",
    "run_dir_of",
    "state_int",
    "update_best",
    "utc_now",
    "write_json",
]

logger = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
CONFIG_YAML = "config.yaml"
TRAIN_LOG = "train_log.jsonl"
BEST_FILE = "best.json"
EVALUATIONS_FILE = "evaluations.jsonl"
CHECKPOINT_PREFIX = "checkpoint_"
TRAIN_STATE_FILE = "train_state.json"
DEEPSPEED_DIR = "deepspeed"
INFERENCE_DIR = "inference"
METRICS_FILE = "metrics.json"
QUALITATIVE_FILE = "qualitative.md"
QUALITATIVE_DIR = "qualitative"
GALLERY_DIR = "gallery"
ERROR_FILE = "eval_error.json"


def checkpoint_dir_name(step: int) -> str:
    """`checkpoint_000001234`: the directory of the checkpoint saved at `step`, one per step, so
    names sort by step and never repeat in a run."""
    return f"{CHECKPOINT_PREFIX}{step:09d}"


def utc_now() -> str:
    """The time stamps of the run directory's records: ISO 8601, UTC, seconds."""
    # timezone.utc, not datetime.UTC: that alias is Python 3.11+, and setup.py allows 3.10.
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")  # noqa: UP017


def _location(url: str, storage_options: Mapping[str, Any] | None) -> Location:
    return open_location(str(url), storage_options)


def read_json(location: Location, name: str) -> dict[str, Any] | None:
    """The JSON object in file ``name`` of ``location``; None if the file does not exist."""
    try:
        text = location.read_text(name)
    except FileNotFoundError:
        return None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{location.child_url(name)}: not valid JSON at line {error.lineno} column {error.colno}: "
                         f"{error.msg}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{location.child_url(name)}: expected a JSON object, got {type(payload).__name__}")  # noqa: TRY004 - bad file content, not a bad argument
    return payload


def write_json(location: Location, name: str, payload: Any) -> None:
    """Publish ``payload`` as JSON file ``name``: readers see the old file or the whole new one."""
    location.write_bytes_atomic(name, (json.dumps(payload, indent=2, allow_nan=False) + "\n").encode("utf-8"))


def _remove_if_present(location: Location, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if location.exists(name):
            location.remove(name)


def run_dir_of(checkpoint: str) -> str:
    """The run directory of a checkpoint: its parent directory or prefix."""
    stripped = str(checkpoint).rstrip("/")
    if "://" in stripped:
        return stripped.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(stripped))


def _basename(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


TRAIN_STATE_FORMAT_VERSION = 1


class TrainStateError(ValueError):
    """train_state.json is not a train state this code reads; the message names the file."""


@dataclasses.dataclass
class TrainState:
    """Where training stands after `step` optimizer steps: the content of train_state.json, written
    by trainer/run_checkpoint.py (last, so its presence marks a complete checkpoint) and read back
    to resume."""

    epoch: int  # the epoch of the last step taken
    step: int  # optimizer steps taken since the start of the run
    batch_in_epoch: int  # batches of `epoch` consumed by every rank
    epoch_complete: bool  # `epoch` is finished: continue with epoch + 1, batch 0
    world_size: int
    global_batch_size: int
    best_rsum: float | None = None  # best dev rsum the evaluation worker had reported, if any
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
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in payload.items() if k in known})


def read_train_state_fields(checkpoint: Location) -> dict[str, Any] | None:
    """A checkpoint's train_state.json as a plain object, for listing and labelling (None: absent,
    the checkpoint is incomplete); no format check, unlike `TrainState.from_json`, which resuming
    needs: the evaluator only reads "step" and "epoch" (`state_int`)."""
    return read_json(checkpoint, TRAIN_STATE_FILE)


def is_run_checkpoint(checkpoint: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``checkpoint`` is a complete checkpoint of a run (train_state.json present), as
    opposed to a bare inference checkpoint."""
    return _location(checkpoint, storage_options).exists(TRAIN_STATE_FILE)


def state_int(state: dict[str, Any] | None, key: str) -> int | None:
    value = None if state is None else state.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------------------------------
# Records of evaluations
# --------------------------------------------------------------------------------------------------


def record_result(checkpoint: str, payload: dict[str, Any],
                  storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``metrics.json`` beside the checkpoint (atomically) and drop a stale eval_error.json."""
    location = _location(checkpoint, storage_options)
    write_json(location, METRICS_FILE, payload)
    # metrics.json now says this checkpoint was evaluated; an older failure record would only
    # contradict it (it exists after a successful --retry-failed).
    _remove_if_present(location, ERROR_FILE)


def record_failure(checkpoint: str, error: BaseException,
                   storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``eval_error.json`` beside the checkpoint; returns its payload."""
    location = _location(checkpoint, storage_options)
    payload = {
        "checkpoint": location.display,
        "error": f"{type(error).__name__}: {error}",
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        "failed_at": utc_now(),
    }
    write_json(location, ERROR_FILE, payload)
    return payload


def load_best(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The run's ``best.json`` payload, None when there is none; the one reader of the file.

    Raises ValueError naming the file when it is not a JSON object (StorageError when it is not
    UTF-8). The trainer and the evaluator use :func:`read_best`, which treats that as no best;
    trainer/report.py uses this to say so in its summary.
    """
    return read_json(_location(run_dir, storage_options), BEST_FILE)


def read_best(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The run's ``best.json`` payload, or None when there is none (or it is unreadable: a damaged
    best.json must not stop training or evaluation; the next better checkpoint replaces it)."""
    try:
        return load_best(run_dir, storage_options)
    except (ValueError, UnicodeDecodeError, OSError) as error:
        logger.warning("ignoring %s: %s", _location(run_dir, storage_options).child_url(BEST_FILE), error)
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
    location = _location(run_dir, storage_options)
    current = read_best(run_dir, storage_options)
    dev_images = (payload.get("data") or {}).get("dev_images")
    if current is not None:
        recorded = current.get("dev_rsum")
        if current.get("dev_images") not in (None, dev_images):
            logger.warning("%s: comparing dev rsums over %s and %s dev images; evaluate with the same "
                           "eval.dev_images", location.child_url(BEST_FILE), current.get("dev_images"), dev_images)
        same = _basename(str(current.get("checkpoint", ""))) == _basename(payload["checkpoint"])
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


# --------------------------------------------------------------------------------------------------
# Checkpoints and retention
# --------------------------------------------------------------------------------------------------


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
    run = _location(run_dir, storage_options)
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
    run = _location(run_dir, storage_options)
    entries = list_checkpoints(run_dir, storage_options)
    best = read_best(run_dir, storage_options)
    best_name = _basename(str(best["checkpoint"])) if best is not None and best.get("checkpoint") else None
    top: tuple[float, str] | None = None
    for entry in entries:
        if entry.evaluated:
            with contextlib.suppress(ValueError, UnicodeDecodeError, OSError):
                rsum = (read_json(run.child(entry.name), METRICS_FILE) or {}).get("dev_rsum")
                if isinstance(rsum, (int, float)) and (top is None or rsum > top[0]):
                    top = (float(rsum), entry.name)
    deleted = []
    for entry in checkpoints_to_prune(entries, keep_last, best_name, top[1] if top else None):
        logger.info("pruning %s (step %s)", entry.url, entry.step)
        run.remove_tree(entry.name)
        deleted.append(entry.url)
    return deleted


# --------------------------------------------------------------------------------------------------
# The evaluation history
# --------------------------------------------------------------------------------------------------


def evaluation_line(payload: dict[str, Any]) -> dict[str, Any]:
    """The evaluations.jsonl line of a metrics.json payload."""
    return {"checkpoint": _basename(str(payload["checkpoint"])), "step": payload.get("step"),
            "epoch": payload.get("epoch"), "dev_rsum": payload.get("dev_rsum"), "dev": payload.get("dev"),
            "test": payload.get("test", {}), "skipped": payload.get("skipped", {}),
            "data": payload.get("data", {}), "evaluated_at": payload.get("evaluated_at") or utc_now(),
            "elapsed_s": payload.get("elapsed_s")}


def read_evaluations(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The run's evaluation history, one entry per evaluated checkpoint in the order recorded;
    [] when there is none. A line that is not a JSON object raises ValueError naming the file and
    line (the history is written whole and atomically, so a bad line is damage, not a race)."""
    location = _location(run_dir, storage_options)
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
        entries.append(entry)
    return entries


def record_evaluation(run_dir: str, payload: dict[str, Any], storage_options: Mapping[str, Any] | None = None) -> bool:
    """Add the checkpoint of ``payload`` (a metrics.json payload) to RUN_DIR/evaluations.jsonl,
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
    location = _location(run_dir, storage_options)
    with location.locked(EVALUATIONS_FILE):
        entries = read_evaluations(run_dir, storage_options)
        names = {str(entry["checkpoint"]) for entry in entries}
        own = _basename(str(payload["checkpoint"]))
        added = []
        for name in location.subdirectories():
            if name.startswith(CHECKPOINT_PREFIX) and name not in names and name != own:
                with contextlib.suppress(ValueError, UnicodeDecodeError, OSError):
                    metrics = read_json(location.child(name), METRICS_FILE)
                    if metrics is not None and metrics.get("checkpoint"):
                        added.append(evaluation_line(metrics))
                        names.add(name)
        new = own not in names
        if new:
            added.append(evaluation_line(payload))
        if added:
            added.sort(key=lambda e: (e["step"] if isinstance(e.get("step"), int) else -1, e["checkpoint"]))
            lines = [json.dumps(entry, allow_nan=False) for entry in entries + added]
            location.write_bytes_atomic(EVALUATIONS_FILE, ("\n".join(lines) + "\n").encode("utf-8"))
    return new
