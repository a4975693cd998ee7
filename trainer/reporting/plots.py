"""The report's figures (PNG, matplotlib): losses and learning rate, throughput and data wait,
the hard-negative diagnostics by logging interval (from the step log), and recall and rsum by
checkpoint (from the evaluations).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede the pyplot import

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from trainer.evaluation import RECALL_KS
from trainer.reporting.reading import CheckpointInfo, Run
from trainer.run.step_log import (
    ACTIVE_FIELD,
    DIRECTIONS,
    GAP_MEAN_FIELD,
    GAP_P10_FIELD,
    REMOTE_FIELD,
    StepSeries,
)

__all__ = ["DIAGNOSTICS_PNG", "FIGSIZE", "LOSSES_PNG", "PLOT_FILES", "RECALL_PNG", "THROUGHPUT_PNG",
           "plot_diagnostics", "plot_losses", "plot_recall", "plot_throughput", "rolling_mean",
           "segmented_rolling_mean", "smoothing_window"]

logger = logging.getLogger("trainer.report")

LOSSES_PNG = "losses.png"
THROUGHPUT_PNG = "throughput.png"
DIAGNOSTICS_PNG = "diagnostics.png"
RECALL_PNG = "recall.png"
PLOT_FILES = (LOSSES_PNG, THROUGHPUT_PNG, DIAGNOSTICS_PNG, RECALL_PNG)
FIGSIZE = (9.0, 6.0)


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` values; the first values average what exists so far."""
    if window <= 1 or values.size == 0:
        return values.astype(float)
    sums = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def segmented_rolling_mean(values: np.ndarray, window: int, segments: np.ndarray) -> np.ndarray:
    """:func:`rolling_mean` restarted wherever ``segments`` changes value: L_M with hardest
    negatives is a different sum than with all negatives, so no mean may span the switch."""
    result = np.empty(values.size, dtype=float)
    bounds = [0, *(np.nonzero(np.diff(segments.astype(int)) != 0)[0] + 1).tolist(), values.size]
    for start, end in itertools.pairwise(bounds):
        result[start:end] = rolling_mean(values[start:end], window)
    return result


def smoothing_window(count: int) -> int:
    """About 5 % of the run, between 1 and 50 steps: visible trends without hiding epochs."""
    return max(1, min(50, count // 20))


def _epoch_starts(steps: StepSeries) -> list[int]:
    """Steps that begin a new epoch (not the first epoch logged)."""
    changes = np.nonzero(np.diff(steps.epoch) != 0)[0] + 1
    return [int(steps.step[i]) for i in changes]


def _mark_epochs(axes: Sequence[Axes], starts: Sequence[int]) -> None:
    for ax in axes:
        for step in starts:
            ax.axvline(step - 0.5, color="0.6", linewidth=0.6, alpha=0.5, zorder=0)


def _log_scale_if_wide(ax: Axes, values: np.ndarray) -> None:
    """Log scale when the values are positive and span more than a factor 20 (loss drops, lr decays)."""
    positive = values[np.isfinite(values)]
    if positive.size and positive.min() > 0 and positive.max() / positive.min() > 20:
        ax.set_yscale("log")


def _save(figure: Figure, path: Path, dpi: int) -> Path:
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    logger.info("wrote %s", path)
    return path


def plot_losses(steps: StepSeries, path: Path, dpi: int) -> Path:
    window = smoothing_window(len(steps))
    figure, (loss_ax, lr_ax) = plt.subplots(2, 1, sharex=True, figsize=FIGSIZE,
                                            gridspec_kw={"height_ratios": [3, 1]}, layout="constrained")
    for values, label, color in ((steps.loss, "total", "black"), (steps.loss_matching, "L_M (matching)", "tab:blue"),
                                 (steps.loss_caption, "L_G (caption)", "tab:orange")):
        loss_ax.plot(steps.step, values, color=color, alpha=0.2, linewidth=0.7)
        loss_ax.plot(steps.step, segmented_rolling_mean(values, window, steps.hardest_negatives), color=color,
                     linewidth=1.4, label=label)
    _log_scale_if_wide(loss_ax, np.concatenate([steps.loss, steps.loss_matching, steps.loss_caption]))
    switch = np.nonzero(steps.hardest_negatives)[0]
    if switch.size and switch[0] > 0:  # the hardest-negative warm-up ended inside the logged range
        loss_ax.axvline(steps.step[switch[0]] - 0.5, color="tab:red", linestyle="--", linewidth=0.8,
                        label="hardest negatives from here")
    loss_ax.set_ylabel("loss per step")
    loss_ax.set_title(f"Losses (lines: rolling mean over {window} steps; faint: per step)")
    loss_ax.legend(loc="upper right", fontsize="small")
    lr_ax.plot(steps.step, steps.lr, color="tab:green", linewidth=1.2, drawstyle="steps-post")
    _log_scale_if_wide(lr_ax, steps.lr)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step (grey lines: epoch boundaries)")
    _mark_epochs((loss_ax, lr_ax), _epoch_starts(steps))
    return _save(figure, path, dpi)


def plot_throughput(steps: StepSeries, path: Path, dpi: int) -> Path:
    window = smoothing_window(len(steps))
    figure, (rate_ax, wait_ax) = plt.subplots(2, 1, sharex=True, figsize=FIGSIZE, layout="constrained")
    rate_ax.plot(steps.step, steps.samples_per_s, color="tab:blue", alpha=0.25, linewidth=0.7)
    rate_ax.plot(steps.step, rolling_mean(steps.samples_per_s, window), color="tab:blue", linewidth=1.4)
    rate_ax.set_ylabel("samples/s")
    rate_ax.set_ylim(bottom=0)
    rate_ax.set_title(f"Throughput and data wait (lines: rolling mean over {window} steps; faint: per step)")
    wait_ms = 1000.0 * steps.data_wait_s
    wait_ax.plot(steps.step, wait_ms, color="tab:purple", alpha=0.25, linewidth=0.7)
    wait_ax.plot(steps.step, rolling_mean(wait_ms, window), color="tab:purple", linewidth=1.4)
    wait_ax.set_ylabel("data wait (ms/step)")
    wait_ax.set_ylim(bottom=0)
    wait_ax.set_xlabel("step (grey lines: epoch boundaries)")
    _mark_epochs((rate_ax, wait_ax), _epoch_starts(steps))
    return _save(figure, path, dpi)


def plot_diagnostics(steps: StepSeries, margin: float | None, path: Path, dpi: int) -> Path | None:
    """Hard-negative gaps, active hinges and remote hardest negatives by logging interval; None when
    the step log carries no diagnostics (written before they existed)."""
    if not steps.has_diagnostics:
        return None
    rows = steps.diagnostic_rows
    x = steps.step[rows]
    figure, (gap_ax, ratio_ax) = plt.subplots(2, 1, sharex=True, figsize=FIGSIZE, layout="constrained")
    colors = {"i2t": "tab:blue", "t2i": "tab:orange"}
    for direction in DIRECTIONS:
        gap_ax.plot(x, steps.diagnostics[GAP_MEAN_FIELD.format(direction=direction)][rows], color=colors[direction], marker="o",
                    markersize=2, linewidth=1.2, label=f"{direction} mean")
        gap_ax.plot(x, steps.diagnostics[GAP_P10_FIELD.format(direction=direction)][rows], color=colors[direction], linestyle="--",
                    linewidth=1.0, label=f"{direction} 10th percentile")
    gap_ax.axhline(0.0, color="0.3", linewidth=0.8)
    if margin is not None:
        gap_ax.axhline(margin, color="tab:green", linestyle=":", linewidth=1.0,
                       label=f"margin {margin:g} (below: hinge active)")
    gap_ax.set_ylabel("positive - hardest negative")
    gap_ax.set_title("Hard negatives per logging interval (i2t: image anchors, t2i: caption anchors)")
    gap_ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="x-small")
    ratio_ax.plot(x, 100 * steps.diagnostics[ACTIVE_FIELD][rows], color="black", marker="o", markersize=2,
                  linewidth=1.2, label="active hinges")
    ratio_ax.plot(x, 100 * steps.diagnostics[REMOTE_FIELD][rows], color="tab:purple", linewidth=1.0,
                  label="hardest negative from another worker")
    ratio_ax.set_ylim(-2, 102)
    ratio_ax.set_ylabel("% per interval")
    ratio_ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="x-small")
    switch = np.nonzero(steps.hardest_negatives)[0]
    collapsed = x[steps.collapsed[rows]]
    for ax in (gap_ax, ratio_ax):
        if switch.size and switch[0] > 0:
            ax.axvline(steps.step[switch[0]] - 0.5, color="tab:red", linestyle="--", linewidth=0.8)
        for step in collapsed:  # intervals the collapse detector flagged
            ax.axvline(step, color="tab:red", linewidth=2.0, alpha=0.25)
    ratio_ax.set_xlabel("step (red dashes: hardest negatives from here; red bands: collapse detected; "
                        "grey lines: epochs)")
    _mark_epochs((gap_ax, ratio_ax), _epoch_starts(steps))
    return _save(figure, path, dpi)


def plot_recall(run: Run, best: CheckpointInfo | None, path: Path, dpi: int) -> Path | None:
    """Recalls per test protocol and rsums by checkpoint step; None when nothing is evaluated."""
    evaluated = [c for c in run.evaluated() if c.step is not None]
    if not evaluated:
        return None
    protocols = run.protocols()
    figure, axes = plt.subplots(len(protocols) + 1, 1, sharex=True, squeeze=False,
                                figsize=(FIGSIZE[0], 2.6 * (len(protocols) + 1)), layout="constrained")
    colors = {1: "tab:blue", 5: "tab:orange", 10: "tab:green"}
    for ax, protocol in zip(axes[:-1, 0], protocols):
        points = [(c.step, c.test(protocol)) for c in evaluated if c.test(protocol) is not None]
        xs = [step for step, _ in points]
        for k in RECALL_KS:
            for direction, style, marker in (("i2t", "-", "o"), ("t2i", "--", "s")):
                ax.plot(xs, [m[f"{direction}_r{k}"] for _, m in points], linestyle=style, marker=marker,
                        markersize=3, color=colors[k], label=f"{direction} R@{k}")
        ax.set_ylabel("recall (%)")
        ax.set_title(f"test {protocol} (solid: image-to-text, dashed: text-to-image)", fontsize="medium")
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="x-small")
    rsum_ax = axes[-1, 0]
    dev = [(c.step, c.dev_rsum) for c in evaluated if c.dev_rsum is not None]
    if dev:
        rsum_ax.plot([s for s, _ in dev], [r for _, r in dev], marker="o", markersize=3, color="black",
                     label="dev rsum")
    for protocol in protocols:
        points = [(c.step, c.test(protocol)) for c in evaluated if c.test(protocol) is not None]
        rsum_ax.plot([s for s, _ in points], [float(m["rsum"]) for _, m in points], marker="s", markersize=3,
                     linestyle="--", label=f"test {protocol} rsum")
    if best is not None and best.step is not None:
        for ax in axes[:, 0]:
            ax.axvline(best.step, color="tab:red", linewidth=0.8, alpha=0.6)
        if best.dev_rsum is not None:
            rsum_ax.plot([best.step], [best.dev_rsum], marker="*", markersize=12, color="tab:red", linestyle="",
                         label=f"best (step {best.step})")
    if run.steps is not None and len(run.steps) > 0:  # the training's whole step range, as the other plots
        rsum_ax.set_xlim(0, max(int(run.steps.step[-1]), max(c.step or 0 for c in evaluated)) * 1.02)
    rsum_ax.set_ylabel("rsum")
    rsum_ax.set_xlabel("checkpoint step (red line: best checkpoint by dev rsum)")
    rsum_ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="x-small")
    return _save(figure, path, dpi)
