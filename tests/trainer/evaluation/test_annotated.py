"""The annotated protocols ``eccv`` and ``cxc`` (trainer/evaluation/annotated.py) against the
eccv-caption package's own metric functions, on the real COCO 5K layout (5,000 images x 25,000 captions) with
small integer-valued embeddings: every product is exact in float32, so the reference rankings
built here in numpy see the very scores the blocked evaluation sees, and the many exact ties test
the tie rule (a positive before every non-positive with the same score)."""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import pytest

from data_shards.coco_annotations import (
    coco_5k_test_ids,
    cxc_ground_truth,
    eccv_ground_truth,
)
from trainer.evaluation import (
    CXC_KEYS,
    ECCV_KEYS,
    EvaluationInputError,
    GalleryIds,
    evaluate_embeddings,
    evaluate_embeddings_protocols,
    evaluate_similarities_protocols,
    format_table,
)

DIM = 8
TOP = 50  # as the package's example: enough for mAP@R (at most 48 positives) and R@10


@pytest.fixture(scope="module")
def coco_ids() -> tuple[np.ndarray, np.ndarray]:
    return coco_5k_test_ids()


@pytest.fixture(scope="module")
def embeddings(coco_ids: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Integer embeddings where the annotated extra positives score high: a caption is its own
    image's vector plus those of the images the ECCV annotations pair it with, plus noise."""
    image_ids, caption_ids = coco_ids
    rng = np.random.default_rng(7)
    images = rng.integers(-2, 3, size=(image_ids.size, DIM)).astype(np.float32)
    captions = np.repeat(images, 5, axis=0) + rng.integers(-2, 3, size=(caption_ids.size, DIM))
    image_row = {int(i): r for r, i in enumerate(image_ids)}
    caption_row = {int(c): r for r, c in enumerate(caption_ids)}
    truth = eccv_ground_truth()
    for image, positives in truth.i2t.items():
        for caption in positives[::2]:  # half of them: extras both found and missed
            if caption in caption_row and caption_row[caption] // 5 != image_row[image]:
                captions[caption_row[caption]] += images[image_row[image]]
    for caption, positives in truth.t2i.items():
        for image in positives[::2]:
            if image_row[image] != caption_row[caption] // 5:
                captions[caption_row[caption]] += images[image_row[image]]
    return images, captions.astype(np.float32)


@pytest.fixture(scope="module")
def single(embeddings: tuple[np.ndarray, np.ndarray]) -> dict[str, dict[str, Any]]:
    """The three protocols of one pass on the standard order (no ids given)."""
    return evaluate_embeddings_protocols([embeddings], ["all", "cxc", "eccv"])


def _rankings(scores_of: Any, queries: np.ndarray, query_rows: dict[int, int], gallery_ids: np.ndarray,
              positives: dict[int, tuple[int, ...]], depth: int) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """The first ``depth`` gallery ids per query, sorted by score descending with ties broken
    positives first (the first mapping) or positives last (the second), then by gallery position.
    (Partitioning first is exact for the metrics: items tied on the sort key at the cut share
    their positivity, all that the metrics look at.)"""
    gallery_row = {int(g): r for r, g in enumerate(gallery_ids)}
    first: dict[int, list[int]] = {}
    last: dict[int, list[int]] = {}
    for chunk in range(0, queries.size, 1000):
        chunk_queries = queries[chunk:chunk + 1000]
        scores = scores_of(np.array([query_rows[int(q)] for q in chunk_queries]))
        assert np.array_equal(scores, np.round(scores)), "scores must be exact integers"
        is_positive = np.zeros(scores.shape, dtype=np.float32)
        for row, query in enumerate(chunk_queries):
            is_positive[row, [gallery_row[p] for p in positives[int(query)] if p in gallery_row]] = 1
        doubled = -2 * scores  # small integers: exact in float32, as are the keys below
        for ranked, key in ((first, doubled - is_positive), (last, doubled - (1 - is_positive))):
            top = np.argpartition(key, depth - 1, axis=1)[:, :depth]
            top_keys = np.take_along_axis(key, top, axis=1)
            order = np.take_along_axis(top, np.lexsort((top, top_keys), axis=1), axis=1)
            ranked.update(zip(chunk_queries.tolist(), gallery_ids[order].tolist()))
    return first, last


def _package_metrics(metric: Any, images: np.ndarray, captions: np.ndarray, ids: tuple[np.ndarray, np.ndarray],
                     protocol: str) -> tuple[dict[str, float], dict[str, float]]:
    """The package's numbers, in percent with our keys, on rankings built from the same scores:
    with ties broken positives first (our rule) and, to show that the ties matter, positives last."""
    image_ids, caption_ids = ids
    truth = eccv_ground_truth() if protocol == "eccv" else cxc_ground_truth()
    # mAP@R and R-Precision look R deep (at most 48 ECCV positives), R@K K deep.
    depth = 48 if protocol == "eccv" else 10
    image_rows = {int(i): r for r, i in enumerate(image_ids)}
    caption_rows = {int(c): r for r, c in enumerate(caption_ids)}
    i2t = _rankings(lambda rows: images[rows] @ captions.T, np.array(list(truth.i2t)), image_rows,
                    caption_ids, truth.i2t, depth)
    t2i = _rankings(lambda rows: captions[rows] @ images.T, np.array(list(truth.t2i)), caption_rows,
                    image_ids, truth.t2i, depth)
    if protocol == "eccv":
        targets: dict[str, Any] = {"target_metrics": ("eccv_r1", "eccv_map_at_r", "eccv_rprecision")}
        names = {"map_at_r": "eccv_map_at_r", "rprecision": "eccv_rprecision", "r1": "eccv_r1"}
    else:
        targets = {"target_metrics": ("cxc_recalls",), "Ks": (1, 5, 10)}
        names = {f"r{k}": f"cxc_r{k}" for k in (1, 5, 10)}
    results = []
    for rule in (0, 1):
        scores = metric.compute_all_metrics(i2t[rule], t2i[rule], **targets)
        results.append({f"{d}_{ours}": 100.0 * float(scores[theirs][d])
                        for ours, theirs in names.items() for d in ("i2t", "t2i")})
    return results[0], results[1]


@pytest.fixture(scope="module")
def metric() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package warns when the optional ujson is missing
        from eccv_caption import Metrics

        return Metrics()


def _approx(result: dict[str, float], keys: tuple[str, ...]) -> Any:
    return pytest.approx({key: result[key] for key in keys}, rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("protocol", ["eccv", "cxc"])
def test_equals_the_package_on_the_standard_5k_order(
    protocol: str, embeddings: tuple[np.ndarray, np.ndarray], coco_ids: tuple[np.ndarray, np.ndarray], metric: Any
) -> None:
    images, captions = embeddings
    started = time.perf_counter()
    ours = evaluate_embeddings([(images, captions)], protocol, block_size=700)  # no ids: the standard order
    elapsed = time.perf_counter() - started
    keys = ECCV_KEYS if protocol == "eccv" else CXC_KEYS
    assert tuple(ours) == keys
    expected, opposite = _package_metrics(metric, images, captions, coco_ids, protocol)
    assert ours == _approx(expected, keys)
    # The ties matter: the opposite tie rule gives other numbers, so the rule is really tested.
    assert opposite != _approx(expected, keys)
    assert elapsed < 30


def test_annotations_change_the_numbers(embeddings: tuple[np.ndarray, np.ndarray],
                                        single: dict[str, dict[str, Any]]) -> None:
    images, captions = embeddings
    results = single
    assert list(results) == ["all", "cxc", "eccv"]
    # CxC adds positives to the original pairs: every recall is at least the original one, and
    # with these embeddings (built on the extra pairs) strictly higher somewhere.
    for key in CXC_KEYS:
        assert results["cxc"][key] >= results["all"][key] - 1e-9
    assert any(results["cxc"][key] > results["all"][key] for key in CXC_KEYS)
    # One pass or one protocol at a time: the same numbers.
    assert results["eccv"] == evaluate_embeddings([(images, captions)], "eccv")
    table = format_table(results)
    assert "mAP@R" in table and "CxC" in table and f"{results['eccv']['i2t_map_at_r']:6.2f}" in table


def test_ids_follow_the_gallery_order(
    embeddings: tuple[np.ndarray, np.ndarray], coco_ids: tuple[np.ndarray, np.ndarray],
    single: dict[str, dict[str, Any]],
) -> None:
    """Permuted images (each with its five captions) and their ids: the same metrics; image ids
    alone also do, the captions being each image's five of the standard order."""
    images, captions = embeddings
    image_ids, caption_ids = coco_ids
    order = np.random.default_rng(3).permutation(images.shape[0])
    caption_order = (5 * order[:, None] + np.arange(5)).reshape(-1)
    standard = {protocol: single[protocol] for protocol in ("eccv", "cxc")}
    ids = GalleryIds.from_arrays(image_ids[order], caption_ids[caption_order])
    permuted = evaluate_embeddings_protocols([(images[order], captions[caption_order])], ["eccv", "cxc"], ids=ids)
    for protocol, expected in standard.items():
        assert permuted[protocol] == pytest.approx(expected, rel=1e-12, abs=1e-9)
    only_images = GalleryIds.from_arrays([str(i) for i in image_ids[order]])  # shards' source_id strings
    assert np.array_equal(only_images.caption_ids, caption_ids[caption_order])


def test_ensemble_averages_similarities(embeddings: tuple[np.ndarray, np.ndarray],
                                        single: dict[str, dict[str, Any]]) -> None:
    """An ensemble of two models ranks by the mean of their similarities, which is the single
    model with both embeddings side by side (exact here: integer scores, halved)."""
    images, captions = embeddings
    rng = np.random.default_rng(11)
    images2 = rng.integers(-2, 3, size=images.shape).astype(np.float32)
    captions2 = (np.repeat(images2, 5, axis=0) + rng.integers(-1, 2, size=captions.shape)).astype(np.float32)
    ensemble = evaluate_embeddings_protocols([(images, captions), (images2, captions2)], ["eccv", "cxc"])
    joined = evaluate_embeddings_protocols(
        [(np.hstack([images, images2]), np.hstack([captions, captions2]))], ["eccv", "cxc"])
    for protocol in ensemble:
        assert ensemble[protocol] == pytest.approx(joined[protocol], rel=1e-12, abs=1e-9)
    assert ensemble["cxc"] != pytest.approx(single["cxc"])


def test_similarity_matrices_give_the_same_numbers(embeddings: tuple[np.ndarray, np.ndarray],
                                                   single: dict[str, dict[str, Any]]) -> None:
    images, captions = embeddings
    sims = images @ captions.T
    from_sims = evaluate_similarities_protocols([sims], ["all", "eccv", "cxc"])
    from_embeddings = single
    for protocol in from_sims:
        assert from_sims[protocol] == pytest.approx(from_embeddings[protocol], rel=1e-12, abs=1e-9)


def test_bad_inputs_say_what_is_needed(coco_ids: tuple[np.ndarray, np.ndarray]) -> None:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((10, 4)).astype(np.float32)
    captions = rng.standard_normal((50, 4)).astype(np.float32)
    with pytest.raises(EvaluationInputError, match=r"'eccv'.*image and caption ids.*5000 images x 25000 captions"):
        evaluate_embeddings([(images, captions)], "eccv")
    image_ids, caption_ids = coco_ids
    subset = GalleryIds.from_arrays(image_ids[:10], caption_ids[:50])
    with pytest.raises(EvaluationInputError, match=r"'cxc'.*of its 5000 image queries are not among the ranked ids"):
        evaluate_embeddings([(images, captions)], "cxc", ids=subset)
    with pytest.raises(EvaluationInputError, match="image id 1 is not in the COCO 5K test split"):
        GalleryIds.from_arrays(np.arange(1, 11))
    with pytest.raises(EvaluationInputError, match="occurs more than once"):
        GalleryIds.from_arrays(np.repeat(image_ids[:1], 2), caption_ids[:10])
    with pytest.raises(EvaluationInputError, match="need 50 caption ids, got 49"):
        GalleryIds.from_arrays(image_ids[:10], caption_ids[:49])
    with pytest.raises(EvaluationInputError, match="COCO ids must be integers"):
        GalleryIds.from_arrays(np.array(["a"] * 10), caption_ids[:50])


# ----------------------------------------------------------------------------------------------
# The evaluation worker's path: COCO-id shards of the 5K split, a checkpoint, evaluate_checkpoint


def test_checkpoint_evaluation_on_coco_id_shards(tmp_path: Any, coco_ids: tuple[np.ndarray, np.ndarray]) -> None:
    """5,000 tiny images (4 regions of 8 features) converted with --coco-ids: the shards carry the
    ids, the reader hands them over, and evaluate_checkpoint reports eccv and cxc equal to ranking
    the directly computed embeddings, beside the recall protocols."""
    from eval_run_helpers import (
        FEATURES,
        REGIONS,
        WORDS,
        Split,
        embed,
        make_model,
        write_checkpoint,
    )

    from data_shards.convert import main as convert_main
    from data_shards.reader import ReaderConfig
    from model.vocab import build_vocab
    from trainer.evaluation import results_table
    from trainer.evaluator.checkpoint_eval import evaluate_checkpoint
    from trainer.inference.encoding import encode_split
    from trainer.config import EvalConfig

    started = time.perf_counter()
    rng = np.random.default_rng(5)
    images = 5000
    ims = rng.standard_normal((images, REGIONS, FEATURES)).astype(np.float32)
    captions = [f"a {WORDS[(i + k) % len(WORDS)]} {WORDS[i % 7]} number {i % 97} variant {k}"
                for i in range(images) for k in range(5)]
    precomp = tmp_path / "precomp"
    precomp.mkdir()
    np.save(precomp / "testall_ims.npy", ims)
    (precomp / "testall_caps.txt").write_text("".join(c + "\n" for c in captions), encoding="utf-8")
    shards = tmp_path / "shards"
    assert convert_main(["--precomp", str(precomp), "--split", "testall", "--coco-ids", "--output", str(shards),
                         "--shard-size", "2500", "--dtype", "float32"]) == 0
    split = Split(shards=shards, ims=ims, captions=captions)
    vocab = build_vocab(captions[:500], threshold=1)
    model = make_model(vocab, seed=3)
    checkpoint = write_checkpoint(tmp_path / "run", "checkpoint_000001", model, vocab, step=7)

    found: list[Any] = []
    encode_split(model, vocab, ReaderConfig(str(shards), num_workers=0), 1000, "cpu", max_images=10, ids=found)
    assert np.array_equal(found[0].image_ids, coco_ids[0][:10])
    assert np.array_equal(found[0].caption_ids, coco_ids[1][:50])

    config = EvalConfig(test_protocols=["all", "eccv", "cxc"], batch_size=1000, qualitative_queries=0)
    payload = evaluate_checkpoint(str(checkpoint), None, str(shards), config)
    assert payload["skipped"] == {} and list(payload["test"]) == ["all", "eccv", "cxc"]
    expected = evaluate_embeddings_protocols([embed(model, vocab, split)], ["all", "eccv", "cxc"])
    for protocol in ("all", "eccv", "cxc"):
        assert payload["test"][protocol] == pytest.approx(expected[protocol], abs=1e-9)
    table = results_table(payload)
    assert "test eccv" in table and "test cxc" in table and "mAP@R" in table
    assert time.perf_counter() - started < 90


def test_checkpoint_evaluation_skips_annotated_protocols_without_coco_ids(tmp_path: Any) -> None:
    """A small test split without ids is not the COCO 5K split: eccv/cxc are skipped, with why."""
    from eval_run_helpers import build_eval_data, make_model, write_checkpoint

    from trainer.evaluator.checkpoint_eval import evaluate_checkpoint
    from trainer.config import EvalConfig

    data = build_eval_data(tmp_path, dev_images=5, test_images=12)
    model = make_model(data.vocab, seed=1)
    checkpoint = write_checkpoint(tmp_path / "run", "checkpoint_000001", model, data.vocab, step=1)
    config = EvalConfig(test_protocols=["all", "eccv", "cxc"], batch_size=16, qualitative_queries=0)
    payload = evaluate_checkpoint(str(checkpoint), None, str(data.test.shards), config)
    assert list(payload["test"]) == ["all"]
    assert set(payload["skipped"]) == {"eccv", "cxc"}
    assert "5000 images x 25000 captions" in payload["skipped"]["eccv"]
