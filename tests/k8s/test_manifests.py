"""The Kubernetes manifests under k8s/: every Kustomize entry point renders, every rendered object
is valid for its kind, the pods follow the security and resource policy, and the commands they run
parse with the project's own CLIs.

Validators, and what each one is:

* Built-in kinds (v1, batch/v1, ...): kubernetes-validate in strict mode (unknown fields are
  errors) for Kubernetes K8S_VERSION, one of the versions the package ships.
* KubeRay kinds (RayJob, RayCronJob, RayCluster): the ``openAPIV3Schema`` of the matching CRD
  version in ../shared/reference/kuberay-crds (KubeRay's own CRDs), checked with jsonschema after
  making it strict: an API server prunes or rejects fields a structural schema does not declare
  unless ``x-kubernetes-preserve-unknown-fields: true``, so every object schema with
  ``properties`` and without that flag gets ``additionalProperties: false``. Tests that need the
  folder skip with a message when it is absent. Object metadata (not described by the CRDs) is
  checked as the ObjectMeta of a built-in kind.
* monitoring.coreos.com kinds: no schema ships here and the upstream CRDs are not copied into the
  repository. The PrometheusRule's ``spec.groups`` go through the real ``promtool check rules``;
  PodMonitors are checked against PODMONITOR_ALLOW_LIST below, a small hand-written allow-list
  of the fields these manifests use and their types. It is NOT the upstream Prometheus Operator
  schema: it only guarantees that nothing outside that list (e.g. a misspelt field) slips in.

The negative tests show that each validator rejects an unknown field and a wrong type, that
promtool rejects a bad rule, and that the policy and command checks can fail.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRD_DIR = ROOT.parent / "shared" / "reference" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}
K8S_VERSION = "1.32.0"  # kubectl here is 1.32; kubernetes-validate ships 1.25 .. 1.37
KUBECTL = shutil.which("kubectl")
PROMTOOL = shutil.which("promtool")
PLACEHOLDER_IMAGE = "vsrn-dist"  # the base's image name, replaced by every overlay's `images:`
S3_SECRET = "vsrn-s3"
RAY_AUTH_SECRET = "vsrn-ray-auth"


def _load_generator() -> Any:
    """k8s/render_monitoring.py, imported from its file (k8s/ is not a package: it is a script)."""
    spec = importlib.util.spec_from_file_location("render_monitoring", K8S / "render_monitoring.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_monitoring = _load_generator()


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _entry_points() -> list[Path]:
    """Directories with a kustomization.yaml that can be built on their own: bases and overlays,
    not components (`kind: Component` only works inside another kustomization)."""
    points = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text()).get("kind") != "Component":
            points.append(path.parent)
    return points


ENTRY_POINTS = _entry_points()
OVERLAYS = [p for p in ENTRY_POINTS if p.parent.name == "overlays"]
IDS = [str(p.relative_to(K8S)) for p in ENTRY_POINTS]
OVERLAY_IDS = [str(p.relative_to(K8S)) for p in OVERLAYS]


@functools.cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    if KUBECTL is None:
        pytest.skip("kubectl not found: `kubectl kustomize` renders the manifests")
    result = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc is not None)


def rendered(directory: Path) -> list[dict[str, Any]]:
    """A fresh copy (tests may modify what they get)."""
    return copy.deepcopy(list(render(directory)))


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def test_the_expected_entry_points_exist() -> None:
    names = set(IDS)
    assert {"base", "overlays/dev", "overlays/production", "overlays/production-raycronjob"} <= names, names


@pytest.mark.parametrize("directory", ENTRY_POINTS, ids=IDS)
def test_entry_point_renders_uniquely_named_objects(directory: Path) -> None:
    objects = rendered(directory)
    assert objects, f"{directory}: renders nothing"
    keys = [(o["apiVersion"].split("/")[0], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
            for o in objects]
    assert len(keys) == len(set(keys)), f"duplicate objects: {keys}"


# --------------------------------------------------------------------------------------------------
# Validation: built-in kinds, KubeRay kinds, Prometheus Operator kinds
# --------------------------------------------------------------------------------------------------

KUBERAY_GROUP = "ray.io"
MONITORING_GROUP = "monitoring.coreos.com"


def _group(obj: dict[str, Any]) -> str:
    api = obj["apiVersion"]
    return api.split("/")[0] if "/" in api else ""


def is_builtin(obj: dict[str, Any]) -> bool:
    group = _group(obj)
    return group == "" or "." not in group or group.endswith(".k8s.io")


def validate_builtin(obj: dict[str, Any]) -> None:
    """Raises kubernetes_validate.ValidationError (strict: unknown fields are errors)."""
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def validate_object_meta(metadata: dict[str, Any]) -> None:
    """ObjectMeta of a CRD object or of a pod template inside one, checked as a built-in kind's."""
    validate_builtin({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata})


def _strict(schema: Any) -> Any:
    """A copy of a CRD structural schema in which undeclared fields are errors, except under
    x-kubernetes-preserve-unknown-fields (what the API server keeps as is)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "patternProperties"):
        if isinstance(out.get(key), dict):
            out[key] = {name: _strict(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = [_strict(sub) for sub in out[key]]
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _require_crds() -> None:
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (the shared reference files beside the repo); "
                    "KubeRay objects are not validated")


@functools.cache
def _crd_versions(kind: str) -> dict[str, dict[str, Any]]:
    """CRD version name -> its openAPIV3Schema, as shipped."""
    _require_crds()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD files are megabytes
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=loader)
    return {v["name"]: v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v.get("served", True)}


@functools.cache
def crd_schema(kind: str, version: str, strict: bool = True) -> dict[str, Any]:
    versions = _crd_versions(kind)
    assert version in versions, f"{kind}: no served CRD version {version} (have {sorted(versions)})"
    return _strict(versions[version]) if strict else versions[version]


def validate_kuberay(obj: dict[str, Any], strict: bool = True) -> None:
    """Raises jsonschema.ValidationError."""
    version = obj["apiVersion"].split("/")[1]
    schema = crd_schema(obj["kind"], version, strict)
    # OpenAPI v3.0 schemas are draft-4 style (boolean exclusiveMinimum, no `const`).
    jsonschema.Draft4Validator(schema).validate(obj)


# Not the upstream schema (see the module docstring): the PodMonitor fields these manifests use.
_LABEL_NAME = {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep", "hashmod",
                            "lowercase", "uppercase", "keepequal", "dropequal"]},
        "sourceLabels": {"type": "array", "items": _LABEL_NAME},
        "separator": {"type": "string"},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "targetLabel": {"type": "string"},
        "modulus": {"type": "integer", "minimum": 1},
    },
}
PODMONITOR_ALLOW_LIST = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"enum": ["monitoring.coreos.com/v1"]},
        "kind": {"enum": ["PodMonitor"]},
        "metadata": {"type": "object"},  # checked as ObjectMeta
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"},
                                   "matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "selector": {
                    "type": "object", "additionalProperties": False, "required": ["matchLabels"],
                    "properties": {"matchLabels": {"type": "object", "minProperties": 1,
                                                   "additionalProperties": {"type": "string"}}},
                },
                "podMetricsEndpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "additionalProperties": False, "required": ["port"],
                        "properties": {
                            "port": {"type": "string", "minLength": 1},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)(ms|s|m|h))+)$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^(0|(([0-9]+)(ms|s|m|h))+)$"},
                            "relabelings": {"type": "array", "items": _RELABEL},
                            "metricRelabelings": {"type": "array", "items": _RELABEL},
                        },
                    },
                },
            },
        },
    },
}


def validate_podmonitor(obj: dict[str, Any]) -> None:
    jsonschema.Draft7Validator(PODMONITOR_ALLOW_LIST).validate(obj)
    validate_object_meta(obj["metadata"])


def promtool_check_rules(groups: list[dict[str, Any]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    if PROMTOOL is None:
        pytest.skip("promtool not found (`make test` installs Debian's prometheus package)")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)


def _pod_templates(node: Any) -> Iterator[dict[str, Any]]:
    """Every pod template (a mapping whose `spec` has `containers`) inside an object."""
    if isinstance(node, dict):
        if isinstance(node.get("spec"), dict) and isinstance(node["spec"].get("containers"), list):
            yield node
        for value in node.values():
            yield from _pod_templates(value)
    elif isinstance(node, list):
        for item in node:
            yield from _pod_templates(item)


def _where(directory: Path, obj: dict[str, Any]) -> str:
    return f"{directory.relative_to(K8S)}: {obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("directory", ENTRY_POINTS, ids=IDS)
def test_every_object_has_a_validator(directory: Path) -> None:
    for obj in rendered(directory):
        assert is_builtin(obj) or _group(obj) == KUBERAY_GROUP or (
            _group(obj) == MONITORING_GROUP and obj["kind"] in ("PodMonitor", "PrometheusRule")), \
            f"{_where(directory, obj)}: no validator for {obj['apiVersion']} {obj['kind']}"


@pytest.mark.parametrize("directory", ENTRY_POINTS, ids=IDS)
def test_builtin_objects_are_valid(directory: Path) -> None:
    for obj in filter(is_builtin, rendered(directory)):
        try:
            validate_builtin(obj)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{_where(directory, obj)}: {error.message} at {list(error.absolute_path)}")


@pytest.mark.parametrize("directory", ENTRY_POINTS, ids=IDS)
def test_kuberay_objects_match_the_crds(directory: Path) -> None:
    for obj in rendered(directory):
        if _group(obj) != KUBERAY_GROUP:
            continue
        try:
            validate_kuberay(obj)
            validate_object_meta(obj["metadata"])
            for template in _pod_templates(obj):
                if "metadata" in template:
                    validate_object_meta(template["metadata"])
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as error:
            pytest.fail(f"{_where(directory, obj)}: {error.message} at {list(error.absolute_path)}")


@pytest.mark.parametrize("directory", ENTRY_POINTS, ids=IDS)
def test_monitoring_objects_are_valid(directory: Path, tmp_path: Path) -> None:
    for obj in rendered(directory):
        if _group(obj) != MONITORING_GROUP:
            continue
        where = _where(directory, obj)
        if obj["kind"] == "PodMonitor":
            try:
                validate_podmonitor(obj)
            except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as error:
                pytest.fail(f"{where}: {error.message} at {list(error.absolute_path)}")
        elif obj["kind"] == "PrometheusRule":
            validate_object_meta(obj["metadata"])
            assert set(obj) == {"apiVersion", "kind", "metadata", "spec"} and set(obj["spec"]) == {"groups"}, where
            result = promtool_check_rules(obj["spec"]["groups"], tmp_path)
            assert result.returncode == 0, f"{where}: promtool check rules:\n{result.stdout}{result.stderr}"
            assert "SUCCESS" in result.stdout, result.stdout


# --------------------------------------------------------------------------------------------------
# Negative tests: each validator rejects an unknown field and a wrong type
# --------------------------------------------------------------------------------------------------


def _one(directory: str, kind: str) -> dict[str, Any]:
    (obj,) = of_kind(rendered(K8S / directory), kind)
    return obj


def test_kubernetes_validate_rejects_an_unknown_field_and_a_wrong_type() -> None:
    cronjob = _one("overlays/production", "CronJob")
    validate_builtin(cronjob)  # the unmodified object passes: the failures below are the edits'

    unknown = copy.deepcopy(cronjob)
    unknown["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        validate_builtin(unknown)

    wrong_type = copy.deepcopy(cronjob)
    wrong_type["spec"]["jobTemplate"]["spec"]["backoffLimit"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError, match="two"):
        validate_builtin(wrong_type)


def test_crd_schema_rejects_an_unknown_field_and_a_wrong_type() -> None:
    rayjob = _one("overlays/production", "RayJob")
    validate_kuberay(rayjob)

    # A misspelt field deep in the embedded pod template: the CRD as shipped accepts it (JSON
    # Schema allows undeclared properties), the strict form rejects it as the API server would.
    unknown = copy.deepcopy(rayjob)
    worker = unknown["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    worker["template"]["spec"]["containers"][0]["resourcez"] = {"limits": {"cpu": "1"}}
    validate_kuberay(unknown, strict=False)
    with pytest.raises(jsonschema.ValidationError, match="resourcez"):
        validate_kuberay(unknown)

    top_level = copy.deepcopy(rayjob)
    top_level["spec"]["shutdownAfterJobFinish"] = True  # the real field ends in -es
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        validate_kuberay(top_level)

    wrong_type = copy.deepcopy(rayjob)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "2"
    with pytest.raises(jsonschema.ValidationError, match="'2' is not of type 'integer'"):
        validate_kuberay(wrong_type)


def test_strict_schema_keeps_preserve_unknown_fields_open() -> None:
    schema = _strict({"type": "object", "properties": {
        "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
        "open": {"type": "object", "properties": {"a": {"type": "string"}},
                 "x-kubernetes-preserve-unknown-fields": True}}})
    validator = jsonschema.Draft4Validator(schema)
    assert validator.is_valid({"open": {"a": "x", "anything": 1}})
    assert not validator.is_valid({"closed": {"a": "x", "anything": 1}})
    assert not validator.is_valid({"other": 1})


def test_podmonitor_allow_list_rejects_an_unknown_field_and_a_wrong_type() -> None:
    monitor = of_kind(rendered(K8S / "overlays/production"), "PodMonitor")[0]
    validate_podmonitor(monitor)

    unknown = copy.deepcopy(monitor)
    unknown["spec"]["podMetricsEndpoints"][0]["metricRelabellings"] = []  # British spelling: not a field
    with pytest.raises(jsonschema.ValidationError, match="metricRelabellings"):
        validate_podmonitor(unknown)

    wrong_type = copy.deepcopy(monitor)
    wrong_type["spec"]["podMetricsEndpoints"][0]["port"] = 8080  # the port *name* is a string
    with pytest.raises(jsonschema.ValidationError, match="8080"):
        validate_podmonitor(wrong_type)


def test_promtool_rejects_a_bad_rule(tmp_path: Path) -> None:
    good = [{"name": "g", "rules": [{"record": "job:up:sum", "expr": "sum by (job) (up)"}]}]
    assert promtool_check_rules(good, tmp_path).returncode == 0
    bad_expr = [{"name": "g", "rules": [{"alert": "Broken", "expr": "rate(up[5m]"}]}]  # unbalanced
    result = promtool_check_rules(bad_expr, tmp_path)
    assert result.returncode != 0, result.stdout
    bad_name = [{"name": "g", "rules": [{"record": "not a metric name", "expr": "up"}]}]
    assert promtool_check_rules(bad_name, tmp_path).returncode != 0


# --------------------------------------------------------------------------------------------------
# Monitoring: generated files, PodMonitors
# --------------------------------------------------------------------------------------------------


def test_generated_monitoring_files_are_up_to_date() -> None:
    result = subprocess.run([sys.executable, str(K8S / "render_monitoring.py"), "--check"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_prometheus_rule_carries_the_source_groups() -> None:
    (rule,) = of_kind(rendered(K8S / "base"), "PrometheusRule")
    assert rule["spec"]["groups"] == render_monitoring.load_rule_groups(ROOT)
    groups = {g["name"] for g in rule["spec"]["groups"]}
    for name in render_monitoring.RULE_FILES:
        source = yaml.safe_load((ROOT / render_monitoring.RULES_DIR / name).read_text())
        assert {g["name"] for g in source["groups"]} <= groups, name


def test_dashboards_configmap_for_the_grafana_sidecar() -> None:
    (configmap,) = [o for o in rendered(K8S / "base") if o["kind"] == "ConfigMap"
                    and o["metadata"]["name"] == render_monitoring.DASHBOARDS_CONFIGMAP]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    sources = sorted((ROOT / render_monitoring.DASHBOARDS_DIR).glob("*.json"))
    assert sorted(configmap["data"]) == [p.name for p in sources]
    for path in sources:
        assert json.loads(configmap["data"][path.name]) == json.loads(path.read_text())


def _write_sources(root: Path) -> None:
    """Small rule files and a dashboard in the repository layout (the generator's own behaviour,
    independent of what the real sources contain)."""
    rules = root / render_monitoring.RULES_DIR
    rules.mkdir(parents=True)
    (rules / "recording.yml").write_text(
        "groups:\n  - name: rec\n    rules:\n      - record: run:vsrn_train_steps:rate2m\n"
        "        expr: |\n          max by (run) (\n            rate(vsrn_train_steps_total[2m]))\n")
    (rules / "alerts.yml").write_text(
        "groups:\n  - name: alerts\n    rules:\n      - alert: Stalled\n        expr: up == 0\n"
        "        labels:\n          severity: warning\n")
    dashboards = root / render_monitoring.DASHBOARDS_DIR
    dashboards.mkdir(parents=True)
    (dashboards / "vsrn.json").write_text(json.dumps({"title": "VSRN", "panels": []}, indent=2))


def test_render_monitoring_output_and_check(tmp_path: Path) -> None:
    root, output = tmp_path / "repo", tmp_path / "out"
    _write_sources(root)
    script = [sys.executable, str(K8S / "render_monitoring.py"), "--root", str(root), "--output", str(output)]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*script, *extra], capture_output=True, text=True, timeout=60, check=False)

    assert run("--check").returncode == 1  # nothing rendered yet
    assert run().returncode == 0, run().stderr
    assert run("--check").returncode == 0
    rule = yaml.safe_load((output / "prometheusrule.yaml").read_text())
    assert [g["name"] for g in rule["spec"]["groups"]] == ["rec", "alerts"]  # RULE_FILES order
    assert rule["spec"]["groups"][0]["rules"][0]["expr"] == \
        "max by (run) (\n  rate(vsrn_train_steps_total[2m]))\n"
    assert (output / "dashboards" / "vsrn.json").read_bytes() == \
        (root / render_monitoring.DASHBOARDS_DIR / "vsrn.json").read_bytes()
    # The generated kustomization builds (with the hand-written PodMonitors beside it).
    shutil.copy(K8S / "base" / "monitoring" / "podmonitors.yaml", output)
    kinds = sorted(o["kind"] for o in render(output))
    assert kinds == ["ConfigMap", "PodMonitor", "PodMonitor", "PrometheusRule"], kinds

    alerts = root / render_monitoring.RULES_DIR / "alerts.yml"
    alerts.write_text(alerts.read_text().replace("severity: warning", "severity: page"))
    stale = run("--check")
    assert stale.returncode == 1 and "prometheusrule.yaml" in stale.stderr, stale.stderr
    assert run().returncode == 0

    (output / "dashboards" / "removed-long-ago.json").write_text("{}")
    stray = run("--check")
    assert stray.returncode == 1 and "removed-long-ago.json" in stray.stderr, stray.stderr
    assert run().returncode == 0
    assert not (output / "dashboards" / "removed-long-ago.json").exists()


@pytest.mark.parametrize("breakage, message", [
    (lambda root: (root / render_monitoring.RULES_DIR / "alerts.yml").unlink(), "cannot read"),
    (lambda root: (root / render_monitoring.RULES_DIR / "alerts.yml").write_text("groups: []\nextra: 1\n"),
     "only `groups`"),
    (lambda root: (root / render_monitoring.RULES_DIR / "alerts.yml").write_text(
        "groups:\n  - name: rec\n    rules: []\n"), "also defined"),
    (lambda root: (root / render_monitoring.DASHBOARDS_DIR / "vsrn.json").write_text("{"), "invalid JSON"),
])
def test_render_monitoring_refuses_unusable_sources(tmp_path: Path, breakage: Any, message: str) -> None:
    _write_sources(tmp_path)
    breakage(tmp_path)
    result = subprocess.run([sys.executable, str(K8S / "render_monitoring.py"), "--root", str(tmp_path),
                             "--output", str(tmp_path / "out"), "--check"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def _ray_pod_labels(objects: list[dict[str, Any]]) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(labels the pod will carry, Ray container) for every Ray pod template: the template's
    labels plus the ray.io/node-type label KubeRay adds."""
    pods = []
    for cluster in _ray_cluster_specs(objects):
        head = cluster["headGroupSpec"]["template"]
        pods.append(({**head["metadata"].get("labels", {}), "ray.io/node-type": "head"},
                     head["spec"]["containers"][0]))
        for group in cluster.get("workerGroupSpecs", []):
            template = group["template"]
            pods.append(({**template["metadata"].get("labels", {}), "ray.io/node-type": "worker"},
                         template["spec"]["containers"][0]))
    return pods


@pytest.mark.parametrize("directory", OVERLAYS, ids=OVERLAY_IDS)
def test_podmonitors_select_ray_pods_that_expose_the_port(directory: Path) -> None:
    objects = rendered(directory)
    monitors = of_kind(objects, "PodMonitor")
    node_types = set()
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        matched = [container for labels, container in _ray_pod_labels(objects)
                   if all(labels.get(k) == v for k, v in selector.items())]
        assert matched, f"PodMonitor {monitor['metadata']['name']} selects no Ray pod of this render"
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for container in matched:
                ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
                assert ports.get(endpoint["port"]) == 8080, (monitor["metadata"]["name"], ports)
        node_types.add(selector.get("ray.io/node-type"))
    assert node_types == {"head", "worker"}


def _relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str]:
    """Prometheus's `replace` relabelling: the source values joined by `;`, the regex anchored at
    both ends, $1.. expanded in the replacement; no match leaves the labels as they are."""
    labels = dict(labels)
    for rule in rules:
        assert rule.get("action", "replace") == "replace"
        value = rule.get("separator", ";").join(labels.get(name, "") for name in rule["sourceLabels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if match:
            template = re.sub(r"\$(\d+)", r"\\g<\1>", rule.get("replacement", "$1"))
            labels[rule["targetLabel"]] = match.expand(template)
    return labels


def test_podmonitors_strip_rays_prefix_from_the_vsrn_metrics_only() -> None:
    from monitoring.metrics import exported_series_names

    for monitor in of_kind(rendered(K8S / "base"), "PodMonitor"):
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        rules = endpoint["metricRelabelings"]
        for name in exported_series_names():
            assert _relabel(rules, {"__name__": f"ray_{name}"})["__name__"] == name
            assert _relabel(rules, {"__name__": name})["__name__"] == name  # the evaluation job's
        for ray_metric in ("ray_node_cpu_utilization", "ray_tasks", "ray_vsrn"):
            assert _relabel(rules, {"__name__": ray_metric})["__name__"] == ray_metric


def test_podmonitor_relabelling_equals_the_shipped_prometheus_config() -> None:
    """The same rule as monitoring/prometheus/prometheus.yml's (snake_case there, camelCase here)."""
    config = yaml.safe_load((ROOT / "monitoring/prometheus/prometheus.yml").read_text())
    shipped = [{"sourceLabels": r["source_labels"], "regex": r["regex"], "replacement": r.get("replacement", "$1"),
                "targetLabel": r["target_label"], "action": r.get("action", "replace")}
               for job in config["scrape_configs"] for r in job.get("metric_relabel_configs", [])
               if r.get("target_label") == "__name__"]
    assert shipped
    for monitor in of_kind(rendered(K8S / "base"), "PodMonitor"):
        rules = [{"action": "replace", "replacement": "$1", **r}
                 for r in monitor["spec"]["podMetricsEndpoints"][0]["metricRelabelings"]]
        assert rules == shipped, monitor["metadata"]["name"]


# --------------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------------


def _ray_cluster_specs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    specs = []
    for obj in objects:
        if obj["kind"] == "RayCluster":
            specs.append(obj["spec"])
        for job in _ray_job_specs(obj):
            if "rayClusterSpec" in job:
                specs.append(job["rayClusterSpec"])
    return specs


def _ray_job_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "RayJob":
        return [obj["spec"]]
    if obj["kind"] == "RayCronJob":
        return [obj["spec"]["jobTemplate"]]
    return []


def pod_policy_violations(pod: dict[str, Any]) -> list[str]:
    """What breaks the project's pod policy (the "restricted" Pod Security Standard plus resources)."""
    problems = []
    pod_security = pod.get("securityContext", {})
    secret_volumes = {v["name"] for v in pod.get("volumes", []) if "secret" in v
                      or any("secret" in s for s in v.get("projected", {}).get("sources", []))}
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken is not false")
    for container in pod.get("initContainers", []) + pod["containers"]:
        name = container["name"]
        security = container.get("securityContext", {})
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(resources.get(kind, {}))
            if missing:
                problems.append(f"{name}: no {kind} for {sorted(missing)}")
        if security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        user = security.get("runAsUser", pod_security.get("runAsUser"))
        if not isinstance(user, int) or user == 0:
            problems.append(f"{name}: runAsUser is not a non-zero UID")
        if security.get("privileged", False) is not False:
            problems.append(f"{name}: privileged")
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if "ALL" not in security.get("capabilities", {}).get("drop", []) or security["capabilities"].get("add"):
            problems.append(f"{name}: capabilities are not exactly `drop: [ALL]`")
        seccomp = security.get("seccompProfile", pod_security.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: no RuntimeDefault seccomp profile")
        for mount in container.get("volumeMounts", []):
            if mount["name"] in secret_volumes and mount.get("readOnly") is not True:
                problems.append(f"{name}: secret volume {mount['name']} is mounted writable")
    return problems


@pytest.mark.parametrize("directory", ENTRY_POINTS, ids=IDS)
def test_every_pod_follows_the_policy(directory: Path) -> None:
    templates = [t for obj in rendered(directory) for t in _pod_templates(obj)]
    if directory.name != "monitoring":
        assert templates, "no pod templates found"
    for template in templates:
        assert pod_policy_violations(template["spec"]) == [], template.get("metadata")


def test_policy_check_flags_a_bad_pod() -> None:
    pod = {"volumes": [{"name": "creds", "secret": {"secretName": "s"}}],
           "containers": [{"name": "c", "image": "x", "resources": {"limits": {"cpu": "1"}},
                           "securityContext": {"privileged": True},
                           "volumeMounts": [{"name": "creds", "mountPath": "/creds"}]}]}
    problems = " | ".join(pod_policy_violations(pod))
    for expected in ("automountServiceAccountToken", "no requests", "no limits for ['memory']", "runAsNonRoot",
                     "runAsUser", "privileged", "allowPrivilegeEscalation", "capabilities", "seccomp",
                     "mounted writable"):
        assert expected in problems, (expected, problems)


@pytest.mark.parametrize("directory", OVERLAYS, ids=OVERLAY_IDS)
def test_overlay_sets_image_and_namespace(directory: Path) -> None:
    objects = rendered(directory)
    images = {c["image"] for obj in objects for t in _pod_templates(obj)
              for c in t["spec"]["containers"] + t["spec"].get("initContainers", [])}
    assert len(images) == 1 and PLACEHOLDER_IMAGE not in images, images
    (namespace,) = of_kind(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {namespace["metadata"]["name"]}


@pytest.mark.parametrize("directory", ENTRY_POINTS, ids=IDS)
def test_cronjobs_forbid_concurrent_runs(directory: Path) -> None:
    for cronjob in of_kind(rendered(directory), "CronJob"):
        assert cronjob["spec"]["concurrencyPolicy"] == "Forbid", cronjob["metadata"]["name"]


def _has_s3_credentials(container: dict[str, Any]) -> bool:
    refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}) for e in container.get("env", [])}
    required = all(refs.get(n, {}).get("name") == S3_SECRET and not refs[n].get("optional")
                   for n in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
    endpoint = refs.get("AWS_ENDPOINT_URL", {})
    return required and endpoint.get("name") == S3_SECRET and endpoint.get("optional") is True


@pytest.mark.parametrize("directory", ENTRY_POINTS, ids=IDS)
def test_ray_clusters(directory: Path) -> None:
    """Token auth, a GPU-free head, GPUs requested (and the GPU taint tolerated) by GPU groups,
    /dev/shm in memory on every Ray pod, metrics on 8080, S3 credentials wherever project code runs."""
    objects = rendered(directory)
    for obj in objects:
        for job in _ray_job_specs(obj):
            cluster = job["rayClusterSpec"]
            assert job.get("submitterPodTemplate"), "submitter pod without security context / resources"
            assert cluster["authOptions"] == {"mode": "token", "secretName": RAY_AUTH_SECRET}
            # KubeRay refuses token authentication below Ray 2.52.
            assert tuple(int(p) for p in cluster["rayVersion"].split(".")[:2]) >= (2, 52), cluster["rayVersion"]
            head = cluster["headGroupSpec"]
            assert head["rayStartParams"]["num-gpus"] == "0"
            assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
            # The driver runs on the head unless the entrypoint asks for resources of a worker.
            driver_on_head = not (job.get("entrypointNumGpus") or job.get("entrypointNumCpus"))
            groups = cluster["workerGroupSpecs"]
            for params, template, is_head in [(head["rayStartParams"], head["template"], True)] + [
                    (g["rayStartParams"], g["template"], False) for g in groups]:
                pod = template["spec"]
                ray = pod["containers"][0]
                assert params["metrics-export-port"] == "8080"
                assert {"name": "metrics", "containerPort": 8080} in ray["ports"]
                shm = [v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
                assert any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in ray["volumeMounts"]), ray["name"]
                if not is_head or driver_on_head:
                    assert _has_s3_credentials(ray), ray["name"]
            for group in groups:
                name = group["groupName"]
                assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
                resources = group["template"]["spec"]["containers"][0]["resources"]
                gpus = resources["limits"].get("nvidia.com/gpu")
                # gpu-* groups have GPUs, cpu-* groups none; the `eval` group has what the
                # evaluator asks for (test_the_cluster_holds_the_job_and_no_gpu_idles).
                assert gpus is not None or not name.startswith("gpu"), name
                assert gpus is None or not name.startswith("cpu"), name
                if gpus is not None:
                    assert int(gpus) >= 1, name
                    assert resources["requests"]["nvidia.com/gpu"] == gpus, name
                    # GPU nodes are commonly tainted so that only pods asking for GPUs land there.
                    tolerated = {t.get("key") for t in group["template"]["spec"].get("tolerations", [])}
                    assert "nvidia.com/gpu" in tolerated, name
        if obj["kind"] == "CronJob":
            (container,) = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
            assert _has_s3_credentials(container)


def _memory(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity))
    assert match, quantity
    return float(match.group(1)) * units.get(match.group(2), 1)


@pytest.mark.parametrize("directory", ENTRY_POINTS, ids=IDS)
def test_memory_volumes_fit_in_the_memory_limit(directory: Path) -> None:
    """A Memory emptyDir is charged to the pod's memory: a /dev/shm larger than half the limit
    would let the object store push the process into the OOM killer."""
    for obj in rendered(directory):
        for template in _pod_templates(obj):
            pod = template["spec"]
            limit = sum(_memory(c["resources"]["limits"]["memory"]) for c in pod["containers"])
            for volume in pod.get("volumes", []):
                if volume.get("emptyDir", {}).get("medium") == "Memory":
                    assert "sizeLimit" in volume["emptyDir"], volume["name"]
                    assert _memory(volume["emptyDir"]["sizeLimit"]) <= limit / 2, (volume, limit)


# --------------------------------------------------------------------------------------------------
# Commands: the entrypoints parse with the project's CLIs and agree with each other
# --------------------------------------------------------------------------------------------------


def training_config(entrypoint: str) -> Any:
    """The TrainConfig a RayJob entrypoint runs with, through trainer/launch.py's own parser and
    trainer/config.py's load_config (raises ConfigError for a wrong key or value, SystemExit for
    an unknown option). Relative paths are relative to the image's project directory = ROOT."""
    from trainer import launch
    from trainer.config import load_config

    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "trainer/launch.py"], argv
    args = launch.build_parser().parse_args(argv[2:])
    return load_config(ROOT / args.config if args.config else launch.DEFAULT_CONFIG, args.overrides)


def evaluate_args(argv: list[str]) -> Any:
    """trainer/evaluate.py's parser and its own cross-option checks (SystemExit 2 on a usage error)."""
    from trainer import evaluate

    assert argv[:2] == ["python", "trainer/evaluate.py"], argv
    parser = evaluate.build_parser()
    args = parser.parse_args(argv[2:])
    evaluate.check_arguments(parser, args)
    return args


def _training(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], Any]:
    jobs = [o for o in of_kind(objects, "RayJob") if "trainer/launch.py" in o["spec"]["entrypoint"]]
    assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]
    return jobs[0], training_config(jobs[0]["spec"]["entrypoint"])


def _evaluations(objects: list[dict[str, Any]]) -> list[tuple[str, list[str], bool]]:
    """(name, argv, whether the process gets a GPU) of every scheduled evaluation."""
    out = []
    for cronjob in of_kind(objects, "CronJob"):
        (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        gpu = "nvidia.com/gpu" in container["resources"]["limits"]
        out.append((f"CronJob/{cronjob['metadata']['name']}", container["command"] + container.get("args", []), gpu))
    for raycron in of_kind(objects, "RayCronJob"):
        job = raycron["spec"]["jobTemplate"]
        out.append((f"RayCronJob/{raycron['metadata']['name']}", shlex.split(job["entrypoint"]),
                    bool(job.get("entrypointNumGpus"))))
    return out


@pytest.mark.parametrize("directory", [p for p in ENTRY_POINTS if p.name != "monitoring"],
                         ids=[i for i in IDS if not i.endswith("monitoring")])
def test_entrypoints_parse_and_point_at_the_same_run(directory: Path) -> None:
    from trainer import launch

    objects = rendered(directory)
    rayjob, config = _training(objects)
    entrypoint = rayjob["spec"]["entrypoint"]
    # KubeRay pastes the entrypoint into a bash command line and Ray runs it through a shell
    # again: every token must mean the same unquoted.
    assert all(shlex.quote(token) == token for token in shlex.split(entrypoint)), entrypoint
    assert config.checkpoint.storage_path.startswith("s3://"), "checkpoints must outlive the cluster"
    assert config.checkpoint.run_name, "a fixed run name: retries resume and the evaluation knows RUN_DIR"
    for split in (config.data.train, config.data.dev, config.data.test):
        assert split.startswith("s3://"), "workers in other pods read the shards: they must be on S3"
    run_dir = launch.resolve_run(config)[1]
    # The job's own evaluation actor scores every checkpoint as soon as it is committed; the
    # scheduled evaluation below only catches up on what it left without metrics.json.
    assert config.eval.enabled, "the training job must run its evaluation actor (eval.enabled)"

    evaluations = _evaluations(objects)
    # One scheduled catch-up evaluator: two schedulers would only score the same leftovers twice.
    assert len(evaluations) == 1, evaluations
    for name, argv, has_gpu in evaluations:
        args = evaluate_args(argv)
        assert args.watch == run_dir, name
        assert args.data == config.data.test and args.dev == config.data.dev, name
        assert args.device.startswith("cuda") == has_gpu, f"{name}: --device {args.device}, GPU {has_gpu}"
        # A scheduled job exits between scrapes: its metrics must be pushed, under the `run` label
        # the training metrics carry (the evaluation alerts join the two on it).
        assert args.pushgateway, f"{name}: no --pushgateway"
        assert (args.run_name or Path(args.watch).name) == config.checkpoint.run_name, name


@pytest.mark.parametrize("directory", OVERLAYS, ids=OVERLAY_IDS)
def test_restarts_are_configured_together(directory: Path) -> None:
    # docs/operations.md, "Preemption and restarts": the numbers only work together.
    import yaml

    objects = rendered(directory)
    rayjob, config = _training(objects)
    spec = rayjob["spec"]
    checkpoint = config.checkpoint
    # A retry (a new cluster, a new driver) waits for the lease of a killed driver to go stale: the
    # wait must cover the timeout plus the two heartbeats it watches to see the holder stopped.
    assert spec["backoffLimit"] >= 1, "a failed attempt must be retried to resume"
    assert checkpoint.lease_wait_s >= checkpoint.lease_timeout_s + 20, (checkpoint.lease_wait_s, checkpoint.lease_timeout_s)
    # `ray job stop` waits RAY_JOB_STOP_WAIT_TIME_S between SIGTERM and SIGKILL: longer than the
    # driver's own bound on stopping with a checkpoint.
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert float(env["RAY_JOB_STOP_WAIT_TIME_S"]) > checkpoint.stop_grace_s
    # A deleted worker pod is drained by `ray start` with a 30 s deadline: the pod must outlive it.
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        assert group["template"]["spec"].get("terminationGracePeriodSeconds", 30) > 30, group["groupName"]


def test_a_wrong_set_key_or_option_fails_the_command_check() -> None:
    from trainer.config import ConfigError

    rayjob, _ = _training(rendered(K8S / "overlays/production"))
    entrypoint = rayjob["spec"]["entrypoint"]
    with pytest.raises(ConfigError, match="checkpoint.storage"):
        training_config(entrypoint.replace("checkpoint.storage_path=", "checkpoint.storage="))
    with pytest.raises(ConfigError, match="optim.epochs"):
        training_config(entrypoint + " --set optim.epochs=ten")
    with pytest.raises(SystemExit):
        training_config(entrypoint + " --sett optim.epochs=3")
    (_, argv, _), = _evaluations(rendered(K8S / "overlays/production"))
    with pytest.raises(SystemExit):
        evaluate_args([*argv, "--protocol", "5k"])
    with pytest.raises(SystemExit):
        evaluate_args([*argv, "--output", "metrics.json"])  # evaluate.py refuses --output with --watch


EVAL_GROUP = "eval"  # the worker group of the training job's evaluation actor


def _ray_node(params: dict[str, str], container: dict[str, Any]) -> dict[str, float]:
    """Logical resources of a Ray node: rayStartParams if given, else what KubeRay derives from the
    container limits (CPU rounded up, GPUs from nvidia.com/gpu)."""
    limits = container["resources"]["limits"]
    cpu = str(limits["cpu"])
    cpus = math.ceil(float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu))
    return {"CPU": float(params.get("num-cpus", cpus)),
            "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}


def _group_node(group: dict[str, Any]) -> dict[str, float]:
    return _ray_node(group["rayStartParams"], group["template"]["spec"]["containers"][0])


def _ray_nodes(cluster: dict[str, Any]) -> list[dict[str, float]]:
    """Logical resources of each Ray node of a cluster: the head, then every replica of every
    worker group."""
    head = cluster["headGroupSpec"]
    nodes = [_ray_node(head["rayStartParams"], head["template"]["spec"]["containers"][0])]
    for group in cluster.get("workerGroupSpecs", []):
        nodes += [_group_node(group) for _ in range(group["replicas"])]
    return nodes


def _fits(capacity: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(capacity.get(k, 0) >= v for k, v in bundle.items())


def _place(free: list[dict[str, float]], bundles: list[dict[str, float]]) -> list[dict[str, float]]:
    """First-fit of resource bundles (one per actor) into `free`, which is updated; the bundles
    that fit nowhere."""
    left = []
    for bundle in sorted(bundles, key=lambda b: (-b.get("GPU", 0), -b.get("CPU", 0))):
        for capacity in free:
            if _fits(capacity, bundle):
                for k, v in bundle.items():
                    capacity[k] -= v
                break
        else:
            left.append(bundle)
    return left


def unplaced_bundles(nodes: list[dict[str, float]], bundles: list[dict[str, float]]) -> list[dict[str, float]]:
    """First-fit of resource bundles (one per actor) into the nodes; the bundles that fit nowhere."""
    return _place([dict(n) for n in nodes], bundles)


def worker_bundles(config: Any) -> list[dict[str, float]]:
    """What launch.py asks Ray for per training worker (Ray Train's ScalingConfig)."""
    dist = config.distributed
    return [{"CPU": dist.cpus_per_worker, "GPU": dist.gpus_per_worker if dist.use_gpu else 0.0}
            for _ in range(dist.workers)]


def evaluator_bundle(config: Any) -> dict[str, float] | None:
    """What the evaluation actor asks for (trainer/evaluator/actor.py make_evaluation_actor:
    num_cpus=eval.cpus, num_gpus=eval.gpus), None when launch.py starts none."""
    return {"CPU": config.eval.cpus, "GPU": config.eval.gpus} if config.eval.enabled else None


def training_bundles(config: Any) -> list[dict[str, float]]:
    """Everything launch.py asks Ray for: the training workers and the evaluation actor."""
    evaluator = evaluator_bundle(config)
    return worker_bundles(config) + ([evaluator] if evaluator is not None else [])


def placement_failures(nodes: list[dict[str, float]], config: Any) -> list[str]:
    """The orders of scheduling in which the job does not fit, described; [] when it always fits.

    launch.py creates the evaluation actor before Ray Train reserves the workers' placement group,
    and neither asks for a custom resource: Ray may start the actor on any node with room for it,
    or (actor creation being asynchronous) place the workers first. Every node the actor can land
    on must leave room for all the workers, and the workers placed first must leave room for it."""
    workers, evaluator = worker_bundles(config), evaluator_bundle(config)
    if evaluator is None:
        left = unplaced_bundles(nodes, workers)
        return [f"workers that fit nowhere: {left}"] if left else []
    failures = []
    landings = [i for i, node in enumerate(nodes) if _fits(node, evaluator)]
    if not landings:
        failures.append(f"the evaluator {evaluator} fits on no node")
    for i in landings:
        free = [dict(n) for n in nodes]
        for k, v in evaluator.items():
            free[i][k] -= v
        left = _place(free, workers)
        if left:
            failures.append(f"evaluator on node {i} {nodes[i]}: workers that fit nowhere: {left}")
    free = [dict(n) for n in nodes]
    left = _place(free, workers) + _place(free, [evaluator])
    if left:
        failures.append(f"workers placed first: bundles that fit nowhere: {left}")
    return failures


def sizing_problems(cluster: dict[str, Any], config: Any) -> list[str]:
    """The worker groups as the manifests size them: the training groups (all but `eval`) have
    exactly the training workers' GPUs, the `eval` group the evaluator's GPUs and at least its
    CPUs, and the job fits whatever Ray schedules first (placement_failures)."""
    problems = []
    groups = cluster.get("workerGroupSpecs", [])
    worker_gpus = sum(b["GPU"] for b in worker_bundles(config))
    training_gpus = sum(_group_node(g)["GPU"] * g["replicas"] for g in groups if g["groupName"] != EVAL_GROUP)
    if training_gpus != worker_gpus:
        problems.append(f"training groups have {training_gpus} GPUs for workers of {worker_gpus}")
    evaluator = evaluator_bundle(config)
    eval_groups = [g for g in groups if g["groupName"] == EVAL_GROUP]
    if evaluator is None:
        if eval_groups:
            problems.append(f"an `{EVAL_GROUP}` group but the job runs no evaluator (eval.enabled false)")
    elif len(eval_groups) != 1 or eval_groups[0]["replicas"] != 1:
        problems.append(f"the evaluator needs one `{EVAL_GROUP}` group of one replica")
    else:
        node = _group_node(eval_groups[0])
        if node["GPU"] != evaluator["GPU"] or node["CPU"] < evaluator["CPU"]:
            problems.append(f"`{EVAL_GROUP}` group {node} does not supply the evaluator's {evaluator}")
    problems += placement_failures(_ray_nodes(cluster), config)
    return problems


@pytest.mark.parametrize("directory", [p for p in ENTRY_POINTS if p.name != "monitoring"],
                         ids=[i for i in IDS if not i.endswith("monitoring")])
def test_the_cluster_holds_the_job_and_no_gpu_idles(directory: Path) -> None:
    objects = rendered(directory)
    rayjob, config = _training(objects)
    cluster = rayjob["spec"]["rayClusterSpec"]
    nodes = _ray_nodes(cluster)
    bundles = training_bundles(config)
    assert sizing_problems(cluster, config) == [], (nodes, config.distributed, config.eval)
    # GPUs are the expensive part: every GPU of the cluster has a worker or the evaluator to run.
    assert sum(n["GPU"] for n in nodes) == sum(b["GPU"] for b in bundles), (nodes, config.distributed, config.eval)
    for raycron in of_kind(objects, "RayCronJob"):
        job = raycron["spec"]["jobTemplate"]
        driver = {"CPU": float(job.get("entrypointNumCpus", 0)), "GPU": float(job.get("entrypointNumGpus", 0))}
        assert unplaced_bundles(_ray_nodes(job["rayClusterSpec"]), [driver]) == []


def test_fit_check_fails_when_the_cluster_is_too_small() -> None:
    rayjob, config = _training(rendered(K8S / "overlays/production"))
    assert config.eval.enabled and (config.eval.cpus, config.eval.gpus) == (4, 1)
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert sizing_problems(cluster, config) == []

    small = copy.deepcopy(cluster)
    small["workerGroupSpecs"][0]["replicas"] = 1  # 8 + 1 GPUs for 16 workers and the evaluator
    assert len(unplaced_bundles(_ray_nodes(small), training_bundles(config))) == 8
    assert any("training groups have 8.0 GPUs for workers of 16" in p for p in sizing_problems(small, config))

    # Without the eval group the 16 GPUs hold the workers, but the evaluator is left over.
    no_eval = copy.deepcopy(cluster)
    no_eval["workerGroupSpecs"] = [g for g in no_eval["workerGroupSpecs"] if g["groupName"] != EVAL_GROUP]
    assert unplaced_bundles(_ray_nodes(no_eval), training_bundles(config)) == [{"CPU": 4, "GPU": 1}]
    assert any("needs one `eval` group" in p for p in sizing_problems(no_eval, config))
    assert placement_failures(_ray_nodes(no_eval), config)

    # An eval node with room for the evaluator only (1 GPU, 4 CPUs): the job fits if the evaluator
    # lands there, but not if Ray starts it on a training node first (the displaced worker needs
    # 8 CPUs): the check tries every landing.
    tight = copy.deepcopy(cluster)
    (group,) = [g for g in tight["workerGroupSpecs"] if g["groupName"] == EVAL_GROUP]
    group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "4"
    assert unplaced_bundles(_ray_nodes(tight), training_bundles(config)) == []  # first-fit alone passes
    failures = placement_failures(_ray_nodes(tight), config)
    assert failures and all(f.startswith("evaluator on node") for f in failures), failures

    # With eval disabled the eval group's GPU would idle.
    disabled = training_config(rayjob["spec"]["entrypoint"] + " --set eval.enabled=false")
    assert any("runs no evaluator" in p for p in sizing_problems(cluster, disabled))
