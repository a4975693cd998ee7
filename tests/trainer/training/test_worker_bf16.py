"""bf16 training through Ray Train + DeepSpeed on 2 CPU workers (trainer/training/engine.py's precision policy).

One module fixture of runs on the shared local Ray:
* "z0": the embedded default's setting shrunk (200 images, 4 epochs) in bf16 with ZeRO 0 and the
  evaluation worker scoring every checkpoint, as the main-job test does in fp32;
* "z2_full" and "z2_cut": the tiny run (tests/train_run_helpers.py) in bf16 with ZeRO 2,
  uninterrupted, and stopped at step 25 then resumed with the same run name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from model.checkpoint import load_inference_checkpoint
from train_run_helpers import ROOT, STEPS_PER_EPOCH, logged_losses, tiny_run_config
from trainer.config import load_config
from trainer.run.layout import checkpoint_dir_name


@pytest.fixture(scope="module")
def bf16_runs(ray_local: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from trainer.launch import run

    root = tmp_path_factory.mktemp("bf16")
    out: dict[str, Any] = {"runs": root / "runs"}
    out["z0"] = run(load_config(ROOT / "configs" / "tiny.yaml", [
        f"data.cache_dir={root / 'cache-z0'}", f"checkpoint.storage_path={root / 'runs'}", "checkpoint.run_name=z0",
        "distributed.precision=bf16", "distributed.zero_stage=0", "distributed.cpus_per_worker=0.75",
        "eval.cpus=0.5", "eval.qualitative_queries=0", "data.synthetic_train_images=200", "optim.epochs=4",
        "optim.warmup_epochs=1", "optim.lr_decay_every_epochs=3", "checkpoint.max_failures=0"]))
    bf16_z2 = ("distributed.precision=bf16", "distributed.zero_stage=2", "checkpoint.max_failures=0")
    out["z2_full"] = run(tiny_run_config(root, "z2_full", *bf16_z2))
    run(tiny_run_config(root, "z2_cut", *bf16_z2, "debug.max_steps=25"))
    out["z2_cut"] = run(tiny_run_config(root, "z2_cut", *bf16_z2))
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_zero0_trains_and_every_checkpoint_is_evaluated(bf16_runs: dict[str, Any]) -> None:
    run_dir = bf16_runs["runs"] / "z0"
    log = logged_losses(run_dir)
    last = int(Path(bf16_runs["z0"]["latest_checkpoint"]).name.split("_")[-1])  # 4 epochs of 30 batches
    assert last == 120 and sorted(log) == list(range(1, last + 1))
    assert all(np.isfinite(v).all() for v in log.values())
    assert np.mean([log[s][0] for s in range(111, 121)]) < 0.5 * np.mean([log[s][0] for s in range(1, 11)])
    best = bf16_runs["z0"]["best"]
    metrics = best["metrics"]["all"]
    # The fp32 main-job test's bar on the same setting (100 test images; chance is rsum ~32).
    assert metrics["rsum"] > 150 and metrics["i2t_r10"] > 30 and metrics["t2i_r10"] > 30, metrics
    for checkpoint in sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir()):
        assert json.loads((checkpoint / "metrics.json").read_text())["dev_rsum"] > 0, checkpoint
    assert load_config(run_dir / "config.yaml").distributed.precision == "bf16"


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_exports_float32_weights_and_keeps_float32_master_weights(bf16_runs: dict[str, Any]) -> None:
    checkpoint = Path(bf16_runs["z2_full"]["latest_checkpoint"])
    inference = checkpoint / "inference"
    with safe_open(str(next(inference.glob("*.safetensors"))), framework="pt") as weights:
        dtypes = {weights.get_tensor(key).dtype for key in weights.keys()}
    assert dtypes <= {torch.float32, torch.int64} and torch.float32 in dtypes  # int64: BN's batch counters
    model, _ = load_inference_checkpoint(inference)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # The engine state: bf16 module weights, float32 master weights in each rank's ZeRO-2 partition,
    # and BatchNorm's running statistics float32 (DeepSpeed casts parameters only).
    step_dir = checkpoint / "deepspeed" / f"global_step{2 * STEPS_PER_EPOCH}"
    module = torch.load(step_dir / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")["module"]
    assert module["image_encoder.fc.weight"].dtype == torch.bfloat16
    assert module["image_encoder.reasoning.0.residual_norm.running_var"].dtype == torch.float32
    optim = torch.load(step_dir / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", weights_only=False,
                       map_location="cpu")["optimizer_state_dict"]
    masters = optim["single_partition_of_fp32_groups"]
    assert masters and all(t.dtype == torch.float32 for t in masters)
    # The export is the master weights rounded to nothing: it equals the bf16 module it was made from.
    exported = model.state_dict()
    torch.testing.assert_close(exported["image_encoder.fc.weight"], module["image_encoder.fc.weight"].float())


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_zero2_resumes_with_the_same_losses(bf16_runs: dict[str, Any]) -> None:
    full, resumed = logged_losses(bf16_runs["runs"] / "z2_full"), logged_losses(bf16_runs["runs"] / "z2_cut")
    assert sorted(full) == sorted(resumed) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    for step, values in full.items():
        assert resumed[step] == pytest.approx(values, rel=1e-6, abs=1e-6), step
    assert full[60][0] < 0.5 * full[1][0]
    assert bf16_runs["z2_cut"]["latest_checkpoint"].endswith(checkpoint_dir_name(60))
