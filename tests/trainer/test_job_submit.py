"""The main job under `ray job submit`: a local head (`ray start --head` on 127.0.0.1, its own temp
dir and ports), the repository uploaded as the runtime env's working_dir, `python trainer/launch.py`
as the entrypoint; the job must succeed and leave its run directory (docs/run_layout.md).

Token authentication (Ray 2.60, ray/_private/authentication/authentication_token_setup.py):
`ray start --head` enables token auth when RAY_AUTH_MODE is unset and a token exists (e.g.
~/.ray/auth_token), but a client (`ray job submit`) only sends the `Authorization: Bearer` header
when RAY_AUTH_MODE=token in *its* environment -- hence the "Unauthorized" of shared/NOTES.md. This
test is explicit and independent of ~/.ray: a fresh random token in RAY_AUTH_TOKEN (the token
loader reads RAY_AUTH_TOKEN before RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token) and RAY_AUTH_MODE=token
for both the head (every Ray process, the job driver included, inherits them, so launch.py's
ray.init(address=RAY_ADDRESS) is authorized too) and the `ray job submit` client.

The head is `ray start --head --block` in its own process group: `ray stop` would stop *every* Ray
on the machine (the session's `ray_local`, other users' clusters). Teardown sends SIGTERM to that
process (with --block it shuts its node down) and then kills, by pid, any descendant still alive.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")

pytestmark = pytest.mark.slow


def _free_port_block(count: int, low: int = 20000, high: int = 60000) -> int:
    """A base port such that base..base+count-1 are free on 127.0.0.1 (outside the worker range
    10002-19999 that other local Ray instances use)."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        base = rng.randrange(low, high - count)
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free block of ports")


@dataclass(frozen=True)
class Head:
    dashboard_url: str
    gcs_address: str
    env: dict[str, str]  # the client environment: token auth, no RAY_ADDRESS
    temp_dir: str


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "AWS_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is the venv's
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _kill_pids(pids: list[int], timeout: float = 15) -> None:
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.fixture
def ray_head() -> Iterator[Head]:
    temp_dir = tempfile.mkdtemp(dir="/tmp", prefix="rj")  # short: Unix socket paths are limited
    base = _free_port_block(201)
    gcs, dashboard, client, node_manager, object_manager, agent_http, agent_grpc, metrics, runtime_env = \
        range(base, base + 9)
    env = _clean_env()
    command = [
        RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
        "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--include-dashboard", "true", "--ray-client-server-port", str(client),
        "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
        "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
        "--min-worker-port", str(base + 9), "--max-worker-port", str(base + 200),
        "--num-cpus", "3", "--disable-usage-stats",
    ]
    log_path = Path(temp_dir) / "head.log"
    log = open(log_path, "w")
    # No drain on the teardown's SIGTERM (Ray drains a node for up to 30 s by default): the job is
    # over by then, and the wait only lengthened the suite.
    head = subprocess.Popen(command, cwd=ROOT, env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    tracked: set[int] = set()
    try:
        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while True:
            tracked.update(_descendants(head.pid))
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited {head.returncode}:\n{log_path.read_text()[-4000:]}")
            probe = subprocess.run([RAY, "job", "list", "--address", url], env=env, capture_output=True,
                                   text=True, timeout=60, check=False)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the head's job server did not answer:\n{probe.stderr[-2000:]}\n"
                                   f"{log_path.read_text()[-4000:]}")
            time.sleep(2)
        yield Head(dashboard_url=url, gcs_address=f"127.0.0.1:{gcs}", env=env, temp_dir=temp_dir)
    finally:
        tracked.update(_descendants(head.pid))
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)  # --block: shuts the node's processes down
            try:
                head.wait(timeout=10)
            except subprocess.TimeoutExpired:
                head.kill()
                head.wait(timeout=10)
        _kill_pids(sorted(tracked))  # anything of this head still alive (by pid, never by name)
        try:
            os.killpg(head.pid, signal.SIGKILL)  # its own process group; gone already, normally
        except (ProcessLookupError, PermissionError):
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_main_job_and_leaves_its_checkpoints(ray_head: Head, tmp_path: Path) -> None:
    runtime_env = {
        "working_dir": str(ROOT),
        "excludes": [".venv", ".git", "**/__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache",
                     "*.egg-info", "runs", "build", "dist", ".whl", ".gl"],
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }
    storage = tmp_path / "runs"
    overrides = [
        f"data.cache_dir={tmp_path / 'cache'}", f"checkpoint.storage_path={storage}", "checkpoint.run_name=job",
        "distributed.cpus_per_worker=1", "eval.cpus=0.5", "eval.qualitative_queries=0",
        "data.synthetic_train_images=100", "data.synthetic_dev_images=50", "data.synthetic_test_images=50",
        "eval.dev_images=50",
        "optim.epochs=2", "optim.warmup_epochs=1", "optim.lr_decay_every_epochs=1", "checkpoint.keep_last=2",
    ]
    started = time.monotonic()
    result = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head.dashboard_url, "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "trainer/launch.py", *[arg for o in overrides for arg in ("--set", o)]],
        cwd=tmp_path, env=ray_head.env, capture_output=True, text=True, timeout=480, check=False)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, (result.stdout[-6000:], result.stderr[-3000:])
    assert "succeeded" in (result.stdout + result.stderr), result.stdout[-3000:]

    # The job's logs (streamed by `ray job submit`) contain the pinned JSON line as the entrypoint's
    # last stdout line; the job logs as Ray stores them end with it.
    logs = subprocess.run([RAY, "job", "logs", "--address", ray_head.dashboard_url,
                           _job_id(result.stdout + result.stderr)],
                          env=ray_head.env, capture_output=True, text=True, timeout=60, check=False)
    assert logs.returncode == 0, logs.stderr[-2000:]
    summary = _last_json_line(logs.stdout)
    run_dir = storage / "job"
    assert summary["run_dir"] == str(run_dir) and summary["run_name"] == "job", summary
    best = summary["best"]
    assert best and best == json.loads((run_dir / "best.json").read_text())

    assert (run_dir / "config.yaml").is_file()
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert checkpoints, list(run_dir.iterdir())
    for checkpoint in checkpoints:
        assert (checkpoint / "train_state.json").is_file()
        assert (checkpoint / "inference" / "model.safetensors").is_file()
        assert (checkpoint / "metrics.json").is_file()
    assert Path(best["checkpoint"]).name in [p.name for p in checkpoints]
    print(f"ray job submit took {elapsed:.0f} s")


def _job_id(output: str) -> str:
    import re

    match = re.search(r"Job '([^']+)' submitted successfully", output) or re.search(r"(raysubmit_\w+)", output)
    assert match, output[-3000:]
    return match.group(1)


def _last_json_line(text: str) -> dict:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert lines, "no job logs"
    last = lines[-1].strip()
    assert last.startswith("{"), lines[-10:]
    return json.loads(last)
