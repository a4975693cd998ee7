"""summary.md, the report's text: the run's configuration highlights, its training (steps,
wall time, throughput, final losses, the last hard-negative diagnostics and the collapse
detector), the best checkpoint's recall table and qualitative page, every checkpoint, the plots.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from data_shards.storage import open_location
from trainer.evaluation import results_table
from trainer.reporting.plots import DIAGNOSTICS_PNG, LOSSES_PNG, RECALL_PNG, THROUGHPUT_PNG, smoothing_window
from trainer.reporting.reading import CheckpointInfo, Run
from trainer.run.layout import CONFIG_YAML, ERROR_FILE, EVALUATIONS_FILE, QUALITATIVE_DIR, QUALITATIVE_FILE, utc_now
from trainer.run.records import EvaluationRecord
from trainer.run.step_log import ACTIVE_FIELD, DIRECTIONS, GAP_MEAN_FIELD, GAP_P10_FIELD, REMOTE_FIELD, StepSeries

__all__ = ["SUMMARY_MD", "copy_qualitative_page", "write_summary"]

logger = logging.getLogger("trainer.report")

SUMMARY_MD = "summary.md"

# (section, key, label) of the configuration shown in the summary.
CONFIG_HIGHLIGHTS = (
    ("model", "embed_size", "embedding size"),
    ("model", "num_reasoning_layers", "reasoning layers"),
    ("model", "aggregation", "aggregation"),
    ("model", "caption_loss_weight", "caption loss weight (lambda)"),
    ("data", "train", "train shards"),
    ("data", "dev", "dev shards"),
    ("data", "test", "test shards"),
    ("optim", "epochs", "epochs"),
    ("optim", "global_batch_size", "global batch size"),
    ("optim", "learning_rate", "learning rate"),
    ("optim", "lr_decay_every_epochs", "lr decay every (epochs)"),
    ("optim", "warmup_epochs", "all-negatives warm-up (epochs)"),
    ("optim", "warmup_steps", "all-negatives warm-up (steps)"),
    ("optim", "margin", "hinge margin"),
    ("monitoring", "collapse_intervals", "collapse detector (logging intervals, 0: off)"),
    ("distributed", "workers", "workers"),
    ("distributed", "use_gpu", "GPUs"),
    ("distributed", "precision", "precision"),
    ("distributed", "zero_stage", "ZeRO stage"),
    ("checkpoint", "every_steps", "checkpoint every (steps, 0: per epoch)"),
    ("checkpoint", "keep_last", "checkpoints kept"),
    ("eval", "test_protocols", "test protocols"),
    ("eval", "dev_images", "dev images"),
)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _config_section(run: Run) -> list[str]:
    if run.config is None:
        return ["Not available (see above)."]
    lines = ["| setting | value |", "| --- | --- |"]
    for section, key, label in CONFIG_HIGHLIGHTS:
        value = run.config_value(section, key)
        if value is None:
            continue
        shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        lines.append(f"| {label} (`{section}.{key}`) | {shown} |")
    return lines


def _training_section(run: Run) -> list[str]:
    steps = run.steps
    if steps is None or len(steps) == 0:
        return ["No steps logged."]
    epochs_configured = run.config_value("optim", "epochs")
    first_epoch, last_epoch = int(steps.epoch.min()), int(steps.epoch.max())
    seconds = steps.step_time_s + steps.data_wait_s
    # The first record's time marks the end of its step: the run started one step duration before.
    wall = float(steps.time[-1] - (steps.time[0] - seconds[0]))
    samples = float(steps.samples.sum())
    tail = smoothing_window(len(steps))
    lines = [
        f"- steps logged: {len(steps)} (steps {int(steps.step[0])}-{int(steps.step[-1])})",
        f"- epochs reached: {first_epoch}-{last_epoch} (0-based), i.e. {last_epoch + 1}"
        + (f" of {epochs_configured} configured" if epochs_configured is not None else ""),
        f"- training wall time: {wall:.1f} s (start of the first logged step to the end of the last)",
        (f"- mean throughput: {samples / max(float(seconds.sum()), 1e-9):.1f} samples/s "
         f"({samples:.0f} samples in {float(seconds.sum()):.1f} s of steps); data wait "
         f"{1000 * float(steps.data_wait_s.mean()):.1f} ms/step "
         f"({100 * float(steps.data_wait_s.sum()) / max(float(seconds.sum()), 1e-9):.1f} % of step time)"),
        (f"- final losses (last step; mean of the last {tail} steps): "
         f"L_M {steps.loss_matching[-1]:.4f} ({steps.loss_matching[-tail:].mean():.4f}), "
         f"L_G {steps.loss_caption[-1]:.4f} ({steps.loss_caption[-tail:].mean():.4f}), "
         f"total {steps.loss[-1]:.4f} ({steps.loss[-tail:].mean():.4f})"),
        f"- final learning rate: {steps.lr[-1]:.3g}",
    ]
    if run.is_s3:
        lines.append("- on s3:// the step log is uploaded at each checkpoint: steps after the last checkpoint "
                     "are not in it yet")
    lines += _diagnostics_lines(steps)
    return lines


def _diagnostics_lines(steps: StepSeries) -> list[str]:
    """The summary's lines on the hard-negative diagnostics and the collapse detector."""
    if not steps.has_diagnostics:
        return []
    last = int(steps.diagnostic_rows[-1])
    d = {key: (float(column[last]) if np.isfinite(column[last]) else None) for key, column in steps.diagnostics.items()}
    gaps = ", ".join(f"{direction} {_fmt(d[GAP_MEAN_FIELD.format(direction=direction)], 3)} / "
                     f"{_fmt(d[GAP_P10_FIELD.format(direction=direction)], 3)}" for direction in DIRECTIONS)
    active, remote = d[ACTIVE_FIELD], d[REMOTE_FIELD]
    lines = [(f"- hard negatives, last logging interval (step {int(steps.step[last])}): gap positive - hardest "
              f"negative (mean / 10th percentile) {gaps}; active hinges "
              f"{_fmt(None if active is None else 100 * active, 1)} %; hardest negatives from other workers "
              f"{_fmt(None if remote is None else 100 * remote, 1)} %")]
    flagged = steps.step[steps.collapsed]
    if flagged.size:
        lines.append(f"- **collapse detected** (L_M at 2 x global batch x margin under hardest negatives) at "
                     f"{flagged.size} logging interval(s), first at step {int(flagged[0])}, last at step "
                     f"{int(flagged[-1])}: try a longer all-negatives warm-up or a lower learning rate "
                     f"(docs/operations.md, \"Collapse\")")
    else:
        lines.append("- collapse detector: did not trip")
    return lines


def copy_qualitative_page(run: Run, best: CheckpointInfo | None, output: Path,
                          storage_options: Mapping[str, Any] | None) -> str | None:
    """Copy the best checkpoint's qualitative page (qualitative.md and its PNGs,
    trainer/inference/qualitative.py) into ``output``, so the report links it with the same relative
    paths; returns where it came from, or None when the checkpoint has none (evaluated without
    eval.qualitative_queries, pruned)."""
    stale = output / QUALITATIVE_DIR
    if stale.is_dir():
        shutil.rmtree(stale)  # an earlier report's figures: never show another checkpoint's
    (output / QUALITATIVE_FILE).unlink(missing_ok=True)
    if best is None or best.pruned:
        return None
    checkpoint = open_location(run.url, storage_options).child(best.name)
    try:
        page = checkpoint.read_bytes(QUALITATIVE_FILE)
    except FileNotFoundError:
        return None
    figures = checkpoint.child(QUALITATIVE_DIR)
    (output / QUALITATIVE_DIR).mkdir(parents=True, exist_ok=True)
    for name in figures.list(".png"):
        (output / QUALITATIVE_DIR / name).write_bytes(figures.read_bytes(name))
    (output / QUALITATIVE_FILE).write_bytes(page)
    return checkpoint.child_url(QUALITATIVE_FILE)


def _best_section(best: CheckpointInfo | None, record: EvaluationRecord | None, source: str,
                  qualitative: str | None = None) -> list[str]:
    if record is None:
        return ["No checkpoint with a dev rsum yet: no best checkpoint."]
    lines = [(f"`{record.name}` (step {record.step}, epoch {record.epoch}): dev rsum "
              f"**{_fmt(record.dev_rsum)}** (chosen by: {source})"), "",
             "```text", results_table(record.to_metrics_json()), "```"]
    for protocol, reason in (record.skipped or {}).items():
        lines.append(f"- test protocol `{protocol}` skipped: {reason}")
    if qualitative is not None:
        lines += ["", f"Qualitative results (top-3 retrievals and attention maps of fixed test queries): "
                      f"[{QUALITATIVE_FILE}]({QUALITATIVE_FILE}), copied from `{qualitative}`."]
    else:
        lines += ["", "No qualitative page for this checkpoint (`eval.qualitative_queries` 0, or not written)."]
    return lines


def _checkpoints_section(run: Run, best: CheckpointInfo | None) -> list[str]:
    if not run.checkpoints and not run.incomplete:
        return ["No checkpoints yet."]
    protocols = run.protocols()
    header = "| checkpoint | step | epoch | dev rsum | " + " | ".join(f"test {p} rsum" for p in protocols) \
        + (" | " if protocols else "") + "evaluation |"
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for checkpoint in run.checkpoints:
        if checkpoint.metrics is not None:
            status = "**best**" if best is not None and checkpoint.name == best.name else "evaluated"
            if checkpoint.pruned:
                status += f" (pruned; from {EVALUATIONS_FILE})"
        elif checkpoint.error is not None:
            status = "failed: " + checkpoint.error.splitlines()[0].replace("|", "\\|")[:200]
        else:
            status = "not evaluated yet"
        tests = [_fmt(float(m["rsum"])) if (m := checkpoint.test(p)) is not None else "n/a" for p in protocols]
        lines.append(f"| `{checkpoint.name}` | {checkpoint.step} | {checkpoint.epoch} | {_fmt(checkpoint.dev_rsum)} | "
                     + "".join(f"{t} | " for t in tests) + f"{status} |")
    for name in run.incomplete:
        lines.append(f"| `{name}` | | | n/a | " + "n/a | " * len(protocols)
                     + "incomplete (no readable train_state.json) |")
    keep_last = run.config_value("checkpoint", "keep_last")
    if keep_last is not None:
        lines += ["", (f"Pruning deletes evaluated checkpoints beyond the newest {keep_last} (`checkpoint.keep_last`) "
                       f"and keeps the best; the pruned ones are listed from {EVALUATIONS_FILE}.")]
    return lines


def write_summary(run: Run, best: CheckpointInfo | None, best_payload: EvaluationRecord | None, best_source: str,
                  plots: Mapping[str, Path | None], path: Path, qualitative: str | None = None) -> Path:
    titles = {LOSSES_PNG: "Losses and learning rate", THROUGHPUT_PNG: "Throughput and data wait",
              DIAGNOSTICS_PNG: "Hard-negative diagnostics", RECALL_PNG: "Recall and rsum by checkpoint"}
    notes = list(run.notes)
    if run.config_value("eval", "enabled") is False:
        notes.append("evaluation is disabled in this run (`eval.enabled: false`)")
    failed = [c for c in run.checkpoints if c.error is not None]
    if failed:
        notes.append(f"evaluation failed for {len(failed)} checkpoint(s) ({', '.join(c.name for c in failed)}); "
                     f"see their {ERROR_FILE}")
    pending = [c for c in run.checkpoints if c.metrics is None and c.error is None]
    if pending:
        notes.append(f"{len(pending)} checkpoint(s) not evaluated yet ({', '.join(c.name for c in pending)})")
    if not run.evaluated():
        notes.append("no evaluated checkpoint: recall plot and best-checkpoint table not produced")
    if run.incomplete:
        notes.append(f"incomplete checkpoint(s) being written or abandoned: {', '.join(run.incomplete)}")
    lines = [f"# Run report: {run.name}", "",
             f"Run directory: `{run.url}`  ",
             (f"Report written {utc_now()} "
              f"by `trainer/report.py`."), ""]
    if notes:
        lines += ["## Missing or incomplete", ""] + [f"- {note}" for note in notes] + [""]
    lines += ["## Configuration", "", f"From `{CONFIG_YAML}` (the resolved configuration of the run).", ""]
    lines += _config_section(run) + ["", "## Training", ""] + _training_section(run)
    lines += ["", "## Best checkpoint", ""] + _best_section(best, best_payload, best_source, qualitative)
    lines += ["", "## Checkpoints", ""] + _checkpoints_section(run, best)
    lines += ["", "## Plots", ""]
    for name, written in plots.items():
        if written is None:
            lines.append(f"- {titles[name]}: not produced (see above)")
        else:
            lines += [f"- [{titles[name]}]({written.name})", "", f"  ![{titles[name]}]({written.name})", ""]
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    logger.info("wrote %s", path)
    return path
