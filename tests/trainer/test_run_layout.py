"""trainer/run_layout.py: the evaluation history survives pruning and is written once per
checkpoint, the report plots it, damage is named; the retention policy alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from eval_run_helpers import EvalData, build_eval_data, make_model, write_checkpoint

from trainer import report
from trainer.config import EvalConfig
from trainer.eval_worker import evaluate_run
from trainer.run_checkpoint import checkpoint_dir_name
from trainer.run_layout import (
    EVALUATIONS_FILE,
    CheckpointEntry,
    checkpoints_to_prune,
    prune_checkpoints,
    read_evaluations,
    record_in_run,
    record_result,
)


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> EvalData:
    return build_eval_data(tmp_path_factory.mktemp("eval-data"))


def _evaluated_run(run: Path, data: EvalData, steps: tuple[int, ...]) -> list[dict[str, Any]]:
    for seed, step in enumerate(steps):
        write_checkpoint(run, checkpoint_dir_name(step), make_model(data.vocab, seed), data.vocab, step)
    return evaluate_run(str(run), str(data.dev.shards), str(data.test.shards), EvalConfig(test_protocols=["all"]))


def test_history_survives_pruning_and_the_report_plots_every_checkpoint(tmp_path: Path, eval_data: EvalData) -> None:
    run = tmp_path / "run"
    summaries = _evaluated_run(run, eval_data, (10, 20, 30, 40))
    assert [s["status"] for s in summaries] == ["ok"] * 4
    pruned = prune_checkpoints(str(run), keep_last=1)
    assert len(pruned) >= 2  # the newest and the best stay
    history = read_evaluations(str(run))
    assert [line["checkpoint"] for line in history] == [checkpoint_dir_name(s) for s in (10, 20, 30, 40)]
    assert [line["step"] for line in history] == [10, 20, 30, 40]
    assert all(isinstance(line["dev_rsum"], float) and "all" in line["test"] and line["evaluated_at"]
               for line in history)
    loaded = report.read_run(str(run))
    assert [c.step for c in loaded.evaluated()] == [10, 20, 30, 40]
    assert sum(c.pruned for c in loaded.checkpoints) == len(pruned)
    assert [c.dev_rsum for c in loaded.evaluated()] == [line["dev_rsum"] for line in history]


def test_a_checkpoint_evaluated_twice_is_one_line(tmp_path: Path, eval_data: EvalData) -> None:
    run = tmp_path / "run"
    _evaluated_run(run, eval_data, (10,))
    payload = json.loads((run / checkpoint_dir_name(10) / "metrics.json").read_text())
    # A second evaluator (evaluate.py beside the actor) records the same checkpoint again.
    record_result(str(run / checkpoint_dir_name(10)), payload)
    record_in_run(str(run), payload)
    assert len(read_evaluations(str(run))) == 1
    assert len((run / EVALUATIONS_FILE).read_text().splitlines()) == 1


def test_a_lost_line_comes_back_with_the_next_record(tmp_path: Path, eval_data: EvalData) -> None:
    run = tmp_path / "run"
    _evaluated_run(run, eval_data, (10, 20))
    lines = (run / EVALUATIONS_FILE).read_text().splitlines()
    (run / EVALUATIONS_FILE).write_text(lines[1] + "\n")  # a racing writer's upload dropped step 10
    write_checkpoint(run, checkpoint_dir_name(30), make_model(eval_data.vocab, 5), eval_data.vocab, 30)
    evaluate_run(str(run), str(eval_data.dev.shards), str(eval_data.test.shards), EvalConfig(test_protocols=["all"]))
    assert sorted(line["step"] for line in read_evaluations(str(run))) == [10, 20, 30]


def test_a_damaged_history_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / EVALUATIONS_FILE).write_text('{"checkpoint": "checkpoint_000000010"}\n{not json\n')
    with pytest.raises(ValueError, match=rf"{EVALUATIONS_FILE}: line 2: not valid JSON"):
        read_evaluations(str(tmp_path))
    (tmp_path / EVALUATIONS_FILE).write_text('[1, 2]\n')
    with pytest.raises(ValueError, match=r"line 1: expected a JSON object"):
        read_evaluations(str(tmp_path))
    assert read_evaluations(str(tmp_path / "nothing")) == []


def test_retention_policy_keeps_newest_best_top_and_unevaluated() -> None:
    def entry(step: int, evaluated: bool = True, failed: bool = False) -> CheckpointEntry:
        return CheckpointEntry(name=f"c{step}", url=f"/r/c{step}", step=step, epoch=0, evaluated=evaluated,
                               failed=failed)

    entries = [entry(1), entry(2), entry(3, evaluated=False, failed=True), entry(4, evaluated=False), entry(5),
               entry(6)]
    assert [e.name for e in checkpoints_to_prune(entries, 2, best_name="c2", top_dev_name="c1")] == ["c3"]
    assert [e.name for e in checkpoints_to_prune(entries, 1, best_name=None, top_dev_name=None)] == [
        "c1", "c2", "c3", "c5"]
    with pytest.raises(ValueError, match="keep_last"):
        checkpoints_to_prune(entries, 0, None, None)
