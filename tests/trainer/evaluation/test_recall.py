"""Tests for trainer/evaluation/ (metrics, scorer, protocols, table): vectorized recall ranks and
metrics against the reference.

The reference algorithm (VSRN / VSE++ ``evaluation.py``) is re-implemented here as a plain
per-query numpy loop: argsort of descending scores, np.where for the positives. The module's
vectorized ranks must agree with it exactly on tie-free data.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch

from trainer.evaluation import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    METRIC_KEYS,
    PROTOCOLS,
    EvaluationInputError,
    RecallMetrics,
    choose_block_size,
    embedding_ranks,
    evaluate_embeddings,
    evaluate_similarities,
    format_table,
    i2t_ranks,
    metrics_from_ranks,
    recall_at_k,
    similarity_ranks,
    t2i_ranks,
    validate_protocol,
)

PINNED_KEYS = [
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr",
    "rsum",
]


# ----------------------------------------------------------------------------------------------
# The reference algorithm, one query at a time


def reference_i2t_ranks(num_images: int, scores_of_image: Callable[[int], np.ndarray]) -> np.ndarray:
    """Reference i2t: argsort one image's scores over all captions, best position of its 5."""
    ranks = np.zeros(num_images)
    for index in range(num_images):
        d = scores_of_image(index)
        inds = np.argsort(d)[::-1]
        rank = 1e20
        for i in range(5 * index, 5 * index + 5):
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    return ranks


def reference_t2i_ranks(num_images: int, scores_of_captions: Callable[[int], np.ndarray]) -> np.ndarray:
    """Reference t2i: for image ``index``, its 5 captions' (5, N) scores; position of ``index``."""
    ranks = np.zeros(5 * num_images)
    for index in range(num_images):
        d = scores_of_captions(index)
        for i in range(len(d)):
            inds = np.argsort(d[i])[::-1]
            ranks[5 * index + i] = np.where(inds == index)[0][0]
    return ranks


def reference_ranks_from_sims(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = sims.shape[0]
    return (
        reference_i2t_ranks(n, lambda index: sims[index]),
        reference_t2i_ranks(n, lambda index: sims[:, 5 * index:5 * index + 5].T),
    )


def reference_ranks_from_embeddings(images: np.ndarray, captions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = images.shape[0]
    return (
        reference_i2t_ranks(n, lambda index: np.dot(images[index:index + 1], captions.T).flatten()),
        reference_t2i_ranks(n, lambda index: np.dot(captions[5 * index:5 * index + 5], images.T)),
    )


def reference_metrics(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    """The reference formulas, written out independently of the module."""
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        out[f"{name}_r1"] = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
        out[f"{name}_r5"] = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
        out[f"{name}_r10"] = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
        out[f"{name}_medr"] = np.floor(np.median(ranks)) + 1
        out[f"{name}_meanr"] = ranks.mean() + 1
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def assert_metrics_equal(actual: dict, expected: dict) -> None:
    assert list(actual)[: len(PINNED_KEYS)] == PINNED_KEYS
    for key in PINNED_KEYS:
        assert actual[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key


# ----------------------------------------------------------------------------------------------
# Data


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def correlated_embeddings(
    rng: np.random.Generator, num_images: int, dim: int, noise: float, dtype=np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """l2-normalized embeddings whose captions are noisy copies of their image: recall is
    neither 0 nor 100, so ranks spread over 0 .. beyond 10. Continuous values: no ties."""
    images = normalize(rng.standard_normal((num_images, dim)))
    captions = normalize(np.repeat(images, 5, axis=0) + noise * rng.standard_normal((5 * num_images, dim)))
    return images.astype(dtype), captions.astype(dtype)


def dyadic_embeddings(rng: np.random.Generator, num_images: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 embeddings in multiples of 1/8 with small magnitude: every dot product, sum and
    halving is exact in float32, so any summation order (blocked matmul, numpy, per-row dots)
    gives bit-identical similarities and the paths can be compared for exact equality."""
    images = rng.integers(-8, 9, size=(num_images, dim)).astype(np.float32) / 8
    noise = rng.integers(-16, 17, size=(5 * num_images, dim)).astype(np.float32) / 8
    return images, np.repeat(images, 5, axis=0) + noise


def overlapping_sims(rng: np.random.Generator, num_images: int, shift: int = 7) -> np.ndarray:
    """A tie-free (N, 5N) float64 similarity matrix that costs O(N) memory: a read-only strided
    view whose row i starts ``shift`` elements after row i-1 in one random buffer, so no two
    entries of a row, or of a column, share a buffer element."""
    buffer = rng.random(shift * num_images + 5 * num_images)
    view = np.lib.stride_tricks.as_strided(
        buffer, shape=(num_images, 5 * num_images), strides=(shift * buffer.itemsize, buffer.itemsize)
    )
    view.flags.writeable = False
    return view


# ----------------------------------------------------------------------------------------------
# A case worked by hand

#                 captions of image 0 ...........  captions of image 1 ...........
HAND_SIMS = np.array(
    [
        [0.10, 0.20, 0.30, 0.40, 0.45, 0.95, 0.50, 0.60, 0.70, 0.80],  # image 0
        [0.05, 0.25, 0.35, 0.30, 0.55, 0.65, 0.75, 0.85, 0.90, 0.15],  # image 1
    ]
)


def test_hand_worked_example() -> None:
    # i2t: image 0's best own caption scores 0.45; five captions of image 1 score higher
    # (0.95, 0.50, 0.60, 0.70, 0.80): rank 5. Image 1's best own caption (0.90) tops its row: 0.
    assert i2t_ranks(HAND_SIMS).tolist() == [5, 0]
    # t2i: caption j is ranked 1 when the other image scores higher on it:
    # j=0: 0.10 > 0.05 -> 0; 1: 0.20 < 0.25 -> 1; 2: 0.30 < 0.35 -> 1; 3: 0.40 > 0.30 -> 0;
    # 4: 0.45 < 0.55 -> 1; 5: 0.65 < 0.95 -> 1; 6: 0.75 > 0.50 -> 0; 7: 0.85 > 0.60 -> 0;
    # 8: 0.90 > 0.70 -> 0; 9: 0.15 < 0.80 -> 1.
    assert t2i_ranks(HAND_SIMS).tolist() == [0, 1, 1, 0, 1, 1, 0, 0, 0, 1]

    result = evaluate_similarities([HAND_SIMS], "all")
    assert result == {
        # ranks [5, 0]: one of two below 1 and below 5, both below 10; median 2.5 -> floor 2,
        # +1 = 3; mean 2.5 + 1 = 3.5.
        "i2t_r1": 50.0, "i2t_r5": 50.0, "i2t_r10": 100.0, "i2t_medr": 3.0, "i2t_meanr": 3.5,
        # ranks: five 0s and five 1s; median 0.5 -> floor 0, +1 = 1; mean 0.5 + 1 = 1.5.
        "t2i_r1": 50.0, "t2i_r5": 100.0, "t2i_r10": 100.0, "t2i_medr": 1.0, "t2i_meanr": 1.5,
        "rsum": 50.0 + 50.0 + 100.0 + 50.0 + 100.0 + 100.0,
    }
    i2t, t2i = reference_ranks_from_sims(HAND_SIMS)
    assert_metrics_equal(result, reference_metrics(i2t, t2i))


def test_ties_count_only_strictly_higher_scores() -> None:
    sims = HAND_SIMS.copy()
    sims[0, 5] = 0.45  # a caption of image 1 now ties image 0's best caption
    sims[0, 6:] = 0.45
    # Nothing scores strictly higher than 0.45 in row 0 any more: rank 0 (ties go to the query).
    assert i2t_ranks(sims).tolist() == [0, 0]
    sims[1, 0] = 0.10  # caption 0: image 1 ties its image 0
    assert t2i_ranks(sims)[0] == 0


def test_i2t_rank_is_the_position_of_the_best_positive() -> None:
    # Counting captions above the *maximum* positive score is the reference's minimum over the
    # five positives' argsort positions: checked here on rows whose positives are spread out.
    rng = np.random.default_rng(1)
    sims = rng.random((30, 150))
    expected = np.array(
        [min(int(np.count_nonzero(sims[i] > sims[i, c])) for c in range(5 * i, 5 * i + 5)) for i in range(30)]
    )
    assert i2t_ranks(sims).tolist() == expected.tolist()
    assert i2t_ranks(sims).tolist() == reference_ranks_from_sims(sims)[0].astype(int).tolist()


# ----------------------------------------------------------------------------------------------
# Agreement with the reference loop


def test_all_protocol_matches_reference_loop_on_similarities() -> None:
    rng = np.random.default_rng(2)
    images, captions = correlated_embeddings(rng, 120, 16, noise=0.9)
    sims = images @ captions.T
    ref_i2t, ref_t2i = reference_ranks_from_sims(sims)
    assert np.array_equal(i2t_ranks(sims), ref_i2t)
    assert np.array_equal(t2i_ranks(sims), ref_t2i)
    # The data spreads the ranks, so every recall cut-off is exercised.
    assert 0 < np.mean(ref_i2t < 1) < np.mean(ref_i2t < 10) < 1
    assert 0 < np.mean(ref_t2i < 1) < np.mean(ref_t2i < 10) < 1
    assert_metrics_equal(evaluate_similarities([sims], "all"), reference_metrics(ref_i2t, ref_t2i))


def test_all_protocol_matches_reference_loop_on_embeddings() -> None:
    rng = np.random.default_rng(3)
    images, captions = correlated_embeddings(rng, 150, 24, noise=0.8)
    ref_i2t, ref_t2i = reference_ranks_from_embeddings(images, captions)
    result = evaluate_embeddings([(images, captions)], "all")
    assert_metrics_equal(result, reference_metrics(ref_i2t, ref_t2i))
    assert "folds" not in result


def test_float32_embeddings_match_the_reference_loop() -> None:
    # In float32 a caption's score with its own image, computed on its own, differs in the last
    # bit from the same entry of a blocked matrix product for about a third of the captions;
    # the caption's own image must never be counted as scoring above itself.
    rng = np.random.default_rng(18)  # a seed whose data meets the precondition below
    images, captions = correlated_embeddings(rng, 100, 64, noise=0.8, dtype=np.float32)
    sims = images.astype(np.float64) @ captions.astype(np.float64).T
    # Precondition: no near-ties, so float32 rounding cannot legitimately reorder anything.
    own = np.arange(500) // 5
    positives = sims[own, np.arange(500)]
    others = np.ones_like(sims, dtype=bool)
    others[own, np.arange(500)] = False
    assert np.abs(sims - positives[None, :])[others].min() > 1e-5
    best = sims.reshape(100, 100, 5)[np.arange(100), np.arange(100)].max(axis=1)
    not_own = ~np.kron(np.eye(100, dtype=bool), np.ones((1, 5), dtype=bool))
    assert np.abs(sims - best[:, None])[not_own].min() > 1e-5

    ref_i2t, ref_t2i = reference_ranks_from_sims(sims)
    i2t, t2i = embedding_ranks([(images, captions)], block_size=16)
    assert i2t.tolist() == ref_i2t.astype(int).tolist()
    assert t2i.tolist() == ref_t2i.astype(int).tolist()


def test_1k_5fold_matches_reference_loop_on_embeddings() -> None:
    # The reference's fold5 evaluation: fold k ranks images 1000k .. 1000k+999 against their own
    # 5000 captions only; every metric is then averaged over the folds.
    rng = np.random.default_rng(4)
    images, captions = correlated_embeddings(rng, 5000, 16, noise=0.6)
    result = evaluate_embeddings([(images, captions)], "1k-5fold")

    assert len(result["folds"]) == 5
    for k, fold in enumerate(result["folds"]):
        fold_images = images[1000 * k:1000 * (k + 1)]
        fold_captions = captions[5000 * k:5000 * (k + 1)]
        assert_metrics_equal(fold, reference_metrics(*reference_ranks_from_embeddings(fold_images, fold_captions)))
    for key in PINNED_KEYS:
        assert result[key] == pytest.approx(np.mean([fold[key] for fold in result["folds"]]), rel=1e-12)
    # rsum of the means is the mean of the rsums (linear), and it is labelled as what it is.
    assert result["rsum"] == pytest.approx(sum(result[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))


def test_1k_5fold_matches_reference_loop_on_similarities() -> None:
    rng = np.random.default_rng(5)
    sims = overlapping_sims(rng, 5000)
    result = evaluate_similarities([sims], "1k-5fold")
    for k in range(5):
        fold_sims = sims[1000 * k:1000 * (k + 1), 5000 * k:5000 * (k + 1)]
        assert_metrics_equal(result["folds"][k], reference_metrics(*reference_ranks_from_sims(fold_sims)))
    for key in PINNED_KEYS:
        assert result[key] == pytest.approx(np.mean([fold[key] for fold in result["folds"]]), rel=1e-12)


def test_1k_5fold_uses_the_first_5000_images_and_any_block_size() -> None:
    rng = np.random.default_rng(6)
    images, captions = dyadic_embeddings(rng, 5003, 4)
    expected = evaluate_embeddings([(images[:5000], captions[:25000])], "1k-5fold")
    assert evaluate_embeddings([(images, captions)], "1k-5fold") == expected
    # Blocks that straddle fold boundaries in the full matrix must not leak across folds.
    assert evaluate_embeddings([(images, captions)], "1k-5fold", block_size=333) == expected


# ----------------------------------------------------------------------------------------------
# Blocking, paths, ensembles


def test_block_size_does_not_change_results() -> None:
    rng = np.random.default_rng(7)
    images, captions = dyadic_embeddings(rng, 53, 8)
    sims = images @ captions.T
    reference = evaluate_embeddings([(images, captions)], "all", block_size=100_000)
    for block_size in (1, 2, 7, 52):
        assert evaluate_embeddings([(images, captions)], "all", block_size=block_size) == reference
        assert evaluate_similarities([sims], "all", block_size=block_size) == reference
    # A budget too small for one query still makes progress, one query at a time.
    assert evaluate_embeddings([(images, captions)], "all", memory_budget_bytes=1) == reference
    assert i2t_ranks(sims, block_size=1).tolist() == i2t_ranks(sims, block_size=1000).tolist()
    assert t2i_ranks(sims, block_size=3).tolist() == t2i_ranks(sims, block_size=1000).tolist()


def test_block_size_follows_the_memory_budget() -> None:
    # 5000 images x 25000 captions: one block of image queries stays within the budget, which
    # itself is far below the 4 GB the evaluation may use beyond its inputs.
    block = choose_block_size(25_000, torch.float32)
    assert 1 < block < 5000
    assert block * 25_000 * 3 * 4 <= DEFAULT_MEMORY_BUDGET_BYTES < 4 * 2**30
    assert choose_block_size(25_000, torch.float64) < block
    assert choose_block_size(25_000, torch.float32, memory_budget_bytes=1) == 1
    with pytest.raises(EvaluationInputError, match="block_size must be >= 1, got 0"):
        evaluate_similarities([HAND_SIMS], "all", block_size=0)


def test_embeddings_path_equals_similarities_path() -> None:
    rng = np.random.default_rng(8)
    images, captions = dyadic_embeddings(rng, 64, 8)
    sims = images @ captions.T  # exact: see dyadic_embeddings
    assert evaluate_embeddings([(images, captions)], "all") == evaluate_similarities([sims], "all")
    i2t, t2i = embedding_ranks([(images, captions)], block_size=5)
    assert i2t.tolist() == i2t_ranks(sims).tolist() and t2i.tolist() == t2i_ranks(sims).tolist()
    assert [r.tolist() for r in similarity_ranks([sims])] == [i2t.tolist(), t2i.tolist()]
    assert i2t.shape == (64,) and t2i.shape == (320,)
    # Tensors work as well as arrays, gradients or not.
    tensors = (torch.from_numpy(images).requires_grad_(), torch.from_numpy(captions))
    assert evaluate_embeddings([tensors], "all") == evaluate_similarities([torch.from_numpy(sims)], "all")


def test_ensemble_of_embeddings_ranks_the_mean_similarity_matrix() -> None:
    rng = np.random.default_rng(9)
    model_a = dyadic_embeddings(rng, 60, 8)
    model_b = dyadic_embeddings(rng, 60, 8)
    model_c = dyadic_embeddings(rng, 60, 8)
    sims = [images @ captions.T for images, captions in (model_a, model_b, model_c)]

    two = evaluate_embeddings([model_a, model_b], "all")
    assert two == evaluate_similarities([(sims[0] + sims[1]) / 2], "all")
    assert two == evaluate_similarities(sims[:2], "all")
    mean_ranks = [r.tolist() for r in similarity_ranks([(sims[0] + sims[1]) / 2])]
    assert [r.tolist() for r in embedding_ranks([model_a, model_b])] == mean_ranks
    assert [r.tolist() for r in similarity_ranks(sims[:2])] == mean_ranks
    assert two != evaluate_embeddings([model_a], "all")  # the second model is not ignored
    assert evaluate_embeddings([model_a, model_b, model_c], "all") == evaluate_similarities(
        [(sims[0] + sims[1] + sims[2]) / 3], "all"
    )


def test_ensemble_of_similarities_matches_reference_loop_on_the_mean() -> None:
    rng = np.random.default_rng(10)
    sims_a = rng.random((80, 400))
    sims_b = rng.random((80, 400))
    mean = (sims_a + sims_b) / 2
    expected = reference_metrics(*reference_ranks_from_sims(mean))
    assert_metrics_equal(evaluate_similarities([sims_a, sims_b], "all"), expected)


def test_1k_5fold_ensemble_of_embeddings_equals_mean_similarities_per_fold() -> None:
    rng = np.random.default_rng(11)
    model_a = dyadic_embeddings(rng, 5000, 4)
    model_b = dyadic_embeddings(rng, 5000, 4)
    result = evaluate_embeddings([model_a, model_b], "1k-5fold")
    for k in (0, 3):
        rows, cols = slice(1000 * k, 1000 * (k + 1)), slice(5000 * k, 5000 * (k + 1))
        fold_mean = (model_a[0][rows] @ model_a[1][cols].T + model_b[0][rows] @ model_b[1][cols].T) / 2
        assert result["folds"][k] == evaluate_similarities([fold_mean], "all")


def test_input_dtypes_are_computed_in_at_least_float32() -> None:
    rng = np.random.default_rng(12)
    images, captions = dyadic_embeddings(rng, 40, 8)
    expected = evaluate_embeddings([(images, captions)], "all")
    # Half-precision inputs hold these values exactly and must give the same result.
    assert evaluate_embeddings([(images.astype(np.float16), captions.astype(np.float16))], "all") == expected
    assert evaluate_embeddings([(images.astype(np.float64), captions.astype(np.float64))], "all") == expected
    assert evaluate_embeddings([((images * 8).astype(np.int64), (captions * 8).astype(np.int64))], "all") == expected


def test_reduced_matmul_precision_of_the_process_is_not_used() -> None:
    # A trainer may allow TF32 / bf16 float32 matmuls; they would reorder close scores. The
    # evaluation runs in full float32 and leaves the process's setting as it found it.
    rng = np.random.default_rng(17)
    images, captions = correlated_embeddings(rng, 200, 256, noise=1.0, dtype=np.float32)
    expected = embedding_ranks([(images, captions)])
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        ranks = embedding_ranks([(images, captions)])
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert [r.tolist() for r in ranks] == [r.tolist() for r in expected]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    rng = np.random.default_rng(13)
    images, captions = dyadic_embeddings(rng, 5000, 8)
    sims = images[:300] @ captions[:1500].T
    for protocol in PROTOCOLS:
        assert evaluate_embeddings([(images, captions)], protocol, device="cuda") == evaluate_embeddings(
            [(images, captions)], protocol, device="cpu"
        )
    assert evaluate_similarities([sims], "all", device="cuda") == evaluate_similarities([sims], "all")
    on_gpu = (torch.from_numpy(images).cuda(), torch.from_numpy(captions).cuda())
    assert evaluate_embeddings([on_gpu], "all") == evaluate_embeddings([(images, captions)], "all")


# ----------------------------------------------------------------------------------------------
# Metrics and reporting


def test_metrics_from_ranks_and_recall_at_k() -> None:
    i2t = np.array([0, 3, 7, 12])
    t2i = np.array([0, 0, 1, 4, 5, 9, 10, 11, 30, 100])
    metrics = metrics_from_ranks(i2t, t2i)
    assert metrics.to_dict() == pytest.approx(reference_metrics(i2t, t2i))
    assert recall_at_k(i2t, 1) == 25.0 and recall_at_k(i2t, 10) == 75.0
    assert metrics.i2t_medr == 6.0  # median 5.0 -> 5 + 1
    assert metrics.t2i_medr == 8.0  # median (5 + 9) / 2 = 7.0 -> 7 + 1
    assert metrics_from_ranks(torch.tensor(i2t), torch.tensor(t2i)) == metrics
    with pytest.raises(EvaluationInputError, match="non-empty 1-D"):
        metrics_from_ranks(np.array([]), t2i)


def test_recall_metrics_fields_are_the_pinned_keys() -> None:
    assert list(METRIC_KEYS) == PINNED_KEYS
    a = RecallMetrics(*range(11))
    b = RecallMetrics(*range(2, 24, 2))  # 2i + 2
    assert list(a.to_dict()) == PINNED_KEYS
    assert RecallMetrics.mean([a, b]).to_dict() == {key: 1.5 * i + 1 for i, key in enumerate(PINNED_KEYS)}
    with pytest.raises(EvaluationInputError, match="empty"):
        RecallMetrics.mean([])


def test_format_table_lists_protocols_and_folds() -> None:
    fold = evaluate_similarities([HAND_SIMS], "all")
    results = {"1k-5fold": {**fold, "folds": [fold] * 5}, "all": fold}
    table = format_table(results)
    lines = table.splitlines()
    assert "image-to-text" in lines[0] and "text-to-image" in lines[0]
    for header in ("protocol", "R@1", "R@5", "R@10", "medr", "meanr", "rsum"):
        assert header in lines[1]
    rows = [line for line in lines if line.startswith(("1k-5fold", "all", "  fold"))]
    assert [row.split("|")[0].strip() for row in rows] == ["1k-5fold"] + [f"fold {k}" for k in range(5)] + ["all"]
    assert rows[-1].split() == ["all", "|", "50.00", "50.00", "100.00", "3.0", "3.50", "|",
                                "50.00", "100.00", "100.00", "1.0", "1.50", "|", "450.00"]
    assert len({len(line) for line in lines[1:]}) == 1  # columns line up


# ----------------------------------------------------------------------------------------------
# Errors


def _pair(n: int, d: int = 4, captions: int | None = None, caption_dim: int | None = None):
    num_captions = 5 * n if captions is None else captions
    return np.ones((n, d), np.float32), np.ones((num_captions, caption_dim or d), np.float32)


@pytest.mark.parametrize(
    ("models", "protocol", "message"),
    [
        ([_pair(300, 16, captions=1400)], "all",
         r"model 0: captions must have 5 x images rows: images has shape \(300, 16\), so 1500 "
         r"captions are expected, but captions has shape \(1400, 16\)"),
        ([_pair(10, 4, caption_dim=5)], "all",
         r"model 0: images and captions must have the same dimension D: images has shape \(10, 4\), "
         r"captions has shape \(50, 5\)"),
        ([_pair(10, 4), _pair(10, 6)], "all",
         r"ensemble members differ in dimension D: model 0 images have shape \(10, 4\), "
         r"model 1 images have shape \(10, 6\)"),
        ([_pair(10, 4), _pair(12, 4)], "all",
         r"ensemble members differ in number of images N: model 0 .* \(10, 4\), model 1 .* \(12, 4\)"),
        ([_pair(300)], "1k-5fold",
         r"protocol '1k-5fold' needs at least 5000 images \(5 folds of 1000\), got N=300"),
        ([_pair(10)], "5k", r"unknown protocol '5k'; expected one of 1k-5fold, all"),
        ([(np.ones(10), np.ones((50, 1)))], "all",
         r"model 0: images: expected a 2-D array, got 1-D with shape \(10,\)"),
        ([(np.ones((10, 4)), np.ones((50, 4, 1)))], "all", r"model 0: captions: expected a 2-D array, got 3-D"),
        ([(np.ones((0, 4)), np.ones((0, 4)))], "all", r"model 0: images is empty"),
        ([], "all", r"no models given"),
        ([(np.ones((10, 4)),)], "all", r"model 0: expected an \(images, captions\) pair"),
        ([(np.array([["a"]]), np.array([["b"]]))], "all", r"model 0: images: expected a numeric array"),
    ],
)
def test_embedding_input_errors(models: list, protocol: str, message: str) -> None:
    with pytest.raises(EvaluationInputError, match=message):
        evaluate_embeddings(models, protocol)


@pytest.mark.parametrize(
    ("sims_list", "protocol", "message"),
    [
        ([np.ones((10, 40))], "all",
         r"sims.npy: similarity matrix must have shape \(N, 5N\) with N >= 1 \(images x captions\), got \(10, 40\)"),
        ([np.ones((50, 10))], "all", r"got \(50, 10\)"),
        ([np.ones((10, 50)), np.ones((11, 55))], "all",
         r"ensemble members differ in shape: sims.npy similarity matrix has shape \(10, 50\), "
         r"other.npy has shape \(11, 55\)"),
        ([np.ones((10, 50))], "1k-5fold", r"needs at least 5000 images .* got N=10"),
        ([np.ones(50)], "all", r"sims.npy: similarity matrix: expected a 2-D array, got 1-D"),
        ([], "all", r"no similarity matrices given"),
    ],
)
def test_similarity_input_errors(sims_list: list, protocol: str, message: str) -> None:
    names = ["sims.npy", "other.npy"][: len(sims_list)]
    with pytest.raises(EvaluationInputError, match=message):
        evaluate_similarities(sims_list, protocol, names=names)


def test_errors_name_the_given_inputs_and_are_value_errors() -> None:
    with pytest.raises(ValueError, match=r"^a.npz: captions must have 5 x images rows"):
        evaluate_embeddings([_pair(3, captions=14)], "all", names=["a.npz"])
    with pytest.raises(ValueError, match="needs at least 5000 images"):
        validate_protocol("1k-5fold", 4999)
    validate_protocol("1k-5fold", 5000)
    validate_protocol("all", 1)


def test_non_finite_values_are_refused() -> None:
    # A NaN would otherwise rank as "nothing scores higher" and count as a perfect hit.
    images, captions = correlated_embeddings(np.random.default_rng(14), 10, 4, noise=0.5)
    images[3, 1] = np.nan
    with pytest.raises(EvaluationInputError, match="model 0: images contains NaN or infinite values"):
        evaluate_embeddings([(images, captions)], "all")
    sims = HAND_SIMS.copy()
    sims[1, 7] = np.inf
    with pytest.raises(EvaluationInputError, match="b.npy: similarity matrix contains NaN or infinite"):
        evaluate_similarities([HAND_SIMS, sims], "all", names=["a.npy", "b.npy"])


def test_unavailable_device_is_refused() -> None:
    with pytest.raises(EvaluationInputError, match="invalid device 'gpu0'"):
        evaluate_similarities([HAND_SIMS], "all", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(EvaluationInputError, match="CUDA is not available"):
            evaluate_similarities([HAND_SIMS], "all", device="cuda")
