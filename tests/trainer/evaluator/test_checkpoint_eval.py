"""Tests for trainer/evaluator/checkpoint_eval.py and trainer/inference/encoding.py: encoding
sharded splits, metrics.json / best.json / eval_error.json / evaluations.jsonl as recorded after
an evaluation, the --watch logic (evaluate_run) and S3 run directories.

Inputs are real: tiny precomputed splits converted into float32 shards, tiny VSRN checkpoints in
the run layout (tests/eval_run_helpers.py). Expected metrics come from trainer.evaluation run on
embeddings computed here directly from the precomputed arrays, without shards or reader.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from eval_run_helpers import (
    DEV_IMAGES,
    FEATURES,
    PINNED_KEYS,
    REGIONS,
    EvalData,
    dev_metrics,
    embed,
    eval_config,
    expected_test_metrics,
    make_run,
    read_json,
    write_checkpoint,
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
from trainer.evaluator import checkpoint_eval
from trainer.evaluator.checkpoint_eval import evaluate_checkpoint, evaluate_run, record_evaluated
from trainer.inference.encoding import EvaluationDataError, encode_split
from trainer.evaluation import evaluate_embeddings
from trainer.run.checkpoints import list_checkpoints
from trainer.run.history import read_evaluations
from trainer.run.layout import EVALUATIONS_FILE

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

    # The run's history: one line per evaluated checkpoint, with the metrics.json numbers.
    history = read_evaluations(str(run))
    assert [(h.checkpoint, h.step, h.epoch) for h in history] == [
        ("checkpoint_000001", 10, 0), ("checkpoint_000002", 20, 1)]
    for line in history:
        metrics = read_json(run / line.checkpoint / "metrics.json")
        assert line.dev_rsum == metrics["dev_rsum"] and line.test == metrics["test"]
        assert line.evaluated_at == metrics["evaluated_at"] and line.elapsed_s == metrics["elapsed_s"]

    # A second pass finds nothing to do and leaves every file as it was.
    before_history = (run / EVALUATIONS_FILE).read_bytes()
    before = {p: p.read_bytes() for p in run.rglob("*.json")}
    assert evaluate_run(str(run)) == []
    assert {p: p.read_bytes() for p in run.rglob("*.json")} == before
    assert (run / EVALUATIONS_FILE).read_bytes() == before_history

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
    monkeypatch.setattr(checkpoint_eval, "encode_split", lambda *args, **kwargs: (images, captions))
    checkpoint = write_checkpoint(tmp_path, "checkpoint_000001", models[0], data.vocab, step=5)
    payload = evaluate_checkpoint(str(checkpoint), None, str(data.test.shards), eval_config())
    assert payload["skipped"] == {} and list(payload["test"]) == ["1k-5fold", "all"]
    for protocol in ("1k-5fold", "all"):
        assert payload["test"][protocol] == evaluate_embeddings([(images, captions)], protocol)
    assert len(payload["test"]["1k-5fold"]["folds"]) == 5
    assert payload["dev"] is None and payload["dev_rsum"] is None


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
    history = read_evaluations(run_url, options)  # the failed checkpoint has no line
    assert [(h.checkpoint, h.dev_rsum) for h in history] == [("checkpoint_000001", metrics["dev_rsum"])]


def test_a_checkpoint_both_evaluators_record_is_one_line(data: EvalData, models: list[VSRN], tmp_path: Path) -> None:
    """The training's actor and `evaluate.py --checkpoint` (or a --watch CronJob that found it
    first) record the same checkpoint: its metrics.json is rewritten, its history line stays one."""
    run = make_run(tmp_path, data, models)
    evaluate_run(str(run))  # the actor's and --watch's path
    first = read_evaluations(str(run))
    checkpoint = run / "checkpoint_000001"
    again = evaluate_checkpoint(str(checkpoint), str(data.dev.shards), str(data.test.shards), eval_config())
    recorded = record_evaluated(str(checkpoint), again, str(run))  # evaluate.py --checkpoint's path
    assert recorded.problem is None and recorded.is_best  # the best re-evaluated: best.json rewritten
    assert read_json(checkpoint / "metrics.json")["evaluated_at"] == again["evaluated_at"]
    assert read_evaluations(str(run)) == first
    assert len((run / EVALUATIONS_FILE).read_text().splitlines()) == 2

    # A checkpoint outside any run (no run_dir): metrics.json only, no history written anywhere.
    outside = write_checkpoint(tmp_path / "loose", "checkpoint_x", models[0], data.vocab, step=1)
    payload = evaluate_checkpoint(str(outside), None, str(data.test.shards), eval_config(test_protocols=["all"]))
    assert record_evaluated(str(outside), payload, None) == checkpoint_eval.Recorded(is_best=False)
    assert (outside / "metrics.json").is_file() and not (tmp_path / "loose" / EVALUATIONS_FILE).exists()



def test_a_damaged_history_does_not_stop_evaluation_or_model_selection(data: EvalData, models: list[VSRN],
                                                                       tmp_path: Path) -> None:
    run = make_run(tmp_path, data, models[:1])
    (run / EVALUATIONS_FILE).write_text("{cut\n")  # damaged by hand: the history cannot be extended
    [summary] = evaluate_run(str(run))
    assert summary["status"] == "ok" and summary["is_best"]
    assert summary["error"].startswith(f"{EVALUATIONS_FILE} not updated: ValueError: ")
    assert "line 1: not valid JSON" in summary["error"]
    assert read_json(run / "best.json")["checkpoint"] == str(run / "checkpoint_000001")
    assert (run / "checkpoint_000001" / "metrics.json").is_file()
    assert (run / EVALUATIONS_FILE).read_text() == "{cut\n"  # left for a person to look at
