"""Tests for trainer/evaluator/actor.py: the evaluation actor, in-process and through Ray: its queue
never holds up the caller, it evaluates in the background, and a new or restarted actor catches up on
what its predecessor left.

Inputs are real: tiny sharded splits and tiny VSRN checkpoints in the run layout
(tests/eval_run_helpers.py); what an evaluation writes is tested in test_checkpoint_eval.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from eval_run_helpers import (
    EvalData,
    dev_metrics,
    eval_config,
    expected_test_metrics,
    read_json,
    truncate,
    write_checkpoint,
)

from model.vsrn import VSRN
from trainer.evaluator.actor import EvaluationWorker, make_evaluation_actor

# --------------------------------------------------------------------------------------------------
# The worker: in-process and as a Ray actor
# --------------------------------------------------------------------------------------------------


def blocking_checkpoint(run: Path, data: EvalData, model: VSRN, name: str, step: int) -> Path:
    """A checkpoint whose train_state.json is a FIFO: evaluating it blocks in the first read until
    the test writes the state, so "an evaluation is running" lasts as long as the test wants."""
    directory = write_checkpoint(run, name, model, data.vocab, step=step, complete=False)
    os.mkfifo(directory / "train_state.json")
    return directory


def release(fifo: Path, step: int, timeout: float = 60.0) -> None:
    """Write the train state into the FIFO once the evaluator has opened it for reading."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: nobody reading yet
            break
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nobody opened {fifo} for reading within {timeout} s") from None
            time.sleep(0.05)
    os.set_blocking(descriptor, True)
    with os.fdopen(descriptor, "w") as stream:
        stream.write(json.dumps({"step": step, "epoch": 0}))


def test_worker_in_process_times_out_while_busy(data: EvalData, models: list[VSRN], tmp_path: Path) -> None:
    run = tmp_path / "run"
    blocked = blocking_checkpoint(run, data, models[0], "checkpoint_000001", 10)
    worker = EvaluationWorker(eval_config(test_protocols=["all"]), str(data.dev.shards), str(data.test.shards),
                              run_dir=str(run))
    try:
        worker.submit(str(blocked))
        with pytest.raises(TimeoutError, match="1 checkpoint"):
            worker.wait_idle(0.2)
        assert worker.pending() == 1 and worker.results() == []
        release(blocked / "train_state.json", 10)
        worker.wait_idle(60)
        assert [(r["step"], r["status"]) for r in worker.results()] == [(10, "ok")]
        assert worker.best()["checkpoint"] == str(blocked)
    finally:
        worker.shutdown(10)


def test_ray_actor_evaluates_in_the_background(ray_local: Any, data: EvalData, models: list[VSRN],
                                               tmp_path: Path) -> None:
    ray = ray_local
    run = tmp_path / "run"
    run.mkdir()
    actor = make_evaluation_actor(eval_config(test_protocols=["all"], cpus=1.0), dev=str(data.dev.shards),
                                  test=str(data.test.shards), run_dir=str(run))
    try:
        _evaluates_in_the_background(ray, actor, run, data, models)
    finally:
        ray.kill(actor)  # a failed test leaves no actor holding the session's CPUs


def _evaluates_in_the_background(ray: Any, actor: Any, run: Path, data: EvalData, models: list[VSRN]) -> None:
    # The checkpoints come after the actor is up: its catch-up at start would read the FIFO.
    assert ray.get(actor.pending.remote(), timeout=120) == 0  # the actor is up
    blocked = blocking_checkpoint(run, data, models[1], "checkpoint_000001", 10)
    better = write_checkpoint(run, "checkpoint_000002", models[0], data.vocab, step=20)
    broken = write_checkpoint(run, "checkpoint_000003", models[0], data.vocab, step=30)
    truncate(broken / "inference" / "model.safetensors")
    ray.get(actor.submit.remote(str(blocked)), timeout=30)
    # The first evaluation is now blocked inside the actor (until release()); submitting more and
    # asking for results must not wait for it.
    started = time.monotonic()
    for checkpoint in (better, broken):
        ray.get(actor.submit.remote(str(checkpoint)), timeout=30)
    assert ray.get(actor.results.remote(), timeout=30) == []
    assert ray.get(actor.pending.remote(), timeout=30) == 3
    assert time.monotonic() - started < 5.0  # the evaluation itself lasts until released
    with pytest.raises(ray.exceptions.RayTaskError, match="TimeoutError"):
        ray.get(actor.wait_idle.remote(0.5), timeout=30)

    release(blocked / "train_state.json", 10)
    ray.get(actor.wait_idle.remote(120), timeout=150)
    results = ray.get(actor.results.remote())
    assert [(r["path"], r["step"], r["status"]) for r in results] == [
        (str(blocked), 10, "ok"), (str(better), 20, "ok"), (str(broken), 30, "failed")]
    assert "model.safetensors" in results[2]["error"]
    assert results[0]["dev_rsum"] == pytest.approx(dev_metrics(models[1], data)["rsum"])
    assert results[1]["dev_rsum"] == pytest.approx(dev_metrics(models[0], data)["rsum"])
    assert results[1]["is_best"] and not results[2]["is_best"]
    best = ray.get(actor.best.remote())
    assert best == read_json(run / "best.json") and best["checkpoint"] == str(better)
    assert read_json(better / "metrics.json")["test"]["all"] == pytest.approx(expected_test_metrics(models[0], data), abs=1e-6)
    assert "CheckpointError" in read_json(broken / "eval_error.json")["error"]


def test_a_new_or_restarted_actor_evaluates_what_its_predecessor_left(ray_local: Any, data: EvalData,
                                                                      models: list[VSRN], tmp_path: Path) -> None:
    # A relaunched run's actor (after a stop, whose last checkpoint was left unevaluated) and an
    # actor Ray restarted after its node died (tests/trainer/test_multinode.py kills a real node)
    # no longer have the old instance's queue, so they look at the run directory.
    ray = ray_local
    run = tmp_path / "run"
    first = write_checkpoint(run, "checkpoint_000001", models[0], data.vocab, step=10)
    second = write_checkpoint(run, "checkpoint_000002", models[1], data.vocab, step=20)
    done = write_checkpoint(run, "checkpoint_000003", models[1], data.vocab, step=30)
    (done / "metrics.json").write_text("{}")  # evaluated before: not again
    actor = make_evaluation_actor(eval_config(test_protocols=["all"], cpus=1.0), dev=str(data.dev.shards),
                                  test=str(data.test.shards), run_dir=str(run))
    try:
        _catches_up(ray, actor, run, data, models, first, second, done)
    finally:
        ray.kill(actor)  # a failed test leaves no actor holding the session's CPUs


def _catches_up(ray: Any, actor: Any, run: Path, data: EvalData, models: list[VSRN], first: Path, second: Path,
                done: Path) -> None:
    ray.get(actor.wait_idle.remote(120), timeout=240)
    ray.get(actor.submit.remote(str(second)), timeout=30)  # the trainer's late submission of one caught up: skipped
    ray.get(actor.wait_idle.remote(120), timeout=150)
    results = ray.get(actor.results.remote())
    assert [(r["path"], r["status"]) for r in results] == [(str(first), "ok"), (str(second), "ok")]
    assert read_json(first / "metrics.json")["dev"] == pytest.approx(dev_metrics(models[0], data), abs=1e-6)
    assert read_json(done / "metrics.json") == {}
    third = write_checkpoint(run, "checkpoint_000004", models[0], data.vocab, step=40)
    ray.kill(actor, no_restart=False)  # the process dies; Ray restarts the actor
    # ray.kill returns before the old instance is gone: a call may still reach it (idle, its
    # results those above), or wait on it and then read the new instance's (still catching up).
    deadline = time.monotonic() + 240
    while True:
        ray.get(actor.wait_idle.remote(120), timeout=240)
        results = ray.get(actor.results.remote(), timeout=60)
        if str(third) in [r["path"] for r in results] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [(r["path"], r["status"]) for r in results] == [(str(third), "ok")]
