"""trainer/training/diagnostics.py over 2 gloo ranks: the interval summary gathers the ranks' hard-negative
stats into the numbers of the global batch, the same on every rank and equal to one process's.

Kept apart from test_collapse.py so that the spawned ranks import only torch, model.loss and
trainer.training.diagnostics (not Ray and DeepSpeed through trainer/training/worker.py): the spawn then takes seconds.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor

from model.loss import gathered_hardest_negative_loss, hardest_negative_loss
from trainer.training.diagnostics import HardNegativeInterval

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _global_steps() -> list[tuple[Tensor, Tensor]]:
    """Two steps of a global batch of 8 pairs (random embeddings, so gaps and hinges vary)."""
    generator = torch.Generator().manual_seed(3)
    steps = []
    for _ in range(2):
        images = F.normalize(torch.randn(8, 6, generator=generator), dim=1)
        steps.append((images, F.normalize(images + 0.8 * torch.randn(8, 6, generator=generator), dim=1)))
    return steps


def _summary_rank(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        interval = HardNegativeInterval()
        rows = slice(rank * 4, rank * 4 + 4)
        for images, captions in _global_steps():
            _, stats = gathered_hardest_negative_loss(images[rows], captions[rows], with_stats=True)
            interval.add(stats)
        summary = interval.summarize(WORLD)
        torch.save(summary, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_ranks_summarize_the_global_batch(tmp_path: Path) -> None:
    mp.spawn(_summary_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    summaries = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert summaries[0] == summaries[1]  # every rank holds the global numbers

    # The reference: one process, the whole global batch, the same two steps.
    reference = HardNegativeInterval()
    for images, captions in _global_steps():
        _, step_stats = hardest_negative_loss(images, captions, with_stats=True)
        reference.add(step_stats)
    expected = reference.summarize(1)
    assert expected is not None
    got = summaries[0]
    for direction in ("i2t", "t2i"):
        assert got.gap_mean[direction] == pytest.approx(expected.gap_mean[direction], abs=1e-6)
        assert got.gap_p10[direction] == pytest.approx(expected.gap_p10[direction], abs=1e-6)
    assert got.active_hinge_ratio == pytest.approx(expected.active_hinge_ratio)
    assert 0.0 < got.active_hinge_ratio < 1.0  # the inputs are neither collapsed nor separated
    # Remote: a hardest negative in the other rank's half. Counted here from the single-process
    # scores: rank r's anchors are rows 4r..4r+3, remote candidates the other four.
    remote = 0
    for images, captions in _global_steps():
        for scores in (images @ captions.t(), captions @ images.t()):
            hardest = scores.fill_diagonal_(float("-inf")).argmax(dim=1)
            remote += int(((hardest // 4) != (torch.arange(8) // 4)).sum())
    assert got.remote_hardest_ratio == pytest.approx(remote / (2 * 2 * 8))
    assert expected.remote_hardest_ratio == 0.0  # a single process has no other worker
