"""Tests of trainer/training/engine.py: the schedules and the DeepSpeed configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.training.engine import deepspeed_config, hardest_negatives, learning_rate

ROOT = Path(__file__).resolve().parents[3]


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
