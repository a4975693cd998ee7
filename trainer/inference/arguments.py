"""What the inference CLIs (explain.py, retrieve.py, caption.py) share: their checkpoint, data and
device arguments, the S3 options of --endpoint-url, and the region order of the checkpoint's run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from data_shards.storage import s3_storage_options
from trainer.inference.checkpoint import LoadedCheckpoint
from trainer.run.config_yaml import read_run_settings
from trainer.run.layout import run_dir_of

__all__ = ["add_checkpoint_arguments", "run_region_order", "storage_options_of"]


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
    return s3_storage_options(endpoint_url=endpoint_url) if endpoint_url else None


def run_region_order(loaded: LoadedCheckpoint, storage_options: Mapping[str, Any] | None) -> str:
    """The reader's region order of the run a checkpoint belongs to (data.region_order in its
    config.yaml), "stored" for a checkpoint outside a run."""
    if not loaded.is_run_checkpoint:
        return "stored"
    settings = read_run_settings(run_dir_of(loaded.location.url), storage_options)
    return settings.region_order if settings is not None else "stored"
