"""One writer per run (trainer/run/lease.py): the lease on RUN_DIR, against a local directory and
the local moto S3 server, then through real `python trainer/launch.py` processes.

Without Ray (seconds): refusal naming the holder, stale takeover after the timeout, force, a
SIGKILLed holder process, racing trainers (exactly one wins), an unreadable record, release.

Through Ray Train (the slow tests; each launch is a real subprocess):

* two concurrent launches on one run: the second exits 2 naming the holder, the first finishes
  with every step once and in order;
* a driver SIGKILLed mid-run: the lease is held until its timeout, then a relaunch takes it over
  and resumes, every step logged once;
* force: a forced launch takes over a live run, which aborts (exit 1) while the new one resumes;
* on s3:// (moto honours If-None-Match and If-Match): refusal and force through launch.py.

The local launches attach to the session's Ray (`ray_local`, 2 CPUs) through RAY_ADDRESS, as
tests/trainer/test_launch.py does: starting a Ray per launch would cost ~15 s each. A refused
launch never reaches Ray. The s3:// launches start their own Ray (tests/trainer/test_s3_storage.py
says why: the session's Ray processes lack the server's credentials).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from train_run_helpers import (
    STEPS_PER_EPOCH,
    Launch,
    logged_losses,
    tiny_run_overrides,
    wait_for,
)

from trainer.config import ConfigError, load_config
from trainer.run.layout import LEASE_FILE, TRAIN_LOG, checkpoint_dir_name
from trainer.run.lease import (
    LeaseHeldError,
    LeaseLostError,
    LeaseRecord,
    RunLease,
    describe_holder,
    read_lease,
)

ROOT = Path(__file__).resolve().parents[3]


# --------------------------------------------------------------------------------------------------
# Without Ray: the lease itself, local and on S3
# --------------------------------------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def run_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(RUN_DIR, storage options): a local directory, or a prefix in a fresh bucket of the moto server."""
    if request.param == "local":
        yield str(tmp_path / "runs" / "r"), None
        return
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    yield f"s3://{bucket}/runs/r", server.storage_options


def test_a_second_trainer_is_refused_naming_the_holder_and_the_age_of_its_heartbeat(
        run_dir: tuple[str, dict[str, Any] | None]) -> None:
    url, options = run_dir
    first = RunLease.acquire(url, timeout_s=30, storage_options=options, ray="ray job 01000000 on 10.0.0.1:6379")
    record = read_lease(url, options)
    assert record is not None and record.token == first.record.token and record.pid == os.getpid()
    assert record.ray == "ray job 01000000 on 10.0.0.1:6379" and record.timeout_s == 30
    with pytest.raises(LeaseHeldError) as refused:
        RunLease.acquire(url, timeout_s=30, storage_options=options)
    message = str(refused.value)
    assert message.startswith(f"run {url} is held by host ") and f"pid {os.getpid()} (ray job 01000000" in message
    assert "heartbeat 0 s ago" in message and "--set checkpoint.force_lease=true" in message
    assert "\n" not in message
    assert describe_holder(url, options).startswith(f"run {url} is held by host ")
    # The refused attempt changed nothing: the record is still the first trainer's.
    assert read_lease(url, options) == record
    first.release()
    assert read_lease(url, options) is None and describe_holder(url, options) == f"run {url}: no trainer holds the lease"
    second = RunLease.acquire(url, timeout_s=30, storage_options=options)
    assert read_lease(url, options).token == second.record.token  # type: ignore[union-attr]
    second.release()


def test_the_heartbeat_renews_and_a_stale_lease_is_taken_over_after_the_timeout(
        run_dir: tuple[str, dict[str, Any] | None], caplog: pytest.LogCaptureFixture) -> None:
    url, options = run_dir
    holder = RunLease.acquire(url, timeout_s=1, storage_options=options)
    assert holder.interval_s == 0.25
    holder.start_heartbeat()
    before = read_lease(url, options).heartbeat_unix  # type: ignore[union-attr]
    time.sleep(1.3)  # past the timeout, but renewed meanwhile: still held
    assert read_lease(url, options).heartbeat_unix > before  # type: ignore[union-attr]
    with pytest.raises(LeaseHeldError):
        RunLease.acquire(url, timeout_s=1, storage_options=options)
    # The holder stops renewing (as a killed driver would, without releasing).
    holder.stop_heartbeat()  # as a hung driver: the record stays, its heartbeat ages
    time.sleep(1.2)
    with caplog.at_level(logging.WARNING, logger="trainer.run.lease"):
        taker = RunLease.acquire(url, timeout_s=1, storage_options=options)
    assert "taking over the stale lease on run" in caplog.text and f"pid {os.getpid()}" in caplog.text
    # The old holder finds out at its next renewal, and its release leaves the new record alone.
    with pytest.raises(LeaseLostError, match="another trainer took over this trainer's lease"):
        holder.renew()
    holder.release()
    assert read_lease(url, options).token == taker.record.token  # type: ignore[union-attr]
    taker.release()
    assert read_lease(url, options) is None


def test_the_holders_longer_timeout_decides_when_its_lease_is_stale(
        run_dir: tuple[str, dict[str, Any] | None]) -> None:
    url, options = run_dir
    holder = RunLease.acquire(url, timeout_s=30, storage_options=options)  # renews every 7.5 s
    time.sleep(1.2)
    with pytest.raises(LeaseHeldError, match="stale 30 s after its last heartbeat"):
        RunLease.acquire(url, timeout_s=1, storage_options=options)
    holder.release()


def test_force_takes_over_a_fresh_lease_and_the_old_holder_learns_it_at_its_next_heartbeat(
        run_dir: tuple[str, dict[str, Any] | None], caplog: pytest.LogCaptureFixture) -> None:
    url, options = run_dir
    holder = RunLease.acquire(url, timeout_s=1, storage_options=options)
    lost: list[LeaseLostError] = []
    called = threading.Event()

    def on_lost(error: LeaseLostError) -> None:
        lost.append(error)
        called.set()

    holder.start_heartbeat(on_lost=on_lost)
    with caplog.at_level(logging.WARNING, logger="trainer.run.lease"):
        taker = RunLease.acquire(url, timeout_s=1, force=True, storage_options=options)
    assert "checkpoint.force_lease: taking over the lease on run" in caplog.text
    assert called.wait(5), "the old holder did not notice within a few heartbeats"
    assert holder.lost is lost[0] and lost[0].holder is not None and lost[0].holder.token == taker.record.token
    with pytest.raises(LeaseLostError):
        holder.check()
    holder.release()
    assert read_lease(url, options).token == taker.record.token  # type: ignore[union-attr]
    taker.release()


def test_racing_trainers_exactly_one_gets_the_lease(run_dir: tuple[str, dict[str, Any] | None]) -> None:
    url, options = run_dir
    RunLease.acquire(url, timeout_s=30, storage_options=options).release()  # the directory exists
    start = threading.Barrier(6)
    won: list[RunLease] = []
    refused: list[LeaseHeldError] = []

    def contend() -> None:
        start.wait()
        try:
            won.append(RunLease.acquire(url, timeout_s=30, storage_options=options))
        except LeaseHeldError as error:
            refused.append(error)

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(won) == 1 and len(refused) == 5, (won, refused)
    assert read_lease(url, options).token == won[0].record.token  # type: ignore[union-attr]
    won[0].release()


HOLDER = """
import sys, time
from trainer.run.lease import RunLease
lease = RunLease.acquire(sys.argv[1], timeout_s=1, storage_options={options})
lease.start_heartbeat()
print("held", flush=True)
time.sleep(600)
"""


def test_a_sigkilled_holder_keeps_the_run_until_its_heartbeat_is_older_than_the_timeout(
        run_dir: tuple[str, dict[str, Any] | None], caplog: pytest.LogCaptureFixture) -> None:
    url, options = run_dir
    process = subprocess.Popen([sys.executable, "-c", HOLDER.format(options=repr(options)), url], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "held"
        time.sleep(0.8)  # a few renewals (every 0.25 s)
        record = read_lease(url, options)
        assert record is not None and record.pid == process.pid and record.heartbeat_unix > time.time() - 0.6
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    with pytest.raises(LeaseHeldError, match=f"pid {process.pid}"):
        RunLease.acquire(url, timeout_s=1, storage_options=options)
    wait_for(lambda: read_lease(url, options).age_s() > 1.1, 10, "the lease to go stale")  # type: ignore[union-attr]
    with caplog.at_level(logging.WARNING, logger="trainer.run.lease"):
        lease = RunLease.acquire(url, timeout_s=1, storage_options=options)
    assert f"taking over the stale lease on run {url}: host" in caplog.text and f"pid {process.pid}" in caplog.text
    lease.release()


def test_with_lease_wait_a_relaunch_waits_for_a_sigkilled_holder_and_refuses_a_live_one(
        run_dir: tuple[str, dict[str, Any] | None], caplog: pytest.LogCaptureFixture) -> None:
    # checkpoint.lease_wait_s: a Kubernetes retry of a job whose driver was killed finds its lease
    # still fresh; it waits for it to go stale instead of exiting 2 (and burning an attempt).
    url, options = run_dir
    live = subprocess.Popen([sys.executable, "-c", HOLDER.format(options=repr(options)), url], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout is not None and live.stdout.readline().strip() == "held"
        started = time.monotonic()
        # A holder that still renews (every 0.25 s) is refused at once, even with a long wait.
        with pytest.raises(LeaseHeldError, match="its heartbeat moved while this trainer waited"):
            RunLease.acquire(url, timeout_s=1, storage_options=options, wait_s=60)
        assert time.monotonic() - started < 5
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(30)
    # Killed: its heartbeat stops; a wait shorter than the time to staleness is refused, saying so...
    with pytest.raises(LeaseHeldError, match="checkpoint.lease_wait_s"):
        RunLease.acquire(url, timeout_s=30, storage_options=options, wait_s=0.5)
    # ...and a long enough one waits, takes the stale lease over and says what it waited for.
    with caplog.at_level(logging.WARNING, logger="trainer.run.lease"):
        lease = RunLease.acquire(url, timeout_s=3, storage_options=options, wait_s=30)
    assert f"pid {live.pid}" in caplog.text and "waiting" in caplog.text
    assert f"taking over the stale lease on run {url}" in caplog.text
    assert read_lease(url, options).token == lease.record.token  # type: ignore[union-attr]
    lease.release()


def test_an_unreadable_lease_is_refused_naming_the_file_and_replaced_with_force(
        run_dir: tuple[str, dict[str, Any] | None]) -> None:
    from data_shards.storage import open_location

    url, options = run_dir
    location = open_location(url, options)
    location.makedirs()
    location.write_bytes_atomic(LEASE_FILE, b"{not json")
    with pytest.raises(LeaseHeldError, match=rf"{LEASE_FILE}: not a lease record .*delete the file or "
                                             r"--set checkpoint.force_lease=true"):
        RunLease.acquire(url, timeout_s=30, storage_options=options)
    assert "lease unreadable" in describe_holder(url, options)
    lease = RunLease.acquire(url, timeout_s=30, force=True, storage_options=options)
    assert isinstance(read_lease(url, options), LeaseRecord)
    lease.release()


def test_evaluate_watch_logs_the_holder_and_needs_no_lease(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "watched"
    holder = RunLease.acquire(str(run), timeout_s=30, ray="ray job 07000000 on 10.0.0.7:6379")
    try:
        result = subprocess.run([sys.executable, "trainer/evaluate.py", "--watch", str(run)], cwd=ROOT,
                                capture_output=True, text=True, timeout=180, check=False)
        # (No config.yaml and no shards: nothing to evaluate, which it says after naming the holder.)
        assert f"run {run} is held by host " in result.stderr, result.stderr[-3000:]
        assert f"pid {os.getpid()} (ray job 07000000 on 10.0.0.7:6379), heartbeat " in result.stderr
        assert read_lease(str(run)).token == holder.record.token  # type: ignore[union-attr]  # untouched
    finally:
        holder.release()


@pytest.mark.parametrize("value,message", [
    ("0", "checkpoint.lease_timeout_s must be >= 1 (seconds"),
    ("-5", "got -5"),
    ("soon", "checkpoint.lease_timeout_s: expected a number, got 'soon'"),
])
def test_bad_lease_settings_name_the_key(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(ROOT / "configs" / "tiny.yaml", [f"checkpoint.lease_timeout_s={value}"])
    with pytest.raises(ConfigError, match="checkpoint.force_lease: expected true or false"):
        load_config(ROOT / "configs" / "tiny.yaml", ["checkpoint.force_lease=maybe"])
    config = load_config(ROOT / "configs" / "tiny.yaml", [])
    assert config.checkpoint.lease_timeout_s == 300 and config.checkpoint.force_lease is False


# --------------------------------------------------------------------------------------------------
# Through `python trainer/launch.py`
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic dataset for the module's launches (generated by the first)."""
    return tmp_path_factory.mktemp("lease_cache")


def _has_checkpoint(run: Path, step: int) -> bool:
    return (run / checkpoint_dir_name(step) / "train_state.json").is_file()


def _logged_steps(run: Path) -> int:
    path = run / TRAIN_LOG
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _local_env(ray_local: Any) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}


def _local_overrides(cache: Path, runs: Path, name: str, *extra: str) -> list[str]:
    # 0.75 CPU per worker: one run fits the session's 2 CPUs, so a second one waits for the first.
    return tiny_run_overrides(cache, runs, name, "distributed.cpus_per_worker=0.75", *extra)


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the run's committed checkpoints


def _committed_steps(snapshot: str | None) -> set[int]:
    """Steps of the checkpoints Ray Train has committed (those a relaunch resumes from; a
    checkpoint directory exists a few seconds before Ray commits it), from its snapshot file."""
    try:
        results = json.loads(snapshot or "")["checkpoint_results"]
        return {int(r["checkpoint_dir_name"].rsplit("_", 1)[1]) for r in results}
    except (ValueError, KeyError, TypeError, IndexError):  # not there yet, or being rewritten
        return set()


def _local_committed(run: Path) -> set[int]:
    path = run / RAY_SNAPSHOT
    return _committed_steps(path.read_text() if path.is_file() else None)


def _resumed_at(launch: Launch) -> int | None:
    found = re.search(r"resuming at step (\d+)", launch.stderr())
    return int(found.group(1)) if found else None


@pytest.mark.slow
@pytest.mark.distributed
def test_a_second_launch_is_refused_force_takes_over_and_a_relaunch_right_after_a_sigkill_waits_then_resumes(
        ray_local: Any, tmp_path: Path, cache_dir: Path, launches: list[Launch]) -> None:
    # One run, four trainers (each Ray Train start costs ~20 s here): A trains; a plain second
    # launch is refused at once naming A; B forces the lease and A stops; B is SIGKILLed; C,
    # launched at once with checkpoint.lease_wait_s (as the RayJob manifests set it for
    # Kubernetes' retries), waits for B's lease to go stale and resumes.
    env, runs = _local_env(ray_local), tmp_path / "runs"
    run = runs / "taken"
    # A lease is stale 15 s after its holder's last renewal (renewals every 3.75 s): longer than C
    # takes to start (its imports alone take seconds on 2 busy cores), so that C finds B's lease
    # still fresh and waits; 3 epochs (90 steps) so that A is still training when B comes.
    overrides = _local_overrides(cache_dir, runs, "taken", "checkpoint.lease_timeout_s=15", "optim.epochs=3")
    a = Launch(tmp_path, "a", overrides, env)
    launches.append(a)
    wait_for(lambda: (run / LEASE_FILE).is_file(), 180, "A's lease", a.exited)

    # A second launch on the running run: exit 2 naming A, before any Ray work.
    started = time.monotonic()
    second = Launch(tmp_path, "second", overrides, env)
    launches.append(second)
    assert second.wait(120) == 2, second.stderr()[-4000:]
    assert time.monotonic() - started < 60  # refused before any Ray work
    line = second.last_line()
    assert line.startswith(f"launch: run {run} is held by host ") and f" pid {a.pid} (ray " in line, line
    assert " heartbeat " in line and " s ago" in line and "--set checkpoint.force_lease=true" in line, line
    assert "Ray cluster" not in second.stderr()  # it never connected to Ray
    wait_for(lambda: 10 in _local_committed(run), 240, "A's checkpoint 10", a.exited)

    # Force: B takes over A's fresh lease; A stops its workers at its next heartbeat (writing
    # nothing more: the run is B's) and exits 1.
    b = Launch(tmp_path, "b", [*overrides, "checkpoint.force_lease=true"], env)
    launches.append(b)
    assert a.wait(120) == 1, a.stderr()[-4000:]
    line = a.last_line()
    assert line.startswith(f"launch: run {run}: another trainer took over this trainer's lease (host "), line
    assert f"pid {b.pid}" in line, line
    assert "stopping without a checkpoint (the run belongs to another trainer now)" in a.stderr()
    wait_for(lambda: _resumed_at(b) is not None, 240, "B to resume", b.exited)
    assert f"checkpoint.force_lease: taking over the lease on run {run} from host" in b.stderr()
    resumed_b = _resumed_at(b)
    assert resumed_b is not None and resumed_b >= 10

    # SIGKILL B once it has committed a checkpoint of its own: no release, the lease stays B's,
    # and a plain relaunch is refused until its heartbeat is 15 s old...
    wait_for(lambda: any(step > resumed_b for step in _local_committed(run)), 240, "B's next checkpoint", b.exited)
    b.kill()
    record = read_lease(str(run))
    assert record is not None and record.pid == b.pid
    with pytest.raises(LeaseHeldError, match=f"pid {b.pid}"):
        RunLease.acquire(str(run), timeout_s=15)

    # ...while C, with checkpoint.lease_wait_s, waits for it, takes it over and resumes; every step
    # of the run is logged once, in order.
    c = Launch(tmp_path, "c", [*overrides, "checkpoint.lease_wait_s=60"], env)
    launches.append(c)
    assert c.wait(300) == 0, c.stderr()[-4000:]
    stderr = c.stderr()
    assert f"run {run}: the lease of host" in stderr and "waiting" in stderr and "checkpoint.lease_wait_s" in stderr
    assert f"taking over the stale lease on run {run}: host" in stderr and f"pid {b.pid}" in stderr
    resumed_c = _resumed_at(c)
    assert resumed_c is not None and resumed_c > resumed_b, stderr[-4000:]
    assert sorted(logged_losses(run)) == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    assert not (run / LEASE_FILE).exists()  # released at the end
    summary = json.loads(c.out_path.read_text().strip().splitlines()[-1])
    assert summary["run_dir"] == str(run) and summary["latest_checkpoint"].endswith(checkpoint_dir_name(90))


def test_on_s3_a_launch_on_a_held_run_exits_2_naming_the_holder_and_writes_nothing(
        s3_server: Any, s3_bucket: str, tmp_path: Path, cache_dir: Path) -> None:
    # The holder is this test process (a RunLease with its heartbeat running): the refused launch
    # never reaches Ray, so this costs seconds. Force, staleness and a SIGKILLed holder on S3 are
    # the lease tests above (moto honours If-None-Match and If-Match).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_"))}
    env.update(s3_server.env)
    url = f"s3://{s3_bucket}/runs/s3lease"
    holder = RunLease.acquire(url, timeout_s=30, storage_options=s3_server.storage_options,
                              ray="ray job 05000000 on 10.0.0.5:6379")
    holder.start_heartbeat()
    try:
        result = subprocess.run(
            [sys.executable, "trainer/launch.py", *[a for o in tiny_run_overrides(
                cache_dir, f"s3://{s3_bucket}/runs", "s3lease", f"data.s3_endpoint_url={s3_server.endpoint_url}")
                for a in ("--set", o)]],
            cwd=ROOT, capture_output=True, text=True, env=env, timeout=180, check=False)
        assert result.returncode == 2, result.stderr[-4000:]
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"launch: run {url} is held by host ") and f" pid {os.getpid()} (ray job 05000000" in line
        assert "--set checkpoint.force_lease=true" in line, line
        keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
        assert keys == [f"runs/s3lease/{LEASE_FILE}"], keys  # no config.yaml: nothing written
        assert read_lease(url, s3_server.storage_options).token == holder.record.token  # type: ignore[union-attr]
    finally:
        holder.release()
    assert read_lease(url, s3_server.storage_options) is None
