"""Opening a checkpoint for inference: a run checkpoint (with `inference/`) or an inference
checkpoint directory itself, local or s3://. What explain.py, retrieve.py, caption.py and the
evaluator share, so that they all load a checkpoint the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_shards.storage import Location, open_location
from model.checkpoint import (
    CONFIG_FILE,
    VOCAB_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_inference_checkpoint,
)
from model.vocab import Vocabulary
from model.vsrn import VSRN
from trainer.run.layout import INFERENCE_DIR, TRAIN_STATE_FILE, run_dir_of

__all__ = ["LoadedCheckpoint", "load_checkpoint", "local_inference_dir"]


@contextlib.contextmanager
def local_inference_dir(checkpoint: Location) -> Iterator[Path]:
    """A local directory with the checkpoint's inference files (downloaded from S3 if needed).

    ``checkpoint`` is a run checkpoint (with ``inference/``) or an inference checkpoint itself.
    """
    if checkpoint.exists(f"{INFERENCE_DIR}/{CONFIG_FILE}"):
        source = checkpoint.child(INFERENCE_DIR)
    elif checkpoint.exists(CONFIG_FILE):
        source = checkpoint
    else:
        raise CheckpointError(f"{checkpoint.display}: no inference checkpoint "
                              f"({INFERENCE_DIR}/{CONFIG_FILE} not found)")
    with contextlib.ExitStack() as stack:
        try:
            directory = stack.enter_context(source.local_directory((WEIGHTS_FILE, VOCAB_FILE, CONFIG_FILE)))
        except FileNotFoundError as error:
            raise CheckpointError(f"{error}: missing from the checkpoint") from error
        yield Path(directory)


@dataclass
class LoadedCheckpoint:
    """A checkpoint's model (eval mode) and vocabulary, where it came from and what identifies it."""

    model: VSRN
    vocab: Vocabulary
    location: Location  # the directory given (a run checkpoint or an inference directory)
    is_run_checkpoint: bool
    weights_sha256: str  # identifies the weights (caches of encodings key on it)


def load_checkpoint(checkpoint: str, storage_options: Mapping[str, Any] | None = None,
                    device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load `checkpoint` (raises CheckpointError naming what is missing or wrong).

    The inference directory of a run checkpoint (`.../checkpoint_<step>/inference`) stands for its
    run checkpoint, so that caches and the run's settings are found either way.
    """
    location = open_location(checkpoint, storage_options)
    parent_url = run_dir_of(location.url)
    if location.url.rstrip("/").rsplit("/", 1)[-1] == INFERENCE_DIR:
        parent = open_location(parent_url, storage_options)
        if parent.exists(TRAIN_STATE_FILE):
            location = parent
    with local_inference_dir(location) as directory:
        model, vocab = load_inference_checkpoint(directory, device=device)
        digest = hashlib.sha256()
        with open(directory / WEIGHTS_FILE, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return LoadedCheckpoint(model=model, vocab=vocab, location=location,
                            is_run_checkpoint=location.exists(f"{INFERENCE_DIR}/{CONFIG_FILE}"),
                            weights_sha256=digest.hexdigest())
