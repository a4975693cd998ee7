"""Which training failures a restart can fix, and the one line a failed run ends with.

Ray Train restarts the workers from the last checkpoint after any worker error, up to
`checkpoint.max_failures` times (FailureConfig). That is right for a lost node, a killed process or
a network error, and useless for errors that the restarted workers would meet again because they
come from the run's inputs: a damaged shard (ShardFormatError: a restart reads the same bytes), a
configuration or data error, a vocabulary or checkpoint that does not load, a loss that turned
non-finite (a restart replays the same batches from the same state). Such errors are FATAL here:

* the worker wraps them in `FatalTrainingError` (rank, error class, one-sentence message;
  `fatal_training_error`), re-raised from the original so the worker's traceback keeps the cause;
* `StopOnFatalError`, a Ray Train `UserCallback` on the controller, sees the workers' errors before
  the failure policy decides (`after_exception`) and raises the fatal one: Ray Train turns an error
  raised by a callback into a ControllerError, which it never retries, so the run stops at once;
* the driver (trainer/launch.py) prints `failure_summary(error)`, one line, as its last line on
  stderr: the cause, and the file, key or value it names.

Storage that a restart cannot fix is fatal too: writing a checkpoint or the step log into
`checkpoint.storage_path` fails with no space left on the device (or over quota), permission
denied, a read-only filesystem, or a bucket that does not exist: trainer/training/checkpoint.py
raises `CheckpointStorageError` (its `storage_error`), whose message names the storage path and,
for no space, the size of one checkpoint. Other OSErrors (S3 and network hiccups) are transient
and keep Ray's restarts.
"""

from __future__ import annotations

import re
from typing import Any

from data_shards.format import ShardFormatError
from model.checkpoint import CheckpointError
from model.vocab import VocabularyError
from trainer.config import ConfigError
from trainer.training.data import DataError
from trainer.training.checkpoint import CheckpointStorageError, ResumeError, storage_error

# Raised by the workers; a restart from the last checkpoint would raise them again.
FATAL_ERRORS: tuple[type[BaseException], ...] = (
    ShardFormatError, ConfigError, DataError, VocabularyError, CheckpointError, ResumeError, FloatingPointError,
    CheckpointStorageError)

# torch's DataLoader re-raises a worker process's exception with this text and the worker's
# traceback before the original message (torch.utils.data._utils.ExceptionWrapper).
_LOADER_WRAPPER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\s*Original Traceback", re.DOTALL)


def one_sentence(message: str) -> str:
    """An error message on one line: the original message of a DataLoader-wrapped error (its
    traceback's last line, without the `module.Class: ` prefix), whitespace collapsed."""
    text = str(message).strip()
    if _LOADER_WRAPPER.match(text):
        last = text.splitlines()[-1].strip()
        text = re.sub(r"^[\w.]+(Error|Exception)\s*:\s*", "", last)
    return " ".join(text.split())


class FatalTrainingError(RuntimeError):
    """A worker error that a restart cannot fix; its message is one sentence naming the cause."""

    def __init__(self, rank: int, cause: str, message: str) -> None:
        self.rank, self.cause, self.message = rank, cause, message
        super().__init__(f"rank {rank}: {cause}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:  # crosses processes (worker -> Ray Train controller -> driver)
        return type(self), (self.rank, self.cause, self.message)


def fatal_training_error(error: BaseException, rank: int) -> FatalTrainingError | None:
    """`error` as a FatalTrainingError when it is one of FATAL_ERRORS (else None)."""
    if isinstance(error, FatalTrainingError):
        return error
    if not isinstance(error, FATAL_ERRORS):
        return None
    return FatalTrainingError(rank, type(error).__name__, one_sentence(str(error)))


def _first_fatal(errors: dict[int, BaseException]) -> FatalTrainingError | None:
    for rank in sorted(errors):
        fatal = fatal_training_error(errors[rank], rank)
        if fatal is not None:
            return fatal
    return None


def stop_on_fatal_error_callback() -> Any:
    """A Ray Train UserCallback that ends the run at the first fatal worker error (module doc)."""
    from ray.train import UserCallback

    class StopOnFatalError(UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            fatal = _first_fatal(worker_exceptions)
            if fatal is not None:
                raise fatal

    return StopOnFatalError()


def failure_summary(error: BaseException, storage_path: str | None = None, checkpoint_bytes: int | None = None) -> str:
    """The one line a failed training run ends with, from what `TorchTrainer.fit()` raised.

    `storage_path` (checkpoint.storage_path) and `checkpoint_bytes` (one checkpoint's size, when
    known): for Ray Train's controller failing to write into the storage in a way no restart fixes
    (it records the run's checkpoints there, and the disk may fill up on its write rather than a
    worker's), the line names them as a worker's CheckpointStorageError would."""
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(error, ControllerError):
        cause = error.controller_failure
        if isinstance(cause, FatalTrainingError):
            return (f"training stopped without restarts (a restart would fail the same way): rank {cause.rank}: "
                    f"{cause.cause}: {cause.message}")
        lasting = (storage_error(cause, storage_path, "Ray Train's record of the run's checkpoints", checkpoint_bytes)
                   if storage_path is not None else None)
        if lasting is not None:  # a controller error: Ray Train never retries it
            return (f"training stopped without restarts (a restart would fail the same way): Ray Train's "
                    f"controller: {type(lasting).__name__}: {one_sentence(str(lasting))}")
        return f"training failed in Ray Train's controller: {type(cause).__name__}: {one_sentence(str(cause))}"
    if isinstance(error, WorkerGroupError) and error.worker_failures:
        rank = min(error.worker_failures)
        cause = error.worker_failures[rank]
        others = len(error.worker_failures) - 1
        return (f"training failed after the restarts allowed by checkpoint.max_failures: rank {rank}: "
                f"{type(cause).__name__}: {one_sentence(str(cause))}"
                + (f" (and {others} other rank{'s' if others > 1 else ''})" if others else ""))
    return f"training failed: {type(error).__name__}: {one_sentence(str(error))}"
