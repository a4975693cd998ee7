"""The Grafana dashboards (monitoring/grafana/dashboards/*.json) and provisioning files: every query
uses only the metric contract (monitoring/metrics.py) and the recording rules, is valid PromQL
(promtool), filters by the `run` variable and reads from the `datasource` variable; the layout is
sound; and the PromQL reference checker itself finds what it must."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitoring import metrics
from monitoring.promql import (
    Selector,
    UnsupportedQuery,
    contract_problems,
    grafana_variable_exprs,
    level_labels,
    references,
    substitute_grafana_variables,
)

REPO = Path(__file__).resolve().parents[2]
GRAFANA_DIR = REPO / "monitoring" / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
TRAINING_DASHBOARD = GRAFANA_DIR / "dashboards" / "vsrn-training.json"
RECORDING = REPO / "monitoring" / "prometheus" / "rules" / "recording.yml"
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}


def load_dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def recording_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RECORDING.read_text(encoding="utf-8"))["groups"]
            for rule in group["rules"]]


def recorded_labels() -> dict[str, set[str]]:
    recorded: dict[str, set[str]] = {}
    for rule in recording_rules():
        recorded.setdefault(rule["record"], set()).update(level_labels(rule["record"]) | set(rule.get("labels", {})))
    return recorded


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query", "")
    return query["query"] if isinstance(query, dict) else query


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every Prometheus query of the dashboard: panel targets, query variables,
    annotation queries."""
    found: list[tuple[str, str]] = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            if "expr" in target:
                found.append((f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            for expr in grafana_variable_exprs(variable_query(variable)):
                found.append((f"variable {variable['name']}", expr))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            found.append((f"annotation {annotation.get('name')!r}", annotation["expr"]))
    return found


def dashboard_problems(dashboard: dict[str, Any]) -> list[str]:
    """Queries of ``dashboard`` that use anything outside the metric contract and the recording
    rules, or no metric at all."""
    recorded = recorded_labels()
    problems: list[str] = []
    for where, expr in queries(dashboard):
        if not references(expr).metrics:
            problems.append(f"{where}: no metric in {expr!r}")
        problems += [f"{where}: {problem}" for problem in contract_problems(expr, recorded)]
    return problems


@pytest.fixture(scope="module", params=DASHBOARDS, ids=lambda p: p.name)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load_dashboard(request.param)


# --------------------------------------------------------------------------------------------------
# The dashboards
# --------------------------------------------------------------------------------------------------


def test_the_training_dashboard_exists() -> None:
    assert TRAINING_DASHBOARD in DASHBOARDS
    board = load_dashboard(TRAINING_DASHBOARD)
    assert board["uid"] == "vsrn-training"
    assert board["title"]


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])  # Grafana's uid limits
    panels = list(all_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    occupied: dict[tuple[int, int], str] = {}
    for panel in panels:
        assert panel.get("title"), f"panel {panel['id']} has no title"
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, f"{panel['title']}: outside the grid"
        assert pos["y"] >= 0 and pos["h"] > 0
        if panel["type"] != "row":
            assert panel.get("targets"), f"{panel['title']}: no query"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in occupied, f"{panel['title']!r} overlaps {occupied[(x, y)]!r}"
                occupied[(x, y)] = panel["title"]


def test_template_variables(dashboard: dict[str, Any]) -> None:
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    run = variables["run"]
    assert run["type"] == "query"
    assert run["datasource"] == DATASOURCE_REF
    assert re.fullmatch(r"label_values\(\s*vsrn_train_steps_total\s*,\s*run\s*\)", variable_query(run))
    # several runs can be compared; "All" must be a regex since the queries match with =~
    assert run["multi"] is True and run["includeAll"] is True and run["allValue"] == ".*"


def test_panels_read_from_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel.get("datasource") == DATASOURCE_REF, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE_REF) == DATASOURCE_REF, panel["title"]


def test_queries_use_only_the_metric_contract(dashboard: dict[str, Any]) -> None:
    assert queries(dashboard)
    problems = dashboard_problems(dashboard)
    assert not problems, "\n".join(problems)


def test_panel_queries_follow_the_run_variable(dashboard: dict[str, Any]) -> None:
    """Every selector of every panel filters by run=~"$run", so the run picker applies to all."""
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            for selector in references(target["expr"]).selectors:
                assert "run" in selector.labels, f"{panel['title']}: {selector.metric} is not filtered by run"
            assert '"$run"' in target["expr"], panel["title"]


def test_queries_are_valid_promql(dashboard: dict[str, Any], promtool: str, tmp_path: Path) -> None:
    """promtool parses each query (Grafana variables replaced by typical values) as a recording
    rule: a syntax error or an unknown function fails."""
    found = queries(dashboard)
    rules = [{"record": f"dashboard_query_{i}", "expr": substitute_grafana_variables(expr)}
             for i, (_, expr) in enumerate(found)]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_every_exported_metric_is_on_the_training_dashboard() -> None:
    """Each metric of the contract appears on the dashboard, directly or through a recording rule."""
    used: set[str] = set()
    for _, expr in queries(load_dashboard(TRAINING_DASHBOARD)):
        used |= references(expr).metrics
    by_rule = {rule["record"]: references(rule["expr"]).metrics for rule in recording_rules()}
    for name in list(used):
        used |= by_rule.get(name, set())
    missing = [spec.name for spec in metrics.ALL_METRICS if not set(spec.series_names()) & used]
    assert not missing, f"not on the dashboard: {missing}"


# --------------------------------------------------------------------------------------------------
# The checker finds what it must
# --------------------------------------------------------------------------------------------------


def test_the_checker_flags_a_made_up_metric_in_the_dashboard() -> None:
    board = copy.deepcopy(load_dashboard(TRAINING_DASHBOARD))
    assert dashboard_problems(board) == []
    panel = next(p for p in all_panels(board) if p.get("targets"))
    panel["targets"][0]["expr"] = 'sum by (run) (rate(vsrn_train_made_up_total{run=~"$run"}[$__rate_interval]))'
    problems = dashboard_problems(board)
    assert len(problems) == 1 and "unknown metric vsrn_train_made_up_total" in problems[0], problems


def test_the_checker_flags_a_made_up_metric_in_a_variable() -> None:
    board = copy.deepcopy(load_dashboard(TRAINING_DASHBOARD))
    run = next(v for v in board["templating"]["list"] if v["name"] == "run")
    run["query"] = {"query": "label_values(vsrn_train_step_total, run)", "refId": "A"}  # "steps" misspelt
    assert any("unknown metric vsrn_train_step_total" in p for p in dashboard_problems(board))


@pytest.mark.parametrize(("expr", "problem"), [
    ('max by (run, term) (vsrn_train_loss{trem="total"})', "vsrn_train_loss has no label trem"),
    ('max by (run, trem) (vsrn_train_loss{term="total"})', "no metric of the expression has label trem"),
    ("max by (run, split) (vsrn_eval_best_rsum)", "no metric of the expression has label split"),
    ("vsrn_train_step_duration_seconds", "unknown metric vsrn_train_step_duration_seconds"),  # a histogram's base name
    ("run:vsrn_train_made_up:rate2m", "unknown metric run:vsrn_train_made_up:rate2m"),
    ('{job="ray"}', "selector without a metric name (job)"),
])
def test_the_checker_flags_names_outside_the_contract(expr: str, problem: str) -> None:
    assert problem in contract_problems(expr, recorded_labels())


@pytest.mark.parametrize(("expr", "metric_names", "grouping"), [
    ('histogram_quantile(0.9, sum by (run, le) (rate(vsrn_train_step_duration_seconds_bucket{run=~"$run"}[$__rate_interval])))',
     {"vsrn_train_step_duration_seconds_bucket"}, {"run", "le"}),
    # keywords, modifiers, numbers, strings, comments and aggregation clauses after the argument
    ('sum(rate(a_total[5m] offset -1h)) without (WorkerId) > bool 1e3 and on (run) b @ start() '
     'or label_replace(c, "dst", "$1 d_total", "src", "(.*)") unless Inf + NaN * 0x1f # e_total',
     {"a_total", "b", "c"}, {"WorkerId", "run"}),
    ('max by (run, protocol) (x{split="dev"}) / on (run) group_left () max by (run) (y) < 0.95',
     {"x", "y"}, {"run", "protocol"}),
    ('{__name__="vsrn_eval_rsum", run=~"${run:regex}"} * on (run) group_right [[extra]] z[1h:5m]',
     {"vsrn_eval_rsum", "z"}, {"run"}),
    ('count_values("k", foo{bar!~"a,b}c"}) - time() - $__range_s', {"foo"}, set()),
])
def test_references(expr: str, metric_names: set[str], grouping: set[str]) -> None:
    refs = references(expr)
    assert refs.metrics == metric_names
    assert refs.grouping_labels == grouping


def test_references_keep_matcher_labels() -> None:
    assert references('vsrn_eval_rsum{run=~"$run", split="dev"}').selectors == (
        Selector("vsrn_eval_rsum", ("run", "split")),)


@pytest.mark.parametrize("expr", ['{__name__=~"vsrn_.+"}', 'rate({__name__!="x"}[1m])', "sum(x", "a ? b"])
def test_uncheckable_expressions_raise(expr: str) -> None:
    with pytest.raises(UnsupportedQuery):
        references(expr)


@pytest.mark.parametrize(("query", "exprs"), [
    ("label_values(vsrn_train_steps_total, run)", ["vsrn_train_steps_total"]),
    ('label_values(vsrn_eval_rsum{split="dev", protocol=~"a,b"}, run)', ['vsrn_eval_rsum{split="dev", protocol=~"a,b"}']),
    ("label_values(run)", []),
    ("query_result(max by (run) (vsrn_train_epoch))", ["max by (run) (vsrn_train_epoch)"]),
    ("label_names()", []),
])
def test_grafana_variable_queries(query: str, exprs: list[str]) -> None:
    assert grafana_variable_exprs(query) == exprs


def test_unknown_grafana_variable_queries_raise() -> None:
    with pytest.raises(UnsupportedQuery):
        grafana_variable_exprs("metrics(vsrn_.*)")


def test_grafana_variables_are_substituted() -> None:
    assert substitute_grafana_variables('rate(x{run=~"$run", a="${b:regex}", c="[[c]]"}[$__rate_interval])') == \
        'rate(x{run=~".*", a=".*", c=".*"}[1m])'


# --------------------------------------------------------------------------------------------------
# Provisioning
# --------------------------------------------------------------------------------------------------


def test_datasource_provisioning() -> None:
    doc = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert doc["apiVersion"] == 1
    (source,) = doc["datasources"]
    assert source["type"] == DATASOURCE_REF["type"]  # what the dashboards' datasource variable lists
    assert source["url"] == "http://127.0.0.1:9090"
    assert source["access"] == "proxy"
    assert source["isDefault"] is True  # the ${datasource} variable starts on the default


def test_dashboard_provisioning() -> None:
    doc = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "vsrn.yml").read_text())
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    assert Path(provider["options"]["path"]).is_absolute()
