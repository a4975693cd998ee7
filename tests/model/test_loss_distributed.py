"""Distributed matching loss: 2 gloo processes against the single-process loss of the whole batch.

Each rank takes its half of a fixed global batch, computes ``gathered_hardest_negative_loss`` and
runs backward. The ranks save their results to ``tmp_path``; the parent test process computes the
single-process reference on the concatenated batch and compares:

* sum over ranks of the losses == single-process loss;
* parameter gradients all-reduce-averaged over ranks (as DDP does) == single-process gradients / 2;
* for leaf embeddings: each rank's gradient of its own rows == single-process gradient of those rows
  (the gather's backward must bring back the other rank's contributions).

All ranks run every case in one spawn (starting processes dominates the run time).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from model.loss import gathered_hardest_negative_loss, hardest_negative_loss

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

WORLD = 2
LOCAL_BATCH = 5
FEATURES = 6
EMBED = 4

# Global image ids: id 1 twice within rank 0; ids 3 and 0 on both ranks (same-image pairs split
# across workers); rank 0 = rows 0..4, rank 1 = rows 5..9.
GLOBAL_IDS = [0, 1, 1, 3, 2, 3, 4, 0, 5, 6]


def free_port() -> int:
    """A port that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------------------
# Inputs shared by the ranks and the parent (deterministic, built from fixed seeds)
# ------------------------------------------------------------------------------------------------


def make_model() -> nn.ModuleDict:
    """Small two-tower embedding model with fixed weights, float64."""
    torch.manual_seed(1234)
    return nn.ModuleDict(
        {
            "image": nn.Linear(FEATURES, EMBED).double(),
            "caption": nn.Linear(FEATURES, EMBED).double(),
        }
    )


def make_features() -> tuple[Tensor, Tensor]:
    """Global (image features, caption features); rows of the same image id share image features."""
    gen = torch.Generator().manual_seed(99)
    per_image = torch.randn(max(GLOBAL_IDS) + 1, FEATURES, generator=gen, dtype=torch.float64)
    image_features = per_image[GLOBAL_IDS]
    caption_features = image_features + torch.randn(
        len(GLOBAL_IDS), FEATURES, generator=gen, dtype=torch.float64
    )
    return image_features, caption_features


def embed(
    model: nn.ModuleDict, image_features: Tensor, caption_features: Tensor
) -> tuple[Tensor, Tensor]:
    return (
        F.normalize(model["image"](image_features), dim=1),
        F.normalize(model["caption"](caption_features), dim=1),
    )


def cross_rank_hardest_case() -> tuple[Tensor, Tensor]:
    """4 rows, 2 per rank, all different images. Image 0 (rank 0) has its positive at 0.6; the
    other caption on rank 0 is orthogonal to it, but caption 2 (rank 1) equals it: the hardest
    negative of image 0, worth 0.2 + 1.0 - 0.6 = 0.6, is on the other rank."""
    images = torch.tensor(
        [[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0], [0, 0.6, 0, 0.8]], dtype=torch.float64
    )
    captions = torch.tensor(
        [[0.6, 0.8, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 0.8, 0, 0.6]], dtype=torch.float64
    )
    return images, captions


def split_same_image_case() -> tuple[Tensor, Tensor, Tensor]:
    """4 rows; rows 0 (rank 0) and 2 (rank 1) are two captions of the same image (id 5, identical
    image rows). Caption 2 is close to image 0, so it would be image 0's hardest negative if the
    same-image pair across ranks were not masked."""
    images = torch.tensor(
        [[1.0, 0, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1.0]], dtype=torch.float64
    )
    captions = torch.tensor(
        [[0.8, 0.6, 0, 0], [0, 0, 1.0, 0], [0.96, 0, 0, 0.28], [0, 0, 0, 1.0]], dtype=torch.float64
    )
    return images, captions, torch.tensor([5, 1, 5, 2])


# ------------------------------------------------------------------------------------------------
# Worker
# ------------------------------------------------------------------------------------------------


def rank_rows(tensor: Tensor, rank: int, world: int) -> Tensor:
    per_rank = tensor.shape[0] // world
    return tensor[rank * per_rank : (rank + 1) * per_rank]


def leaf_case(
    images: Tensor, captions: Tensor, ids: Tensor | None, rank: int, max_violation: bool
) -> dict[str, Tensor]:
    """Gathered loss on this rank's rows of leaf embeddings; returns loss and row gradients."""
    local_images = rank_rows(images, rank, WORLD).clone().requires_grad_()
    local_captions = rank_rows(captions, rank, WORLD).clone().requires_grad_()
    local_ids = None if ids is None else rank_rows(ids, rank, WORLD)
    loss = gathered_hardest_negative_loss(
        local_images, local_captions, local_ids, max_violation=max_violation
    )
    loss.backward()
    local_only = hardest_negative_loss(
        local_images.detach(), local_captions.detach(), local_ids, max_violation=max_violation
    )
    assert local_images.grad is not None and local_captions.grad is not None
    return {
        "loss": loss.detach(),
        "local_only_loss": local_only,
        "image_grad": local_images.grad,
        "caption_grad": local_captions.grad,
    }


def worker(rank: int, port: int, out_dir: str) -> None:
    """Entry point of one rank (spawned; must stay importable at module level)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),  # fail instead of hanging on a lost peer
    )
    try:
        results: dict[str, Any] = {}
        image_features, caption_features = make_features()
        ids = torch.tensor(GLOBAL_IDS)

        # Model cases: parameter gradients averaged over ranks like data parallelism does.
        for name, use_ids, max_violation in [
            ("ids_hardest", True, True),
            ("ids_sum", True, False),
            ("no_ids_hardest", False, True),
        ]:
            model = make_model()
            local_images, local_captions = embed(
                model,
                rank_rows(image_features, rank, WORLD),
                rank_rows(caption_features, rank, WORLD),
            )
            loss = gathered_hardest_negative_loss(
                local_images,
                local_captions,
                rank_rows(ids, rank, WORLD) if use_ids else None,
                max_violation=max_violation,
            )
            loss.backward()
            grads = {}
            for param_name, param in model.named_parameters():
                assert param.grad is not None
                grad = param.grad.clone()
                dist.all_reduce(grad, op=dist.ReduceOp.SUM)
                grads[param_name] = grad / WORLD
            results[name] = {"loss": loss.detach(), "grads": grads}

        # Leaf-embedding cases.
        images, captions = cross_rank_hardest_case()
        for max_violation in (True, False):
            results[f"cross_rank_{max_violation}"] = leaf_case(
                images, captions, torch.arange(4), rank, max_violation
            )
        images, captions, split_ids = split_same_image_case()
        results["split_same_image_ids"] = leaf_case(images, captions, split_ids, rank, True)
        results["split_same_image_no_ids"] = leaf_case(images, captions, None, rank, True)

        # bf16 inputs: gathered and computed in float32.
        bf16_images = rank_rows(images, rank, WORLD).bfloat16().requires_grad_()
        bf16_captions = rank_rows(captions, rank, WORLD).bfloat16().requires_grad_()
        bf16_loss = gathered_hardest_negative_loss(
            bf16_images, bf16_captions, rank_rows(split_ids, rank, WORLD)
        )
        bf16_loss.backward()
        assert bf16_images.grad is not None
        results["bf16"] = {
            "loss": bf16_loss.detach(),
            "image_grad_dtype": str(bf16_images.grad.dtype),
        }

        # Uneven local batches: a clear error on every rank instead of a gloo abort.
        uneven = 2 + rank
        try:
            gathered_hardest_negative_loss(images[:uneven], captions[:uneven])
            results["uneven_error"] = ""
        except ValueError as error:
            results["uneven_error"] = str(error)

        # Hard-negative stats of the cross-rank case (image 0's hardest caption is on rank 1).
        stat_images, stat_captions = cross_rank_hardest_case()
        stats_loss, stats = gathered_hardest_negative_loss(
            rank_rows(stat_images, rank, WORLD),
            rank_rows(stat_captions, rank, WORLD),
            rank_rows(torch.arange(4), rank, WORLD),
            with_stats=True,
        )
        # plain tensors: torch.load(weights_only=True) refuses other classes
        results["stats"] = {"loss": stats_loss.detach(), **dataclasses.asdict(stats)}

        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(out_dir: Path, deadline_s: float = 150.0) -> list[dict[str, Any]]:
    """Spawn the ranks, wait with a deadline, kill them on timeout, load their results."""
    context = mp.start_processes(
        worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + deadline_s
    try:
        # join() raises ProcessRaisedException (and terminates the others) when a rank fails.
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish within {deadline_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=5)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


# ------------------------------------------------------------------------------------------------
# Parent-side references and assertions
# ------------------------------------------------------------------------------------------------


def single_process(use_ids: bool, max_violation: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss and parameter gradients of the whole global batch in one process."""
    model = make_model()
    images, captions = embed(model, *make_features())
    ids = torch.tensor(GLOBAL_IDS) if use_ids else None
    loss = hardest_negative_loss(images, captions, ids, max_violation=max_violation)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def single_process_leaves(
    images: Tensor, captions: Tensor, ids: Tensor | None, max_violation: bool
) -> tuple[Tensor, Tensor, Tensor]:
    images = images.clone().requires_grad_()
    captions = captions.clone().requires_grad_()
    loss = hardest_negative_loss(images, captions, ids, max_violation=max_violation)
    loss.backward()
    assert images.grad is not None and captions.grad is not None
    return loss.detach(), images.grad, captions.grad


def close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(tmp_path_factory.mktemp("loss_ranks"))


@pytest.mark.parametrize(
    ("name", "use_ids", "max_violation"),
    [("ids_hardest", True, True), ("ids_sum", True, False), ("no_ids_hardest", False, True)],
)
def test_losses_sum_and_gradients_average_to_single_process(
    rank_results: list[dict[str, Any]], name: str, use_ids: bool, max_violation: bool
) -> None:
    expected_loss, expected_grads = single_process(use_ids, max_violation)
    assert expected_loss > 0
    per_rank = [result[name] for result in rank_results]
    # Each rank holds only its anchors' share (no double counting); the shares add up.
    close(sum(r["loss"] for r in per_rank), expected_loss)
    assert all(0 < r["loss"] < expected_loss for r in per_rank)
    for param_name, expected in expected_grads.items():
        assert expected.abs().sum() > 0
        for r in per_rank:  # after averaging, every rank holds the same gradient
            close(r["grads"][param_name], expected / WORLD)


@pytest.mark.parametrize("max_violation", [True, False])
def test_hardest_negative_on_other_rank(
    rank_results: list[dict[str, Any]], max_violation: bool
) -> None:
    images, captions = cross_rank_hardest_case()
    expected_loss, image_grad, caption_grad = single_process_leaves(
        images, captions, torch.arange(4), max_violation
    )
    rank0, rank1 = (result[f"cross_rank_{max_violation}"] for result in rank_results)
    close(rank0["loss"] + rank1["loss"], expected_loss)
    # Locally, image 0 has no violating negative; the gathered loss finds the 0.6 on rank 1.
    assert rank0["loss"] >= rank0["local_only_loss"] + 0.6 - 1e-12
    # Each rank's row gradients include the other rank's loss terms on its rows.
    close(torch.cat([rank0["image_grad"], rank1["image_grad"]]), image_grad)
    close(torch.cat([rank0["caption_grad"], rank1["caption_grad"]]), caption_grad)
    # Caption 2 (rank 1) is image 0's hardest negative, so rank 0's loss moves rank 1's row.
    assert caption_grad[2].abs().sum() > 0


def test_same_image_split_across_ranks_is_masked(rank_results: list[dict[str, Any]]) -> None:
    images, captions, ids = split_same_image_case()
    with_ids = [result["split_same_image_ids"] for result in rank_results]
    without_ids = [result["split_same_image_no_ids"] for result in rank_results]

    expected_loss, image_grad, caption_grad = single_process_leaves(images, captions, ids, True)
    close(with_ids[0]["loss"] + with_ids[1]["loss"], expected_loss)
    close(torch.cat([r["image_grad"] for r in with_ids]), image_grad)
    close(torch.cat([r["caption_grad"] for r in with_ids]), caption_grad)
    # Masked: image 0's candidates besides its own image's captions (0 and 2) are orthogonal,
    # so no cost remains for it; unmasked, caption 2 costs 0.2 + 0.96 - 0.8 = 0.36.
    expected_unmasked, _, _ = single_process_leaves(images, captions, None, True)
    close(without_ids[0]["loss"] + without_ids[1]["loss"], expected_unmasked)
    assert without_ids[0]["loss"] >= with_ids[0]["loss"] + 0.36 - 1e-12


def test_bf16_inputs_gathered_in_float32(rank_results: list[dict[str, Any]]) -> None:
    images, captions, ids = split_same_image_case()
    expected = hardest_negative_loss(images.bfloat16().float(), captions.bfloat16().float(), ids)
    losses = [result["bf16"]["loss"] for result in rank_results]
    assert all(loss.dtype == torch.float32 for loss in losses)
    torch.testing.assert_close(losses[0] + losses[1], expected, rtol=1e-6, atol=1e-6)
    assert all(result["bf16"]["image_grad_dtype"] == "torch.bfloat16" for result in rank_results)


def test_uneven_local_batches_raise_on_every_rank(rank_results: list[dict[str, Any]]) -> None:
    for result in rank_results:
        assert "same local (batch, dim, dtype size)" in result["uneven_error"]


def test_stats_count_hardest_negatives_from_the_other_rank(rank_results: list[dict[str, Any]]) -> None:
    images, captions = cross_rank_hardest_case()
    expected_loss, expected = hardest_negative_loss(images, captions, torch.arange(4), with_stats=True)
    per_rank = [result["stats"] for result in rank_results]
    close(per_rank[0]["loss"] + per_rank[1]["loss"], expected_loss)  # stats change nothing
    # Gaps and hinge counts: the ranks' anchors together are the single-process anchors.
    close(torch.cat([r["gap_i2t"] for r in per_rank]), expected.gap_i2t)
    close(torch.cat([r["gap_t2i"] for r in per_rank]), expected.gap_t2i)
    assert sum(r["active_hinges"].item() for r in per_rank) == expected.active_hinges.item()
    assert sum(r["queries"].item() for r in per_rank) == 8
    # Remote: the query's hardest negative (by score, positives masked) lies in the other rank's
    # half of the global batch (rows 0-1 on rank 0, rows 2-3 on rank 1).
    remote = [0, 0]
    for scores in (images @ captions.t(), captions @ images.t()):
        hardest = scores.fill_diagonal_(float("-inf")).argmax(dim=1)
        for query, candidate in enumerate(hardest.tolist()):
            remote[query // 2] += candidate // 2 != query // 2
    assert [r["remote_hardest"].item() for r in per_rank] == remote
    assert remote[0] >= 1  # image 0's hardest caption (caption 2) is on rank 1
    assert expected.remote_hardest.item() == 0  # one process: no other worker
