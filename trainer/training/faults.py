"""Fault injection for tests and drills (the `debug` section of the configuration)."""

from __future__ import annotations

import logging
import os
from typing import Any

from data_shards.storage import open_location

log = logging.getLogger(__name__)


def fail_once(run_dir: str, storage_options: dict[str, Any] | None, step: int) -> None:
    """debug.fail_at_step: hard-exit this process once per run (a marker in RUN_DIR remembers)."""
    location = open_location(run_dir, storage_options)
    marker = f".debug-failed-at-step-{step}"
    if location.exists(marker):
        return
    location.write_bytes_atomic(marker, b"")
    # Ray commits a checkpoint only once it has collected every rank's report (it polls every few
    # seconds); wait for that, so the simulated crash resumes from a known checkpoint (the last one).
    import ray.train

    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                           timeout_s=60)
    log.warning("debug.fail_at_step: exiting at step %d to simulate a worker failure", step)
    logging.shutdown()
    os._exit(1)
