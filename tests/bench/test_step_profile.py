"""bench/step_profile.py (what a training step asks of the device: dispatches, syncs, shapes) and
bench/compile_speed.py (eager against compiled steps), run for real with tiny sizes on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.step_profile import distinct_shapes, parse_lengths, profile_call  # noqa: E402


def test_the_sync_counter_sees_what_makes_the_host_wait() -> None:
    device_tensor = torch.arange(6.0)
    mask = device_tensor > 2
    host = torch.tensor([3, 1, 2])  # host data (as the reader's batches)

    def step() -> None:
        float(device_tensor.sum())  # .item(): a sync
        device_tensor[mask].sum()  # a boolean gather: nonzero, a data-dependent shape
        device_tensor.cpu()  # a device-to-host copy
        device_tensor.tolist()  # another
        torch.tensor([1.0, 2.0], device=device_tensor.device)  # a blocking host-to-device copy
        host.to(device_tensor.device, non_blocking=True)  # non-blocking: not a sync
        int(host.max())  # host work: not a sync, not a device dispatch
        sorted_lengths = host.sort().values
        sorted_lengths.tolist()

    _, counts = profile_call(step, host_inputs=[host])
    assert counts.syncs == 5, counts.sync_sites
    assert counts.host_dispatches > 0


def test_distinct_shapes_follow_the_caption_buckets() -> None:
    from trainer.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    lengths = parse_lengths("tail:10:22:0.05:60")(np.random.default_rng(0), 20_000)
    shapes = distinct_shapes(lengths, 64, cfg, np.random.default_rng(1))
    assert shapes["batches"] == 312 and 2 <= shapes["distinct"] <= 6  # widths 24, 32, ..., 64
    assert all(int(width) % 8 == 0 for width in shapes["shapes"])


def test_step_profile_cli_writes_the_pinned_figures(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, "bench/step_profile.py", "--widths", "tiny", "--batch-size", "8",
                           "--regions", "6", "--lengths", "uniform:4:14", "--epoch-pairs", "2000", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("dispatches_per_step", "top_level_dispatches_per_step", "syncs_per_step", "syncs_per_logging_step",
                "distinct_step_shapes_per_epoch"):
        assert isinstance(result[key], int), key
    assert result["dispatches_per_step"] >= result["top_level_dispatches_per_step"] >= result["compute_ops_per_step"] > 0
    assert result["syncs_per_step"] == 0 and result["syncs_per_logging_step"] == 1
    assert set(result["syncs_by_part"]) >= {"image_encoder", "text_encoder", "caption_branch", "matching_loss",
                                            "backward", "optimizer"}
    assert result["config"]["precision"] == "bf16" and result["config"]["zero_stage"] == 0


@pytest.mark.slow
def test_compile_speed_cli_times_eager_and_compiled_steps(tmp_path: Path) -> None:
    out = tmp_path / "compile.json"
    done = subprocess.run([sys.executable, "bench/compile_speed.py", "--device", "cpu", "--widths", "tiny",
                           "--batch-sizes", "4", "--regions", "4", "--lengths", "uniform:4:6", "--steps", "2",
                           "--warmup", "1", "--precision", "fp32", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    loops = {r["loop"]: r for r in result["results"]}
    assert sorted(loops) == ["compiled", "eager"]
    for r in loops.values():
        assert r["batch_size"] == 4 and r["ms_per_step"] > 0 and r["pairs_per_s"] > 0 and r["buckets"] == [8]
    assert loops["compiled"]["graphs"] == 1  # one bucket, one graph
    # The same first weights and batches: the same losses, eager or compiled.
    np.testing.assert_allclose(loops["compiled"]["last_losses"], loops["eager"]["last_losses"], rtol=1e-4)
