"""config.yaml: the run's resolved configuration (trainer/config.py's TrainConfig), written by
trainer/launch.py when the run starts (:func:`write_run_config`) and read back, typed, by whoever
works on the run later: the evaluator and the inference tools take the dev/test shards, the eval
settings and the reader's region order from it (:func:`read_run_settings`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import yaml

from data_shards.storage import is_s3_url, open_location, s3_storage_options
from trainer.config import ConfigError, EvalConfig, TrainConfig, config_from_dict, config_to_yaml
from trainer.run.layout import CONFIG_YAML

__all__ = ["RunSettings", "read_run_config", "read_run_settings", "write_run_config"]


def write_run_config(config: TrainConfig, run_dir: str) -> None:
    """Write ``config`` as RUN_DIR/config.yaml (atomically), creating the run directory; on s3://
    with the data's endpoint (``data.s3_endpoint_url``, else the environment), as the run's other
    files."""
    options = s3_storage_options(endpoint_url=config.data.s3_endpoint_url or None) if is_s3_url(run_dir) else None
    location = open_location(run_dir, options)
    location.makedirs()
    location.write_bytes_atomic(CONFIG_YAML, config_to_yaml(config).encode("utf-8"))


@dataclasses.dataclass
class RunSettings:
    """What the evaluator needs from a run's config.yaml (or from the command line)."""

    dev: str | None
    test: str | None
    eval: EvalConfig
    region_order: str = "stored"
    s3_endpoint_url: str = ""


def read_run_config(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> TrainConfig | None:
    """``RUN_DIR/config.yaml`` as the configuration it was written from; None if the file is absent.

    Raises ConfigError naming the file when it is not a valid trainer/config.py configuration.
    """
    location = open_location(run_dir, storage_options)
    try:
        text = location.read_text(CONFIG_YAML)
    except FileNotFoundError:
        return None
    where = location.child_url(CONFIG_YAML)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: invalid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the configuration must be a mapping of sections")
    try:
        return config_from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def read_run_settings(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> RunSettings | None:
    """Dev/test shards, eval settings and region order from ``RUN_DIR/config.yaml``
    (:func:`read_run_config`); None if the file is absent."""
    config = read_run_config(run_dir, storage_options)
    if config is None:
        return None
    return RunSettings(dev=config.data.dev or None, test=config.data.test or None, eval=config.eval,
                       region_order=config.data.region_order, s3_endpoint_url=config.data.s3_endpoint_url)
