"""Tests of model/interpret.py: the paper's Sec. 4.5 arithmetic against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.interpret import (
    attention_map,
    correlation_ranks,
    rank_scores,
    region_attention,
)
from model.vsrn import VSRN, VSRNConfig


def _tiny_model(**overrides: object) -> VSRN:
    torch.manual_seed(0)
    config = VSRNConfig(img_dim=6, embed_size=8, word_dim=4, vocab_size=10, num_reasoning_layers=2,
                        caption_loss_weight=0.0, **overrides)  # type: ignore[arg-type]
    model = VSRN(config).eval()
    # Non-zero residual branches (they start as the identity), so the RRR layers matter.
    with torch.no_grad():
        for layer in model.image_encoder.reasoning:
            layer.residual_norm.weight.uniform_(0.5, 1.5)
            layer.residual_norm.bias.uniform_(-0.1, 0.1)
    return model


def _hand_reasoned(model: VSRN, regions: torch.Tensor) -> torch.Tensor:
    """V* written out from the paper's equations with the model's weights (one image, (k, img_dim))."""
    enc = model.image_encoder
    v = regions @ enc.fc.weight.T + enc.fc.bias
    v = v / v.norm(dim=0, keepdim=True)  # the reference's l2norm across regions (region_axis)
    k = v.shape[0]
    for layer in enc.reasoning:
        theta = v @ layer.theta.weight.T + layer.theta.bias
        phi = v @ layer.phi.weight.T + layer.phi.bias
        g = v @ layer.g.weight.T + layer.g.bias
        relation = theta @ phi.T / k  # Eq. 2: R = phi(V)^T theta(V) / k, no softmax
        y = (relation @ g) @ layer.residual_proj.weight.T + layer.residual_proj.bias
        bn = layer.residual_norm
        y = (y - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        v = y + v  # Eq. 3
    return v / v.norm(dim=0, keepdim=True)


@torch.no_grad()
def test_correlations_ranks_and_scores_equal_a_hand_computation() -> None:
    model = _tiny_model()
    regions = torch.randn(1, 5, 6)
    [result] = region_attention(model, regions, lam=50.0)
    reasoned = _hand_reasoned(model, regions[0])
    image = model.encode_images(regions)[0]
    torch.testing.assert_close(torch.from_numpy(result.reasoned), reasoned, rtol=1e-5, atol=1e-6)
    expected_corr = (reasoned @ image).numpy()
    np.testing.assert_allclose(result.correlation, expected_corr, rtol=1e-5, atol=1e-6)
    # Ranks by hand: 1 for the largest correlation; scores 50 (k - r)^2 with k = 5.
    order = sorted(range(5), key=lambda i: -expected_corr[i])
    hand_rank = {region: position + 1 for position, region in enumerate(order)}
    assert result.rank.tolist() == [hand_rank[i] for i in range(5)]
    assert result.score.tolist() == [50.0 * (5 - hand_rank[i]) ** 2 for i in range(5)]
    assert sorted(result.score.tolist()) == [0.0, 50.0, 200.0, 450.0, 800.0]


def test_ranks_break_ties_in_stored_order_and_scores_check_their_inputs() -> None:
    assert correlation_ranks(np.array([0.5, 0.9, 0.5, 0.1])).tolist() == [2, 1, 3, 4]
    assert rank_scores(np.array([2, 1, 3, 4]), lam=2.0).tolist() == [8.0, 18.0, 2.0, 0.0]
    with pytest.raises(ValueError, match="ranks must be in 1..3"):
        rank_scores(np.array([1, 2, 4]))
    with pytest.raises(ValueError, match="lambda must be a positive number"):
        rank_scores(np.array([1, 2]), lam=0.0)


def test_regions_are_reported_in_stored_order_whatever_order_the_model_reads() -> None:
    # The GRU reads regions by area: the image vector depends on the order, V* does not.
    model = _tiny_model(region_order="area")
    regions = torch.randn(2, 4, 6)
    boxes = torch.tensor([[[0, 0, 1, 1], [0, 0, 4, 4], [0, 0, 2, 2], [0, 0, 3, 3]]] * 2, dtype=torch.float32)
    stored = region_attention(model, regions, boxes)
    permutation = torch.tensor([2, 0, 3, 1])
    permuted = region_attention(model, regions[:, permutation], boxes[:, permutation])
    for a, b in zip(stored, permuted):
        np.testing.assert_allclose(a.correlation[permutation.numpy()], b.correlation, rtol=1e-5, atol=1e-6)
    # A reader that reorders (feed_order) is the same as giving the model the reordered regions.
    plain = _tiny_model()
    feed = torch.tensor([[3, 1, 0, 2], [1, 0, 2, 3]])
    fed = region_attention(plain, regions, feed_order=feed)
    for b in range(2):
        direct = region_attention(plain, regions[b:b + 1, feed[b]])[0]
        np.testing.assert_allclose(fed[b].correlation[feed[b].numpy()], direct.correlation, rtol=1e-5, atol=1e-6)


def _brute_force_map(boxes: np.ndarray, scores: np.ndarray, width: int, height: int) -> np.ndarray:
    out = np.zeros((height, width))
    for y in range(height):
        for x in range(width):
            for (x1, y1, x2, y2), s in zip(boxes, scores):
                if x1 <= x + 0.5 <= x2 and y1 <= y + 0.5 <= y2:
                    out[y, x] += s
    return out


def test_attention_map_sums_the_scores_of_the_boxes_holding_each_pixel() -> None:
    boxes = np.array([[0, 0, 4, 3], [2, 1, 6, 5], [0, 0, 6, 5]], dtype=np.float32)
    scores = np.array([200.0, 50.0, 0.0])
    heat = attention_map(boxes, scores, 6, 5)
    assert heat[0, 0] == 200.0 and heat[2, 3] == 250.0 and heat[4, 5] == 50.0 and heat[4, 0] == 0.0
    # Fractional, overlapping and out-of-image boxes, against a pixel-by-pixel sum.
    rng = np.random.default_rng(0)
    corners = rng.uniform(-5, 40, size=(30, 2, 2))
    random_boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)
    random_scores = rng.uniform(0, 100, size=30)
    np.testing.assert_allclose(attention_map(random_boxes, random_scores, 33, 21),
                               _brute_force_map(random_boxes, random_scores, 33, 21), rtol=1e-9, atol=1e-9)
    # The map's total is each score times the pixels its box holds.
    areas = [(_brute_force_map(random_boxes[i:i + 1], np.ones(1), 33, 21)).sum() for i in range(30)]
    assert attention_map(random_boxes, random_scores, 33, 21).sum() == pytest.approx(float(np.dot(areas, random_scores)))
    with pytest.raises(ValueError, match="boxes must be"):
        attention_map(np.zeros((2, 3)), np.zeros(2), 4, 4)
