"""The main job (`python trainer/launch.py`): configuration errors, and an end-to-end run through
Ray Train + DeepSpeed with the evaluation worker scoring every checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from train_run_helpers import (
    tiny_run_config,
    tiny_run_overrides,
)

from trainer.config import load_config
from trainer.launch import pyarrow_s3_filesystem, resolve_run

ROOT = Path(__file__).resolve().parents[2]


def launch(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "trainer/launch.py", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args,message", [
    (["--set", "optim.lrr=1"], "unknown key(s): optim.lrr"),
    (["--set", "distributed.zero_stage=3"], "distributed.zero_stage must be 0, 1 or 2"),
    (["--config", "configs/missing.yaml"], "missing.yaml: cannot read"),
    (["--set", "distributed.use_gpu=true", "--set", "distributed.workers=2", "--set", "distributed.gpus_per_worker=0.5"],
     "distributed.gpus_per_worker is 0.5 with distributed.workers=2"),
])
def test_configuration_errors_exit_2_naming_the_key_before_any_ray_work(
        args: list[str], message: str, tmp_path: Path) -> None:
    started = time.monotonic()
    result = launch(*args, "--set", f"checkpoint.storage_path={tmp_path}", env={"RAY_ADDRESS": "127.0.0.1:1"},
                    timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert result.stdout == ""
    # No Ray: nothing was started or contacted (RAY_ADDRESS points nowhere), no run directory made.
    assert "Ray" not in result.stderr and list(tmp_path.iterdir()) == []
    assert time.monotonic() - started < 60


def test_a_config_that_does_not_fit_the_data_exits_2(tmp_path: Path) -> None:
    result = launch("--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", f"checkpoint.storage_path={tmp_path}",
                    "--set", "data.synthetic_train_images=20", "--set", "model.img_dim=32",
                    env={"RAY_ADDRESS": "127.0.0.1:1"}, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "model.img_dim is 32 but the features of" in result.stderr and "have 64 dimensions" in result.stderr


def test_run_names_and_storage_paths() -> None:
    config, run_dir = resolve_run(load_config(ROOT / "configs" / "tiny.yaml", ["checkpoint.run_name=r1",
                                                                              "checkpoint.storage_path=~/runs/"]))
    assert run_dir == os.path.expanduser("~/runs/r1") and config.checkpoint.storage_path == os.path.expanduser("~/runs")
    config, run_dir = resolve_run(load_config(ROOT / "configs" / "coco.yaml"))
    assert config.checkpoint.run_name.startswith("vsrn-") and run_dir == f"s3://vsrn-runs/{config.checkpoint.run_name}"


def test_s3_storage_filesystem_gets_the_endpoint() -> None:
    config = load_config(ROOT / "configs" / "coco.yaml", ["data.s3_endpoint_url=http://127.0.0.1:9000"])
    fs = pyarrow_s3_filesystem(config)
    assert fs.type_name == "s3" and "127.0.0.1:9000" in repr(fs.__reduce__())


@pytest.mark.slow
@pytest.mark.distributed
def test_main_job_trains_evaluates_each_checkpoint_and_prints_the_pinned_json(embedded_default_run: Any) -> None:
    # The embedded default (configs/tiny.yaml), trained once per session (tests/conftest.py).
    result, run_dir = embedded_default_run.result, embedded_default_run.run_dir
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])  # pinned: the last line is one JSON object
    assert summary["run_dir"] == str(run_dir) and summary["run_name"] == "embedded"
    assert any(line.startswith("protocol") and "R@1" in line for line in lines)

    best = summary["best"]
    assert best == json.loads((run_dir / "best.json").read_text())
    metrics = best["metrics"]["all"]
    # 100 held-out test images: chance is R@1 1 %, R@10 10 %, rsum ~32. Far above that:
    assert metrics["rsum"] > 150 and metrics["i2t_r10"] > 30 and metrics["t2i_r10"] > 30, metrics

    # One checkpoint per epoch (62 steps each: 400 images x 5 captions / 32); the evaluator scored
    # every one; pruning kept the newest two and the best.
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    names = [p.name for p in checkpoints]
    assert names[-2:] == ["checkpoint_000000310", "checkpoint_000000372"] and len(names) <= 3
    assert Path(best["checkpoint"]).name in names
    for checkpoint in checkpoints:
        payload = json.loads((checkpoint / "metrics.json").read_text())
        assert payload["dev_rsum"] > 0 and "all" in payload["test"]
    # The evaluation history keeps every evaluated checkpoint, the pruned ones too (once each).
    history = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    assert sorted(line["step"] for line in history) == [62, 124, 186, 248, 310, 372]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "train_log.jsonl").is_file()
    config = load_config(run_dir / "config.yaml")  # the resolved configuration, with the data it used
    assert config.data.train.endswith("shards/train") and config.model.vocab_size < 200
    assert "L_M" in result.stderr and "L_G" in result.stderr and "samples/s" in result.stderr
    # The workers ran with the allocator settings of trainer/training/allocator.py (set through Ray's runtime_env).
    assert "malloc: MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824" in result.stderr
    # No deprecation warning from the driver, the workers or the evaluation actor (before: the
    # actor's Ray runtime-context call warned on every run).
    warned = [line for line in result.stderr.splitlines() if "DeprecationWarning" in line or "FutureWarning" in line]
    assert warned == [], warned


def _damage_one_shard(split: Path) -> str:
    """Flip one bit of the first image's features in the split's second shard (the values stay
    finite: the low byte of a float16); returns the shard's name. Only its sha256 can tell."""
    shard = sorted(split.glob("*.tar"))[1]
    with tarfile.open(shard) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("regions.npy"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + 128] ^= 0x01  # past the 128-byte .npy header
    shard.write_bytes(bytes(data))
    return shard.name


@pytest.mark.slow
@pytest.mark.distributed
def test_a_damaged_shard_read_by_a_worker_ends_the_run_without_restarts(ray_local: Any, tmp_path: Path) -> None:
    from trainer.training.data import prepare_data

    config = tiny_run_config(tmp_path, "damaged")
    data = prepare_data(config.data)
    train = tmp_path / "damaged-train"
    shutil.copytree(data.train, train)
    name = _damage_one_shard(train)
    result = launch(*[f"--set={o}" for o in tiny_run_overrides(tmp_path / "cache", tmp_path / "runs", "damaged")],
                    "--set", f"data.train={train}", "--set", f"data.dev={data.dev}", "--set", f"data.test={data.test}",
                    "--set", f"data.vocab={data.vocab}", "--set", "checkpoint.max_failures=3",
                    "--set", "distributed.cpus_per_worker=0.75",
                    env={"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("launch: training stopped without restarts"), last
    assert f"{train / name}: sha256" in last and "ShardFormatError" in last and "rank " in last, last
    # One attempt: the workers started once and Ray's failure policy never chose to retry.
    assert result.stderr.count(" parameters on 2 CPU worker(s)") == 1
    assert "RETRY" not in result.stderr, result.stderr[-3000:]
    assert not any(line.startswith("{") for line in result.stdout.splitlines())  # no summary JSON


@pytest.mark.slow
def test_a_run_asking_for_gpus_on_a_cluster_without_any_ends_naming_them(ray_local: Any, tmp_path: Path) -> None:
    # The session's cluster has 2 CPUs and no GPU, and no autoscaler: before, the driver waited
    # for Ray Train's placement group silently until it was killed.
    started = time.monotonic()
    result = launch(*[f"--set={o}" for o in tiny_run_overrides(tmp_path / "cache", tmp_path / "runs", "no-gpus")],
                    "--set", "distributed.use_gpu=true", "--set", "distributed.resource_wait_s=5",
                    env={"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("launch: the Ray cluster cannot place this run"), last
    assert "missing {GPU: 2} (for training worker 0, training worker 1)" in last, last
    assert "distributed.gpus_per_worker" in last and "distributed.resource_wait_s" in last, last
    assert elapsed < 60, elapsed
    assert not (tmp_path / "runs" / "no-gpus" / "config.yaml").exists()  # refused before the run was written


LOOPBACK_PROBE = """
import json, socket, sys
from trainer.launch import keep_local_ray_on_loopback
keep_local_ray_on_loopback()
import ray
from ray._private.services import node_ip_address_from_perspective
ray.init(address="local", num_cpus=1, include_dashboard=False)
node = next(n for n in ray.nodes() if n["Alive"])
port = node["MetricsExportPort"]
def reachable(host):
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False
external = node_ip_address_from_perspective()
print(json.dumps({"node": node["NodeManagerAddress"], "external": external,
                  "loopback": reachable("127.0.0.1"), "on_external": reachable(external)}))
ray.shutdown()
"""


def test_a_local_cluster_keeps_ray_and_its_metrics_endpoint_on_loopback() -> None:
    # What `python trainer/launch.py` does before it starts a local Ray: its metrics endpoint
    # (and every other Ray port) answers on 127.0.0.1 only.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    result = subprocess.run([sys.executable, "-c", LOOPBACK_PROBE], cwd=ROOT, capture_output=True, text=True,
                            timeout=180, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["node"] == "127.0.0.1" and probe["loopback"], probe
    if probe["external"] != "127.0.0.1":  # a machine with a network address: nothing listens there
        assert not probe["on_external"], probe
