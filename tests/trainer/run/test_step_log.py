"""trainer/run/step_log.py: the step log's readers, the lines as written (bench/gpu_check.py) and
the columns in step order (the report), with damage named by file and line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from data_shards.storage import open_location
from trainer.run.layout import TRAIN_LOG
from trainer.run.step_log import (
    COLLAPSED_FIELD,
    LOG_FIELDS,
    STEP_FIELDS,
    StepLog,
    StepLogError,
    read_step_lines,
    read_step_log,
)


def line(step: int, **extra: object) -> str:
    record = {key: float(step) for key in STEP_FIELDS} | {"step": step, "epoch": 0, "batch": step - 1,
                                                          "hardest_negatives": step > 1}
    return json.dumps(record | extra)


def test_lines_as_written_and_columns_in_step_order(tmp_path: Path) -> None:
    run = open_location(str(tmp_path))
    assert read_step_lines(run) is None and read_step_log(run) is None
    diagnostics = dict.fromkeys(LOG_FIELDS, 0.5) | {"active_hinge_ratio": None, COLLAPSED_FIELD: True}
    # Step 2 twice (a resume that did not truncate), the last line still being written.
    text = "\n".join([line(1), line(2, loss=9.0), line(3, **diagnostics), line(2, loss=2.5), '{"step": 4, "lo'])
    (tmp_path / TRAIN_LOG).write_text(text)
    assert [r["step"] for r in read_step_lines(run)] == [1, 2, 3, 2]
    series = read_step_log(run)
    assert series is not None and list(series.step) == [1, 2, 3] and len(series) == 3
    assert series.loss[1] == 2.5  # the later line of a step logged twice
    assert list(series.hardest_negatives) == [False, True, True] and list(series.collapsed) == [False, False, True]
    assert series.has_diagnostics and list(series.diagnostic_rows) == [2]
    assert series.diagnostics["gap_i2t_mean"][2] == 0.5 and math.isnan(series.diagnostics["gap_i2t_mean"][0])
    assert np.isnan(series.diagnostics["active_hinge_ratio"]).all()  # null: nothing counted


@pytest.mark.parametrize(("bad", "message"), [
    ("{not json", r"line 2: not valid JSON"),
    ("[1, 2]", r"line 2: expected a JSON object, got list"),
    ('{"step": 2}', r"line 2: no 'epoch' field"),
    (None, r"line 2: 'lr' is 'fast', not a finite number"),
])
def test_damage_is_named_by_file_and_line(tmp_path: Path, bad: str | None, message: str) -> None:
    (tmp_path / TRAIN_LOG).write_text(line(1) + "\n" + (bad if bad is not None else line(2, lr="fast")) + "\n")
    with pytest.raises(StepLogError, match=rf"{TRAIN_LOG} {message}"):
        read_step_log(open_location(str(tmp_path)))


def test_step_log_drops_the_steps_that_are_redone_after_a_restart(tmp_path: Path) -> None:
    log = StepLog(str(tmp_path), None)
    for step in range(1, 6):
        log.append({"step": step, "loss": float(step)})
    log.truncate_after(3)
    log.append({"step": 4, "loss": 40.0})
    lines = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
