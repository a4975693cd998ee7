"""The run report that ``python trainer/report.py RUN_DIR --output DIR`` writes (plots and summary.md).

    reading.py   the run as the report reads it, through trainer/run/: configuration, step log,
                 every evaluated checkpoint (pruned ones from the history), best.json, what is
                 missing; the best checkpoint as trainer/run/best.py chooses it
    plots.py     losses.png, throughput.png, diagnostics.png, recall.png
    summary.py   summary.md: the run's text, linking the plots and the best checkpoint's
                 qualitative page

It builds on trainer/run/ and trainer/evaluation/ (the results table) only; trainer/report.py,
the command line, builds on it. Its modules are imported one by one (this file re-exports nothing).
"""
