"""Single-process tests of the matching loss (model/loss.py).

The expected values come from an independent double loop over pairs written here, from a
transcription of the reference VSE++/VSRN ``ContrastiveLoss``, and from small cases worked by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from model.loss import (
    HardestNegativeLoss,
    gather_with_grad,
    gathered_hardest_negative_loss,
    hardest_negative_loss,
)


def loop_loss(
    images: Tensor,
    captions: Tensor,
    image_ids: list[int] | None,
    margin: float,
    max_violation: bool,
) -> Tensor:
    """Plain double loop over (query, candidate) pairs; differentiable, in the inputs' dtype."""
    n = images.shape[0]

    def excluded(a: int, b: int) -> bool:
        return a == b if image_ids is None else image_ids[a] == image_ids[b]

    def reduce(costs: list[Tensor]) -> Tensor:
        if not costs:
            return images.new_zeros(())
        stacked = torch.stack(costs)
        return stacked.max() if max_violation else stacked.sum()

    total = images.new_zeros(())
    for i in range(n):  # image i as query, captions j as negatives
        positive = images[i] @ captions[i]
        costs = [
            torch.clamp(margin + images[i] @ captions[j] - positive, min=0)
            for j in range(n)
            if not excluded(i, j)
        ]
        total = total + reduce(costs)
    for j in range(n):  # caption j as query, images i as negatives
        positive = images[j] @ captions[j]
        costs = [
            torch.clamp(margin + images[i] @ captions[j] - positive, min=0)
            for i in range(n)
            if not excluded(i, j)
        ]
        total = total + reduce(costs)
    return total


def reference_contrastive_loss(
    im: Tensor, s: Tensor, margin: float, max_violation: bool
) -> Tensor:
    """Transcription of ContrastiveLoss.forward of KunpengLi1994/VSRN model.py (VSE++)."""
    scores = im @ s.t()
    diagonal = scores.diag().view(im.size(0), 1)
    d1 = diagonal.expand_as(scores)
    d2 = diagonal.t().expand_as(scores)
    cost_s = (margin + scores - d1).clamp(min=0)
    cost_im = (margin + scores - d2).clamp(min=0)
    mask = torch.eye(scores.size(0)) > 0.5
    cost_s = cost_s.masked_fill_(mask, 0)
    cost_im = cost_im.masked_fill_(mask, 0)
    if max_violation:
        cost_s = cost_s.max(1)[0]
        cost_im = cost_im.max(0)[0]
    return cost_s.sum() + cost_im.sum()


def random_batch(
    n: int, dim: int, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """l2-normalised random image and caption embeddings, captions correlated with their images
    so that some hinges are active and some are not."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, dim, generator=gen, dtype=dtype)
    captions = images + 1.2 * torch.randn(n, dim, generator=gen, dtype=dtype)
    return F.normalize(images, dim=1), F.normalize(captions, dim=1)


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_without_ids(max_violation: bool, seed: int) -> None:
    images, captions = random_batch(9, 6, seed)
    got = hardest_negative_loss(images, captions, max_violation=max_violation)
    expected = loop_loss(images, captions, None, 0.2, max_violation)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert expected > 0  # the case is not trivially zero


@pytest.mark.parametrize("max_violation", [True, False])
def test_matches_loop_with_ids_and_other_margin(max_violation: bool) -> None:
    images, captions = random_batch(10, 5, seed=3)
    ids = [4, 7, 7, 1, 9, 4, 2, 2, 2, 8]
    # Rows of the same image carry the same image embedding, as in a real batch.
    first_row = {}
    for row, image_id in enumerate(ids):
        first_row.setdefault(image_id, row)
    images = images[[first_row[i] for i in ids]]
    got = hardest_negative_loss(
        images, captions, torch.tensor(ids), margin=0.35, max_violation=max_violation
    )
    expected = loop_loss(images, captions, ids, 0.35, max_violation)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("max_violation", [True, False])
def test_matches_reference_transcription(max_violation: bool) -> None:
    images, captions = random_batch(12, 8, seed=5)
    got = hardest_negative_loss(images, captions, None, 0.2, max_violation)
    expected = reference_contrastive_loss(images, captions, 0.2, max_violation)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def hand_case() -> tuple[Tensor, Tensor]:
    """Images are the unit axes e0, e1, e2, so S[i, j] = component i of caption j.

    S (rows images, columns captions)   = [[0.6, 0.8, 0.0],
                                           [0.8, 0.6, 0.6],
                                           [0.0, 0.0, 0.8]],   diagonal d = [0.6, 0.6, 0.8].
    """
    images = torch.eye(3, dtype=torch.float64)
    captions = torch.tensor(
        [[0.6, 0.8, 0.0], [0.8, 0.6, 0.0], [0.0, 0.6, 0.8]], dtype=torch.float64
    )  # rows are unit vectors
    return images, captions


def test_hand_worked_values() -> None:
    images, captions = hand_case()
    # cost_s[i, j] = max(0, 0.2 + S[i, j] - d[i]):
    #   image 0: caption 1 -> 0.2 + 0.8 - 0.6 = 0.4, caption 2 -> 0
    #   image 1: caption 0 -> 0.4, caption 2 -> 0.2 + 0.6 - 0.6 = 0.2
    #   image 2: captions 0, 1 -> 0
    # cost_im[i, j] = max(0, 0.2 + S[i, j] - d[j]):
    #   caption 0: image 1 -> 0.4, image 2 -> 0
    #   caption 1: image 0 -> 0.4, image 2 -> 0
    #   caption 2: image 0 -> 0, image 1 -> 0.2 + 0.6 - 0.8 = 0
    # Hardest: (0.4 + 0.4 + 0) + (0.4 + 0.4 + 0) = 1.6;  sum: (0.4 + 0.6 + 0) + (0.4 + 0.4) = 1.8.
    hardest = hardest_negative_loss(images, captions, max_violation=True)
    summed = hardest_negative_loss(images, captions, max_violation=False)
    torch.testing.assert_close(hardest, torch.tensor(1.6, dtype=torch.float64))
    torch.testing.assert_close(summed, torch.tensor(1.8, dtype=torch.float64))
    # Ids [0, 1, 1] make rows 1 and 2 the same image: cost_s[1, 2] = 0.2 no longer counts
    # (the other cross pair, cost_im of caption 1 vs image 2, was already 0).
    ids = torch.tensor([0, 1, 1])
    torch.testing.assert_close(
        hardest_negative_loss(images, captions, ids, max_violation=False),
        torch.tensor(1.6, dtype=torch.float64),
    )
    torch.testing.assert_close(
        hardest_negative_loss(images, captions, ids, max_violation=True),
        torch.tensor(1.6, dtype=torch.float64),
    )


def test_same_image_pairs_are_not_negatives() -> None:
    """Rows 0 and 1 are two captions of the same image (identical image rows, ids 7, 7).

    The only violating pairs are the cross pairs of rows 0 and 1; row 2 is far from both.
      image 0 = image 1 = e0, caption 0 = e0, caption 1 = (0.96, 0.28, 0), image 2 = caption 2 = e2.
    Without ids (the reference): image 0 vs caption 1: 0.2 + 0.96 - 1    = 0.16
                                 image 1 vs caption 0: 0.2 + 1    - 0.96 = 0.24
                                 caption 0 vs image 1: 0.2 + 1    - 1    = 0.2
                                 caption 1 vs image 0: 0.2 + 0.96 - 0.96 = 0.2   -> total 0.8
    With ids these pairs are masked and nothing else violates the margin -> 0.
    """
    images = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]], dtype=torch.float64)
    captions = torch.tensor([[1.0, 0, 0], [0.96, 0.28, 0], [0, 0, 1.0]], dtype=torch.float64)
    ids = torch.tensor([7, 7, 9])
    for max_violation in (True, False):
        with_ids = hardest_negative_loss(images, captions, ids, max_violation=max_violation)
        without = hardest_negative_loss(images, captions, None, max_violation=max_violation)
        torch.testing.assert_close(with_ids, torch.tensor(0.0, dtype=torch.float64))
        torch.testing.assert_close(without, torch.tensor(0.8, dtype=torch.float64))
        torch.testing.assert_close(
            without, reference_contrastive_loss(images, captions, 0.2, max_violation)
        )


def test_bf16_inputs_are_computed_in_float32() -> None:
    images, captions = random_batch(16, 32, seed=7, dtype=torch.float32)
    images_bf16 = images.bfloat16().requires_grad_()
    captions_bf16 = captions.bfloat16().requires_grad_()
    got = hardest_negative_loss(images_bf16, captions_bf16)
    assert got.dtype == torch.float32
    # Exactly the float32 computation on the bf16-rounded values.
    expected = hardest_negative_loss(images_bf16.detach().float(), captions_bf16.detach().float())
    assert torch.equal(got.detach(), expected)
    # And close to the float64 truth on those values (a bf16 computation would be off by ~1e-2).
    truth = loop_loss(
        images_bf16.detach().double(), captions_bf16.detach().double(), None, 0.2, True
    )
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-5)
    got.backward()
    assert images_bf16.grad is not None and images_bf16.grad.dtype == torch.bfloat16
    assert captions_bf16.grad is not None and captions_bf16.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("with_ids", [True, False])
def test_gradients_match_loop(max_violation: bool, with_ids: bool) -> None:
    images0, captions0 = random_batch(8, 5, seed=11)
    ids = [0, 1, 1, 2, 3, 4, 4, 5] if with_ids else None
    id_tensor = torch.tensor(ids) if ids is not None else None

    images = images0.clone().requires_grad_()
    captions = captions0.clone().requires_grad_()
    hardest_negative_loss(images, captions, id_tensor, 0.2, max_violation).backward()

    images_ref = images0.clone().requires_grad_()
    captions_ref = captions0.clone().requires_grad_()
    loop_loss(images_ref, captions_ref, ids, 0.2, max_violation).backward()

    assert images.grad is not None and captions.grad is not None
    torch.testing.assert_close(images.grad, images_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(captions.grad, captions_ref.grad, rtol=1e-10, atol=1e-12)
    assert images.grad.abs().sum() > 0


def test_all_candidates_masked_gives_zero() -> None:
    images, captions = random_batch(4, 3, seed=2)
    ids = torch.zeros(4, dtype=torch.int64)  # one image, four captions: no negatives at all
    for max_violation in (True, False):
        loss = hardest_negative_loss(images, captions, ids, max_violation=max_violation)
        assert loss.item() == 0.0


def test_module_wrapper_and_undistributed_fallback() -> None:
    images, captions = random_batch(7, 4, seed=9)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4])
    criterion = HardestNegativeLoss(margin=0.2, max_violation=False)
    warm_up = criterion(images, captions, ids)
    torch.testing.assert_close(warm_up, loop_loss(images, captions, ids.tolist(), 0.2, False))
    criterion.max_violation = True  # what the trainer does after the warm-up
    hardest = criterion(images, captions, ids)
    torch.testing.assert_close(hardest, loop_loss(images, captions, ids.tolist(), 0.2, True))
    assert "max_violation=True" in repr(criterion)
    # Without an initialised process group the gathered loss is the single-process loss and the
    # gather is the identity.
    assert torch.equal(gathered_hardest_negative_loss(images, captions, ids), hardest)
    assert gather_with_grad(images) is images


def test_invalid_inputs_raise() -> None:
    images, captions = random_batch(4, 3, seed=0)
    with pytest.raises(ValueError, match="shapes must be equal"):
        hardest_negative_loss(images, captions[:3])
    with pytest.raises(ValueError, match="2-D"):
        hardest_negative_loss(images[0], captions[0])
    with pytest.raises(ValueError, match="image_ids"):
        hardest_negative_loss(images, captions, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        hardest_negative_loss(images, captions, torch.tensor([0.0, 1.0, 2.0, 3.0]))


# --------------------------------------------------------------------------------------------------
# Hard-negative stats (with_stats=True)
# --------------------------------------------------------------------------------------------------


def loop_stats(
    images: Tensor, captions: Tensor, image_ids: list[int], margin: float, max_violation: bool
) -> dict[str, list[float] | float]:
    """The stats by a plain loop: per query its best-scoring negative, gaps, hinge counts."""
    n = images.shape[0]
    gaps: dict[str, list[float]] = {"i2t": [], "t2i": []}
    active = hinges = 0
    for direction in ("i2t", "t2i"):
        for q in range(n):
            positive = float(images[q] @ captions[q])
            negatives = [
                float(images[q] @ captions[c]) if direction == "i2t" else float(images[c] @ captions[q])
                for c in range(n)
                if image_ids[c] != image_ids[q]
            ]
            if not negatives:
                gaps[direction].append(float("nan"))
                continue
            gaps[direction].append(positive - max(negatives))
            costs = [margin + s - positive for s in negatives]
            if max_violation:
                hinges += 1
                active += max(costs) > 0
            else:
                hinges += len(costs)
                active += sum(c > 0 for c in costs)
    return {"gap_i2t": gaps["i2t"], "gap_t2i": gaps["t2i"], "active": float(active), "hinges": float(hinges)}


@pytest.mark.parametrize("max_violation", [True, False])
def test_stats_leave_loss_and_gradients_unchanged(max_violation: bool) -> None:
    images, captions = random_batch(9, 6, seed=4)
    ids = torch.tensor([0, 1, 1, 2, 3, 4, 5, 5, 6])
    plain = [t.clone().requires_grad_() for t in (images, captions)]
    loss = hardest_negative_loss(*plain, ids, max_violation=max_violation)
    loss.backward()
    with_stats = [t.clone().requires_grad_() for t in (images, captions)]
    loss_again, stats = hardest_negative_loss(*with_stats, ids, max_violation=max_violation, with_stats=True)
    loss_again.backward()
    assert torch.equal(loss_again.detach(), loss.detach())
    for a, b in zip(plain, with_stats):
        assert a.grad is not None and b.grad is not None and torch.equal(a.grad, b.grad)
    assert not stats.gap_i2t.requires_grad and not stats.active_hinges.requires_grad


@pytest.mark.parametrize("max_violation", [True, False])
def test_stats_match_loop(max_violation: bool) -> None:
    images, captions = random_batch(10, 5, seed=3)
    ids = [4, 7, 7, 1, 9, 4, 2, 2, 2, 8]
    _, stats = hardest_negative_loss(
        images, captions, torch.tensor(ids), margin=0.35, max_violation=max_violation, with_stats=True
    )
    expected = loop_stats(images, captions, ids, 0.35, max_violation)
    torch.testing.assert_close(stats.gap_i2t, torch.tensor(expected["gap_i2t"], dtype=torch.float64))
    torch.testing.assert_close(stats.gap_t2i, torch.tensor(expected["gap_t2i"], dtype=torch.float64))
    assert stats.active_hinges.item() == expected["active"]
    assert stats.hinges.item() == expected["hinges"]
    assert 0 < expected["active"] < expected["hinges"]  # neither trivial case
    assert stats.queries.item() == 2 * 10 and stats.remote_hardest.item() == 0  # one process: all local


def test_stats_of_the_hand_case() -> None:
    images, captions = hand_case()
    _, stats = hardest_negative_loss(images, captions, with_stats=True)
    # S = [[0.6, 0.8, 0], [0.8, 0.6, 0.6], [0, 0, 0.8]], d = [0.6, 0.6, 0.8]. Image rows: hardest
    # captions 0.8, 0.8, 0.0; caption columns: hardest images 0.8, 0.8, 0.6.
    torch.testing.assert_close(stats.gap_i2t, torch.tensor([-0.2, -0.2, 0.8], dtype=torch.float64))
    torch.testing.assert_close(stats.gap_t2i, torch.tensor([-0.2, -0.2, 0.2], dtype=torch.float64))
    # Hinges active where gap < margin 0.2: four of six (the t2i gap of exactly 0.2 costs 0).
    assert stats.active_hinges.item() == 4 and stats.hinges.item() == 6


def test_collapsed_embeddings_give_two_b_margin() -> None:
    """All embeddings alike: every hinge equals the margin, so L_M = 2 * B * margin under hardest
    negatives (one hinge per query and direction) and 2 * B * (B - 1) * margin under all negatives."""
    batch = 16
    same = F.normalize(torch.ones(batch, 8, dtype=torch.float64), dim=1)
    hardest, stats = hardest_negative_loss(same, same, margin=0.2, with_stats=True)
    torch.testing.assert_close(hardest, torch.tensor(2 * batch * 0.2, dtype=torch.float64))
    assert stats.active_hinges.item() == stats.hinges.item() == 2 * batch
    assert stats.gap_i2t.abs().max().item() < 1e-12
    all_negatives, stats = hardest_negative_loss(same, same, margin=0.2, max_violation=False, with_stats=True)
    torch.testing.assert_close(all_negatives, torch.tensor(2 * batch * (batch - 1) * 0.2, dtype=torch.float64))
    assert stats.active_hinges.item() == stats.hinges.item() == 2 * batch * (batch - 1)


def test_stats_without_negatives_are_nan_and_not_counted() -> None:
    images, captions = random_batch(4, 3, seed=2)
    _, stats = hardest_negative_loss(images, captions, torch.zeros(4, dtype=torch.int64), with_stats=True)
    assert torch.isnan(stats.gap_i2t).all() and torch.isnan(stats.gap_t2i).all()
    assert stats.queries.item() == 0 and stats.hinges.item() == 0 and stats.active_hinges.item() == 0


def test_gathered_loss_without_a_process_group_gives_the_same_stats() -> None:
    images, captions = random_batch(7, 4, seed=9)
    loss, stats = gathered_hardest_negative_loss(images, captions, with_stats=True)
    expected_loss, expected = hardest_negative_loss(images, captions, with_stats=True)
    assert torch.equal(loss, expected_loss) and torch.equal(stats.gap_t2i, expected.gap_t2i)
