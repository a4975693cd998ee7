"""Checkpoints and resume (trainer/training/checkpoint.py), through Ray Train + DeepSpeed on 2 CPU workers.

The Ray tests share one module fixture of runs on a tiny configuration (96 synthetic images,
global batch 16, 30 steps per epoch, 2 epochs, ZeRO stage 1 so that optimizer states are
partitioned by rank, a checkpoint every 10 steps):

* "full": uninterrupted;
* "cut": the same configuration through `python trainer/launch.py`, stopped by SIGTERM in epoch 0
  (as `ray job stop` or a deleted pod stops it), relaunched and stopped by SIGINT in epoch 1
  (Ctrl-C), then re-run in this process with the same run name; in that last part rank 1
  hard-exits after step 45 (debug.fail_at_step), and Ray restarts the workers from the step-40
  checkpoint. Its per-step losses must equal "full"'s. (One run covers all four, as each Ray Train
  start costs ~20 s on 2 cores.)
* "moved": a copy of "cut" at the SIGTERM's checkpoint, resumed with ONE worker (universal checkpoint).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from train_run_helpers import (
    ROOT,
    STEPS_PER_EPOCH,
    Launch,
    logged_losses,
    tiny_run_config,
    tiny_run_overrides,
    wait_for,
)

from model.checkpoint import load_inference_checkpoint
from model.vocab import build_vocab
from model.vsrn import VSRN, VSRNConfig
from trainer.config import ConfigError, TrainConfig
from trainer.run.checkpoints import list_checkpoints
from trainer.run.layout import LEASE_FILE, TRAIN_LOG, checkpoint_dir_name
from trainer.run.train_state import TrainState
from trainer.training.checkpoint import (
    CheckpointStorageError,
    export_inference,
    require_shared_storage,
    rng_state,
    set_rng_state,
    storage_error,
)

# --------------------------------------------------------------------------------------------------
# Without Ray
# --------------------------------------------------------------------------------------------------


def test_train_state_round_trip_and_next_position() -> None:
    state = TrainState(epoch=3, step=120, batch_in_epoch=7, epoch_complete=False, world_size=2,
                       global_batch_size=128)
    again = TrainState.from_json(state.to_json(), "x")
    assert again == state and again.next_position() == (3, 7)
    # Files written before best_rsum went (nothing read it) still resume.
    older = json.dumps({**json.loads(state.to_json()), "best_rsum": 412.5})
    assert TrainState.from_json(older, "x") == state
    done = TrainState(epoch=3, step=130, batch_in_epoch=17, epoch_complete=True, world_size=2, global_batch_size=128)
    assert done.next_position() == (4, 0)
    assert checkpoint_dir_name(130) == "checkpoint_000000130"  # names sort by step


def test_local_paths_are_refused_only_when_nodes_sit_on_other_hosts(tmp_path: Path) -> None:
    def config(storage: str, train: str, shared: bool = False) -> TrainConfig:
        return tiny_run_config(tmp_path, "r", f"checkpoint.storage_path={storage}", f"data.train={train}",
                               f"data.dev={train}", f"data.test={train}", f"checkpoint.shared_filesystem={shared}")

    local = config("/runs", "/data/train")
    # Several nodes on the driver's host (as in tests/trainer/test_multinode.py) share its disk.
    require_shared_storage(local, ["127.0.0.1", "127.0.0.1"], "127.0.0.1")
    # S3 everywhere, or a filesystem mounted on every node: any cluster.
    require_shared_storage(config("s3://b/runs", "s3://b/train"), ["10.0.0.1", "10.0.0.2"], "10.0.0.1")
    require_shared_storage(config("/runs", "/data/train", shared=True), ["10.0.0.1", "10.0.0.2"], "10.0.0.1")
    with pytest.raises(ConfigError, match=r"checkpoint.storage_path is a local path \(/runs\) but the Ray cluster "
                                          r"has nodes on 3 hosts \(this driver's 10.0.0.1, and 10.0.0.2, 10.0.0.3\)"):
        require_shared_storage(local, ["10.0.0.1", "10.0.0.3", "10.0.0.2"], "10.0.0.1")
    with pytest.raises(ConfigError, match="data.train is a local path"):
        require_shared_storage(config("s3://b/runs", "/data/train"), ["10.0.0.2"], "10.0.0.1")


def test_rng_states_restore_torch_numpy_and_python() -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    saved = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5)
    np.random.rand(5)
    random.random()
    set_rng_state(saved)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_rng_states_hold_one_cuda_generator_at_most_and_load_the_older_list(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A CPU rank saves no CUDA state; a GPU rank saves its own device's generator only (the GPU
    # check's resume part runs that on CUDA), never every visible GPU's list, which restored under
    # another per-node layout raised an index error or handed a rank another rank's generator.
    saved = rng_state(torch.device("cpu"))
    assert saved["cuda"] is None
    torch.save(saved, tmp_path / "rank.pt")
    set_rng_state(torch.load(tmp_path / "rank.pt", weights_only=True), torch.device("cpu"))
    # Checkpoints written before held a list (empty on CPU); a non-empty one is ambiguous: skipped, said.
    older = {**saved, "cuda": []}
    set_rng_state(older, torch.device("cpu"))
    with caplog.at_level("WARNING", logger="trainer.training.checkpoint"):
        set_rng_state({**saved, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}, torch.device("cpu"))
    assert "CUDA RNG states of 2 GPUs" in caplog.text


def test_inference_export_of_a_bf16_module_has_float32_weights(tmp_path: Path) -> None:
    vocab = build_vocab(["a dog on a mat", "a cat"], 1)
    config = VSRNConfig(img_dim=8, embed_size=16, word_dim=8, vocab_size=len(vocab), num_reasoning_layers=1,
                        caption_hidden=8, caption_word_dim=8)
    module = VSRN(config).to(torch.bfloat16)
    export_inference(tmp_path / "inference", module, vocab, {"step": 3})
    model, loaded_vocab = load_inference_checkpoint(tmp_path / "inference")
    assert all(p.dtype == torch.float32 for p in model.parameters()) and len(loaded_vocab) == len(vocab)
    for name, value in module.state_dict().items():
        expected = value.float() if value.is_floating_point() else value  # num_batches_tracked stays int64
        torch.testing.assert_close(model.state_dict()[name], expected, msg=name)


# --------------------------------------------------------------------------------------------------
# Through Ray Train
# --------------------------------------------------------------------------------------------------


def tree_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("error,reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
    (OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"),
     "no space left on the device"),  # pyarrow's upload: the errno only in the text
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only filesystem"),
    (OSError("When uploading part: AWS Error NO_SUCH_BUCKET during CreateMultipartUpload"), "the bucket does not exist"),
    (FileNotFoundError("The specified bucket does not exist (NoSuchBucket)"), "the bucket does not exist"),
])
def test_storage_errors_no_restart_fixes_name_the_path(error: BaseException, reason: str) -> None:
    wrapped = RuntimeError("upload failed")  # as Ray or pyarrow wrap it
    wrapped.__cause__ = error
    lasting = storage_error(wrapped, "s3://runs/coco", "checkpoint_000000120", 3 * 2**20)
    assert isinstance(lasting, CheckpointStorageError)
    message = str(lasting)
    assert message.startswith(f"checkpoint storage s3://runs/coco: {reason} while writing checkpoint_000000120")
    assert ("one checkpoint takes about 3.0 MiB" in message) == (reason == "no space left on the device")


def test_transient_storage_errors_keep_the_restarts() -> None:
    for error in (OSError("AWS Error NETWORK_CONNECTION during PutObject"), ConnectionResetError(104, "reset"),
                  TimeoutError("read timed out")):
        assert storage_error(error, "s3://runs/coco", "checkpoint_000000120") is None


@pytest.mark.slow
@pytest.mark.distributed
def test_a_full_checkpoint_disk_ends_the_run_in_one_try_naming_the_path(ray_local: Any, tmp_path: Path) -> None:
    # A 12 MB tmpfs as checkpoint.storage_path: before, Ray Train spent every restart on the same
    # "No space left on device" and the last line did not say where.
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(small)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode}): "
                    "the full-disk case is not run on this machine")
    try:
        overrides = [f"--set={o}" for o in tiny_run_overrides(tmp_path / "cache", small, "full",
                                                                "checkpoint.max_failures=3",
                                                                "distributed.cpus_per_worker=0.75")]
        result = subprocess.run([sys.executable, "trainer/launch.py", *overrides], cwd=ROOT, capture_output=True,
                                text=True, timeout=600, check=False,
                                env={**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address})
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
    assert result.returncode == 1, result.stderr[-4000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("launch: training stopped without restarts"), last
    # The disk fills up on a worker's write or on Ray Train's record of the checkpoints (its controller).
    assert f"CheckpointStorageError: checkpoint storage {small}: no space left on the device while writing " \
        in last, last
    assert "one checkpoint takes about" in last and "MiB" in last, last
    assert result.stderr.count(" parameters on 2 CPU worker(s)") == 1  # one try: no restart


@dataclass(frozen=True)
class Stop:
    """A launch of "cut" stopped by a signal (see `runs`)."""

    signal: signal.Signals
    signalled_at: int  # the last step logged when the signal was sent
    status: int  # the launcher's exit status
    step: int  # the latest complete checkpoint after it exited
    stderr: str
    lease_left: bool  # RUN_DIR/lease.json still there
    last_logged: int


def _last_logged_step(run: Path) -> int:
    path = run / TRAIN_LOG
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1])["step"] if lines else 0


def _stop_launch(root: Path, run: Path, overrides: list[str], env: dict[str, str], sig: signal.Signals,
                 after_step: int) -> Stop:
    """`python trainer/launch.py` of `overrides`, sent `sig` once it has logged `after_step`
    (every step is logged at once: logging.interval_steps=1)."""
    launch = Launch(root, sig.name, overrides, env)
    try:
        wait_for(lambda: _last_logged_step(run) >= after_step, 300, f"step {after_step}", launch.exited)
        signalled_at = _last_logged_step(run)
        launch.process.send_signal(sig)
        status = launch.wait(120)
    finally:
        launch.kill()
    latest = list_checkpoints(str(run))[-1]  # what a relaunch resumes from
    assert latest.step is not None, latest
    return Stop(sig, signalled_at, status, latest.step, launch.stderr(),
                (run / LEASE_FILE).exists(), _last_logged_step(run))


@pytest.fixture(scope="module")
def runs(ray_local: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from trainer.launch import run

    root = tmp_path_factory.mktemp("resume")
    out: dict[str, Any] = {"root": root, "runs": root / "runs"}
    out["full"] = run(tiny_run_config(root, "full"))
    # "cut", as users and Kubernetes stop a job: `python trainer/launch.py` stopped by SIGTERM in
    # epoch 0, relaunched and stopped by SIGINT in epoch 1 (away from the checkpoints every 10 steps).
    cut = root / "runs" / "cut"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    overrides = tiny_run_overrides(root / "cache", root / "runs", "cut", "logging.interval_steps=1")
    sigterm = _stop_launch(root, cut, overrides, env, signal.SIGTERM, after_step=21)
    shutil.copytree(cut, root / "runs" / "moved")
    out["cut_files_after_interruption"] = sorted(p.name for p in cut.iterdir())
    out["stop_digest"] = tree_digest(cut / checkpoint_dir_name(sigterm.step))
    # An upload that crashed half way: a directory without train_state.json, at a step the resumed
    # run will checkpoint again. Resuming must ignore it and rewrite it completely.
    out["partial"] = (sigterm.step // 10 + 1) * 10
    partial = cut / checkpoint_dir_name(out["partial"]) / "deepspeed"
    partial.mkdir(parents=True)
    (partial / "latest").write_text("garbage")
    sigint = _stop_launch(root, cut, overrides, env, signal.SIGINT, after_step=32)
    out["stops"] = [sigterm, sigint]
    # The rest in this process; rank 1 hard-exits after step 45 and Ray restarts the workers.
    out["cut_resumed_at"] = time.time()
    out["cut"] = run(tiny_run_config(root, "cut", "logging.interval_steps=1", "debug.fail_at_step=45",
                                     "debug.fail_rank=1", "checkpoint.max_failures=1"))
    out["moved"] = run(tiny_run_config(root, "moved", "distributed.workers=1"))
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_two_worker_training_through_ray_and_deepspeed(runs: dict[str, Any]) -> None:
    run_dir = runs["runs"] / "full"
    assert runs["full"]["run_dir"] == str(run_dir)
    assert runs["full"]["latest_checkpoint"] == str(run_dir / checkpoint_dir_name(60))
    log = logged_losses(run_dir)
    assert sorted(log) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert all(np.isfinite(v).all() for v in log.values())
    # The learning rate decays at epoch 1 (lr_decay_every_epochs=1) and the model learns.
    assert log[1][2] == pytest.approx(5e-4) and log[60][2] == pytest.approx(5e-5)
    assert log[60][0] < 0.5 * log[1][0]
    # Every 10 steps and at the end of each epoch; the resolved configuration beside them.
    names = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert names == [checkpoint_dir_name(s) for s in (10, 20, 30, 40, 50, 60)]
    assert (run_dir / "config.yaml").is_file()
    checkpoint = run_dir / checkpoint_dir_name(30)
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state == {"epoch": 0, "step": 30, "batch_in_epoch": 30, "epoch_complete": True, "world_size": 2,
                     "global_batch_size": 16, "format_version": 1}
    deepspeed = checkpoint / "deepspeed"
    assert (deepspeed / "latest").read_text().strip() == "global_step30"
    assert {p.name for p in (deepspeed / "global_step30").iterdir()} >= {
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"}  # ZeRO-1: each rank's optimizer partition
    assert sorted(p.name for p in (deepspeed / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    model, vocab = load_inference_checkpoint(checkpoint / "inference")
    assert model.config.vocab_size == len(vocab) and model.config.img_dim == 64


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_and_sigint_stop_at_the_next_step_with_a_checkpoint_and_the_relaunch_resumes_there(
        runs: dict[str, Any]) -> None:
    # `ray job stop`, a deleted pod (SIGTERM) and Ctrl-C (SIGINT): before, the driver died with
    # SIGABRT and the steps since the last checkpoint were lost.
    cut = runs["runs"] / "cut"
    resumed_from = 0
    for stop, status in zip(runs["stops"], (143, 130)):
        assert stop.status == status, stop.stderr[-4000:]
        # The step in flight when the signal came, or the one after it: the workers stop at the next boundary.
        assert stop.signalled_at <= stop.step <= stop.signalled_at + 2, (stop.signalled_at, stop.step)
        assert f"stop requested ({stop.signal.name}): checkpointing it, then stopping after step {stop.step}" \
            in stop.stderr, stop.stderr[-4000:]
        last = stop.stderr.strip().splitlines()[-1]
        assert last == (f"launch: stopped by {stop.signal.name}: checkpoint {cut / checkpoint_dir_name(stop.step)} "
                        "is committed and a relaunch with the same checkpoint.run_name resumes from it"), last
        assert not stop.lease_left, "the lease is released"
        assert stop.last_logged == stop.step  # nothing logged past the checkpoint
        if resumed_from:
            assert f"resuming at step {resumed_from}:" in stop.stderr
        resumed_from = stop.step
    # The last relaunch went on from the SIGINT's checkpoint: what it logged, it logged after it started.
    records = [json.loads(line) for line in (cut / TRAIN_LOG).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # every step once, in order
    assert all((r["time"] >= runs["cut_resumed_at"]) == (r["step"] > resumed_from) for r in records)


@pytest.mark.slow
@pytest.mark.distributed
def test_interrupted_and_resumed_run_gives_the_same_logged_losses(runs: dict[str, Any]) -> None:
    cut_dir = runs["runs"] / "cut"
    first_stop = runs["stops"][0].step
    assert checkpoint_dir_name(runs["partial"]) not in runs["cut_files_after_interruption"]
    full, resumed = logged_losses(runs["runs"] / "full"), logged_losses(cut_dir)
    assert sorted(resumed) == sorted(full)
    for step, values in full.items():  # across two relaunches and a restart
        assert resumed[step] == pytest.approx(values, rel=1e-6, abs=1e-6), step
    # The checkpoint resumed from is untouched; the half-written one was redone completely.
    assert tree_digest(cut_dir / checkpoint_dir_name(first_stop)) == runs["stop_digest"]
    partial = cut_dir / checkpoint_dir_name(runs["partial"])
    assert (partial / "deepspeed" / "latest").read_text().strip() == f"global_step{runs['partial']}"
    assert (partial / "train_state.json").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_with_another_number_of_workers(runs: dict[str, Any]) -> None:
    moved_dir = runs["runs"] / "moved"
    assert runs["moved"]["latest_checkpoint"] == str(moved_dir / checkpoint_dir_name(60))
    log, full = logged_losses(moved_dir), logged_losses(runs["runs"] / "full")
    assert sorted(log) == list(range(1, 61))
    moved_at = runs["stops"][0].step  # the SIGTERM's checkpoint
    assert moved_at < STEPS_PER_EPOCH  # in epoch 0: the loss changes its form (hardest negatives) at epoch 1
    assert all(log[s] == pytest.approx(full[s], rel=1e-6) for s in range(1, moved_at + 1))  # before the move
    # Model and optimizer continue (no restart from scratch: the loss stays at its level at the
    # move; the batches after the move are other ones, so only levels compare), the lr follows the epoch.
    def mean(values: dict[int, tuple[float, float, float]], steps: range) -> float:
        return float(np.mean([values[s][0] for s in steps]))

    after_move = range(moved_at + 1, min(moved_at + 6, STEPS_PER_EPOCH + 1))
    fresh, before, after = mean(full, range(1, 6)), mean(full, after_move), mean(log, after_move)
    assert after < 0.9 * fresh and abs(after - before) < 0.2 * before, (fresh, before, after)
    assert abs(mean(log, range(51, 61)) - mean(full, range(51, 61))) < 0.3 * mean(full, range(51, 61))
    assert log[60][2] == pytest.approx(5e-5)
    state = json.loads((moved_dir / checkpoint_dir_name(60) / "train_state.json").read_text())
    assert state["world_size"] == 1 and state["step"] == 60


@pytest.mark.slow
@pytest.mark.distributed
def test_killed_worker_is_restarted_from_the_last_checkpoint(runs: dict[str, Any]) -> None:
    cut_dir = runs["runs"] / "cut"
    assert (cut_dir / ".debug-failed-at-step-45").is_file()  # rank 1 did exit once, after step 45
    assert runs["cut"]["latest_checkpoint"] == str(cut_dir / checkpoint_dir_name(60))  # and the run finished
    log, full = logged_losses(cut_dir), logged_losses(runs["runs"] / "full")
    # Steps 41..45 were redone from the step-40 checkpoint, logged once, with the same values.
    assert sorted(log) == sorted(full)
    for step in range(41, 61):
        assert log[step] == pytest.approx(full[step], rel=1e-6, abs=1e-6), step
