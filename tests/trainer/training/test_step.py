"""Tests of trainer/training/step.py: no host sync in a non-logging step of the worker's loop,
through the real engine (bench/step_profile.py's counts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


_SYNC_SCRIPT = r"""
import argparse, json, sys
sys.path.insert(0, sys.argv[1])
from bench.step_profile import run
results = {}
for precision in ("fp32", "bf16"):
    for zero in (0, 1, 2):
        args = argparse.Namespace(device="cpu", batch_size=8, regions=6, precision=precision, zero_stage=zero,
                                  widths="tiny", lengths="uniform:4:14", epoch_lengths=None, epoch_pairs=4000,
                                  warmup=2, compile=False, json=None)
        r = run(args)
        results[f"{precision}/{zero}"] = {k: r[k] for k in ("syncs_per_step", "syncs_per_logging_step", "sync_sites",
                                                             "top_level_dispatches_per_step")}
        results[f"{precision}/{zero}"]["logging_sites"] = r["logging_step"]["sync_sites"]
print("RESULT " + json.dumps(results))
"""


@pytest.mark.distributed
def test_a_non_logging_step_never_waits_for_the_device() -> None:
    """ZeRO 0, 1, 2 in fp32 and bf16: zero host-sync points in a non-logging step of the worker's
    loop (hand-off, forward, both losses, backward, optimizer) and one in a logging step, counted
    by bench/step_profile.py on the real DeepSpeed engine of one rank."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _SYNC_SCRIPT, str(ROOT)], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert sorted(results) == ["bf16/0", "bf16/1", "bf16/2", "fp32/0", "fp32/1", "fp32/2"]
    for config, r in results.items():
        assert r["syncs_per_step"] == 0, (config, r["sync_sites"])
        assert r["syncs_per_logging_step"] == 1, (config, r["logging_sites"])
