"""trainer/run/: the one evaluation record and its three files (records.py), best.json bookkeeping
and the choice of the best checkpoint (best.py), pruning and the retention policy (retention.py),
the evaluation history (history.py: it survives pruning, is written once per checkpoint, loses no
line to two local writers, and names damage by file and line), the train state's format."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
from pathlib import Path
from typing import Any

import pytest
from eval_run_helpers import (
    EvalData,
    build_eval_data,
    make_model,
    read_json,
    write_checkpoint,
)

from trainer import report
from trainer.evaluator.checkpoint_eval import evaluate_run, record_evaluated
from trainer.config import EvalConfig
from trainer.run.best import best_checkpoint, update_best
from trainer.run.checkpoints import CheckpointEntry
from trainer.run.history import read_evaluations, record_evaluation
from trainer.run.layout import EVALUATIONS_FILE, checkpoint_dir_name
from trainer.run.records import EvaluationRecord
from trainer.run.retention import checkpoints_to_prune, prune_checkpoints
from trainer.run.train_state import TrainState, TrainStateError


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
    assert [line.checkpoint for line in history] == [checkpoint_dir_name(s) for s in (10, 20, 30, 40)]
    assert [line.step for line in history] == [10, 20, 30, 40]
    assert all(isinstance(line.dev_rsum, float) and "all" in line.test and line.evaluated_at
               for line in history)
    loaded = report.read_run(str(run))
    assert [c.step for c in loaded.evaluated()] == [10, 20, 30, 40]
    assert sum(c.pruned for c in loaded.checkpoints) == len(pruned)
    assert [c.dev_rsum for c in loaded.evaluated()] == [line.dev_rsum for line in history]


def test_a_checkpoint_evaluated_twice_is_one_line(tmp_path: Path, eval_data: EvalData) -> None:
    run = tmp_path / "run"
    _evaluated_run(run, eval_data, (10,))
    payload = json.loads((run / checkpoint_dir_name(10) / "metrics.json").read_text())
    # A second evaluator (evaluate.py beside the actor) records the same checkpoint again.
    record_evaluated(str(run / checkpoint_dir_name(10)), payload, str(run))
    assert len(read_evaluations(str(run))) == 1
    assert len((run / EVALUATIONS_FILE).read_text().splitlines()) == 1


def test_a_lost_line_comes_back_with_the_next_record(tmp_path: Path, eval_data: EvalData) -> None:
    run = tmp_path / "run"
    _evaluated_run(run, eval_data, (10, 20))
    lines = (run / EVALUATIONS_FILE).read_text().splitlines()
    (run / EVALUATIONS_FILE).write_text(lines[1] + "\n")  # a racing writer's upload dropped step 10
    write_checkpoint(run, checkpoint_dir_name(30), make_model(eval_data.vocab, 5), eval_data.vocab, 30)
    evaluate_run(str(run), str(eval_data.dev.shards), str(eval_data.test.shards), EvalConfig(test_protocols=["all"]))
    assert sorted(line.step for line in read_evaluations(str(run))) == [10, 20, 30]


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


def test_update_best_keeps_the_highest_dev_rsum(tmp_path: Path) -> None:
    def payload(name: str, rsum: float | None) -> EvaluationRecord:
        return EvaluationRecord.from_metrics_json({
            "checkpoint": str(tmp_path / name), "step": 1, "epoch": 0, "dev": {"rsum": rsum}, "dev_rsum": rsum,
            "test": {"all": {"rsum": 1.0}}, "data": {"dev_images": 20}})

    assert update_best(str(tmp_path), payload("checkpoint_a", 100.0))
    assert not update_best(str(tmp_path), payload("checkpoint_b", 100.0))  # a tie keeps the earlier one
    assert not update_best(str(tmp_path), payload("checkpoint_b", 99.0))
    assert not update_best(str(tmp_path), payload("checkpoint_c", None))  # no dev split: no selection
    assert read_json(tmp_path / "best.json")["checkpoint"] == str(tmp_path / "checkpoint_a")
    assert update_best(str(tmp_path), payload("checkpoint_a", 90.0))  # the best re-evaluated: rewritten
    assert read_json(tmp_path / "best.json")["dev_rsum"] == 90.0
    assert update_best(str(tmp_path), payload("checkpoint_b", 95.0))
    (tmp_path / "best.json").write_text('{"checkpoint": ')  # damaged: replaced, not fatal
    assert update_best(str(tmp_path), payload("checkpoint_c", 1.0))
    assert read_json(tmp_path / "best.json")["checkpoint"] == str(tmp_path / "checkpoint_c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json"]  # no temporary files left


def test_prune_checkpoints_keeps_newest_best_and_unevaluated(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step, rsum in [(10, 300.0), (20, 100.0), (30, 200.0), (40, None), (50, 50.0)]:
        directory = run / f"checkpoint_{step:06d}"
        directory.mkdir(parents=True)
        (directory / "train_state.json").write_text(json.dumps({"step": step, "epoch": 0}))
        if rsum is not None:
            (directory / "metrics.json").write_text(json.dumps({"dev_rsum": rsum}))
    (run / "checkpoint_000030" / "eval_error.json").write_text("{}")
    (run / "checkpoint_000060").mkdir()  # incomplete: no train_state.json
    (run / "best.json").write_text(json.dumps({"checkpoint": str(run / "checkpoint_000020"), "dev_rsum": 100.0}))
    deleted = prune_checkpoints(str(run), keep_last=1)
    # 50: newest complete; 20: best.json; 10: highest dev rsum (best.json lags); 40: not evaluated.
    assert deleted == [str(run / "checkpoint_000030")]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [
        "checkpoint_000010", "checkpoint_000020", "checkpoint_000040", "checkpoint_000050", "checkpoint_000060"]
    with pytest.raises(ValueError, match="keep_last"):
        prune_checkpoints(str(run), keep_last=0)


def _record_many(run_dir: str, first_step: int, count: int) -> None:
    for step in range(first_step, first_step + count):
        record_evaluation(run_dir, EvaluationRecord.from_metrics_json({
            "checkpoint": f"{run_dir}/{checkpoint_dir_name(step)}", "step": step, "epoch": 0, "dev_rsum": float(step),
            "test": {}}))


def test_two_local_writers_lose_no_line(tmp_path: Path) -> None:
    """The actor and an evaluate.py process recording at the same moment: each rewrite of the
    history happens under the file's lock, so no line is lost (no checkpoint directories here,
    so the self-repair from metrics.json cannot hide a lost line)."""
    run = tmp_path / "run"
    run.mkdir()
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_record_many, args=(str(run), first, 25)) for first in (1, 101)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
        assert writer.exitcode == 0
    steps = sorted(line.step for line in read_evaluations(str(run)))
    assert steps == list(range(1, 26)) + list(range(101, 126))
    assert sorted(p.name for p in run.iterdir()) == [".lock-evaluations.jsonl", EVALUATIONS_FILE]


def test_train_state_round_trip_and_damage() -> None:
    state = TrainState(epoch=1, step=20, batch_in_epoch=3, epoch_complete=False, world_size=2, global_batch_size=8)
    assert TrainState.from_json(state.to_json(), "x") == state
    with pytest.raises(TrainStateError, match="where: not valid JSON"):
        TrainState.from_json("{", "where")
    with pytest.raises(TrainStateError, match="unsupported train state"):
        TrainState.from_json(json.dumps({"format_version": 99}), "where")



METRICS = {"checkpoint": "s3://b/run/checkpoint_000000010", "step": 10, "epoch": 0,
           "dev": {"i2t_r1": 1.0, "rsum": 200.0}, "dev_rsum": 200.0, "test": {"all": {"i2t_r1": 2.0, "rsum": 210.0}},
           "skipped": {"1k-5fold": "needs at least 5000 test images"},
           "data": {"dev": "d", "dev_images": 20, "test": "t", "test_images": 100}, "qualitative": "qualitative.md",
           "evaluated_at": "2026-12-04T10:00:00+00:00", "elapsed_s": 1.5, "format_version": 1}


def test_one_record_type_writes_and_reads_metrics_history_and_best_in_their_pinned_shapes() -> None:
    record = EvaluationRecord.from_metrics_json(METRICS)
    assert record.to_metrics_json() == METRICS and list(record.to_metrics_json()) == list(METRICS)
    without_page = {k: v for k, v in METRICS.items() if k != "qualitative"}  # no page asked for: no key
    assert EvaluationRecord.from_metrics_json(without_page).to_metrics_json() == without_page
    line = record.to_history_line()
    assert list(line) == ["checkpoint", "step", "epoch", "dev_rsum", "dev", "test", "skipped", "data", "evaluated_at",
                          "elapsed_s"]
    assert line["checkpoint"] == "checkpoint_000000010" and line["test"] == METRICS["test"]
    assert EvaluationRecord.from_history_line(line).to_history_line() == line
    best = dataclasses.replace(record, updated_at="2026-12-04T10:00:01+00:00").to_best_json()
    assert best == {"checkpoint": METRICS["checkpoint"], "step": 10, "epoch": 0, "dev_rsum": 200.0, "dev_images": 20,
                    "dev": METRICS["dev"], "metrics": METRICS["test"], "updated_at": "2026-12-04T10:00:01+00:00"}
    again = EvaluationRecord.from_best_json(best)
    assert again.to_best_json() == best and again.test == METRICS["test"] and again.dev_images == 20


def test_the_best_checkpoint_is_best_json_s_else_the_highest_dev_rsum() -> None:
    def record(name: str, rsum: float | None, step: int) -> EvaluationRecord:
        return EvaluationRecord(checkpoint=f"/r/{name}", step=step, dev_rsum=rsum)

    evaluated = {"c1": record("c1", 100.0, 1), "c2": record("c2", 300.0, 2), "c3": record("c3", 300.0, 3),
                 "c4": record("c4", None, 4)}
    assert best_checkpoint(None, evaluated) == ("c2", evaluated["c2"])  # a tie: the earlier one
    recorded = record("c1", 90.0, 1)  # best.json decides; its checkpoint's own metrics.json is newer
    assert best_checkpoint(recorded, evaluated) == ("c1", evaluated["c1"])
    gone = record("c0", 500.0, 0)  # the checkpoint's metrics are gone: best.json's own copy
    assert best_checkpoint(gone, evaluated) == ("c0", gone)
    assert best_checkpoint(None, {"c4": evaluated["c4"]}) is None
