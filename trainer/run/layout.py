"""The names of the run directory and the primitives its records share (docs/run_layout.md).

Every file and directory name of RUN_DIR is spelled here, once; every other module asks for it by
its constant. RUN_DIR is reached through data_shards/storage.py's `Location` only
(:func:`location_of`); JSON records are read and published whole (:func:`read_json`,
:func:`write_json`: readers see the old file or the new one), stamped with :func:`utc_now`.
A checkpoint of the run is ``checkpoint_<step, 9 digits>/`` (:func:`checkpoint_dir_name`); its
run directory is its parent (:func:`run_dir_of`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Mapping
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
    "checkpoint_dir_name",
    "checkpoint_name",
    "location_of",
    "read_json",
    "remove_if_present",
    "run_dir_of",
    "utc_now",
    "write_json",
]

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


def location_of(url: str, storage_options: Mapping[str, Any] | None) -> Location:
    """The run directory or checkpoint at ``url`` (local or s3://)."""
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


def remove_if_present(location: Location, name: str) -> None:
    """Delete file ``name`` of ``location`` if it is there."""
    with contextlib.suppress(FileNotFoundError):
        if location.exists(name):
            location.remove(name)


def run_dir_of(checkpoint: str) -> str:
    """The run directory of a checkpoint: its parent directory or prefix."""
    stripped = str(checkpoint).rstrip("/")
    if "://" in stripped:
        return stripped.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(stripped))


def checkpoint_name(url: str) -> str:
    """The directory name of a checkpoint given by path or URL (``checkpoint_<step>``)."""
    return str(url).rstrip("/").rsplit("/", 1)[-1]
