"""Tiny training runs through the real launcher, shared by the Ray Train tests
(tests/trainer/training/test_checkpoint.py, training/test_worker_bf16.py, test_multinode.py; tests/ is on sys.path).

`tiny_run_config`: configs/tiny.yaml shrunk to 96 synthetic images, a global batch of 16 (30 steps
per epoch), 2 epochs, ZeRO 1, a checkpoint every 10 steps, no evaluation: about 20 s of Ray Train
on 2 cores. `logged_losses`: a run's train_log.jsonl, checked to hold every step once, in order.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 30  # 96 images x 5 captions / 16


def tiny_run_overrides(cache_dir: Path, storage_path: str | Path, name: str, *extra: str) -> list[str]:
    """The `--set` overrides of the tiny run `name`: synthetic data generated into `cache_dir`,
    the run in `storage_path` (a directory or s3://bucket/prefix)."""
    return [
        f"data.cache_dir={cache_dir}", f"checkpoint.storage_path={storage_path}", f"checkpoint.run_name={name}",
        "data.synthetic_train_images=96", "data.synthetic_dev_images=10", "data.synthetic_test_images=10",
        "optim.global_batch_size=16", "optim.epochs=2", "optim.warmup_epochs=1", "optim.lr_decay_every_epochs=1",
        "distributed.zero_stage=1", "checkpoint.every_steps=10", "eval.enabled=false", "logging.interval_steps=10",
        *extra]


def tiny_run_config(root: Path, name: str, *extra: str) -> TrainConfig:
    """The tiny run `name` with its data in root/cache and its run directory in root/runs/name."""
    return load_config(ROOT / "configs" / "tiny.yaml", tiny_run_overrides(root / "cache", root / "runs", name, *extra))


def logged_losses(run_dir: Path) -> dict[int, tuple[float, float, float]]:
    """step -> (L_M, L_G, lr) of a run's train_log.jsonl; every step must appear once, in order."""
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps logged more than once or out of order: {steps}"
    return {r["step"]: (r["loss_matching"], r["loss_caption"], r["lr"]) for r in records}
