"""Hard-negative diagnostics per logging interval, and the collapse detector.

With hardest negatives mined over a global batch, training can fall into the trivial solution:
every embedding alike, every positive score equal to every negative score, so every hinge is
active at exactly the margin and L_M = 2 * B * margin (B the global batch: one hinge per image query
and one per caption query; VSE++ issue #27 and its duplicates: "the loss stays at 51.2" for B = 128,
margin 0.2). Recall then stays flat for hours before anyone notices. This module turns the loss's own
per-step :class:`model.loss.HardNegativeStats` into one summary per logging interval and watches L_M.

* :class:`HardNegativeInterval` keeps a rank's stats of the steps since the last progress line as
  device tensors (no host sync per step) and, at the logging step, gathers all ranks' values in one
  collective (with the trainer's losses of the interval riding along) and brings the summary to the
  host once: the numbers describe the GLOBAL batch, so they do not depend on the worker count (like
  the logged losses).
* :class:`HardNegativeSummary`: per direction (i2t: image anchor vs its hardest caption; t2i:
  caption anchor vs its hardest image) the mean and 10th percentile of (positive score - hardest
  negative score); the fraction of active hinges among those the loss sums (one per query under
  hardest negatives, one per (query, negative) pair during the all-negatives warm-up); the share of
  hardest negatives found in another worker's part of the global batch (about (W - 1) / W when they
  are spread evenly; always 0 with one worker).
* :class:`CollapseDetector`: collapsed when the interval mean of L_M stays within ``tolerance`` (1 %)
  of 2 * B * margin for ``intervals`` consecutive logging intervals run entirely under hardest
  negatives. Intervals with warm-up steps break the streak: under all negatives the collapsed loss is
  2 * margin * (number of negative pairs), a level that a healthy warm-up can cross on its way down,
  and the warm-up is the usual cure, not the problem. After a restart the streak starts again.

The progress-line wording lives here; the step-log keys in trainer/run/step_log.py, with the step
log's reader (trainer/training/recorder.py writes them, trainer/report.py reads them).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from model.loss import HardNegativeStats
from trainer.run.step_log import ACTIVE_FIELD, DIRECTIONS, GAP_MEAN_FIELD, GAP_P10_FIELD, REMOTE_FIELD

__all__ = [
    "COLLAPSE_TOLERANCE",
    "DIRECTIONS",
    "CollapseDetector",
    "CollapseUpdate",
    "HardNegativeInterval",
    "HardNegativeSummary",
    "collapse_level",
]

log = logging.getLogger("trainer.training.diagnostics")

COLLAPSE_TOLERANCE = 0.01  # "within 1 % of 2 * B * margin"
GAP_QUANTILE = 0.1
# torch.quantile refuses inputs above 2**24 elements; an interval holding more gaps than that
# (e.g. 1000 steps of a 16K global batch) is thinned evenly before the quantile, not the mean.
_MAX_QUANTILE_INPUT = 2**24


@dataclass(frozen=True)
class HardNegativeSummary:
    """One logging interval over the global batch (host floats; NaN where nothing was counted)."""

    gap_mean: Mapping[str, float]  # direction -> mean of (positive - hardest negative) score
    gap_p10: Mapping[str, float]  # direction -> its 10th percentile
    active_hinge_ratio: float  # active hinge terms / hinge terms the loss summed
    remote_hardest_ratio: float  # hardest negatives from another worker's rows / queries with a negative
    steps: int

    @classmethod
    def from_values(cls, values: list[float], steps: int) -> "HardNegativeSummary":
        """From the 6 host values of :meth:`HardNegativeInterval.summarize_on_device`."""
        return cls(gap_mean=dict(zip(DIRECTIONS, values[0:2])), gap_p10=dict(zip(DIRECTIONS, values[2:4])),
                   active_hinge_ratio=values[4], remote_hardest_ratio=values[5], steps=steps)

    def log_fields(self) -> dict[str, float | None]:
        """The train_log.jsonl fields (JSON has no NaN: a value with nothing counted is null)."""
        fields: dict[str, float] = {}
        for direction in DIRECTIONS:
            fields[GAP_MEAN_FIELD.format(direction=direction)] = self.gap_mean[direction]
            fields[GAP_P10_FIELD.format(direction=direction)] = self.gap_p10[direction]
        fields[ACTIVE_FIELD] = self.active_hinge_ratio
        fields[REMOTE_FIELD] = self.remote_hardest_ratio
        return {key: (None if math.isnan(value) else value) for key, value in fields.items()}

    def progress(self) -> str:
        """The diagnostics part of the progress line."""
        gaps = "  ".join(f"{d} {self.gap_mean[d]:+.3f}/{self.gap_p10[d]:+.3f}" for d in DIRECTIONS)
        return (f"gap (mean/p10) {gaps}  active hinges {100 * self.active_hinge_ratio:.0f}%  "
                f"hardest from other workers {100 * self.remote_hardest_ratio:.0f}%")


class HardNegativeInterval:
    """A rank's :class:`HardNegativeStats` since the last logging step, kept on the device."""

    def __init__(self) -> None:
        self._gaps: list[Tensor] = []  # per step: (2, b), rows in DIRECTIONS order
        self._counts: Tensor | None = None  # (4,): active hinges, hinges, remote hardest, queries

    @property
    def steps(self) -> int:
        return len(self._gaps)

    def add(self, stats: HardNegativeStats) -> None:
        """Add one step's stats; device-side operations only (no host sync)."""
        self._gaps.append(torch.stack([stats.gap_i2t, stats.gap_t2i]).float())
        counts = torch.stack([stats.active_hinges, stats.hinges, stats.remote_hardest, stats.queries]).float()
        self._counts = counts if self._counts is None else self._counts + counts

    def summarize(self, world: int, group: dist.ProcessGroup | None = None) -> HardNegativeSummary | None:
        """The global summary of the interval, and a fresh start; None when no step was added.

        With ``world > 1`` this is a collective: every rank must call it at the same step, with as
        many steps added (the ranks step together and the loss insists on equal local batches).
        """
        steps = self.steps
        gathered = self.summarize_on_device(world, group=group)
        if gathered is None:
            return None
        return HardNegativeSummary.from_values(gathered[0].tolist(), steps)  # the one host sync of the interval

    def summarize_on_device(self, world: int, extra: Tensor | None = None,
                            group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor | None] | None:
        """:meth:`summarize` without the host transfer: (the summary's 6 values as a device tensor,
        for :meth:`HardNegativeSummary.from_values`; ``extra`` summed over the ranks), and a fresh
        start; None when no step was added. ``extra``: a 1-D float tensor of this rank's that rides
        the same collective (the trainer's losses of the interval), so that a logging step needs one
        collective and one host transfer in all."""
        if self._counts is None:
            return None
        gaps = torch.cat(self._gaps, dim=1)  # (2, steps * b)
        pieces = [gaps.flatten(), self._counts] + ([extra.float()] if extra is not None else [])
        local = torch.cat(pieces)
        extra_size = 0 if extra is None else extra.numel()
        self._gaps, self._counts = [], None
        summed_extra = None
        if world > 1:
            # One all-gather for gaps, counts and the extra values alike.
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local.contiguous(), group=group)
            per_rank = torch.stack(parts)
            end = per_rank.shape[1] - extra_size
            gaps = per_rank[:, :end - 4].reshape(world, 2, -1).transpose(0, 1).reshape(2, -1)
            counts = per_rank[:, end - 4:end].sum(dim=0)
            if extra is not None:
                summed_extra = per_rank[:, end:].sum(dim=0)
        else:
            end = local.shape[0] - extra_size
            counts = local[end - 4:end]
            if extra is not None:
                summed_extra = local[end:]
        means = gaps.nanmean(dim=1)
        sample = gaps
        if gaps.shape[1] > _MAX_QUANTILE_INPUT:
            sample = gaps[:, :: -(-gaps.shape[1] // _MAX_QUANTILE_INPUT)]
        p10 = _nanquantile_rows(sample, GAP_QUANTILE)
        ratios = torch.stack([counts[0] / counts[1], counts[2] / counts[3]])  # 0/0 = NaN: nothing counted
        return torch.cat([means, p10, ratios]), summed_extra


def _nanquantile_rows(values: Tensor, q: float) -> Tensor:
    """`values.nanquantile(q, dim=1)` (linear interpolation, NaN where a row has no number) in
    device operations only: torch's CPU quantile checks its argument with host reads."""
    ordered = values.sort(dim=1).values  # NaN sort last
    count = (~values.isnan()).sum(dim=1, keepdim=True)
    rank = (count - 1).clamp(min=0) * q
    low = rank.floor()
    high = rank.ceil()
    lower = ordered.gather(1, low.long())
    upper = ordered.gather(1, high.long())
    result = torch.lerp(lower, upper, (rank - low).to(values.dtype)).squeeze(1)
    return result.masked_fill(count.squeeze(1) == 0, float("nan"))


def collapse_level(global_batch: int, margin: float) -> float:
    """L_M of the collapsed solution under hardest negatives: 2 * B * margin.

    Every embedding alike makes every score equal, so each query's hardest hinge is exactly the
    margin; L_M sums one hinge per image query and one per caption query of the global batch
    (the recorder logs L_M summed over the global batch, the reference's scale).
    """
    return 2.0 * global_batch * margin


@dataclass(frozen=True)
class CollapseUpdate:
    collapsed: bool  # the detector's state after this interval
    started: bool  # it became collapsed at this interval
    ended: bool  # it stopped being collapsed at this interval
    streak: int  # consecutive intervals near the collapse level


class CollapseDetector:
    """Collapse: L_M's interval mean within ``tolerance`` of :func:`collapse_level` for
    ``intervals`` consecutive logging intervals under hardest negatives. ``intervals`` 0 (or a
    margin of 0, where the level would be a perfect loss) turns it off."""

    def __init__(self, global_batch: int, margin: float, intervals: int,
                 tolerance: float = COLLAPSE_TOLERANCE) -> None:
        self.level = collapse_level(global_batch, margin)
        self.intervals = intervals
        self.tolerance = tolerance
        self.streak = 0
        self.collapsed = False

    @property
    def enabled(self) -> bool:
        return self.intervals > 0 and self.level > 0

    def near_level(self, mean_matching: float) -> bool:
        return abs(mean_matching - self.level) <= self.tolerance * self.level

    def update(self, mean_matching: float, hardest_only: bool) -> CollapseUpdate:
        """After each logging interval: its mean L_M, and whether every step of it used hardest negatives."""
        was = self.collapsed
        if self.enabled and hardest_only and self.near_level(mean_matching):
            self.streak += 1
        else:
            self.streak = 0
        self.collapsed = self.enabled and self.streak >= self.intervals
        return CollapseUpdate(collapsed=self.collapsed, started=self.collapsed and not was,
                              ended=was and not self.collapsed, streak=self.streak)

    def warning(self, step: int, mean_matching: float, summary: HardNegativeSummary | None) -> str:
        """What the worker logs when the detector trips: what it means and what to try."""
        seen = "" if summary is None else (
            f" In the last interval {100 * summary.active_hinge_ratio:.0f}% of the hinges were active and the "
            f"mean gap between positive and hardest negative was {summary.gap_mean['i2t']:+.3f} (i2t) / "
            f"{summary.gap_mean['t2i']:+.3f} (t2i).")
        return (f"training has likely collapsed at step {step}: L_M has stayed within "
                f"{100 * self.tolerance:g}% of 2 * global batch * margin = {self.level:g} (now {mean_matching:.4g}) "
                f"for {self.streak} logging intervals under hardest negatives. That is the trivial solution "
                f"in which all embeddings are alike and every hardest-negative hinge sits at the margin; "
                f"recall rarely improves much from there (check the evaluator's dev rsum).{seen} "
                f"Try a longer all-negatives warm-up "
                f"(optim.warmup_epochs / optim.warmup_steps) or a lower optim.learning_rate in a new run (a new "
                f"checkpoint.run_name: resuming this one continues from its collapsed checkpoints); "
                f"docs/operations.md, section 4, 'Collapse'.")
