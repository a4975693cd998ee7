"""Opening a checkpoint for inference: a run checkpoint (with `inference/`) or an inference
checkpoint directory itself, local or s3://. What explain.py, retrieve.py, caption.py and the
evaluation share, so that they all load a checkpoint the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_shards.format import ImageRecord
from data_shards.regions import region_index
from data_shards.storage import Location, open_location
from model.checkpoint import (
    CONFIG_FILE,
    VOCAB_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_inference_checkpoint,
)
from model.interpret import RegionAttention, region_attention
from model.vocab import Vocabulary
from model.vsrn import VSRN
from trainer.run.config_yaml import read_run_settings
from trainer.run.layout import INFERENCE_DIR, TRAIN_STATE_FILE, run_dir_of

__all__ = ["LoadedCheckpoint", "feed_order", "load_checkpoint", "local_inference_dir", "records_attention"]


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


# --------------------------------------------------------------------------------------------------
# What the inference CLIs (explain.py, retrieve.py, caption.py) share
# --------------------------------------------------------------------------------------------------


def add_checkpoint_arguments(parser: Any) -> None:
    """--checkpoint, --data, --device, --batch-size, --endpoint-url, --log-level."""
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="a run checkpoint directory or its inference/ directory, local or s3://")
    parser.add_argument("--data", required=True, metavar="SHARDS",
                        help="a split directory (manifest.json and shards), local or s3://")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=256, metavar="B",
                        help="images per forward pass when encoding the split (default: 256)")
    parser.add_argument("--endpoint-url", metavar="URL",
                        help="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="verbosity of the log on stderr (default: WARNING)")


def storage_options_of(endpoint_url: str | None) -> dict[str, Any] | None:
    """s3fs options for --endpoint-url, else None (every reader takes the environment)."""
    from data_shards.storage import s3_storage_options

    return s3_storage_options(endpoint_url=endpoint_url) if endpoint_url else None


def run_region_order(loaded: LoadedCheckpoint, storage_options: Mapping[str, Any] | None) -> str:
    """The reader's region order of the run a checkpoint belongs to (data.region_order in its
    config.yaml), "stored" for a checkpoint outside a run."""
    if not loaded.is_run_checkpoint:
        return "stored"
    settings = read_run_settings(run_dir_of(loaded.location.url), storage_options)
    return settings.region_order if settings is not None else "stored"


def feed_order(record: ImageRecord, region_order: str) -> np.ndarray | None:
    """The index that puts a record's regions in the order its run's reader fed them to the model
    (data.region_order; None: stored order). "random" draws one fixed permutation (seed 0), so
    that a tool's output is reproducible."""
    return region_index(record.boxes, record.regions.shape[0], region_order,  # type: ignore[arg-type]
                        np.random.default_rng(0) if region_order == "random" else None)


def records_attention(model: VSRN, records: Sequence[ImageRecord], lam: float, region_order: str,
                      device: str | torch.device = "cpu") -> list[RegionAttention]:
    """The Sec. 4.5 attention of each record (model/interpret.py), the model fed as its run's
    reader feeds it; regions reported in stored order."""
    out = []
    for record in records:
        regions = torch.from_numpy(np.asarray(record.regions, dtype=np.float32)).unsqueeze(0).to(device)
        boxes = torch.from_numpy(record.boxes).unsqueeze(0).to(device) if record.boxes is not None else None
        index = feed_order(record, region_order)
        feed = torch.from_numpy(index).unsqueeze(0).to(device) if index is not None else None
        out.append(region_attention(model, regions, boxes, lam=lam, feed_order=feed)[0])
    return out
