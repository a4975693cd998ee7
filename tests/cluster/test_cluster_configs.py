"""cluster/gpu-cluster.yaml and cluster/runtime_env.yaml, checked with Ray's own code.

* The cluster config is validated the way `ray up` does it (ray.autoscaler._private: the JSON
  schema shipped with Ray, then prepare_config + validate_config, which merge the AWS defaults and
  check node types and docker); a config with an unknown key or a wrong type must fail it.
* The `ray start` commands are parsed by the installed `ray start` CLI itself (click), so a
  misspelt flag or a non-integer port fails here instead of on a GPU node; the metrics export port
  is the one the monitoring setup scrapes (8080, as in the Kubernetes manifests under k8s/).
* The COCO job (configs/coco.yaml) must fit on the worker nodes: every training worker's bundle
  and the evaluation actor, with the head left out (it advertises no CPU).
* The runtime env is built as ray.runtime_env.RuntimeEnv and the repository is zipped with Ray's
  packaging code (what `ray job submit` uploads), without the help of .gitignore: the excludes
  alone must keep the virtualenv and the git history out and every source file in.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray._private.label_utils import validate_node_label_syntax, validate_node_labels
from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv
from ray.scripts.scripts import start as ray_start_cli

from trainer.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster" / "gpu-cluster.yaml"
RUNTIME_ENV_YAML = ROOT / "cluster" / "runtime_env.yaml"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
# The port Ray's metrics agents export on, as scraped by the monitoring setup (the Kubernetes
# RayJob/RayCronJob rayStartParams and their PodMonitors use the same).
METRICS_EXPORT_PORT = 8080
# The working_dir upload must stay small: the job's code is a few MiB.
PACKAGE_BUDGET_BYTES = 10 * 1024 * 1024


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path}: not a mapping"
    return data


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return load_yaml(CLUSTER_YAML)


@pytest.fixture(scope="module")
def runtime_env() -> dict[str, Any]:
    return load_yaml(RUNTIME_ENV_YAML)


def validate_like_ray_up(config: dict[str, Any]) -> dict[str, Any]:
    """The checks `ray up` runs before contacting the cloud: Ray's JSON schema on the file as
    written (additionalProperties: false catches unknown keys), then prepare_config (merges
    ray/autoscaler/aws/defaults.yaml, checks docker) and validate_config (schema again on the
    merged config, head_node_type, min_workers against max_workers). Returns the merged config."""
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def ray_start_invocations(commands: list[str]) -> list[list[str]]:
    """The argument lists of the `ray start` commands in a list of shell command lines."""
    found = []
    for line in commands:
        for part in line.split(";"):
            words = shlex.split(part)
            if words[:2] == ["ray", "start"]:
                found.append(words[2:])
    return found


def parse_ray_start(arguments: list[str]) -> dict[str, Any]:
    """Parse `ray start` arguments with the installed Ray's own CLI definition (nothing runs);
    $RAY_HEAD_IP, filled in by the autoscaler on each node, gets a stand-in address."""
    arguments = [a.replace("$RAY_HEAD_IP", "10.0.0.1") for a in arguments]
    return ray_start_cli.make_context("start", arguments).params


# --------------------------------------------------------------------------------------------------
# gpu-cluster.yaml
# --------------------------------------------------------------------------------------------------


def test_cluster_config_passes_rays_own_validation(cluster: dict[str, Any]) -> None:
    prepared = validate_like_ray_up(cluster)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize(("break_it", "message"), [
    pytest.param(lambda c: c.update(max_wrokers=3), "'max_wrokers' was unexpected", id="unknown-top-level-key"),
    pytest.param(lambda c: c.update(max_workers="three"), "'three' is not of type 'integer'",
                 id="max_workers-not-an-integer"),
    pytest.param(lambda c: c["available_node_types"]["gpu_a100"].update(min_worker=1), "'min_worker' was unexpected",
                 id="unknown-node-type-key"),
    pytest.param(lambda c: c["available_node_types"]["gpu_a100"].pop("resources"), "'resources' is a required",
                 id="node-type-without-resources"),
    pytest.param(lambda c: c["available_node_types"]["gpu_a100"]["resources"].update(GPU=0.5),
                 "0.5 is not of type 'integer'", id="fractional-node-resource"),
    pytest.param(lambda c: c.update(head_start_ray_commands="ray start --head"), "is not of type 'array'",
                 id="commands-not-a-list"),
    pytest.param(lambda c: c.update(head_node_type="no-such-type"), "must be one of `available_node_types`",
                 id="unknown-head-node-type"),
    pytest.param(lambda c: c["available_node_types"]["gpu_a100"].update(min_workers=4),
                 "smaller than the sum of `min_workers`", id="min_workers-above-global-max_workers"),
])
def test_broken_cluster_configs_fail_the_same_validation(cluster: dict[str, Any], break_it: Any,
                                                         message: str) -> None:
    broken = copy.deepcopy(cluster)
    break_it(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        validate_like_ray_up(broken)


def test_start_commands_parse_and_export_metrics_on_the_scraped_port(cluster: dict[str, Any]) -> None:
    (head,) = ray_start_invocations(cluster["head_start_ray_commands"])
    (worker,) = ray_start_invocations(cluster["worker_start_ray_commands"])
    head_params, worker_params = parse_ray_start(head), parse_ray_start(worker)
    assert head_params["head"] and not worker_params["head"]
    for params in (head_params, worker_params):
        assert params["metrics_export_port"] == METRICS_EXPORT_PORT
    assert head_params["dashboard_host"] == "0.0.0.0"  # reachable beyond localhost (job API, tunnel)
    assert head_params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"  # where `ray up` puts it
    # Workers join the head's GCS port.
    assert worker_params["address"] == f"10.0.0.1:{head_params['port']}"
    # A misspelt flag would be rejected by the same parser.
    with pytest.raises(Exception, match="metrics-export-prt"):
        parse_ray_start(["--head", "--metrics-export-prt=8080"])


def test_metrics_port_matches_the_kubernetes_manifests() -> None:
    """Every metrics-export-port in k8s/ (rayStartParams) equals the cluster launcher's."""
    ports = {}
    for path in sorted((ROOT / "k8s").rglob("*.yaml")):
        for match in re.finditer(r"metrics-export-port:\s*\"?(\d+)", path.read_text(encoding="utf-8")):
            ports[f"{path.relative_to(ROOT)}:{match.group(0)}"] = int(match.group(1))
    if not ports:
        pytest.skip("no Kubernetes manifests with a metrics-export-port in this checkout")
    assert set(ports.values()) == {METRICS_EXPORT_PORT}, ports


def test_node_types_head_without_gpus_workers_with_gpus(cluster: dict[str, Any]) -> None:
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    assert not head["node_config"]["InstanceType"].startswith(("p", "g"))  # EC2 GPU families
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    assert workers
    for name, node in workers.items():
        assert node["resources"].get("GPU", 0) >= 1, name
        assert node["node_config"]["InstanceType"].startswith(("p4d.", "p5.", "g5.", "g6.")), name
        assert 0 <= node["min_workers"] <= node["max_workers"], name
    assert sum(t["min_workers"] for t in workers.values()) <= cluster["max_workers"]
    for node in types.values():
        labels = node.get("labels", {})
        validate_node_labels(labels)  # no reserved ray.io/ prefix
        validate_node_label_syntax(labels)


def _bundles_of(config_path: Path) -> list[dict[str, float]]:
    """Resource bundles a run of this config asks for: one per training worker, and the
    evaluation actor (trainer/launch.py, trainer/evaluator/actor.make_evaluation_actor)."""
    config = load_config(config_path)
    worker = {"CPU": config.distributed.cpus_per_worker,
              "GPU": config.distributed.gpus_per_worker if config.distributed.use_gpu else 0.0}
    bundles = [dict(worker) for _ in range(config.distributed.workers)]
    if config.eval.enabled:
        bundles.append({"CPU": float(config.eval.cpus), "GPU": float(config.eval.gpus)})
    return bundles


def _fits(bundles: list[dict[str, float]], cluster: dict[str, Any]) -> bool:
    """First-fit decreasing of the bundles into the largest cluster the config allows (every node
    type at its max_workers, within the global max_workers, the head included as it is)."""
    types = cluster["available_node_types"]
    nodes = [dict(types[cluster["head_node_type"]]["resources"])]
    budget = cluster["max_workers"]
    for name, node in sorted(types.items(), key=lambda item: -item[1]["resources"].get("GPU", 0)):
        if name == cluster["head_node_type"]:
            continue
        count = min(node.get("max_workers", budget), budget)
        nodes += [dict(node["resources"]) for _ in range(count)]
        budget -= count
    for bundle in sorted(bundles, key=lambda b: (-b.get("GPU", 0), -b.get("CPU", 0))):
        for free in nodes:
            if all(free.get(key, 0) + 1e-9 >= need for key, need in bundle.items() if need):
                for key, need in bundle.items():
                    free[key] = free.get(key, 0) - need
                break
        else:
            return False
    return True


def test_the_coco_run_fits_on_the_cluster(cluster: dict[str, Any]) -> None:
    bundles = _bundles_of(ROOT / "configs" / "coco.yaml")
    assert sum(b["GPU"] for b in bundles) >= 9  # 8 training workers + the evaluator: a real GPU job
    assert _fits(bundles, cluster)
    # The check can fail: without the evaluation node and with one training node, the evaluator's
    # GPU is missing (the head has none).
    smaller = copy.deepcopy(cluster)
    smaller["available_node_types"]["gpu_eval"]["max_workers"] = 0
    smaller["available_node_types"]["gpu_a100"]["max_workers"] = 1
    assert not _fits(bundles, smaller)


def test_docker_image_runs_the_installed_ray(cluster: dict[str, Any]) -> None:
    """The cluster's Ray must be the Ray that submits the jobs and runs `ray up`."""
    image = cluster["docker"]["image"]
    repository, tag = image.rsplit(":", 1)
    assert repository == "rayproject/ray"
    assert tag.split("-")[0] == ray.__version__, f"{image}: bump the tag to Ray {ray.__version__}"
    assert f"-py{sys.version_info.major}{sys.version_info.minor}-" in f"-{tag}-"


def test_nodes_install_this_project_from_the_synced_checkout(cluster: dict[str, Any]) -> None:
    mounts = cluster["file_mounts"]
    (remote,) = [remote for remote, local in mounts.items() if local == "."]  # the repository root
    assert any(re.search(rf"pip install .*-e {re.escape(remote)}\b", cmd) for cmd in cluster["setup_commands"]), \
        cluster["setup_commands"]
    assert {".venv", ".git"} <= set(cluster["rsync_exclude"])


# --------------------------------------------------------------------------------------------------
# runtime_env.yaml
# --------------------------------------------------------------------------------------------------


def test_runtime_env_is_a_valid_ray_runtime_env(runtime_env: dict[str, Any]) -> None:
    env = RuntimeEnv(**runtime_env)
    assert env.working_dir() == "."
    variables = env.env_vars()
    assert all(isinstance(v, str) for v in variables.values()), variables
    # Dependencies come from the nodes (gpu-cluster.yaml setup_commands), never per job.
    assert not {"pip", "uv", "conda"} & set(runtime_env)
    # `ray job stop`: SIGTERM, then SIGKILL after this wait, which must exceed the driver's own
    # bound on stopping with a checkpoint (checkpoint.stop_grace_s).
    from trainer.config import CheckpointConfig

    assert float(variables["RAY_JOB_STOP_WAIT_TIME_S"]) > CheckpointConfig().stop_grace_s


def test_runtime_env_matches_the_cluster(runtime_env: dict[str, Any], cluster: dict[str, Any]) -> None:
    variables = runtime_env["env_vars"]
    region = cluster["provider"]["region"]
    assert variables["AWS_DEFAULT_REGION"] == region
    assert region in variables["AWS_ENDPOINT_URL_S3"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(variables)  # no secrets
    assert variables["NCCL_SOCKET_IFNAME"].startswith("^") and "lo" in variables["NCCL_SOCKET_IFNAME"][1:].split(",")


def _package(directory: Path, excludes: list[str], target: Path) -> set[str]:
    """Zip ``directory`` as Ray does for a working_dir upload, ignoring .gitignore; the names."""
    create_package(str(directory), target, include_gitignore=False, excludes=excludes)
    with zipfile.ZipFile(target) as archive:
        return {name for name in archive.namelist() if not name.endswith("/")}


def test_excludes_drop_environments_history_and_data_but_keep_the_code(
        runtime_env: dict[str, Any], tmp_path: Path) -> None:
    tree = tmp_path / "repo"
    keep = ["trainer/launch.py", "data_shards/reader.py", "model/vsrn.py", "configs/coco.yaml", "setup.py",
            "docs/run_layout.md", "tests/data_shards/test_reader.py"]
    drop = [".venv/lib/python3.11/site-packages/torch/__init__.py", ".git/objects/ab/cdef", ".git/HEAD",
            "trainer/__pycache__/launch.cpython-311.pyc", "vsrn_dist.egg-info/PKG-INFO", "runs/r1/best.json",
            "shards/train/shard-000000.tar", "cache/synthetic/vocab.json", "docs/report/losses.png",
            ".pytest_cache/v/cache/lastfailed"]
    for name in keep + drop:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("x")
    assert _package(tree, runtime_env["excludes"], tmp_path / "pkg.zip") == set(keep)


def test_the_repository_package_is_small_and_complete(runtime_env: dict[str, Any], tmp_path: Path) -> None:
    names = _package(ROOT, runtime_env["excludes"], tmp_path / "pkg.zip")
    size = os.path.getsize(tmp_path / "pkg.zip")
    assert size < min(PACKAGE_BUDGET_BYTES, GCS_STORAGE_MAX_SIZE // 2), f"working_dir package of {size} bytes"
    assert not [n for n in names if n.split("/")[0] in {".venv", ".git", "runs"}]
    tracked = subprocess.run(["git", "ls-files", "model", "trainer", "data_shards", "monitoring", "configs",
                              "cluster", "setup.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    code = [name for name in tracked.stdout.split() if (ROOT / name).exists()]  # tracked and not deleted here
    assert code and not [name for name in code if name not in names]
