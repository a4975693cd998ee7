"""Typed training configuration: YAML files plus `--set section.key=value` overrides.

Every section is a dataclass; `load_config` reads a YAML file with yaml.safe_load, applies the
overrides in order, converts and type-checks every value against the dataclass fields, and
validates the whole. Unknown keys, wrong types and impossible values raise ConfigError naming the
key (`optim.learning_rate: ...`) before any cluster work starts. `config_to_yaml` writes the
resolved configuration, which every run saves beside its checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_shards.regions import RegionOrder
from data_shards.shard_reader import BadDataPolicy
from model.vsrn import VSRNConfig

Precision = Literal["fp32", "bf16", "fp16"]
# Keys of earlier releases: a configuration that still uses one gets an error naming the new key.
RENAMED_KEYS = {"data.shuffle_buffer": "data.pool_images"}


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible; the message names it."""


@dataclass
class DataConfig:
    # Shard locations (a directory or s3:// prefix holding manifest.json). Empty train: the
    # built-in synthetic dataset is generated into `cache_dir` and sharded there.
    train: str = ""
    dev: str = ""
    test: str = ""
    vocab: str = ""  # vocab.json (model/vocab.py); empty: built from the train captions
    vocab_threshold: int = 4  # the reference keeps words seen at least 4 times
    cache_dir: str = "~/.cache/vsrn-dist"
    synthetic_train_images: int = 2000
    synthetic_dev_images: int = 200
    synthetic_test_images: int = 1000
    synthetic_regions: int = 36
    synthetic_feature_dim: int = 2048
    loader_workers: int = 2
    pool_images: int = 2000  # images in each loader worker's caption pool (data_shards/caption_pool.py)
    region_order: RegionOrder = "stored"
    bad_data: BadDataPolicy = "strict"
    s3_endpoint_url: str = ""  # empty: from the environment (AWS_ENDPOINT_URL) or AWS defaults

    def validate(self) -> None:
        _positive(self, "vocab_threshold", "synthetic_train_images", "synthetic_dev_images",
                  "synthetic_test_images", "synthetic_feature_dim")
        _non_negative(self, "loader_workers", "pool_images")
        if self.synthetic_regions < 4:
            raise ConfigError(f"data.synthetic_regions must be >= 4, got {self.synthetic_regions}")


@dataclass
class OptimConfig:
    epochs: int = 30
    # The global batch is fixed and each worker takes global_batch_size / workers, so the learning
    # rate, the loss scale (summed over the global batch) and the hardest-negative pool do not
    # change when the number of workers does.
    global_batch_size: int = 128
    learning_rate: float = 2e-4
    lr_decay_every_epochs: int = 15  # x lr_decay_factor every this many epochs (reference: 15; 10 for Flickr30K)
    lr_decay_factor: float = 0.1
    grad_clip: float = 2.0  # set explicitly: DeepSpeed would clip at 1.0 otherwise
    margin: float = 0.2
    max_violation: bool = True
    # Hardest-negative warm-up: all negatives for the first N epochs or steps, then the hardest.
    warmup_epochs: int = 0
    warmup_steps: int = 0
    seed: int = 0

    def validate(self) -> None:
        _positive(self, "epochs", "global_batch_size", "learning_rate", "lr_decay_every_epochs")
        _non_negative(self, "grad_clip", "margin", "warmup_epochs", "warmup_steps")
        if not 0.0 < self.lr_decay_factor <= 1.0:
            raise ConfigError(f"optim.lr_decay_factor must be in (0, 1], got {self.lr_decay_factor}")


@dataclass
class DistributedConfig:
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # With use_gpu: a whole number of GPUs per worker, or a fraction for a single worker (which
    # may share its GPU with the evaluation actor). NCCL refuses two ranks on one GPU.
    gpus_per_worker: float = 1.0
    precision: Precision = "fp32"
    zero_stage: int = 0
    # How long the driver waits for the Ray cluster to hold the resources the run asks for
    # (workers x cpus/gpus_per_worker and the evaluation actor) before it gives up naming what is
    # missing: the time an autoscaler, or a KubeRay worker group still starting, needs to add nodes.
    resource_wait_s: float = 30.0

    def validate(self) -> None:
        _positive(self, "workers", "cpus_per_worker")
        _non_negative(self, "gpus_per_worker", "resource_wait_s")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"distributed.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.precision == "fp16" and not self.use_gpu:
            raise ConfigError("distributed.precision: fp16 needs a GPU (use bf16 or fp32 on CPU)")
        if self.use_gpu:
            self._validate_gpus()

    def _validate_gpus(self) -> None:
        gpus = self.gpus_per_worker
        if gpus <= 0:
            raise ConfigError("distributed.gpus_per_worker must be > 0 with distributed.use_gpu=true, "
                              f"got {gpus:g}")
        if gpus < 1 and self.workers > 1:
            # Ray packs fractional GPU requests onto the same device, and NCCL refuses two ranks of
            # one process group on one GPU ("Duplicate GPU detected") at the first collective.
            raise ConfigError(f"distributed.gpus_per_worker is {gpus:g} with distributed.workers={self.workers}: "
                              "two training workers would share one GPU, which NCCL refuses; give each worker "
                              "a whole GPU (gpus_per_worker=1), or train with one worker")
        if gpus > 1 and not float(gpus).is_integer():
            raise ConfigError(f"distributed.gpus_per_worker must be a whole number above 1, got {gpus:g} "
                              "(Ray assigns whole GPUs beyond one)")


MIN_LEASE_TIMEOUT_S = 1.0  # checkpoint.lease_timeout_s: below this the heartbeat would be a busy loop


@dataclass
class CheckpointConfig:
    storage_path: str = "~/vsrn-runs"  # local directory or s3://bucket/prefix
    run_name: str = ""  # empty: a timestamped name; the same name resumes that run
    every_steps: int = 0  # also every N steps (0: only at the end of each epoch)
    keep_last: int = 2  # the best is always kept as well
    max_failures: int = 1  # worker failures tolerated (restart from the last checkpoint)
    # A local storage_path (and local data) on a Ray cluster spanning several hosts is refused,
    # unless it is on a filesystem that every node mounts at the same path (NFS, EFS, Lustre...):
    # then say so here (trainer/training/checkpoint.py, require_shared_storage).
    shared_filesystem: bool = False
    # The lease on RUN_DIR (trainer/run/lease.py): one trainer writes a run at a time. A lease
    # whose heartbeat is older than this is stale (its driver died) and a new trainer takes it
    # over; longer than any pause of the driver (a Ray worker restart does not pause it).
    lease_timeout_s: float = 300.0
    # Take over a lease that another trainer still renews; that trainer stops at its next heartbeat.
    force_lease: bool = False
    # A relaunch that finds the lease of a trainer which stopped heart-beating (a killed driver, a
    # lost head pod) waits up to this long for it to go stale instead of exiting 2 at once; a
    # holder whose heartbeat still moves is refused at once. The RayJob manifest sets it above
    # lease_timeout_s, so that Kubernetes' retry resumes the run (docs/operations.md).
    lease_wait_s: float = 0.0
    # SIGTERM/SIGINT to the driver: the workers stop at the next step boundary and checkpoint that
    # step; past this many seconds the driver exits without a checkpoint. Inside Kubernetes' default
    # 30 s termination grace and `ray job stop`'s wait (RAY_JOB_STOP_WAIT_TIME_S, set to 30 by the
    # manifests and cluster/runtime_env.yaml).
    stop_grace_s: float = 25.0

    def validate(self) -> None:
        _non_negative(self, "every_steps", "max_failures", "lease_wait_s")
        _positive(self, "keep_last", "stop_grace_s")
        if not self.storage_path:
            raise ConfigError("checkpoint.storage_path must not be empty")
        if not self.lease_timeout_s >= MIN_LEASE_TIMEOUT_S:
            raise ConfigError(f"checkpoint.lease_timeout_s must be >= {MIN_LEASE_TIMEOUT_S:g} (seconds; the heartbeat "
                              f"renews every lease_timeout_s/4, at most every 10 s), got {self.lease_timeout_s:g}")


@dataclass
class EvalConfig:
    enabled: bool = True
    test_protocols: list[str] = field(default_factory=lambda: ["1k-5fold", "all"])
    dev_images: int = 1000  # the reference validates on the first 1000 dev images
    batch_size: int = 256
    # Test images whose top-3 retrievals and attention maps each checkpoint's qualitative.md shows
    # (trainer/inference/qualitative.py; evenly spaced over the test split, the same for every
    # checkpoint); 0: off.
    qualitative_queries: int = 8
    cpus: float = 1.0
    gpus: float = 0.0

    def validate(self) -> None:
        # The protocol names are trainer/evaluation/metrics.py's; imported here rather than at the
        # top, so that importing this module does not import torch.
        from trainer.evaluation import PROTOCOLS

        for protocol in self.test_protocols:
            if protocol not in PROTOCOLS:
                raise ConfigError(f"eval.test_protocols: unknown protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
        _positive(self, "dev_images", "batch_size")
        _non_negative(self, "cpus", "gpus", "qualitative_queries")


@dataclass
class LoggingConfig:
    interval_steps: int = 50

    def validate(self) -> None:
        _positive(self, "interval_steps")


@dataclass
class MonitoringConfig:
    """Prometheus metrics (monitoring/metrics.py lists them) and the training health checks."""

    # Record the training and evaluation metrics through ray.util.metrics.
    enabled: bool = True
    # For the local Ray instance launch.py starts (ignored on an existing cluster, whose
    # `ray start --metrics-export-port` decides): the port of Ray's metrics endpoint; 0 lets Ray
    # pick one, which it writes to /tmp/ray/prom_metrics_service_discovery.json.
    metrics_export_port: int = 0
    # Collapse detector (trainer/training/diagnostics.py): L_M within 1 % of 2 * global batch * margin for
    # this many consecutive logging intervals (logging.interval_steps) under hardest negatives logs
    # a warning and sets vsrn_train_collapsed to 1. 0 turns it off. The warning is logged even when
    # `enabled` is false; only the gauge needs the metrics.
    collapse_intervals: int = 5

    def validate(self) -> None:
        _non_negative(self, "collapse_intervals")
        if not 0 <= self.metrics_export_port <= 65535:
            raise ConfigError(f"monitoring.metrics_export_port must be a port number (0-65535), "
                              f"got {self.metrics_export_port}")


@dataclass
class DebugConfig:
    """Fault injection for tests and drills; all off by default."""

    # Stop cleanly after this many optimizer steps (with a checkpoint), as if interrupted; a
    # re-run with the same checkpoint.run_name (and max_steps 0) continues the run.
    max_steps: int = 0
    # Rank `fail_rank` hard-exits (os._exit(1)) right after this step, once per run (a marker file
    # in the run directory stops it from failing again after Ray restarts the workers).
    fail_at_step: int = 0
    fail_rank: int = 0

    def validate(self) -> None:
        _non_negative(self, "max_steps", "fail_at_step", "fail_rank")


@dataclass
class TrainConfig:
    model: VSRNConfig = field(default_factory=VSRNConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        if self.optim.global_batch_size % self.distributed.workers:
            raise ConfigError(f"optim.global_batch_size ({self.optim.global_batch_size}) must be divisible "
                              f"by distributed.workers ({self.distributed.workers})")
        if self.debug.fail_at_step and self.debug.fail_rank >= self.distributed.workers:
            raise ConfigError(f"debug.fail_rank ({self.debug.fail_rank}) must be < distributed.workers "
                              f"({self.distributed.workers})")

    @property
    def per_worker_batch_size(self) -> int:
        return self.optim.global_batch_size // self.distributed.workers


def _positive(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not value > 0:
            raise ConfigError(f"{_section_name(section)}.{name} must be > 0, got {value}")


def _non_negative(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not value >= 0:
            raise ConfigError(f"{_section_name(section)}.{name} must be >= 0, got {value}")


def _section_name(section: Any) -> str:
    for f in dataclasses.fields(TrainConfig):
        if f.default_factory is type(section):  # type: ignore[comparison-overlap]
            return f.name
    return type(section).__name__


# --------------------------------------------------------------------------------------------------
# Conversion from plain data (YAML) with type checks
# --------------------------------------------------------------------------------------------------


def _convert(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        errors = []
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            try:
                return _convert(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(annotation)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads "2e-4" (no dot) as a string; accept numbers written that way.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{key}: must be finite, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")  # a bug in the dataclasses


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'configuration'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        old = f"{prefix}.{key}" if prefix else str(key)
        if old in RENAMED_KEYS:
            raise ConfigError(f"{old} was renamed {RENAMED_KEYS[old]}; rename it in the configuration")
    unknown = sorted(set(data) - known)
    if unknown:
        names = ", ".join(f"{prefix}.{k}" if prefix else str(k) for k in unknown)
        raise ConfigError(f"unknown key(s): {names} (known in {prefix or 'the top level'}: {', '.join(sorted(known))})")
    values = {name: _convert(value, hints[name], f"{prefix}.{name}" if prefix else name)
              for name, value in data.items()}
    try:
        return cls(**values)
    except ValueError as exc:  # the model config validates itself in __post_init__
        raise ConfigError(f"{prefix}: {exc}") from None


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    merged = _deep_merge(config_to_dict(TrainConfig()), data)
    config = _build(TrainConfig, merged, "")
    config.validate()
    return config


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` (value in YAML syntax) to plain config data in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    path, raw = assignment.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {assignment!r}: the key must be section.key, e.g. optim.learning_rate")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {path}: cannot parse value {raw!r} ({exc})") from None
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {path}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The defaults, updated by the YAML file at `path` (if any), then by each override."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the configuration ({exc.strerror})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the configuration must be a mapping of sections")
        data = loaded or {}
    for assignment in overrides or []:
        apply_override(data, assignment)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None


def config_to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
