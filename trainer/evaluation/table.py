"""The text tables of results: recall rows (with the folds of ``1k-5fold``), then CxC and ECCV
Caption rows in tables of their own (:func:`format_table`), and the table of one checkpoint's
evaluation, its dev row and a row per test protocol (:func:`results_table`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trainer.evaluation.metrics import METRIC_KEYS, RECALL_KS

_TABLE_COLUMNS = (
    ("R@1", "r1", "{:6.2f}"),
    ("R@5", "r5", "{:6.2f}"),
    ("R@10", "r10", "{:6.2f}"),
    ("medr", "medr", "{:7.1f}"),
    ("meanr", "meanr", "{:8.2f}"),
)


def _table_row(label: str, metrics: dict[str, Any], label_width: int) -> str:
    cells = []
    for direction in ("i2t", "t2i"):
        cells.append(" ".join(fmt.format(metrics[f"{direction}_{key}"]) for _, key, fmt in _TABLE_COLUMNS))
    return f"{label:<{label_width}} | {cells[0]} | {cells[1]} | {metrics['rsum']:7.2f}"


_ECCV_COLUMNS = (("mAP@R", "map_at_r"), ("R-P", "rprecision"), ("R@1", "r1"))


def _is_recall_row(metrics: dict[str, Any]) -> bool:
    return all(key in metrics for key in METRIC_KEYS)


def _annotated_table(rows: list[tuple[str, dict[str, Any]]], columns: Sequence[tuple[str, str]],
                     label_width: int, title: str) -> list[str]:
    cell = "{:6.2f}"
    headers = " ".join(f"{name:>6}" for name, _ in columns)
    width = len(headers)
    lines = [
        f"{'':<{label_width}} | {'image-to-text':^{width}} | {'text-to-image':^{width}} |",
        f"{title:<{label_width}} | {headers} | {headers} |",
    ]
    lines.append("-" * len(lines[1]))
    for label, metrics in rows:
        cells = [" ".join(cell.format(metrics[f"{d}_{key}"]) for _, key in columns) for d in ("i2t", "t2i")]
        lines.append(f"{label:<{label_width}} | {cells[0]} | {cells[1]} |")
    return lines


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A readable text table of results keyed by protocol (or any row label); ``1k-5fold`` also
    lists its folds. Rows of ECCV Caption metrics (mAP@R, R-Precision, R@1) and of CxC recalls
    (R@1/5/10 only) follow in tables of their own, recognised by their keys."""
    recall_rows = {label: m for label, m in results.items() if _is_recall_row(m)}
    eccv_rows = [(label, m) for label, m in results.items() if "i2t_map_at_r" in m]
    cxc_rows = [(label, m) for label, m in results.items()
                if label not in recall_rows and "i2t_map_at_r" not in m and "i2t_r10" in m]
    labels = list(results)
    for protocol, metrics in recall_rows.items():
        labels += [f"  fold {k}" for k in range(len(metrics.get("folds", [])))]
    label_width = max([len("protocol")] + [len(label) for label in labels])
    lines: list[str] = []
    if recall_rows:
        widths = [len(fmt.format(0.0)) for _, _, fmt in _TABLE_COLUMNS]
        headers = " ".join(f"{name:>{width}}" for (name, _, _), width in zip(_TABLE_COLUMNS, widths))
        block_width = len(headers)
        lines += [
            f"{'':<{label_width}} | {'image-to-text':^{block_width}} | {'text-to-image':^{block_width}} |",
            f"{'protocol':<{label_width}} | {headers} | {headers} | {'rsum':>7}",
        ]
        lines.append("-" * len(lines[1]))
        for protocol, metrics in recall_rows.items():
            lines.append(_table_row(protocol, metrics, label_width))
            for k, fold in enumerate(metrics.get("folds", [])):
                lines.append(_table_row(f"  fold {k}", fold, label_width))
    if cxc_rows:
        if lines:
            lines.append("")
        lines += _annotated_table(cxc_rows, [(f"R@{k}", f"r{k}") for k in RECALL_KS], label_width, "CxC")
    if eccv_rows:
        if lines:
            lines.append("")
        lines += _annotated_table(eccv_rows, _ECCV_COLUMNS, label_width, "ECCV")
    return "\n".join(lines)


def results_table(payload: Mapping[str, Any]) -> str:
    """The recall table of one checkpoint's evaluation (a metrics.json payload, docs/run_layout.md):
    the dev row, then one row per test protocol (ECCV Caption and CxC, when evaluated, in tables
    of their own below it)."""
    rows: dict[str, dict[str, Any]] = {}
    if payload.get("dev") is not None:
        rows[f"dev (all, {payload['data']['dev_images']} images)"] = payload["dev"]
    for protocol, metrics in payload.get("test", {}).items():
        rows[f"test {protocol}"] = metrics
    return format_table(rows) if rows else "(no metrics)"
