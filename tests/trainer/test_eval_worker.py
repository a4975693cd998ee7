"""Tests for trainer/eval_worker.py: encoding sharded splits, metrics.json / best.json /
eval_error.json, the --watch logic, pruning, the Ray actor and S3 run directories.

Inputs are real: tiny precomputed splits converted into float32 shards, tiny VSRN checkpoints in
the run layout (tests/eval_run_helpers.py). Expected metrics come from trainer.evaluation run on
embeddings computed here directly from the precomputed arrays, without shards or reader.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from eval_run_helpers import (
    FEATURES,
    REGIONS,
    EvalData,
    build_eval_data,
    embed,
    make_model,
    write_checkpoint,
    write_run_config,
    write_split,
)

from data_shards.format import (
    MANIFEST_NAME,
    ImageRecord,
    Manifest,
    ShardInfo,
    encode_record,
    sample_key,
)
from data_shards.reader import ReaderConfig
from data_shards.storage import open_location
from model.vsrn import VSRN
from trainer import eval_worker
from trainer.config import EvalConfig
from trainer.eval_worker import (
    EvaluationDataError,
    EvaluationWorker,
    encode_split,
    evaluate_checkpoint,
    evaluate_run,
    list_checkpoints,
    make_evaluation_actor,
    prune_checkpoints,
    update_best,
)
from trainer.evaluation import evaluate_embeddings

PINNED_KEYS = ["i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
               "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum"]
DEV_IMAGES = 20  # of the 30 dev images: the subset ends inside the second shard of 16


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> EvalData:
    return build_eval_data(tmp_path_factory.mktemp("eval_data"))


@pytest.fixture(scope="module")
def models(data: EvalData) -> list[VSRN]:
    """Two different models, the one with the higher dev rsum first (it must stay the best when
    the later checkpoint, with a lower rsum, is evaluated)."""
    candidates = [make_model(data.vocab, seed) for seed in (1, 2)]
    rsums = [dev_metrics(m, data)["rsum"] for m in candidates]
    assert rsums[0] != rsums[1]
    return sorted(candidates, key=lambda m: -dev_metrics(m, data)["rsum"])


def dev_metrics(model: VSRN, data: EvalData) -> dict[str, Any]:
    return evaluate_embeddings([embed(model, data.vocab, data.dev, DEV_IMAGES)], "all")


def expected_test_metrics(model: VSRN, data: EvalData) -> dict[str, Any]:
    return evaluate_embeddings([embed(model, data.vocab, data.test)], "all")


def eval_config(**changes: Any) -> EvalConfig:
    base = {"test_protocols": ["1k-5fold", "all"], "dev_images": DEV_IMAGES, "batch_size": 16}
    return EvalConfig(**{**base, **changes})


def make_run(root: Path, data: EvalData, models: list[VSRN], corrupt: int | None = None) -> Path:
    """RUN_DIR with config.yaml and checkpoint_000001.. (steps 10, 20, ...) of ``models``;
    ``corrupt``: index of a checkpoint whose model.safetensors is truncated."""
    run = root / "run"
    write_run_config(run, str(data.dev.shards), str(data.test.shards), ["1k-5fold", "all"], DEV_IMAGES)
    for index, model in enumerate(models):
        directory = write_checkpoint(run, f"checkpoint_{index + 1:06d}", model, data.vocab, step=10 * (index + 1),
                                     epoch=index)
        if index == corrupt:
            truncate(directory / "inference" / "model.safetensors")
    return run


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_encode_split_matches_direct_encoding(data: EvalData, models: list[VSRN], workers: int) -> None:
    model = models[0]
    config = ReaderConfig(str(data.test.shards), num_workers=workers)
    images, captions = encode_split(model, data.vocab, config, batch_size=7, device="cpu")
    expected_images, expected_captions = embed(model, data.vocab, data.test)
    assert images.dtype == captions.dtype == np.float32
    assert images.shape == (40, 16) and captions.shape == (200, 16)
    np.testing.assert_allclose(images, expected_images, atol=1e-5)
    np.testing.assert_allclose(captions, expected_captions, atol=1e-5)

    # A prefix that ends inside a shard (shards of 16 images) reads only what it needs.
    images, captions = encode_split(model, data.vocab, ReaderConfig(str(data.dev.shards), num_workers=0),
                                    batch_size=16, device="cpu", max_images=DEV_IMAGES)
    expected_images, expected_captions = embed(model, data.vocab, data.dev, DEV_IMAGES)
    assert images.shape == (DEV_IMAGES, 16) and captions.shape == (5 * DEV_IMAGES, 16)
    np.testing.assert_allclose(images, expected_images, atol=1e-5)
    np.testing.assert_allclose(captions, expected_captions, atol=1e-5)


def write_shards_with_caption_counts(directory: Path, counts: list[int]) -> None:
    """One shard whose image i has counts[i] captions (the converter only makes five)."""
    directory.mkdir(parents=True)
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as writer:
        for index, count in enumerate(counts):
            record = ImageRecord(key=sample_key("test", index), split="test", index=index,
                                 regions=np.zeros((REGIONS, FEATURES), np.float32),
                                 captions=[f"a dog number {index} variant {k}" for k in range(count)])
            writer.write(encode_record(record, "float32"))
    (directory / "test-000000.tar").write_bytes(buffer.getvalue())
    manifest = Manifest(feature_shape=(REGIONS, FEATURES), feature_dtype="float32", images=len(counts),
                        captions=sum(counts), split="test",
                        shards=[ShardInfo("test-000000.tar", len(counts), hashlib.sha256(buffer.getvalue()).hexdigest())])
    (directory / MANIFEST_NAME).write_text(manifest.to_json())


def test_encode_split_needs_five_captions_per_image(data: EvalData, models: list[VSRN], tmp_path: Path) -> None:
    write_shards_with_caption_counts(tmp_path / "bad", [5, 5, 4, 5])
    with pytest.raises(EvaluationDataError, match=r"image test-0000002 \(index 2\) has 4 captions.*exactly 5"):
        encode_split(models[0], data.vocab, ReaderConfig(str(tmp_path / "bad"), num_workers=0), 16, "cpu")
    # The first two images alone are fine.
    images, captions = encode_split(models[0], data.vocab, ReaderConfig(str(tmp_path / "bad"), num_workers=0), 16,
                                    "cpu", max_images=2)
    assert images.shape == (2, 16) and captions.shape == (10, 16)


# --------------------------------------------------------------------------------------------------
# A run: metrics.json, best.json, eval_error.json, --watch semantics
# --------------------------------------------------------------------------------------------------


def test_evaluate_run_writes_metrics_and_best(data: EvalData, models: list[VSRN], tmp_path: Path) -> None:
    run = make_run(tmp_path, data, models)
    write_checkpoint(run, "checkpoint_000009", models[1], data.vocab, step=90, complete=False)  # being written
    summaries = evaluate_run(str(run))  # shards and eval settings from config.yaml

    assert [(s["path"], s["step"], s["status"], s["is_best"]) for s in summaries] == [
        (str(run / "checkpoint_000001"), 10, "ok", True), (str(run / "checkpoint_000002"), 20, "ok", False)]
    for index, model in enumerate(models):
        directory = run / f"checkpoint_{index + 1:06d}"
        metrics = read_json(directory / "metrics.json")
        assert set(metrics) >= {"checkpoint", "step", "epoch", "dev", "dev_rsum", "test", "skipped", "data"}
        assert metrics["checkpoint"] == str(directory)
        assert (metrics["step"], metrics["epoch"]) == (10 * (index + 1), index)
        assert list(metrics["dev"]) == PINNED_KEYS and list(metrics["test"]) == ["all"]
        assert list(metrics["test"]["all"]) == PINNED_KEYS
        assert metrics["dev"] == pytest.approx(dev_metrics(model, data), abs=1e-6)
        assert metrics["dev_rsum"] == metrics["dev"]["rsum"]
        assert metrics["test"]["all"] == pytest.approx(expected_test_metrics(model, data), abs=1e-6)
        assert "5000" in metrics["skipped"]["1k-5fold"] and "40" in metrics["skipped"]["1k-5fold"]
        assert metrics["data"] == {"dev": str(data.dev.shards), "dev_images": DEV_IMAGES,
                                   "test": str(data.test.shards), "test_images": 40}
        assert summaries[index]["dev_rsum"] == metrics["dev_rsum"]
        assert not (directory / "eval_error.json").exists()
    assert not (run / "checkpoint_000009" / "metrics.json").exists()

    best = read_json(run / "best.json")
    first = read_json(run / "checkpoint_000001" / "metrics.json")
    assert best["checkpoint"] == str(run / "checkpoint_000001")
    assert (best["step"], best["epoch"], best["dev_rsum"]) == (10, 0, first["dev_rsum"])
    assert best["dev_rsum"] > read_json(run / "checkpoint_000002" / "metrics.json")["dev_rsum"]
    assert best["metrics"] == first["test"] and best["dev"] == first["dev"]

    # A second pass finds nothing to do and leaves every file as it was.
    before = {p: p.read_bytes() for p in run.rglob("*.json")}
    assert evaluate_run(str(run)) == []
    assert {p: p.read_bytes() for p in run.rglob("*.json")} == before

    # The checkpoint that was being written completes: only it is evaluated.
    (run / "checkpoint_000009" / "train_state.json").write_text(json.dumps({"step": 90, "epoch": 8}))
    assert [s["step"] for s in evaluate_run(str(run))] == [90]


def test_failed_checkpoint_is_recorded_and_the_rest_evaluated(data: EvalData, models: list[VSRN],
                                                               tmp_path: Path) -> None:
    run = make_run(tmp_path, data, models, corrupt=0)
    summaries = evaluate_run(str(run))
    assert [(s["step"], s["status"]) for s in summaries] == [(10, "failed"), (20, "ok")]
    assert "model.safetensors" in summaries[0]["error"]
    error = read_json(run / "checkpoint_000001" / "eval_error.json")
    assert error["checkpoint"] == str(run / "checkpoint_000001")
    assert "CheckpointError" in error["error"] and "model.safetensors" in error["error"]
    assert "Traceback" in error["traceback"]
    assert not (run / "checkpoint_000001" / "metrics.json").exists()
    assert read_json(run / "best.json")["checkpoint"] == str(run / "checkpoint_000002")

    # Failed checkpoints are not retried unless asked; once repaired, a retry records metrics
    # and drops the failure record.
    assert evaluate_run(str(run)) == []
    write_checkpoint(run, "checkpoint_000001", models[0], data.vocab, step=10)
    summaries = evaluate_run(str(run), retry_failed=True)
    assert [(s["step"], s["status"], s["is_best"]) for s in summaries] == [(10, "ok", True)]
    assert not (run / "checkpoint_000001" / "eval_error.json").exists()
    assert read_json(run / "best.json")["checkpoint"] == str(run / "checkpoint_000001")


def test_unusable_data_fails_before_touching_checkpoints(data: EvalData, models: list[VSRN], tmp_path: Path) -> None:
    run = make_run(tmp_path, data, models[:1])
    with pytest.raises(ValueError, match="manifest"):
        evaluate_run(str(run), test=str(tmp_path / "no_such_shards"))
    (run / "config.yaml").unlink()
    with pytest.raises(ValueError, match="no dev or test shards"):
        evaluate_run(str(run))
    assert sorted(p.name for p in (run / "checkpoint_000001").iterdir()) == ["inference", "train_state.json"]


def test_1k_5fold_runs_with_5000_test_images(data: EvalData, models: list[VSRN], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Encoding 5000 images would take the tests too long: the encoder is replaced by fixed
    # embeddings, which is all the protocol handling sees.
    rng = np.random.default_rng(0)
    images = rng.standard_normal((5000, 8)).astype(np.float32)
    captions = np.repeat(images, 5, axis=0) + rng.standard_normal((25000, 8)).astype(np.float32)
    monkeypatch.setattr(eval_worker, "encode_split", lambda *args, **kwargs: (images, captions))
    checkpoint = write_checkpoint(tmp_path, "checkpoint_000001", models[0], data.vocab, step=5)
    payload = evaluate_checkpoint(str(checkpoint), None, str(data.test.shards), eval_config())
    assert payload["skipped"] == {} and list(payload["test"]) == ["1k-5fold", "all"]
    for protocol in ("1k-5fold", "all"):
        assert payload["test"][protocol] == evaluate_embeddings([(images, captions)], protocol)
    assert len(payload["test"]["1k-5fold"]["folds"]) == 5
    assert payload["dev"] is None and payload["dev_rsum"] is None


def test_update_best_keeps_the_highest_dev_rsum(tmp_path: Path) -> None:
    def payload(name: str, rsum: float | None) -> dict[str, Any]:
        return {"checkpoint": str(tmp_path / name), "step": 1, "epoch": 0, "dev": {"rsum": rsum}, "dev_rsum": rsum,
                "test": {"all": {"rsum": 1.0}}, "data": {"dev_images": 20}}

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
    blocked = blocking_checkpoint(run, data, models[1], "checkpoint_000001", 10)
    better = write_checkpoint(run, "checkpoint_000002", models[0], data.vocab, step=20)
    broken = write_checkpoint(run, "checkpoint_000003", models[0], data.vocab, step=30)
    truncate(broken / "inference" / "model.safetensors")

    actor = make_evaluation_actor(eval_config(test_protocols=["all"], cpus=1.0), dev=str(data.dev.shards),
                                  test=str(data.test.shards), run_dir=str(run))
    assert ray.get(actor.pending.remote(), timeout=120) == 0  # the actor is up
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
    ray.kill(actor)


def test_a_restarted_actor_evaluates_what_its_predecessor_left(ray_local: Any, data: EvalData,
                                                               models: list[VSRN], tmp_path: Path) -> None:
    # What happens when the actor's node dies (tests/trainer/test_multinode.py kills a real node):
    # the new instance no longer has the old one's queue, so it looks at the run directory.
    ray = ray_local
    run = tmp_path / "run"
    first = write_checkpoint(run, "checkpoint_000001", models[0], data.vocab, step=10)
    second = write_checkpoint(run, "checkpoint_000002", models[1], data.vocab, step=20)
    done = write_checkpoint(run, "checkpoint_000003", models[1], data.vocab, step=30)
    (done / "metrics.json").write_text("{}")  # evaluated before: not again
    actor = make_evaluation_actor(eval_config(test_protocols=["all"], cpus=1.0), dev=str(data.dev.shards),
                                  test=str(data.test.shards), run_dir=str(run))
    assert ray.get(actor.pending.remote(), timeout=120) == 0  # a first start catches up on nothing
    ray.kill(actor, no_restart=False)  # the process dies; Ray restarts the actor
    ray.get(actor.wait_idle.remote(120), timeout=240)  # retried on the new instance
    ray.get(actor.submit.remote(str(second)), timeout=30)  # a late submission of a queued one: skipped
    ray.get(actor.wait_idle.remote(120), timeout=150)
    results = ray.get(actor.results.remote())
    assert [(r["path"], r["status"]) for r in results] == [(str(first), "ok"), (str(second), "ok")]
    assert read_json(first / "metrics.json")["dev"] == pytest.approx(dev_metrics(models[0], data), abs=1e-6)
    assert read_json(done / "metrics.json") == {}
    ray.kill(actor)


# --------------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------------


def upload_tree(local: Path, url: str, storage_options: dict[str, Any]) -> None:
    """Copy a local directory tree to an S3 prefix with the storage helper."""
    location = open_location(url, storage_options)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        location.write_bytes_atomic(path.relative_to(local).as_posix(), path.read_bytes())


def test_s3_run_directory(data: EvalData, models: list[VSRN], tmp_path: Path, s3_server: Any,
                          s3_bucket: str) -> None:
    options = s3_server.storage_options
    run_url = f"s3://{s3_bucket}/runs/r1"
    local = make_run(tmp_path, data, models, corrupt=1)
    # The dev shards on S3 as well, so the reader's S3 path is part of the test.
    write_split(tmp_path / "s3dev", "dev", 30, seed=1)
    upload_tree(tmp_path / "s3dev" / "dev_shards", f"s3://{s3_bucket}/shards/dev", options)
    upload_tree(local, run_url, options)

    assert [e.step for e in list_checkpoints(run_url, options)] == [10, 20]
    summaries = evaluate_run(run_url, dev=f"s3://{s3_bucket}/shards/dev", storage_options=options)
    assert [(s["path"], s["status"]) for s in summaries] == [
        (f"{run_url}/checkpoint_000001", "ok"), (f"{run_url}/checkpoint_000002", "failed")]

    run = open_location(run_url, options)
    metrics = json.loads(run.read_text("checkpoint_000001/metrics.json"))
    assert metrics["checkpoint"] == f"{run_url}/checkpoint_000001"
    assert metrics["dev"] == pytest.approx(dev_metrics(models[0], data), abs=1e-6)
    assert metrics["test"]["all"] == pytest.approx(expected_test_metrics(models[0], data), abs=1e-6)
    best = json.loads(run.read_text("best.json"))
    assert best["checkpoint"] == f"{run_url}/checkpoint_000001" and best["dev_rsum"] == metrics["dev_rsum"]
    assert "model.safetensors" in json.loads(run.read_text("checkpoint_000002/eval_error.json"))["error"]
    assert evaluate_run(run_url, dev=f"s3://{s3_bucket}/shards/dev", storage_options=options) == []
