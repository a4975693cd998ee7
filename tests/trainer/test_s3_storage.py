"""The main job with `checkpoint.storage_path=s3://BUCKET/runs` on the local moto server: the run
directory (config.yaml, checkpoints, metrics.json, best.json) lives in the bucket, and re-running
with the same run name and one more epoch resumes from the S3 checkpoint.

S3 endpoint and credentials: `python trainer/launch.py` runs WITHOUT RAY_ADDRESS, so it starts its
own local Ray and every Ray process (Train controller, workers, evaluation actor) inherits the
subprocess environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION /
AWS_ENDPOINT_URL of the moto server. The session's `ray_local` cluster would not do: its processes
were started without those variables, and neither Ray's pyarrow S3FileSystem (launch.py:
pyarrow_s3_filesystem, credentials from each process's default AWS chain) nor the evaluator's s3fs
options (storage_options_for: endpoint/region only) carry the credentials. `data.s3_endpoint_url`
is set as well, so pyarrow gets `endpoint_override=127.0.0.1:PORT, scheme=http` explicitly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def launch(*overrides: str, env: dict[str, str], timeout: float = 420) -> subprocess.CompletedProcess[str]:
    args = [arg for o in overrides for arg in ("--set", o)]
    return subprocess.run([sys.executable, "trainer/launch.py", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=timeout, env=env)


def _keys(client: Any, bucket: str, prefix: str) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            keys[obj["Key"]] = obj
    return keys


def _checkpoints(keys: dict[str, Any], prefix: str) -> list[str]:
    return sorted({key[len(prefix):].split("/")[0] for key in keys
                   if key[len(prefix):].startswith("checkpoint_") and "/" in key[len(prefix):]})


def test_training_with_s3_storage_writes_the_run_to_the_bucket_and_resumes(
        s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "AWS_"))}  # a local Ray inside the job, not the session's
    env.update(s3_server.env)
    env["PYTHONUNBUFFERED"] = "1"
    common = [
        f"data.cache_dir={tmp_path / 'cache'}", f"checkpoint.storage_path=s3://{s3_bucket}/runs",
        f"data.s3_endpoint_url={s3_server.endpoint_url}", "checkpoint.run_name=s3run",
        "distributed.cpus_per_worker=0.75", "eval.cpus=0.5", "data.synthetic_train_images=100",
        "data.synthetic_dev_images=50", "data.synthetic_test_images=50", "eval.dev_images=50",
        "optim.warmup_epochs=0", "optim.lr_decay_every_epochs=1", "checkpoint.keep_last=3",
    ]
    first = launch(*common, "optim.epochs=1", env=env)
    assert first.returncode == 0, (first.stdout[-3000:], first.stderr[-6000:])
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    run_url = f"s3://{s3_bucket}/runs/s3run"
    assert summary["run_dir"] == run_url and summary["run_name"] == "s3run"
    assert summary["latest_checkpoint"].startswith(f"{run_url}/checkpoint_")

    client = s3_server.client()
    prefix = "runs/s3run/"
    keys = _keys(client, s3_bucket, prefix)
    assert f"{prefix}config.yaml" in keys and f"{prefix}best.json" in keys, sorted(keys)
    checkpoints = _checkpoints(keys, prefix)
    assert checkpoints, sorted(keys)
    for name in checkpoints:
        # The evaluator's qualitative page (eval.qualitative_queries) goes to the bucket too.
        for leaf in ("train_state.json", "inference/model.safetensors", "metrics.json", "qualitative.md"):
            assert f"{prefix}{name}/{leaf}" in keys, (name, leaf, sorted(keys))
    best = json.loads(client.get_object(Bucket=s3_bucket, Key=f"{prefix}best.json")["Body"].read())
    assert best == summary["best"] and best["checkpoint"].startswith(f"{run_url}/checkpoint_")
    last = checkpoints[-1]
    state = json.loads(client.get_object(Bucket=s3_bucket, Key=f"{prefix}{last}/train_state.json")["Body"].read())
    assert state["epoch_complete"]

    # Same run name, one more epoch: resumes from the S3 checkpoint and trains only the new epoch.
    second = launch(*common, "optim.epochs=2", env=env)
    assert second.returncode == 0, (second.stdout[-3000:], second.stderr[-6000:])
    summary2 = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary2["run_dir"] == run_url
    assert f"resuming at step {state['step']}" in second.stderr, second.stderr[-6000:]
    keys2 = _keys(client, s3_bucket, prefix)
    checkpoints2 = _checkpoints(keys2, prefix)
    assert checkpoints2[-1] > last and summary2["latest_checkpoint"].endswith(checkpoints2[-1])
    state2 = json.loads(client.get_object(Bucket=s3_bucket,
                                          Key=f"{prefix}{checkpoints2[-1]}/train_state.json")["Body"].read())
    assert state2["step"] == 2 * state["step"] and state2["epoch_complete"], (state, state2)
    # The first run's checkpoint was not rewritten (a fresh start would have re-saved it).
    old = f"{prefix}{last}/train_state.json"
    assert old in keys2 and keys2[old]["ETag"] == keys[old]["ETag"] \
        and keys2[old]["LastModified"] == keys[old]["LastModified"]
    for leaf in ("train_state.json", "inference/model.safetensors", "metrics.json"):
        assert f"{prefix}{checkpoints2[-1]}/{leaf}" in keys2
