"""The Prometheus configuration, recording rules and alerts of monitoring/prometheus/, checked with
the real promtool (config and rule validation, the rule unit tests under monitoring/prometheus/tests)
and against the metric contract of monitoring/metrics.py."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitoring import metrics
from monitoring.promql import contract_problems, level_labels, references

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "monitoring" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RECORDING = PROMETHEUS_DIR / "rules" / "recording.yml"
ALERTS = PROMETHEUS_DIR / "rules" / "alerts.yml"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))

# The alerts this project promises (the issue that introduced them; the README lists them).
EXPECTED_ALERTS = {
    "VSRNTrainingStalled", "VSRNTrainingLossNaN", "VSRNTrainingLossExploding", "VSRNEvaluationFailing",
    "VSRNEvaluationLate", "VSRNRecallRegressed", "VSRNSkippedSamplesRising",
    "VSRNTrainingCollapsed",  # issue 13: hard-negative collapse detector
}
SEVERITIES = {"critical", "warning"}
SD_FILE = "/tmp/ray/prom_metrics_service_discovery.json"  # written by Ray's head


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=REPO, capture_output=True, text=True, timeout=60)


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in load(path)["groups"] for rule in group["rules"]]


def recorded_labels() -> dict[str, set[str]]:
    """Recording-rule name -> the labels its series carry (level labels plus the rule's labels)."""
    recorded: dict[str, set[str]] = {}
    for rule in rules(RECORDING):
        recorded.setdefault(rule["record"], set()).update(level_labels(rule["record"]) | set(rule.get("labels", {})))
    return recorded


def test_files_are_where_the_config_says() -> None:
    assert RULE_FILES == [ALERTS, RECORDING]
    assert RULE_TESTS, "no promtool test files under monitoring/prometheus/tests"
    config = load(CONFIG)
    # rule_files are relative to the configuration's directory, so it runs from any directory
    assert sorted((CONFIG.parent / name).resolve() for name in config["rule_files"]) == RULE_FILES


# --------------------------------------------------------------------------------------------------
# promtool
# --------------------------------------------------------------------------------------------------


def test_prometheus_config_is_valid(promtool: str) -> None:
    result = run(promtool, "check", "config", CONFIG)
    assert result.returncode == 0, output(result)
    # promtool also loads and checks the rule files the configuration names
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in output(result), output(result)


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rule_file_is_valid(promtool: str, path: Path) -> None:
    result = run(promtool, "check", "rules", path)
    assert result.returncode == 0, output(result)
    assert f"SUCCESS: {len(rules(path))} rules found" in output(result)


@pytest.mark.parametrize("path", RULE_TESTS, ids=lambda p: p.name)
def test_rule_unit_tests_pass(promtool: str, path: Path) -> None:
    result = run(promtool, "test", "rules", path)
    assert result.returncode == 0, output(result)


@pytest.mark.parametrize(("intact", "broken"), [
    ("vsrn_train_loss != vsrn_train_loss", "vsrn_train_loss != != vsrn_train_loss"),  # syntax
    ("increase(vsrn_eval_failures_total[30m])", "increases(vsrn_eval_failures_total[30m])"),  # unknown function
    ("for: 5m", "for: 5 minutes"),  # not a duration
])
def test_check_rules_rejects_a_broken_copy(promtool: str, tmp_path: Path, intact: str, broken: str) -> None:
    text = ALERTS.read_text(encoding="utf-8")
    assert intact in text
    good, bad = tmp_path / "good.yml", tmp_path / "bad.yml"
    good.write_text(text, encoding="utf-8")
    bad.write_text(text.replace(intact, broken, 1), encoding="utf-8")
    # the unmodified copy passes, so the failure below comes from the change alone
    assert run(promtool, "check", "rules", good).returncode == 0
    result = run(promtool, "check", "rules", bad)
    assert result.returncode != 0, output(result)
    assert "FAILED" in output(result)


def _rule_test(tmp_path: Path, exp_alerts: list[dict[str, Any]]) -> Path:
    """A promtool test file on the real alerts: a finite, healthy loss, expecting ``exp_alerts``
    for VSRNTrainingLossNaN at 10 minutes."""
    doc = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": 'vsrn_train_loss{run="r1", rank="0", term="total"}', "values": "2x15"}],
            "alert_rule_test": [{"eval_time": "10m", "alertname": "VSRNTrainingLossNaN", "exp_alerts": exp_alerts}],
        }],
    }
    path = tmp_path / f"test_{len(list(tmp_path.iterdir()))}.yml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def test_test_rules_fails_when_an_expected_alert_does_not_fire(promtool: str, tmp_path: Path) -> None:
    quiet = _rule_test(tmp_path, [])
    assert run(promtool, "test", "rules", quiet).returncode == 0
    wrong = _rule_test(tmp_path, [{"exp_labels": {"severity": "critical", "run": "r1", "rank": "0", "term": "total"}}])
    result = run(promtool, "test", "rules", wrong)
    assert result.returncode != 0, output(result)
    assert "VSRNTrainingLossNaN" in output(result)


# --------------------------------------------------------------------------------------------------
# The rule files themselves
# --------------------------------------------------------------------------------------------------


def _alert_test_cases() -> list[dict[str, Any]]:
    return [case for path in RULE_TESTS for test in load(path)["tests"] for case in test.get("alert_rule_test", [])]


def test_every_alert_has_a_firing_and_a_quiet_test_case() -> None:
    alerts = {rule["alert"] for rule in rules(ALERTS)}
    cases = _alert_test_cases()
    tested = {case["alertname"] for case in cases}
    # a case naming an alert that does not exist passes trivially when it expects nothing
    assert tested <= alerts, f"tests of unknown alerts: {sorted(tested - alerts)}"
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert alerts - firing == set(), f"alerts never tested firing: {sorted(alerts - firing)}"
    assert alerts - quiet == set(), f"alerts never tested quiet: {sorted(alerts - quiet)}"


def test_every_recording_rule_is_unit_tested() -> None:
    tested: set[str] = set()
    for path in RULE_TESTS:
        for test in load(path)["tests"]:
            for case in test.get("promql_expr_test", []):
                tested |= references(case["expr"]).metrics
    missing = {rule["record"] for rule in rules(RECORDING)} - tested
    assert not missing, f"recording rules without a promql_expr_test: {sorted(missing)}"


def test_alerts_follow_the_conventions() -> None:
    alerts = rules(ALERTS)
    names = [rule["alert"] for rule in alerts]
    assert sorted(names) == sorted(EXPECTED_ALERTS), "alerts missing, extra or duplicated"
    for rule in alerts:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no `for:` duration"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity label"
        annotations = rule.get("annotations", {})
        assert set(annotations) >= {"summary", "description"}, name
        assert "$labels." in annotations["summary"], f"{name}: summary does not say which run"
        assert "$labels." in annotations["description"] and "$value" in annotations["description"], \
            f"{name}: description without $labels or $value"


def test_recording_rules_follow_the_naming_convention() -> None:
    for rule in rules(RECORDING):
        name = rule["record"]
        # level:metric:operations, the metric being one of ours
        match = re.fullmatch(r"([a-z]+(?:_[a-z]+)*):(vsrn_[a-z0-9_]+):([a-z0-9_]+)", name)
        assert match, f"{name} is not level:metric:operations"
        assert not match.group(2).endswith("_total"), f"{name}: drop _total once a rate is taken"
        # the level names exactly the labels the rule keeps: its grouping labels (le is consumed
        # by histogram_quantile) and the labels it sets
        kept = (references(rule["expr"]).grouping_labels - {"le"}) | set(rule.get("labels", {}))
        assert level_labels(name) == kept, f"{name}: level says {sorted(level_labels(name))}, rule keeps {sorted(kept)}"


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rules_use_only_the_metric_contract(path: Path) -> None:
    recorded = recorded_labels()
    for rule in rules(path):
        name = rule.get("alert") or rule["record"]
        refs = references(rule["expr"])
        assert refs.metrics, f"{name} references no metric"
        assert refs.metrics & metrics.exported_series_names(), f"{name} uses no exported metric"
        # alerts must work without recording.yml (the file may be deployed alone)
        problems = contract_problems(rule["expr"], None if path == ALERTS else recorded)
        assert not problems, f"{name}: {problems}"


# --------------------------------------------------------------------------------------------------
# Scrape configuration
# --------------------------------------------------------------------------------------------------


def _relabel(config: dict[str, Any], labels: dict[str, str]) -> dict[str, str]:
    """Prometheus's `replace` relabelling (the only action used): the regex is anchored at both
    ends and the replacement's $N / ${N} refer to its groups."""
    labels = dict(labels)
    for step in config:
        assert step.get("action", "replace") == "replace"
        value = step.get("separator", ";").join(labels.get(name, "") for name in step["source_labels"])
        match = re.fullmatch(step.get("regex", "(.*)"), value)
        if match is None:
            continue
        replacement = re.sub(r"\$\{?(\w+)\}?", lambda m: match.group(int(m.group(1))) or "",
                             step.get("replacement", "$1"))
        labels[step["target_label"]] = replacement
    return labels


def test_scrape_jobs() -> None:
    jobs = {job["job_name"]: job for job in load(CONFIG)["scrape_configs"]}
    assert set(jobs) == {"ray", "vsrn_eval", "pushgateway"}
    assert [sd["files"] for sd in jobs["ray"]["file_sd_configs"]] == [[SD_FILE]]
    assert jobs["vsrn_eval"]["static_configs"] == [{"targets": ["127.0.0.1:9464"]}]
    assert jobs["pushgateway"]["static_configs"] == [{"targets": ["127.0.0.1:9091"]}]
    # pushed groups keep job="vsrn_eval" and run; only the Pushgateway job may override labels
    assert jobs["pushgateway"].get("honor_labels") is True
    assert not jobs["ray"].get("honor_labels") and not jobs["vsrn_eval"].get("honor_labels")


def test_ray_prefix_is_stripped_from_our_metrics_only() -> None:
    relabel = next(job for job in load(CONFIG)["scrape_configs"] if job["job_name"] == "ray")["metric_relabel_configs"]
    for name in metrics.exported_series_names():
        ray_name = metrics.RAY_PREFIX + name
        assert _relabel(relabel, {"__name__": ray_name, "WorkerId": "w"}) == {"__name__": name, "WorkerId": "w"}
        assert _relabel(relabel, {"__name__": name})["__name__"] == name
    for other in ("ray_node_cpu_utilization", "ray_tasks", "ray_vsrn", "my_ray_vsrn_x", "vsrn_ray_x"):
        assert _relabel(relabel, {"__name__": other})["__name__"] == other
