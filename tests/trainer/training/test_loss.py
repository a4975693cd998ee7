"""Tests of trainer/training/loss.py: the loss scaling makes 2 DeepSpeed ranks compute the
reference's single-process gradient of the global batch."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from trainer.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[3]


def _config() -> TrainConfig:
    # No dropout and no BatchNorm (the RRR layers normalize over each rank's batch), so that the
    # two computations are the same function; hardest negatives on.
    return load_config(ROOT / "configs" / "tiny.yaml", [
        "model.num_reasoning_layers=0", "model.caption_dropout=0.0", "model.img_dim=8", "model.embed_size=16",
        "model.word_dim=8", "model.caption_hidden=8", "model.caption_word_dim=8", "model.vocab_size=20",
        "optim.global_batch_size=8", "optim.warmup_epochs=0"])


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    regions = torch.rand(8, 5, 8, generator=generator)
    lengths = torch.tensor([5, 7, 4, 6, 7, 3, 5, 6])
    tokens = torch.randint(4, 20, (8, 7), generator=generator)
    tokens[:, 0] = 1
    for row, length in enumerate(lengths.tolist()):
        tokens[row, length - 1] = 2
        tokens[row, length:] = 0
    image_ids = torch.tensor([0, 1, 2, 3, 4, 5, 2, 6])  # rows 2 and 6: the same image, on different ranks
    return regions, tokens, lengths, image_ids


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    from model.vsrn import VSRN, VSRNConfig
    from trainer.training.engine import build_engine
    from trainer.training.loss import training_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = _config()
    torch.manual_seed(0)
    model = VSRN(VSRNConfig.from_dict(cfg.model.to_dict()))
    engine = build_engine(cfg, model, universal=False)
    regions, tokens, lengths, image_ids = _global_batch()
    rows = slice(rank * 4, rank * 4 + 4)
    out = engine(regions[rows], tokens[rows], lengths[rows])
    loss, _ = training_loss(out, image_ids[rows], cfg, world, hardest=True)
    engine.backward(loss)  # DeepSpeed all-reduces (averages) the gradients here
    grads = {name: p.grad.detach().clone() for name, p in engine.module.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save(grads, os.path.join(out_dir, "distributed.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.distributed
def test_two_deepspeed_ranks_get_the_reference_gradient_of_the_global_batch(tmp_path: Path) -> None:
    from model.loss import hardest_negative_loss
    from model.vsrn import VSRN, VSRNConfig

    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    distributed = torch.load(tmp_path / "distributed.pt")

    # The reference: one process, the whole batch, L_M summed over it, L_G its per-pair mean.
    cfg = _config()
    torch.manual_seed(0)
    model = VSRN(VSRNConfig.from_dict(cfg.model.to_dict()))
    regions, tokens, lengths, image_ids = _global_batch()
    out = model(regions, tokens, lengths)
    loss = hardest_negative_loss(out.image_emb, out.caption_emb, image_ids, margin=0.2, max_violation=True)
    (loss + out.caption_loss).backward()
    reference = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    assert distributed.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(distributed[name], grad, rtol=1e-4, atol=1e-6, msg=name)
