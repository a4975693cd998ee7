"""Plots and a markdown summary of a training run: ``python trainer/report.py RUN_DIR --output DIR``.

RUN_DIR is a run directory as docs/run_layout.md describes it, local or ``s3://`` (read through
data_shards/storage.py; S3 endpoint from ``--endpoint-url``, else ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``, credentials from the environment). DIR is a local directory; it receives

* ``losses.png``: L_M (matching), L_G (caption) and the total loss over the steps, raw and smoothed,
  and the learning rate in its own panel; epoch boundaries and the switch to hardest negatives
  are marked;
* ``throughput.png``: samples/s and data wait per step (rolling mean, raw values faint);
* ``diagnostics.png``: the hard-negative diagnostics of each logging interval (trainer/training/diagnostics.py):
  the gap between positive and hardest-negative scores (mean and 10th percentile, both directions)
  with the margin, and the fractions of active hinges and of hardest negatives from other workers;
  the switch to hardest negatives and the intervals the collapse detector flagged are marked (only
  for step logs that carry the diagnostics);
* ``recall.png``: R@1/5/10 (image-to-text and text-to-image) of every test protocol present and the
  dev and test rsum by checkpoint step, the best checkpoint marked;
* ``summary.md``: run name, configuration highlights (from ``RUN_DIR/config.yaml``), steps and
  epochs done, wall time, mean throughput, final losses, the last hard-negative diagnostics and
  whether the collapse detector tripped, the best checkpoint's recall table (the
  layout the evaluation worker logs), every checkpoint with its rsum, and links to the plots;
* ``qualitative.md`` and ``qualitative/*.png``: the best checkpoint's qualitative page (top-3
  retrievals and attention maps of fixed test queries, trainer/inference/qualitative.py), copied from the
  checkpoint and linked from summary.md, when it has one.

The inputs are ``train_log.jsonl`` (one JSON object per step, trainer/run/step_log.py's ``StepLog``),
``evaluations.jsonl`` (the evaluation history, which keeps the checkpoints that pruning deleted),
the ``checkpoint_*/metrics.json`` and ``eval_error.json`` files and ``best.json`` (written by
the evaluator), all named and read through trainer/run/ (the step log by run/step_log.py, the
evaluations as run/records.py's one record type); the best checkpoint is the one trainer/run/best.py
names, as for pruning. trainer/reporting/ reads the run (reading.py), draws the plots (plots.py)
and writes summary.md (summary.py); this module is the command line. Every evaluated
checkpoint is plotted: those of the history and, for a run without one (written before it
existed), those whose metrics.json is still there. A run with missing pieces (no step log yet, no
evaluation yet, a checkpoint whose evaluation failed) gives the plots it can, and summary.md says
what is missing. A corrupt step-log line, history line or metrics.json stops the report with a
message naming the file (and the line); the exception is an unparsable *last* step-log line
without a newline, which is a line still being written by a live run and is skipped with a
warning.

Exit status: 0 on success, printing the paths written (one per line) on stdout; 2 when the run
directory cannot be read or an input is corrupt (a one-line message on stderr). Logs go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __name__ == "__main__" and __package__ in (None, ""):  # `python trainer/report.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_shards.storage import StorageError, is_s3_url, s3_storage_options
from trainer.reporting.plots import (
    DIAGNOSTICS_PNG,
    LOSSES_PNG,
    PLOT_FILES,
    RECALL_PNG,
    THROUGHPUT_PNG,
    plot_diagnostics,
    plot_losses,
    plot_recall,
    plot_throughput,
)
from trainer.reporting.reading import ReportInputError, find_best, is_number, read_run
from trainer.reporting.summary import SUMMARY_MD, copy_qualitative_page, write_summary
from trainer.run.layout import QUALITATIVE_FILE, TRAIN_LOG

logger = logging.getLogger("trainer.report")

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def make_report(run_dir: str, output: Path, storage_options: Mapping[str, Any] | None = None,
                dpi: int = 100) -> list[Path]:
    """Write the plots and summary.md of ``run_dir`` into ``output``; returns the files written.

    Plot files of an earlier report in ``output`` that this run cannot produce are removed, so the
    directory never shows a stale plot beside the new summary.
    """
    run = read_run(run_dir, storage_options)
    output.mkdir(parents=True, exist_ok=True)
    best, best_payload, best_source = find_best(run)
    plots: dict[str, Path | None] = dict.fromkeys(PLOT_FILES)
    if run.steps is not None and len(run.steps) > 0:
        plots[LOSSES_PNG] = plot_losses(run.steps, output / LOSSES_PNG, dpi)
        plots[THROUGHPUT_PNG] = plot_throughput(run.steps, output / THROUGHPUT_PNG, dpi)
        margin = run.config_value("optim", "margin")
        plots[DIAGNOSTICS_PNG] = plot_diagnostics(run.steps, float(margin) if is_number(margin) else None,
                                                  output / DIAGNOSTICS_PNG, dpi)
        if plots[DIAGNOSTICS_PNG] is None:
            run.notes.append(f"{TRAIN_LOG} has no hard-negative diagnostics (written before they existed): "
                             "diagnostics plot not produced")
    plots[RECALL_PNG] = plot_recall(run, best, output / RECALL_PNG, dpi)
    for name, written in plots.items():
        stale = output / name
        if written is None and stale.exists():
            logger.info("removing %s from an earlier report", stale)
            stale.unlink()
    qualitative = copy_qualitative_page(run, best, output, storage_options)
    summary = write_summary(run, best, best_payload, best_source, plots, output / SUMMARY_MD, qualitative)
    copied = [output / QUALITATIVE_FILE] if qualitative is not None else []
    return [p for p in plots.values() if p is not None] + copied + [summary]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer/report.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (local or s3://)")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR",
                        help="local directory for the PNG plots and summary.md (created if missing)")
    parser.add_argument("--endpoint-url", default=None,
                        help="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    parser.add_argument("--dpi", type=int, default=100, help="resolution of the plots (default: 100)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="verbosity of the log on stderr (default: INFO)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (argparse itself exits 2 on usage errors)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    storage_options = s3_storage_options(endpoint_url=args.endpoint_url) if is_s3_url(args.run_dir) else None
    try:
        written = make_report(args.run_dir, args.output, storage_options, args.dpi)
    except (ReportInputError, StorageError) as error:  # StorageError: a malformed location
        logger.error("%s", error)
        return EXIT_BAD_INPUT
    except OSError as error:  # an unreachable store or a permission problem: no traceback needed
        logger.error("%s: cannot read the run or write the report: %s", args.run_dir, error)
        return EXIT_BAD_INPUT
    for path in written:
        print(os.fspath(path))  # the CLI's result: the files written
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
