"""The main job on a Ray cluster of several nodes, simulated on this machine (127.0.0.x), through the
real `python trainer/launch.py` and RAY_ADDRESS, with checkpoints on the local S3 server.

The cluster (`ray.cluster_utils.Cluster`): a head without CPUs (it holds the driver, as under `ray
job submit`) and four nodes of 1 CPU. Training workers take 0.75 CPU and the evaluation actor 0.5,
so no node fits two of them: the actor and the two workers land on three different nodes and one
node is spare. Ray keeps every address on loopback with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (else it
replaces 127.0.0.1 by the machine's address, where nothing listens).

* "steady": an uninterrupted run; placement read from what each worker and the actor log (their
  node ids).
* "faulty": the same run. Mid-epoch, the node of rank 0 is killed without warning (its raylet and
  everything on it SIGKILLed): Ray Train restarts both workers from the last checkpoint, on the
  surviving worker node and the spare. Later the evaluation actor's node is killed too; no node has
  room for the actor until the test adds one, and meanwhile training goes on. Ray then recreates
  the actor there and it evaluates what its predecessor had not.
* A node on 127.0.0.2 (another host, as far as Ray can tell) and a local storage path: refused.
* "drained": mid-epoch, the node of rank 1 is drained for preemption with a deadline (Ray's node
  drain, through `ray drain-node`, as a spot notice or a deleted KubeRay pod does): the workers
  checkpoint the step they are on before the deadline, Ray Train moves them to the other nodes at
  the deadline and the run resumes from that checkpoint and finishes every step once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from train_run_helpers import ROOT, STEPS_PER_EPOCH, tiny_run_overrides

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORKER_NODE = re.compile(r"rank (\d+) of 2 on node ([0-9a-f]+) \(([\d.]+)\)")
EVALUATOR_NODE = re.compile(r"evaluation worker on node ([0-9a-f]+) \(([\d.]+)\)")
PROGRESS = re.compile(r"epoch \d+ step (\d+) \(batch")
DRAIN_CHECKPOINT = re.compile(r"drained for preemption, deadline in (\d+) s: checkpointing step (\d+)")
COMMITTED_10 = re.compile(r"queued \S+/checkpoint_000000010 for evaluation")
LAST_STEP = 2 * STEPS_PER_EPOCH


@dataclass
class SimulatedCluster:
    cluster: Any  # ray.cluster_utils.Cluster
    nodes: dict[str, Any]  # node id -> the Cluster's node object
    env: dict[str, str]  # for the driver: RAY_ADDRESS, S3 endpoint and credentials, loopback
    bucket: str
    s3: Any  # conftest.S3Server

    def add_node(self, ip: str = "127.0.0.1") -> str:
        node = self.cluster.add_node(num_cpus=1, node_ip_address=ip)
        self.cluster.wait_for_nodes()
        self.nodes[node.node_id] = node
        return node.node_id

    def kill_node(self, node_id: str) -> None:
        """The node's raylet and every process on it SIGKILLed, as a machine that dies."""
        self.cluster.remove_node(self.nodes.pop(node_id), allow_graceful=False)


@pytest.fixture(scope="module")
def simulated_cluster(s3_server: Any) -> Iterator[SimulatedCluster]:
    from ray.cluster_utils import Cluster

    bucket = f"multinode-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    with pytest.MonkeyPatch.context() as patch:
        # The nodes' processes (and the workers they start) inherit these: S3 credentials as on a
        # real cluster's machines, and Ray on loopback.
        patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # The GCS declares a node dead after 3 missed health checks 1 s apart (Ray's defaults: 5,
        # 3 s apart, ~15 s): a killed node's workers and actor are replaced that much sooner.
        # Each check still waits up to Ray's 10 s timeout, so a slow raylet is not taken for dead.
        patch.setenv("RAY_health_check_period_ms", "1000")
        patch.setenv("RAY_health_check_failure_threshold", "3")
        for name, value in s3_server.env.items():
            patch.setenv(name, value)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
        try:
            nodes = {}
            for _ in range(4):
                node = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
                nodes[node.node_id] = node
            cluster.wait_for_nodes()
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
            env.update(RAY_ADDRESS=cluster.address, RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1")
            yield SimulatedCluster(cluster, nodes, env, bucket, s3_server)
        finally:
            cluster.shutdown()


class LaunchedRun:
    """`python trainer/launch.py` in the background, its stderr in a file the test can watch."""

    def __init__(self, tmp: Path, name: str, overrides: list[str], env: dict[str, str]) -> None:
        self.stdout_path, self.stderr_path = tmp / f"{name}.stdout", tmp / f"{name}.stderr"
        args = [arg for override in overrides for arg in ("--set", override)]
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen([sys.executable, "trainer/launch.py", *args], cwd=ROOT, stdout=out,
                                            stderr=err, env=env)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for(self, pattern: re.Pattern[str], count: int = 1, timeout: float = 300,
                 where: Any = None) -> list[re.Match[str]]:
        """The first `count` matches of `pattern` in stderr (that satisfy `where`), waiting for them."""
        deadline = time.monotonic() + timeout
        while True:
            matches = [m for m in pattern.finditer(self.stderr) if where is None or where(m)]
            if len(matches) >= count:
                return matches
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{pattern.pattern!r} x{count} not seen (exit {self.process.poll()}):\n"
                                     f"{self.stderr[-6000:]}")
            time.sleep(0.5)

    def latest_step(self) -> int:
        return max((int(m.group(1)) for m in PROGRESS.finditer(self.stderr)), default=0)

    def finish(self, timeout: float = 600) -> dict[str, Any]:
        self.process.wait(timeout)
        assert self.process.returncode == 0, self.stderr[-8000:]
        return json.loads(self.stdout_path.read_text().strip().splitlines()[-1])


@dataclass
class Observed:
    summary: dict[str, Any]
    workers: list[dict[int, str]] = field(default_factory=list)  # per worker-group start: rank -> node id
    evaluators: list[str] = field(default_factory=list)  # node ids, one per actor start
    events: dict[str, Any] = field(default_factory=dict)
    stderr: str = ""


def _placements(run: LaunchedRun, starts: int) -> list[dict[int, str]]:
    matches = run.wait_for(WORKER_NODE, count=2 * starts)
    return [{int(m.group(1)): m.group(2) for m in matches[2 * i:2 * i + 2]} for i in range(starts)]


def _overrides(root: Path, bucket: str, endpoint: str, name: str) -> list[str]:
    return tiny_run_overrides(
        root / "cache", f"s3://{bucket}/runs", name, f"data.s3_endpoint_url={endpoint}", "eval.enabled=true",
        "eval.cpus=0.5", "eval.qualitative_queries=0",  # its pages cost the evaluator ~5 s a checkpoint here
        "distributed.cpus_per_worker=0.75", "checkpoint.keep_last=20", "checkpoint.max_failures=2",
        "logging.interval_steps=5", "data.synthetic_dev_images=20", "eval.dev_images=20")


@pytest.fixture(scope="module")
def runs(simulated_cluster: SimulatedCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Observed]:
    sim = simulated_cluster
    root = tmp_path_factory.mktemp("multinode")
    out: dict[str, Observed] = {}

    steady = LaunchedRun(root, "steady", _overrides(root, sim.bucket, sim.s3.endpoint_url, "steady"), sim.env)
    summary = steady.finish()
    out["steady"] = Observed(summary, _placements(steady, 1), [m.group(1) for m in EVALUATOR_NODE.finditer(steady.stderr)],
                             stderr=steady.stderr)

    faulty = LaunchedRun(root, "faulty", _overrides(root, sim.bucket, sim.s3.endpoint_url, "faulty"), sim.env)
    events: dict[str, Any] = {}
    (first,) = _placements(faulty, 1)
    evaluator = faulty.wait_for(EVALUATOR_NODE)[0].group(1)
    # Mid-epoch 0 (30 steps), once Ray has committed the step-10 checkpoint (its callback hands each
    # committed checkpoint to the evaluator, which logs it), rank 0's node dies. Killed before that
    # commit, the run would restart from step 0: still correct, but not the resume to test.
    faulty.wait_for(COMMITTED_10)
    faulty.wait_for(PROGRESS, where=lambda m: int(m.group(1)) >= 15)
    events["worker_node_killed_after_step"] = faulty.latest_step()
    sim.kill_node(first[0])
    _, second = _placements(faulty, 2)  # the workers again, after Ray Train restarted them
    # Later, in epoch 1: the evaluator's node dies. No node has 0.5 CPU free now (two hold a
    # worker each, 0.25 left), so the actor waits for one while training goes on.
    faulty.wait_for(PROGRESS, where=lambda m: int(m.group(1)) >= 35)
    events["evaluator_node_killed_after_step"] = faulty.latest_step()
    sim.kill_node(evaluator)
    deadline = time.monotonic() + 240
    while faulty.latest_step() < min(events["evaluator_node_killed_after_step"] + 10, LAST_STEP):
        assert time.monotonic() < deadline and faulty.process.poll() is None, faulty.stderr[-6000:]
        time.sleep(0.5)
    events["steps_without_evaluator"] = faulty.latest_step() - events["evaluator_node_killed_after_step"]
    events["added_node"] = sim.add_node()
    summary = faulty.finish()
    out["faulty"] = Observed(summary, [first, second], [m.group(1) for m in EVALUATOR_NODE.finditer(faulty.stderr)],
                             events, faulty.stderr)
    return out


def _log_time(match: re.Match[str]) -> float:
    """The timestamp of the log line holding `match` (logging's `%(asctime)s`), in seconds."""
    line_start = match.string.rfind("\n", 0, match.start()) + 1
    stamp = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})", match.string[line_start:match.start()])
    assert stamp, match.string[line_start:match.end()]
    return time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")) + int(stamp.group(2)) / 1000


def _s3_tree(sim: SimulatedCluster, run: str) -> dict[str, bytes]:
    client, prefix = sim.s3.client(), f"runs/{run}/"
    keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=sim.bucket, Prefix=prefix)
            for obj in page.get("Contents", [])]
    return {key[len(prefix):]: client.get_object(Bucket=sim.bucket, Key=key)["Body"].read()
            for key in keys if key.endswith(".json") or key.endswith(".jsonl")}


def _check_run(sim: SimulatedCluster, name: str, observed: Observed) -> dict[str, bytes]:
    files = _s3_tree(sim, name)
    steps = [json.loads(line)["step"] for line in files["train_log.jsonl"].decode().splitlines()]
    assert steps == list(range(1, LAST_STEP + 1)), steps  # every step once, in order, to the planned last
    checkpoints = sorted({key.split("/")[0] for key in files if re.match(r"checkpoint_\d+/", key)})
    assert checkpoints == [f"checkpoint_{s:09d}" for s in range(10, LAST_STEP + 1, 10)], checkpoints
    for checkpoint in checkpoints:  # each one evaluated
        assert f"{checkpoint}/metrics.json" in files, (checkpoint, sorted(files))
    assert observed.summary["run_dir"] == f"s3://{sim.bucket}/runs/{name}"
    assert json.loads(files["best.json"]) == observed.summary["best"]
    return files


def test_workers_and_evaluator_run_on_three_different_nodes_with_s3_checkpoints(
        runs: dict[str, Observed], simulated_cluster: SimulatedCluster) -> None:
    steady = runs["steady"]
    (placement,) = steady.workers
    assert len(steady.evaluators) == 1
    assert len({placement[0], placement[1], steady.evaluators[0]}) == 3, (placement, steady.evaluators)
    _check_run(simulated_cluster, "steady", steady)
    assert steady.summary["best"]["dev_rsum"] > 0


def test_a_lost_worker_node_is_replaced_by_the_spare_and_the_run_ends_as_uninterrupted(
        runs: dict[str, Observed], simulated_cluster: SimulatedCluster) -> None:
    faulty, steady = runs["faulty"], runs["steady"]
    first, second = faulty.workers
    # Killed while training (mostly at steps 15-20 of epoch 0's 30 here; a slow checkpoint commit
    # can let it run further), never after the last step.
    killed_after = faulty.events["worker_node_killed_after_step"]
    assert 15 <= killed_after < LAST_STEP
    assert first[0] not in second.values() and len(set(second.values())) == 2  # on two other nodes
    assert first[1] in second.values()  # the surviving worker node, and the spare
    # From the last checkpoint (every 10 steps) before the loss: the steps after it were redone.
    resumed = [int(m.group(1)) for m in re.finditer(r"resuming at step (\d+):", faulty.stderr)]
    assert len(resumed) == 1 and resumed[0] % 10 == 0 and 10 <= resumed[0] <= killed_after, resumed
    _check_run(simulated_cluster, "faulty", faulty)
    assert faulty.summary["best"]["dev_rsum"] == steady.summary["best"]["dev_rsum"]
    assert faulty.summary["best"]["checkpoint"].rsplit("/", 1)[-1] == steady.summary["best"]["checkpoint"].rsplit("/", 1)[-1]


def test_a_lost_evaluator_node_loses_no_evaluation_and_training_does_not_wait(
        runs: dict[str, Observed], simulated_cluster: SimulatedCluster) -> None:
    faulty = runs["faulty"]
    assert len(faulty.evaluators) == 2  # started, then recreated by Ray on another node
    assert faulty.evaluators[1] != faulty.evaluators[0]
    # Training went on for at least 10 more steps (or to its end) while no evaluator existed: those
    # steps were logged before the recreated actor's first line.
    killed_after = faulty.events["evaluator_node_killed_after_step"]
    target = min(killed_after + 10, LAST_STEP)
    assert faulty.events["steps_without_evaluator"] >= target - killed_after
    step_logged = min(_log_time(m) for m in PROGRESS.finditer(faulty.stderr) if int(m.group(1)) >= target)
    recreated = _log_time(list(EVALUATOR_NODE.finditer(faulty.stderr))[1])
    assert step_logged < recreated, (step_logged, recreated)
    assert re.search(r"evaluation worker: [1-9]\d* checkpoint\(s\) of .* not yet evaluated",
                     faulty.stderr), faulty.stderr[-4000:]
    _check_run(simulated_cluster, "faulty", faulty)  # every checkpoint has its metrics.json


def test_local_storage_on_a_cluster_spanning_hosts_is_refused_before_training(
        runs: dict[str, Observed], simulated_cluster: SimulatedCluster, tmp_path: Path) -> None:
    sim = simulated_cluster
    sim.add_node("127.0.0.2")  # another host, as far as Ray can tell
    result = subprocess.run(
        [sys.executable, "trainer/launch.py", *[arg for o in tiny_run_overrides(
            tmp_path / "cache", tmp_path / "runs", "local") for arg in ("--set", o)]],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=sim.env, check=False)
    assert result.returncode == 2, result.stderr[-4000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("launch: configuration error: checkpoint.storage_path is a local path"), last
    assert "127.0.0.2" in last and "s3://" in last and "checkpoint.shared_filesystem=true" in last, last
    # No training started and nothing of a run written: the lease, taken before Ray (so that a
    # second trainer is refused at once), was released; only its hidden lock file may remain.
    run_dir = tmp_path / "runs" / "local"
    assert not run_dir.exists() or {p.name for p in run_dir.iterdir()} <= {".lock-lease.json"}, \
        sorted(p.name for p in run_dir.iterdir())
    assert " parameters on " not in result.stderr


DRAIN_DEADLINE_S = 15
DRAINED_EPOCHS = 4  # long enough to still be training at the deadline


def test_a_drained_node_checkpoints_before_its_deadline_and_the_run_continues_on_the_others(
        simulated_cluster: SimulatedCluster, tmp_path: Path) -> None:
    sim = simulated_cluster
    for _ in range(max(0, 3 - len(sim.nodes))):  # two nodes for the workers and one to move to
        sim.add_node()
    env = {**sim.env, "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}  # Ray Train's watcher; reaches its controller
    # Checkpoints on S3; the local data cache is on the one machine all the simulated nodes share
    # (a node on 127.0.0.2 may have joined: it is this machine too).
    overrides = [*_overrides(tmp_path, sim.bucket, sim.s3.endpoint_url, "drained"), "eval.enabled=false",
                 "checkpoint.shared_filesystem=true", f"optim.epochs={DRAINED_EPOCHS}",
                 "checkpoint.max_failures=0"]  # a preemption is not a failure: Ray Train counts it apart
    drained = LaunchedRun(tmp_path, "drained", overrides, env)
    (first,) = _placements(drained, 1)
    drained.wait_for(PROGRESS, where=lambda m: int(m.group(1)) >= 13)
    node = first[1]
    drain = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "drain-node", "--address", sim.cluster.address, "--node-id", node,
         "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot preemption (test)",
         "--deadline-remaining-seconds", str(DRAIN_DEADLINE_S)],
        capture_output=True, text=True, timeout=60, env=sim.env)
    drained_at = time.time()
    assert drain.returncode == 0, drain.stdout + drain.stderr
    (notice,) = drained.wait_for(DRAIN_CHECKPOINT, timeout=60)
    step = int(notice.group(2))
    committed = drained.wait_for(re.compile(rf"checkpoint at step {step} \("), timeout=60)[0]
    assert _log_time(committed) < drained_at + DRAIN_DEADLINE_S  # written before the node goes
    _, second = _placements(drained, 2)  # Ray Train restarted the group at the deadline...
    assert node not in second.values(), (node, second)  # ...away from the drained node
    resumed = int(drained.wait_for(re.compile(r"resuming at step (\d+):"), timeout=120)[0].group(1))
    assert resumed >= step, (resumed, step)  # from the drain's checkpoint (or a later one)
    drained.finish()
    steps = [json.loads(line)["step"] for line in _s3_tree(sim, "drained")["train_log.jsonl"].decode().splitlines()]
    assert steps == list(range(1, DRAINED_EPOCHS * STEPS_PER_EPOCH + 1)), steps  # every step once, in order
