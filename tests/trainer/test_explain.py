"""Tests of the explain.py and caption.py CLIs on tiny checkpoints and real shards.

explain.py: the pinned KEY.json (its numbers equal model/interpret.py's on the same record), the three
figure forms (over a picture, over a canvas of boxes, a bar chart without boxes) and its errors.
caption.py: greedy captions with the attention per word, and the error for a model without L_G.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from eval_run_helpers import (
    EvalData,
    PictureSplit,
    make_caption_model,
    make_model,
    run_script,
    write_checkpoint,
)
from PIL import Image

from data_shards.lookup import read_records
from model.interpret import region_attention


def test_explain_writes_the_pinned_json_and_the_map_over_the_picture(pictures: PictureSplit, tmp_path: Path,
                                                                      cli: Any) -> None:
    model = make_model(pictures.vocab, seed=1)
    checkpoint = write_checkpoint(tmp_path / "run", "checkpoint_000001", model, pictures.vocab, step=1)
    out = tmp_path / "explained"
    keys = ["test-0000002", "test-0000005"]
    result = run_script("explain.py", "--checkpoint", str(checkpoint), "--data", str(pictures.shards), "--key", keys[0],
                     "--key", keys[1], "--output", str(out), "--image", str(pictures.images), "--lambda", "2")
    assert result.returncode == 0, result.stderr
    for key, record in zip(keys, read_records(str(pictures.shards), keys)):
        payload = json.loads((out / f"{key}.json").read_text())
        assert set(payload) == {"key", "lambda", "regions"} and payload["key"] == key and payload["lambda"] == 2.0
        [expected] = region_attention(model, torch.from_numpy(record.regions).unsqueeze(0), lam=2.0)
        regions = payload["regions"]
        assert [r["index"] for r in regions] == list(range(len(record.regions)))
        assert all(set(r) == {"index", "box", "correlation", "rank", "score"} for r in regions)
        assert [r["box"] for r in regions] == record.boxes.tolist()
        np.testing.assert_allclose([r["correlation"] for r in regions], expected.correlation, rtol=1e-5, atol=1e-6)
        assert [r["rank"] for r in regions] == expected.rank.tolist()
        assert [r["score"] for r in regions] == [2.0 * (len(regions) - r["rank"]) ** 2 for r in regions]
        with Image.open(out / f"{key}.png") as figure:
            assert figure.format == "PNG" and figure.size[0] > 300

    # One key and one picture file; and the canvas of the stored size when no picture is given.
    single = cli("explain.py", "--checkpoint", str(checkpoint / "inference"), "--data", str(pictures.shards),
                  "--key", keys[0], "--output", str(tmp_path / "one"), "--image", str(pictures.images / f"{keys[0]}.png"))
    assert single.returncode == 0, single.stderr
    canvas = cli("explain.py", "--checkpoint", str(checkpoint), "--data", str(pictures.shards), "--key", keys[0],
                  "--output", str(tmp_path / "canvas"))
    assert canvas.returncode == 0, canvas.stderr
    assert (tmp_path / "canvas" / f"{keys[0]}.png").stat().st_size > 0
    assert json.loads((tmp_path / "canvas" / f"{keys[0]}.json").read_text()) == \
        json.loads((out / f"{keys[0]}.json").read_text()) | {"lambda": 50.0, "regions": [
            r | {"score": 50.0 * (4 - r["rank"]) ** 2} for r in json.loads((out / f"{keys[0]}.json").read_text())["regions"]]}


def test_explain_without_boxes_draws_the_scores_and_errors_name_the_input(data: EvalData, tmp_path: Path,
                                                                          cli: Any) -> None:
    checkpoint = write_checkpoint(tmp_path / "run", "checkpoint_000001", make_model(data.vocab, 1), data.vocab, step=1)
    out = tmp_path / "bars"
    result = cli("explain.py", "--checkpoint", str(checkpoint), "--data", str(data.test.shards),
                  "--key", "test-0000001", "--output", str(out))
    assert result.returncode == 0, result.stderr
    payload = json.loads((out / "test-0000001.json").read_text())
    assert all(r["box"] is None for r in payload["regions"]) and (out / "test-0000001.png").stat().st_size > 0
    for args, message in [
        (["--key", "test-0000001", "--key", "missing-key"], "no sample with key 'missing-key'"),
        (["--key", "test-0000001", "--image", str(tmp_path / "nothing.png")], "nothing.png: no such file"),
        (["--key", "test-0000001", "--key", "test-0000002", "--image", str(out / "test-0000001.png")],
         "is one file for several keys"),
    ]:
        failed = cli("explain.py", "--checkpoint", str(checkpoint), "--data", str(data.test.shards),
                      "--output", str(tmp_path / "x"), *args)
        assert failed.returncode == 2 and message in failed.stderr, failed.stderr
    bad_lambda = cli("explain.py", "--checkpoint", str(checkpoint), "--data", str(data.test.shards),
                      "--key", "test-0000001", "--output", str(tmp_path / "x"), "--lambda", "-1")
    assert bad_lambda.returncode == 2 and "--lambda must be a positive number" in bad_lambda.stderr


def test_caption_prints_greedy_captions_with_attention_and_refuses_a_model_without_l_g(
        pictures: PictureSplit, tmp_path: Path, cli: Any) -> None:
    model = make_caption_model(pictures.vocab, seed=3)
    checkpoint = write_checkpoint(tmp_path / "run", "checkpoint_000001", model, pictures.vocab, step=1)
    keys = ["test-0000000", "test-0000004"]
    result = run_script("caption.py", "--checkpoint", str(checkpoint), "--data", str(pictures.shards),
                     "--key", keys[0], "--key", keys[1], "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    records = read_records(str(pictures.shards), keys)
    for entry, record in zip(payload, records):
        generated = model.generate_captions(torch.from_numpy(record.regions).unsqueeze(0))
        assert entry["key"] == record.key and entry["references"] == record.captions
        assert entry["caption"] == pictures.vocab.decode(generated.tokens[0]) == " ".join(entry["words"])
        assert len(entry["attention"]) == len(entry["words"])
        for step, weights in enumerate(entry["attention"]):
            assert len(weights) == record.regions.shape[0] and sum(weights) == pytest.approx(1.0, abs=1e-4)
            np.testing.assert_allclose(weights, generated.attention[0, step].numpy(), atol=1e-6)
    plain = cli("caption.py", "--checkpoint", str(checkpoint), "--data", str(pictures.shards), "--key", keys[0])
    assert plain.returncode == 0 and plain.stdout.startswith(f"{keys[0]}: ") and "reference: " in plain.stdout

    without = write_checkpoint(tmp_path / "run", "checkpoint_000002", make_model(pictures.vocab, 1), pictures.vocab, 2)
    refused = cli("caption.py", "--checkpoint", str(without), "--data", str(pictures.shards), "--key", keys[0])
    assert refused.returncode == 2 and "trained without the caption loss L_G" in refused.stderr
