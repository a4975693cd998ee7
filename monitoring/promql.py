"""What a PromQL expression refers to: metric names, the label names of its selectors, and the
labels of its ``by``/``without``/``on``/``ignoring``/``group_left``/``group_right`` lists.

Used by the tests to hold the Prometheus rules and the Grafana dashboards (and whatever is generated
from them, e.g. under k8s/) to the metric contract of monitoring/metrics.py: a query on a name that
no code exports returns nothing, silently, and a dashboard panel or an alert built on it never
shows anything. This is a lexer with just enough context to tell a metric name from a function,
a keyword, a label name or a string; it does not check syntax (``promtool check rules`` does).

Grafana template variables (``$run``, ``${run}``, ``[[run]]``, ``$__rate_interval``) are accepted
where Grafana allows them, and :func:`grafana_variable_exprs` gives the PromQL inside a Grafana
variable query such as ``label_values(vsrn_train_steps_total, run)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Set
from dataclasses import dataclass

from monitoring import metrics

__all__ = [
    "RAY_LABELS",
    "SCRAPE_LABELS",
    "References",
    "Selector",
    "UnsupportedQuery",
    "contract_problems",
    "grafana_variable_exprs",
    "level_labels",
    "references",
    "substitute_grafana_variables",
]

# Labels every series gets on its way to Prometheus, besides those of monitoring/metrics.py: what
# Ray attaches to application metrics, and the scrape's job/instance.
RAY_LABELS = frozenset({"SessionName", "NodeAddress", "WorkerId", "Component", "Version"})
SCRAPE_LABELS = RAY_LABELS | {"job", "instance"}


class UnsupportedQuery(ValueError):
    """An expression whose metric names cannot be known statically (e.g. ``{__name__=~"..."}``)."""


@dataclass(frozen=True)
class Selector:
    """One vector selector: its metric name (None for a selector by labels only) and the label
    names its matchers use (``__name__`` excluded)."""

    metric: str | None
    labels: tuple[str, ...]


@dataclass(frozen=True)
class References:
    selectors: tuple[Selector, ...]
    grouping_labels: frozenset[str]  # labels of by/without/on/ignoring/group_left/group_right lists

    @property
    def metrics(self) -> frozenset[str]:
        return frozenset(s.metric for s in self.selectors if s.metric is not None)


# Words that are operators or modifiers, never metric names (PromQL keywords are case-insensitive).
_KEYWORDS = frozenset({"and", "or", "unless", "atan2", "bool", "offset", "start", "end"})
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_AGGREGATORS = frozenset({
    "sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "limitk", "limit_ratio",
})
_NUMBER_WORDS = frozenset({"inf", "nan"})

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[^\]]*\]\])
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:[a-zA-Z][a-zA-Z0-9]*)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}\[\]@])
""", re.VERBOSE)


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    pos: int


def _tokenize(expr: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise UnsupportedQuery(f"cannot read {expr[pos:pos + 20]!r} at {pos} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind not in ("space", "comment"):
            tokens.append(_Tok(kind, match.group(), pos))
        pos = match.end()
    return tokens


def _skip_brackets(tokens: list[_Tok], i: int) -> int:
    """``tokens[i]`` is ``[``: the index after the matching ``]`` (a range or subquery: durations
    and Grafana variables, nothing that names a metric)."""
    depth = 0
    for j in range(i, len(tokens)):
        if tokens[j].text == "[":
            depth += 1
        elif tokens[j].text == "]":
            depth -= 1
            if depth == 0:
                return j + 1
    raise UnsupportedQuery("unbalanced [ ]")


def _label_list(tokens: list[_Tok], i: int) -> tuple[list[str], int]:
    """``tokens[i]`` is ``(`` after a grouping keyword: its label names and the index after ``)``."""
    labels: list[str] = []
    j = i + 1
    while j < len(tokens) and tokens[j].text != ")":
        if tokens[j].kind == "ident":
            labels.append(tokens[j].text)
        elif tokens[j].text != ",":
            raise UnsupportedQuery(f"unexpected {tokens[j].text!r} in a label list")
        j += 1
    if j == len(tokens):
        raise UnsupportedQuery("unbalanced ( ) in a label list")
    return labels, j + 1


def _matchers(tokens: list[_Tok], i: int) -> tuple[str | None, list[str], int]:
    """``tokens[i]`` is ``{``: the metric name given by a ``__name__="..."`` matcher (if any), the
    other label names, and the index after ``}``."""
    name: str | None = None
    labels: list[str] = []
    j = i + 1
    while j < len(tokens) and tokens[j].text != "}":
        tok = tokens[j]
        if tok.text == ",":
            j += 1
            continue
        if tok.kind != "ident" or j + 2 >= len(tokens):
            raise UnsupportedQuery(f"unexpected {tok.text!r} in label matchers")
        op, value = tokens[j + 1], tokens[j + 2]
        if op.text not in ("=", "!=", "=~", "!~") or value.kind not in ("string", "variable"):
            raise UnsupportedQuery(f"unexpected matcher {tok.text}{op.text}{value.text}")
        if tok.text == "__name__":
            if op.text != "=" or value.kind != "string":
                raise UnsupportedQuery(f"metric names chosen by {tok.text}{op.text}{value.text} cannot be checked")
            name = value.text[1:-1]
        else:
            labels.append(tok.text)
        j += 3
    if j == len(tokens):
        raise UnsupportedQuery("unbalanced { }")
    return name, labels, j + 1


def references(expr: str) -> References:
    """The selectors and grouping labels of ``expr`` (PromQL, possibly with Grafana variables)."""
    tokens = _tokenize(expr)
    depth = 0  # unbalanced parentheses would shift what follows a keyword; refuse rather than guess
    for tok in tokens:
        depth += {"(": 1, ")": -1}.get(tok.text, 0)
        if depth < 0:
            break
    if depth != 0:
        raise UnsupportedQuery(f"unbalanced ( ) in {expr!r}")
    selectors: list[Selector] = []
    grouping: set[str] = set()
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if tok.text == "[":
            i = _skip_brackets(tokens, i)
            continue
        if tok.text == "{":  # a selector by labels only: {__name__="x"} or {job="..."}
            name, labels, i = _matchers(tokens, i)
            selectors.append(Selector(name, tuple(labels)))
            continue
        if tok.kind != "ident":
            i += 1
            continue
        word = tok.text.lower()
        if word in _GROUPING:
            if nxt is not None and nxt.text == "(":
                labels, i = _label_list(tokens, i + 1)
                grouping.update(labels)
            else:  # group_left/group_right without a label list
                i += 1
            continue
        if word == "offset":
            i += 2 if nxt is not None and nxt.text != "-" else 3  # offset [-]<duration>
            continue
        if word in _KEYWORDS or word in _NUMBER_WORDS:
            i += 1
            continue
        if nxt is not None and nxt.text == "(":  # a function call
            i += 1
            continue
        if word in _AGGREGATORS and nxt is not None and nxt.text.lower() in ("by", "without"):
            i += 1
            continue
        # anything else is a metric name, optionally followed by matchers
        if nxt is not None and nxt.text == "{":
            name, labels, i = _matchers(tokens, i + 1)
            if name is not None:
                raise UnsupportedQuery(f"{tok.text} has a __name__ matcher as well")
            selectors.append(Selector(tok.text, tuple(labels)))
        else:
            selectors.append(Selector(tok.text, ()))
            i += 1
    return References(tuple(selectors), frozenset(grouping))


_LABEL_VALUES = re.compile(r"^\s*label_values\s*\((?P<args>.*)\)\s*$", re.DOTALL)
_QUERY_RESULT = re.compile(r"^\s*query_result\s*\((?P<expr>.*)\)\s*$", re.DOTALL)
_LABEL_NAMES = re.compile(r"^\s*label_names\s*\((?P<expr>.*)\)\s*$", re.DOTALL)


def grafana_variable_exprs(query: str) -> list[str]:
    """The PromQL expressions inside a Grafana Prometheus variable query: ``label_values(label)``
    (none), ``label_values(expr, label)`` (expr), ``label_names([expr])``, ``query_result(expr)``.
    ``metrics(regex)`` and unknown forms raise :class:`UnsupportedQuery`."""
    if match := _LABEL_VALUES.match(query):
        args = match.group("args")
        # the label is the last argument; the expression before it may contain commas
        expr, comma, label = args.rpartition(",")
        if not comma:
            return []
        if not re.fullmatch(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*", label):
            raise UnsupportedQuery(f"label_values: {label.strip()!r} is not a label name")
        return [expr.strip()]
    if match := _QUERY_RESULT.match(query):
        return [match.group("expr").strip()]
    if match := _LABEL_NAMES.match(query):
        expr = match.group("expr").strip()
        return [expr] if expr else []
    raise UnsupportedQuery(f"unsupported Grafana variable query {query!r}")


_GRAFANA_DURATIONS = {
    "__rate_interval": "1m", "__interval": "15s", "__range": "1h",
    "__rate_interval_ms": "60000", "__interval_ms": "15000", "__range_ms": "3600000", "__range_s": "3600",
}


def substitute_grafana_variables(expr: str) -> str:
    """``expr`` with Grafana's variables replaced by typical values, so that a PromQL parser can
    check it: built-in durations by durations, time bounds by numbers, other variables (used in
    label matchers) by ``.*``."""

    def value(name: str) -> str:
        name = name.split(":", 1)[0]  # ${var:format}
        if name in _GRAFANA_DURATIONS:
            return _GRAFANA_DURATIONS[name]
        if name in ("__from", "__to"):
            return "0"
        return ".*"

    expr = re.sub(r"\$\{([^}]*)\}", lambda m: value(m.group(1)), expr)
    expr = re.sub(r"\[\[([^\]]*)\]\]", lambda m: value(m.group(1)), expr)
    return re.sub(r"\$([A-Za-z_][A-Za-z0-9_]*)", lambda m: value(m.group(1)), expr)


def level_labels(record: str) -> frozenset[str]:
    """The labels a recording rule named level:metric:operations keeps, read from its level
    (``run_rank`` -> {run, rank}); the contract's label names contain no underscore."""
    level = record.split(":", 1)[0]
    return frozenset(level.split("_")) if level else frozenset()


def _contract_labels() -> dict[str, frozenset[str]]:
    labels: dict[str, frozenset[str]] = {}
    for spec in metrics.ALL_METRICS:
        for series in spec.series_names():
            extra = {"le"} if series.endswith("_bucket") and spec.kind == "histogram" else set()
            labels[series] = frozenset(spec.labels) | extra
    return labels


def contract_problems(expr: str, recorded: Mapping[str, Set[str]] | None = None) -> list[str]:
    """What in ``expr`` is not in the metric contract (monitoring/metrics.py), as messages: metric
    names that are neither exported series nor in ``recorded`` (recording-rule name -> its labels),
    matcher labels the metric does not have, and by/without/on/ignoring labels that none of the
    expression's metrics has. Labels added at scrape time (SCRAPE_LABELS) are always allowed."""
    known = _contract_labels()
    known.update({name: frozenset(labels) for name, labels in (recorded or {}).items()})
    refs = references(expr)
    problems: list[str] = []
    available: set[str] = set(SCRAPE_LABELS)
    all_known = True
    for selector in refs.selectors:
        if selector.metric is None:
            problems.append(f"selector without a metric name ({', '.join(selector.labels)})")
            all_known = False
        elif selector.metric not in known:
            problems.append(f"unknown metric {selector.metric}")
            all_known = False
        else:
            allowed = known[selector.metric] | SCRAPE_LABELS
            available |= allowed
            problems += [f"{selector.metric} has no label {label}"
                         for label in selector.labels if label not in allowed]
    if all_known:  # with an unknown metric, which labels exist is unknown too
        problems += [f"no metric of the expression has label {label}"
                     for label in sorted(refs.grouping_labels - available)]
    return problems
