"""Tests of trainer/inference/retrieval.py and the retrieve.py CLI: retrieval agrees with the evaluator.

Real inputs: tiny sharded splits and tiny VSRN checkpoints in the run layout (eval_run_helpers).
"Agrees" means: the ranking of every query equals a brute-force ranking of the evaluator's own
similarity matrix (images @ captions.T of the same embeddings), and the position of the ground truth
in it is the evaluator's rank (trainer.evaluation.embedding_ranks).
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
    embed,
    run_script,
    write_checkpoint,
    write_run_config,
)

from model.vsrn import VSRN
from trainer.inference import retrieval
from trainer.evaluation import embedding_ranks
from trainer.inference.checkpoint import load_checkpoint
from trainer.inference.retrieval import (
    QueryError,
    encode_texts,
    load_gallery,
    search_by_image,
    search_by_text,
)
from trainer.run.layout import GALLERY_DIR


@pytest.fixture(scope="module")
def checkpoint(data: EvalData, models: list[VSRN], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("retrieval") / "run"
    write_run_config(run, str(data.dev.shards), str(data.test.shards), ["all"])
    return write_checkpoint(run, "checkpoint_000010", models[0], data.vocab, step=10)


def _brute_force(queries: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The evaluator's block product for these rows, and its stable descending order."""
    scores = torch.mm(torch.from_numpy(queries), torch.from_numpy(candidates).T).numpy()
    return scores, np.argsort(-scores, axis=1, kind="stable")


def test_rankings_equal_the_evaluators_similarity_matrix(data: EvalData, models: list[VSRN],
                                                          checkpoint: Path) -> None:
    loaded = load_checkpoint(str(checkpoint))
    gallery = load_gallery(loaded, str(data.test.shards), batch_size=16, cache=False)
    # Keys and captions as the split holds them, in the evaluation reader's (source) order.
    assert gallery.index.keys == tuple(f"test-{i:07d}" for i in range(len(data.test.ims)))
    assert gallery.caption_texts == data.test.captions
    images, captions = embed(models[0], data.vocab, data.test)
    np.testing.assert_allclose(gallery.images, images, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gallery.captions, captions, rtol=1e-5, atol=1e-6)
    n = len(gallery.index)
    i2t_ranks, t2i_ranks = embedding_ranks([(gallery.images, gallery.captions)])

    # Image -> text: the whole ranking of every image, and the evaluator's rank of its captions.
    everything = search_by_image(gallery, list(gallery.index.keys), 5 * n)
    scores, order = _brute_force(gallery.images, gallery.captions)
    for i, hits in enumerate(everything):
        assert [h.row for h in hits] == order[i].tolist()
        np.testing.assert_array_equal([h.score for h in hits], scores[i, order[i]])
        first_own = next(h.rank for h in hits if h.key == gallery.index.keys[i])
        assert first_own - 1 == i2t_ranks[i]
        assert all(h.caption == gallery.caption(h.row)[2] and h.key == gallery.caption(h.row)[0] for h in hits)

    # Text -> image from the captions' own texts, tokenized as training does.
    texts = gallery.caption_texts
    queries = encode_texts(loaded.model, loaded.vocab, texts)
    np.testing.assert_allclose(queries, gallery.captions, rtol=1e-5, atol=1e-6)
    t2i = search_by_text(gallery, gallery.captions, n)
    _, order = _brute_force(gallery.captions, gallery.images)
    for j, hits in enumerate(t2i):
        assert [h.row for h in hits] == order[j].tolist()
        own = next(h.rank for h in hits if h.row == j // 5)
        assert own - 1 == t2i_ranks[j]
    with pytest.raises(QueryError, match="text query 2 is empty"):
        encode_texts(loaded.model, loaded.vocab, ["a dog", "  "])


def test_the_gallery_is_cached_beside_a_run_checkpoint(data: EvalData, checkpoint: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_checkpoint(str(checkpoint))
    first = load_gallery(loaded, str(data.test.shards), batch_size=16)
    cached = list((checkpoint / GALLERY_DIR).glob("*.npz"))
    assert len(cached) == 1

    def no_encoding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the cached gallery should have been used")

    monkeypatch.setattr(retrieval, "encode_split", no_encoding)
    second = load_gallery(loaded, str(data.test.shards), batch_size=16)
    assert np.array_equal(first.images, second.images) and np.array_equal(first.captions, second.captions)
    assert second.index == first.index  # keys and captions come from the cache too
    # Another region order is another encoding: not taken from this cache.
    with pytest.raises(AssertionError, match="cached gallery"):
        load_gallery(loaded, str(data.test.shards), batch_size=16, region_order="random")
    # The inference directory stands for its run checkpoint (same cache).
    via_inference = load_checkpoint(str(checkpoint / "inference"))
    assert via_inference.is_run_checkpoint and via_inference.location.url == str(checkpoint)
    # Another split has another cache entry: it must be encoded.
    with pytest.raises(AssertionError, match="cached gallery"):
        load_gallery(loaded, str(data.dev.shards), batch_size=16)


def test_cli_json_and_table(data: EvalData, checkpoint: Path, cli: Any) -> None:
    loaded = load_checkpoint(str(checkpoint))
    gallery = load_gallery(loaded, str(data.test.shards), batch_size=16)
    text = data.test.captions[7]
    result = run_script("retrieve.py", "--checkpoint", str(checkpoint), "--data", str(data.test.shards), "--text", text,
                       "--text", "a zebra number 3", "--top-k", "4", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert [entry["query"] for entry in payload] == [text, "a zebra number 3"]
    expected = search_by_text(gallery, encode_texts(loaded.model, loaded.vocab, [text]), 4)[0]
    # Same ranking; the scores may differ in the last bits (the CLI encodes both texts in one batch).
    assert [(r["rank"], r["key"]) for r in payload[0]["results"]] == [(h.rank, h.key) for h in expected]
    assert [r["score"] for r in payload[0]["results"]] == pytest.approx([h.score for h in expected], abs=1e-6)
    assert all(set(r) == {"rank", "key", "score"} for entry in payload for r in entry["results"])
    assert "'a zebra number 3': not in the checkpoint's vocabulary (read as <unk>): zebra" in result.stderr

    key = gallery.index.keys[3]
    result = cli("retrieve.py", "--checkpoint", str(checkpoint), "--data", str(data.test.shards), "--image", key,
                       "--top-k", "5", "--json")
    assert result.returncode == 0, result.stderr
    [entry] = json.loads(result.stdout)
    hits = search_by_image(gallery, [key], 5)[0]
    assert entry == {"query": key, "results": [
        {"rank": h.rank, "key": h.key, "score": h.score, "caption": h.caption, "caption_index": h.caption_index}
        for h in hits]}

    table = cli("retrieve.py", "--checkpoint", str(checkpoint), "--data", str(data.test.shards), "--image", key)
    assert table.returncode == 0, table.stderr
    marked = [line for line in table.stdout.splitlines() if "✓" in line]
    assert len(marked) == sum(h.key == key for h in hits) and all(f"({key}," in line for line in marked)


@pytest.mark.parametrize(("args", "message"), [
    (["--image", "test-0000001", "--image", "no-such-key"], "no sample with key 'no-such-key'"),
    (["--text", "a dog", "--text", " "], "--text query 2 is empty"),
])
def test_cli_errors_name_the_query(data: EvalData, checkpoint: Path, args: list[str], message: str,
                                   cli: Any) -> None:
    result = cli("retrieve.py", "--checkpoint", str(checkpoint), "--data", str(data.test.shards), *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    missing = cli("retrieve.py", "--checkpoint", str(checkpoint.parent / "nope"), "--data", str(data.test.shards),
                        "--text", "a dog")
    assert missing.returncode == 2 and "nope" in missing.stderr
