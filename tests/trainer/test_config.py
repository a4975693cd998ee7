"""Tests of trainer/config.py: YAML + overrides into typed dataclasses, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainer.config import ConfigError, TrainConfig, config_to_yaml, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["coco.yaml", "f30k.yaml", "tiny.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(ROOT / "configs" / name)
    assert isinstance(config, TrainConfig)
    assert config.optim.global_batch_size % config.distributed.workers == 0


def test_paper_settings() -> None:
    coco = load_config(ROOT / "configs" / "coco.yaml")
    assert (coco.optim.learning_rate, coco.optim.lr_decay_every_epochs, coco.optim.epochs) == (2e-4, 15, 30)
    assert (coco.optim.global_batch_size, coco.optim.margin, coco.optim.grad_clip) == (128, 0.2, 2.0)
    assert coco.optim.max_violation and coco.model.num_reasoning_layers == 4
    assert coco.eval.test_protocols == ["1k-5fold", "all"]
    f30k = load_config(ROOT / "configs" / "f30k.yaml")
    assert f30k.model.final_batchnorm and not f30k.model.norm_after_fc
    assert f30k.optim.lr_decay_every_epochs == 10 and f30k.eval.test_protocols == ["all"]


def test_overrides_apply_in_order_with_yaml_values() -> None:
    config = load_config(ROOT / "configs" / "tiny.yaml", [
        "optim.learning_rate=1e-3", "optim.learning_rate=3e-3", "distributed.workers=4",
        "eval.test_protocols=[all, 1k-5fold]", "model.aggregation=mean", "data.bad_data=skip",
        "optim.max_violation=false"])
    assert config.optim.learning_rate == 3e-3  # "3e-3" is a string to YAML 1.1; accepted as a number
    assert config.distributed.workers == 4 and config.per_worker_batch_size == 8
    assert config.eval.test_protocols == ["all", "1k-5fold"]
    assert config.model.aggregation == "mean" and config.data.bad_data == "skip"
    assert config.optim.max_violation is False


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown key(s): optim.lrr"),
    ("bogus.key=1", "unknown key(s): bogus"),
    ("optim.learning_rate=abc", "optim.learning_rate: expected a number, got 'abc'"),
    ("optim.epochs=1.5", "optim.epochs: expected an integer, got float 1.5"),
    ("optim.max_violation=yes please", "optim.max_violation: expected true or false"),
    ("distributed.zero_stage=3", "distributed.zero_stage must be 0, 1 or 2, got 3"),
    ("distributed.precision=fp8", "distributed.precision: must be one of 'fp32', 'bf16', 'fp16'"),
    ("model.aggregation=max", "model.aggregation: must be one of 'gsr', 'mean'"),
    ("model.embed_size=0", "model: VSRNConfig.embed_size must be positive, got 0"),
    ("optim.learning_rate=-1", "optim.learning_rate must be > 0, got -1.0"),
    ("optim.lr_decay_factor=2", "optim.lr_decay_factor must be in (0, 1], got 2.0"),
    ("optim.global_batch_size=33", "optim.global_batch_size (33) must be divisible by distributed.workers (2)"),
    ("eval.test_protocols=[5k]", "eval.test_protocols: unknown protocol '5k'"),
    ("distributed.precision=fp16", "distributed.precision: fp16 needs a GPU"),
    ("distributed.resource_wait_s=-1", "distributed.resource_wait_s must be >= 0"),
    ("optim=3", "--set 'optim=3': the key must be section.key"),
    ("optim.learning_rate", "expected section.key=value"),
    ("data.shuffle_buffer=64", "data.shuffle_buffer was renamed data.pool_images"),
])
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(ROOT / "configs" / "tiny.yaml", [override])
    assert message in str(error.value)


@pytest.mark.parametrize("overrides,message", [
    # Two NCCL ranks on one GPU fail at their first collective ("Duplicate GPU detected"): refused here.
    (["distributed.workers=2", "distributed.gpus_per_worker=0.5"],
     "distributed.gpus_per_worker is 0.5 with distributed.workers=2"),
    (["distributed.workers=2", "distributed.gpus_per_worker=0"], "distributed.gpus_per_worker must be > 0"),
    (["distributed.workers=1", "distributed.gpus_per_worker=1.5"], "distributed.gpus_per_worker must be a whole number"),
])
def test_gpu_shares_that_nccl_or_ray_cannot_run_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(ROOT / "configs" / "tiny.yaml", ["distributed.use_gpu=true", *overrides])
    assert message in str(error.value)


def test_gpu_shares_that_work_are_accepted() -> None:
    # One worker may take half a GPU and leave the other half to the evaluation actor (gpu_check).
    one = load_config(ROOT / "configs" / "tiny.yaml", ["distributed.use_gpu=true", "distributed.workers=1",
                                                       "distributed.gpus_per_worker=0.5", "eval.gpus=0.5"])
    assert one.distributed.gpus_per_worker == 0.5
    two = load_config(ROOT / "configs" / "tiny.yaml", ["distributed.use_gpu=true", "distributed.gpus_per_worker=2"])
    assert two.distributed.workers == 2
    # Without use_gpu the GPU share is not used, whatever it says.
    assert load_config(ROOT / "configs" / "tiny.yaml", ["distributed.gpus_per_worker=0.5"]).distributed.workers == 2


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(bad_yaml)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: the configuration must be a mapping"):
        load_config(not_mapping)
    wrong_section = tmp_path / "section.yaml"
    wrong_section.write_text("optim: 5\n")
    with pytest.raises(ConfigError, match="section.yaml: optim: expected a mapping"):
        load_config(wrong_section)
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    config = load_config(ROOT / "configs" / "coco.yaml", ["optim.epochs=7"])
    saved = tmp_path / "config.yaml"
    saved.write_text(config_to_yaml(config))
    assert load_config(saved) == config
    assert yaml.safe_load(saved.read_text())["optim"]["epochs"] == 7


def test_debug_section_for_fault_injection() -> None:
    config = load_config(ROOT / "configs" / "tiny.yaml", ["debug.max_steps=30", "debug.fail_at_step=12",
                                                          "debug.fail_rank=1"])
    assert (config.debug.max_steps, config.debug.fail_at_step, config.debug.fail_rank) == (30, 12, 1)
    assert load_config(ROOT / "configs" / "tiny.yaml").debug.max_steps == 0  # off by default
    with pytest.raises(ConfigError, match=r"debug.max_steps must be >= 0, got -1"):
        load_config(ROOT / "configs" / "tiny.yaml", ["debug.max_steps=-1"])
    with pytest.raises(ConfigError, match=r"debug.fail_rank \(2\) must be < distributed.workers \(2\)"):
        load_config(ROOT / "configs" / "tiny.yaml", ["debug.fail_at_step=5", "debug.fail_rank=2"])
