"""Tests of trainer/worker.py without Ray: schedules, the DeepSpeed configuration, and that the
loss scaling makes 2 DeepSpeed ranks compute the reference's single-process gradient."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from trainer.config import TrainConfig, load_config
from trainer.worker import StepLog, deepspeed_config, hardest_negatives, learning_rate

ROOT = Path(__file__).resolve().parents[2]


def test_learning_rate_is_a_step_decay_of_the_epoch() -> None:
    optim = load_config(ROOT / "configs" / "coco.yaml").optim  # the reference: 2e-4, x0.1 every 15 epochs
    assert [learning_rate(optim, e) for e in (0, 14)] == [2e-4, 2e-4]
    assert learning_rate(optim, 15) == pytest.approx(2e-5) and learning_rate(optim, 29) == pytest.approx(2e-5)
    assert learning_rate(optim, 30) == pytest.approx(2e-6)


def test_hardest_negative_warmup_by_epochs_or_steps() -> None:
    optim = load_config(ROOT / "configs" / "tiny.yaml", ["optim.warmup_epochs=2", "optim.warmup_steps=0"]).optim
    assert [hardest_negatives(optim, e, 1000) for e in (0, 1, 2)] == [False, False, True]
    optim = load_config(ROOT / "configs" / "tiny.yaml", ["optim.warmup_epochs=0", "optim.warmup_steps=50"]).optim
    assert [hardest_negatives(optim, 0, s) for s in (0, 49, 50)] == [False, False, True]
    optim = load_config(ROOT / "configs" / "tiny.yaml", ["optim.warmup_epochs=0", "optim.max_violation=false"]).optim
    assert not hardest_negatives(optim, 10, 10)


def test_deepspeed_config_keeps_the_global_batch_and_clips_explicitly() -> None:
    coco = load_config(ROOT / "configs" / "coco.yaml")
    ds = deepspeed_config(coco)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (128, 16, 1)
    # ZeRO 0 in bf16: DeepSpeed's plain engine around FlatAdam, which clips (at 2.0) and keeps the
    # float32 master weights; DeepSpeed neither clips nor wraps the optimizer.
    assert ds["gradient_clipping"] == 0.0 and ds["zero_optimization"] == {"stage": 0}
    assert "bf16" not in ds and "fp16" not in ds and "checkpoint" not in ds
    four = deepspeed_config(load_config(ROOT / "configs" / "coco.yaml", ["distributed.workers=4",
                                                                        "distributed.zero_stage=2"]))
    assert (four["train_batch_size"], four["train_micro_batch_size_per_gpu"]) == (128, 32)
    assert four["zero_optimization"] == {"stage": 2} and four["gradient_clipping"] == 2.0
    assert four["bf16"] == {"enabled": True, "check_grad_overflow": False}
    fp16 = deepspeed_config(load_config(ROOT / "configs" / "coco.yaml", ["distributed.precision=fp16"]))
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # 0: dynamic loss scaling
    assert fp16["gradient_clipping"] == 2.0
    tiny = deepspeed_config(load_config(ROOT / "configs" / "tiny.yaml"), universal=True)
    assert "bf16" not in tiny and "fp16" not in tiny and tiny["checkpoint"] == {"load_universal": True}


def test_step_log_drops_the_steps_that_are_redone_after_a_restart(tmp_path: Path) -> None:
    log = StepLog(str(tmp_path), None)
    for step in range(1, 6):
        log.append({"step": step, "loss": float(step)})
    log.truncate_after(3)
    log.append({"step": 4, "loss": 40.0})
    lines = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


# --------------------------------------------------------------------------------------------------
# Two DeepSpeed ranks == one process on the global batch
# --------------------------------------------------------------------------------------------------


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
    from trainer.worker import build_engine, training_loss

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


# --------------------------------------------------------------------------------------------------
# FlatAdam (ZeRO 0): torch's Adam + clipping, in a few operators, checkpoints in the old layouts
# --------------------------------------------------------------------------------------------------


def _tiny_module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _train(module: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 4, scale: float = 30.0) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(5, 4, generator=generator)
        (scale * module(x.to(next(module.parameters()).dtype)).float().pow(2).sum()).backward()  # norms past the clip
        optimizer.step()
        optimizer.zero_grad()


def test_flat_adam_is_torch_adam_with_clipping() -> None:
    from trainer.worker import FlatAdam

    reference, flat = _tiny_module(), _tiny_module()
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(5, 4, generator=generator)
        (30.0 * reference(x).pow(2).sum()).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 2.0)
        adam.step()
        adam.zero_grad()
    optimizer = FlatAdam(flat.parameters(), lr=1e-2, clip=2.0)
    _train(flat, optimizer)
    for a, b in zip(flat.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The module's parameters are views of the one master buffer.
    assert all(p.untyped_storage().data_ptr() == optimizer.master.untyped_storage().data_ptr()
               for p in flat.parameters())


def test_flat_adam_state_dict_keeps_torch_adams_layout_and_loads_it() -> None:
    from trainer.worker import FlatAdam

    reference = _tiny_module()
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2, fused=True)
    _train(reference, adam)
    saved = adam.state_dict()  # what a ZeRO-0 fp32 checkpoint of the trainer before issue 21 holds
    module = _tiny_module()
    module.load_state_dict(reference.state_dict())
    optimizer = FlatAdam(module.parameters(), lr=1e-2, clip=0.0)
    optimizer.load_state_dict(saved)
    mine = optimizer.state_dict()
    assert mine["state"].keys() == saved["state"].keys() and len(mine["param_groups"][0]["params"]) == 4
    for index, state in saved["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(mine["state"][index][key], value, msg=f"{index} {key}")
    # Both continue the same way.
    _train(reference, adam, steps=2)
    _train(module, optimizer, steps=2)
    for a, b in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_flat_adam_in_bf16_keeps_float32_masters_in_deepspeeds_zero0_layout() -> None:
    from trainer.worker import FlatAdam, _cast_parameters

    module = _tiny_module()
    _cast_parameters(module, torch.bfloat16)
    optimizer = FlatAdam(module.parameters(), lr=1e-3, clip=2.0)
    assert optimizer.master.dtype == torch.float32 and all(p.dtype == torch.bfloat16 for p in module.parameters())
    _train(module, optimizer)
    state = optimizer.state_dict()
    # DeepSpeed's FP16_UnfusedOptimizer layout (a bf16 ZeRO-0 checkpoint before issue 21).
    assert {"dynamic_loss_scale", "cur_scale", "optimizer_state_dict", "fp32_groups"} <= set(state)
    masters = state["fp32_groups"][0]
    assert [m.shape for m in masters] == [p.shape for p in module.parameters()]
    assert all(m.dtype == torch.float32 for m in masters)
    for m, p in zip(masters, module.parameters()):
        assert torch.equal(m.to(torch.bfloat16), p)  # the module holds the masters, rounded
    # Reloaded into a fresh optimizer, the masters (not the rounded weights) come back.
    other = _tiny_module()
    _cast_parameters(other, torch.bfloat16)
    restored = FlatAdam(other.parameters(), lr=1e-3, clip=2.0)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.master, optimizer.master, rtol=0, atol=0)
    for a, b in zip(other.parameters(), module.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# No host sync in a non-logging step, through the real engine (bench/step_profile.py's counts)
# --------------------------------------------------------------------------------------------------


_SYNC_SCRIPT = r"""
import argparse, json, sys
sys.path.insert(0, sys.argv[1])
from bench.step_profile import run
results = {}
for precision in ("fp32", "bf16"):
    for zero in (0, 1, 2):
        args = argparse.Namespace(device="cpu", batch_size=8, regions=6, precision=precision, zero_stage=zero,
                                  widths="tiny", lengths="uniform:4:14", epoch_lengths=None, epoch_pairs=4000,
                                  warmup=2, compile=False, json=None)
        r = run(args)
        results[f"{precision}/{zero}"] = {k: r[k] for k in ("syncs_per_step", "syncs_per_logging_step", "sync_sites",
                                                             "top_level_dispatches_per_step")}
        results[f"{precision}/{zero}"]["logging_sites"] = r["logging_step"]["sync_sites"]
print("RESULT " + json.dumps(results))
"""


@pytest.mark.distributed
def test_a_non_logging_step_never_waits_for_the_device() -> None:
    """ZeRO 0, 1, 2 in fp32 and bf16: zero host-sync points in a non-logging step of the worker's
    loop (hand-off, forward, both losses, backward, optimizer) and one in a logging step, counted
    by bench/step_profile.py on the real DeepSpeed engine of one rank."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _SYNC_SCRIPT, str(ROOT)], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert sorted(results) == ["bf16/0", "bf16/1", "bf16/2", "fp32/0", "fp32/1", "fp32/2"]
    for config, r in results.items():
        assert r["syncs_per_step"] == 0, (config, r["sync_sites"])
        assert r["syncs_per_logging_step"] == 1, (config, r["logging_sites"])
