"""Tiny training runs through the real launcher, shared by the Ray Train tests
(tests/trainer/training/test_checkpoint.py, training/test_worker_bf16.py, test_multinode.py; tests/ is on sys.path).

`Launch`: `python trainer/launch.py` as a subprocess, its output in files (the `launches` fixture of
tests/trainer/conftest.py kills those still running when a test ends); `wait_for`: poll a condition.

`tiny_run_config`: configs/tiny.yaml shrunk to 96 synthetic images, a global batch of 16 (30 steps
per epoch), 2 epochs, ZeRO 1, a checkpoint every 10 steps, no evaluation: about 20 s of Ray Train
on 2 cores. `logged_losses`: a run's train_log.jsonl, checked to hold every step once, in order.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

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


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             alive: Callable[[], str | None] | None = None) -> None:
    """Poll `condition` until it holds; fail naming `what` (and why, when `alive` says the
    process it waits on is gone)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if alive is not None and (gone := alive()) is not None:
            pytest.fail(f"waiting for {what}: {gone}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


class Launch:
    """A `python trainer/launch.py` subprocess, its stdout and stderr in files."""

    def __init__(self, directory: Path, label: str, overrides: list[str], env: dict[str, str]) -> None:
        self.label = label
        self.out_path, self.err_path = directory / f"{label}.out", directory / f"{label}.err"
        self._files: list[IO[str]] = [open(self.out_path, "w"), open(self.err_path, "w")]  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "trainer/launch.py", *[a for o in overrides for a in ("--set", o)]],
            cwd=ROOT, stdout=self._files[0], stderr=self._files[1], env=env)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.err_path.read_text()

    def exited(self) -> str | None:
        """None while running; else why it ended, with the end of its stderr."""
        if self.process.poll() is None:
            return None
        return f"{self.label} exited {self.process.returncode}: {self.stderr()[-4000:]}"

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            for stream in self._files:
                stream.close()

    def last_line(self) -> str:
        lines = self.stderr().strip().splitlines()
        return lines[-1] if lines else ""

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.wait(60)
