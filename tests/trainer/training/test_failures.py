"""trainer/training/failures.py: which worker errors stop a run at once, and the line a failed run ends with.
(The whole path through Ray Train, a damaged shard read by a worker, is in test_launch.py.)"""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from data_shards.format import ShardFormatError
from trainer.config import ConfigError
from trainer.training.failures import FatalTrainingError, failure_summary, fatal_training_error, one_sentence
from trainer.training.checkpoint import ResumeError


class _DamagedShards(IterableDataset):
    def __iter__(self):  # type: ignore[no-untyped-def]
        raise ShardFormatError("s3://b/train/train-000007.tar: sample train-0000042: feature shape (37, 2048) "
                               "!= manifest (36, 2048)")


def test_a_dataloader_worker_error_becomes_its_original_message_on_one_line() -> None:
    with pytest.raises(ShardFormatError) as caught:  # torch re-raises the worker's error type
        next(iter(DataLoader(_DamagedShards(), batch_size=None, num_workers=1)))
    assert "Original Traceback" in str(caught.value)
    fatal = fatal_training_error(caught.value, rank=3)
    assert fatal is not None and (fatal.rank, fatal.cause) == (3, "ShardFormatError")
    assert fatal.message == ("s3://b/train/train-000007.tar: sample train-0000042: feature shape (37, 2048) "
                             "!= manifest (36, 2048)")
    assert one_sentence("a\n  b\tc ") == "a b c"


@pytest.mark.parametrize("error,fatal", [
    (ShardFormatError("x.tar: bad"), True), (ConfigError("optim.lr: bad"), True), (ResumeError("ckpt"), True),
    (FloatingPointError("non-finite loss"), True), (OSError("connection reset"), False),
    (RuntimeError("gloo timeout"), False), (torch.cuda.OutOfMemoryError("oom"), False)])
def test_only_errors_a_restart_would_meet_again_are_fatal(error: Exception, fatal: bool) -> None:
    assert (fatal_training_error(error, 0) is not None) == fatal


def test_a_fatal_error_crosses_processes_and_summarizes_in_one_line() -> None:
    from ray.train import ControllerError, WorkerGroupError

    fatal = pickle.loads(pickle.dumps(FatalTrainingError(1, "ShardFormatError", "a.tar: sha256 1 != manifest 2")))
    assert (fatal.rank, fatal.cause, fatal.message) == (1, "ShardFormatError", "a.tar: sha256 1 != manifest 2")
    line = failure_summary(ControllerError(fatal))
    assert line == ("training stopped without restarts (a restart would fail the same way): rank 1: "
                    "ShardFormatError: a.tar: sha256 1 != manifest 2")
    line = failure_summary(WorkerGroupError("...", {1: RuntimeError("gloo\nconnection closed"), 0: OSError("x")}))
    assert line == ("training failed after the restarts allowed by checkpoint.max_failures: rank 0: OSError: x "
                    "(and 1 other rank)")
    assert "\n" not in failure_summary(ControllerError(ValueError("a\nb")))


def test_ray_trains_controller_meeting_a_full_disk_is_named_like_a_workers_storage_error() -> None:
    # pyarrow's message, as Ray Train's controller raised it writing its record of the checkpoints
    from ray.train import ControllerError

    full = ControllerError(OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"))
    line = failure_summary(full, "/mnt/runs", 3 * 2**20)
    assert line.startswith("training stopped without restarts (a restart would fail the same way): Ray Train's "
                           "controller: CheckpointStorageError: checkpoint storage /mnt/runs: no space left on the "
                           "device while writing Ray Train's record of the run's checkpoints; one checkpoint takes "
                           "about 3.0 MiB"), line
    # a transient error, or no storage path given: the controller's error as it is
    assert failure_summary(ControllerError(TimeoutError("read timed out")), "/mnt/runs").startswith(
        "training failed in Ray Train's controller: TimeoutError")
    assert failure_summary(full).startswith("training failed in Ray Train's controller: OSError")
