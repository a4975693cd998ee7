"""Training checkpoints of a run: what they hold, how they reach storage, how a run resumes.

Layout (docs/run_layout.md), one directory per report, `RUN_DIR/checkpoint_<step, 9 digits>/`:

    deepspeed/            engine.save_checkpoint of every rank: module, optimizer (ZeRO shards
                          from each rank), DeepSpeed's step counters; plus
    deepspeed/rng/rank_<r>.pt   each rank's RNG states (torch, numpy, python): dropout masks and
                          anything else random continue as in an uninterrupted run
    inference/            rank 0: model/checkpoint.py format (float32 weights, config, vocab),
                          what evaluate.py, encode.py and the evaluation worker read
    train_state.json      rank 0, written LAST: epoch, step, data position, world size, global
                          batch

How a checkpoint lands: every rank writes its part into a local temporary directory and calls
`ray.train.report(checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=...)`; Ray
copies the ranks' directories into the same `RUN_DIR/checkpoint_*` (local or s3://) and registers
the checkpoint only once every rank's upload has returned. The upload function here adds a
barrier so that rank 0 publishes `train_state.json` (temporary name, then a rename) after every
rank's files are in place: a directory with train_state.json is complete, one without is an
interrupted upload. Each report gets a NEW directory and Ray's resume point only moves to it
after registration, so a crash while writing never touches the previous checkpoint.

Resume: Ray hands the latest registered checkpoint to the restarted (after a worker failure,
`FailureConfig.max_failures`) or re-launched (same `checkpoint.run_name` and storage path) workers
through `ray.train.get_checkpoint()`. `restore_checkpoint` loads the engine state and this rank's
RNG states and returns the `TrainState`; the trainer continues at the batch after the saved one
with the learning rate of that epoch (a function of the epoch), and the sharded reader replays the
epoch's order from that batch, so the losses equal an uninterrupted run's.

Different number of workers: with ZeRO stage 0 the engine checkpoint holds whole optimizer
states and loads as it is; with ZeRO 1-2 each rank converts the checkpoint into a DeepSpeed
universal checkpoint (deepspeed.checkpoint.ds_to_universal) and loads that. The global batch and
the learning rate do not depend on the worker count; the order of the rest of an interrupted
epoch does (the reader's plan depends on the world size), which is logged.

Pruning ("keep the last K and the best") is not Ray's: CheckpointConfig(num_to_keep) cannot know
the best, whose metrics arrive later from the evaluation worker. The launcher calls
`trainer.run.retention.prune_checkpoints(RUN_DIR, checkpoint.keep_last)` after each report and at
the end; it only deletes evaluated checkpoints that are neither among the newest K nor the best.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_shards.storage import is_s3_url
from model.checkpoint import save_inference_checkpoint
from model.vocab import Vocabulary
from model.vsrn import VSRN
from trainer.config import ConfigError, TrainConfig
from trainer.run.layout import DEEPSPEED_DIR, INFERENCE_DIR, TRAIN_STATE_FILE, checkpoint_dir_name
from trainer.run.train_state import TrainState, TrainStateError

log = logging.getLogger(__name__)

RNG_DIR = "rng"  # inside DEEPSPEED_DIR: each rank's RNG states
UNIVERSAL_LATEST = "latest_universal"


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed as configured; the message says what to do."""


# --------------------------------------------------------------------------------------------------
# Storage every node can reach
# --------------------------------------------------------------------------------------------------


def require_shared_storage(config: TrainConfig, node_hosts: list[str], driver_host: str) -> None:
    """Refuse local paths of `config` that not every node of the cluster can see.

    What every node must reach: checkpoint.storage_path (each worker writes its part of a
    checkpoint) and the shards (data.train for the workers, data.dev/test for the evaluator);
    s3:// ones are reachable from everywhere. `node_hosts`: the IP addresses of the nodes that may
    run workers or the evaluation actor; `driver_host`: the driver's node's. Hosts are told apart
    by node IP: nodes that share the driver's IP share its filesystem (several Ray nodes on one
    machine), others do not see its local directories, and a worker there would write its
    checkpoint shards, or look for its shards, on its own disk; Ray Train would then commit
    checkpoints that no host holds whole. checkpoint.shared_filesystem says that the local paths
    are on a filesystem mounted at the same path on every node. Raises ConfigError naming the key,
    the hosts and the fix. The driver calls it with the cluster's nodes, each worker with its own.
    """
    if config.checkpoint.shared_filesystem:
        return
    others = sorted({host for host in node_hosts if host != driver_host})
    locations = {"checkpoint.storage_path": config.checkpoint.storage_path, "data.train": config.data.train,
                 "data.dev": config.data.dev, "data.test": config.data.test}
    local = [(key, path) for key, path in locations.items() if path and not is_s3_url(path)]
    if not others or not local:
        return
    key, path = local[0]
    raise ConfigError(
        f"{key} is a local path ({path}) but the Ray cluster has nodes on {len(others) + 1} hosts "
        f"(this driver's {driver_host}, and {', '.join(others)}), which cannot see this host's disk: use s3:// "
        "storage (or a filesystem that every node mounts at the same path, with "
        "checkpoint.shared_filesystem=true)")


# --------------------------------------------------------------------------------------------------
# Storage errors that no restart fixes
# --------------------------------------------------------------------------------------------------


class CheckpointStorageError(RuntimeError):
    """Writing into the run's storage failed in a way no restart fixes (`storage_error`); the
    message names the storage path. One of trainer/training/failures.py's fatal errors."""


# errno values of a full, forbidden or read-only destination: the same write fails after a restart.
_LASTING_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                   errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                   errno.EROFS: "read-only filesystem"}
_FULL = {errno.ENOSPC, errno.EDQUOT}
# The same in the text of errors that carry no errno: pyarrow's (Ray's checkpoint upload) and the S3
# clients' (a missing bucket or a refused request arrive as OSError/PermissionError with the
# service's error name in the message).
_LASTING_TEXT = (("No space left on device", errno.ENOSPC), ("Disk quota exceeded", errno.EDQUOT),
                 ("Permission denied", errno.EACCES), ("Read-only file system", errno.EROFS))
_LASTING_S3 = (("NoSuchBucket", "the bucket does not exist"), ("NO_SUCH_BUCKET", "the bucket does not exist"),
               ("bucket does not exist", "the bucket does not exist"), ("AccessDenied", "access denied"),
               ("ACCESS_DENIED", "access denied"))


def storage_error(error: BaseException, storage_path: str, what: str,
                  checkpoint_bytes: int | None = None) -> CheckpointStorageError | None:
    """`error` (raised while writing `what` into `storage_path`) as a CheckpointStorageError when no
    restart can fix it: no space (or quota), permission denied, a read-only filesystem, a missing
    bucket; else None (S3 and network hiccups are transient). `checkpoint_bytes`: the size of one
    checkpoint (all ranks' parts), named in the message when the storage is full."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:  # the OSError may sit under Ray's or pyarrow's
        seen.add(id(current))
        text = " ".join(str(current).split())
        code = current.errno if isinstance(current, OSError) and current.errno in _LASTING_ERRNOS else None
        if code is None:
            code = next((number for marker, number in _LASTING_TEXT if marker in text), None)
        reason = _LASTING_ERRNOS[code] if code is not None else next(
            (why for marker, why in _LASTING_S3 if marker in text), None)
        if reason is not None:
            size = (f"; one checkpoint takes about {checkpoint_bytes / 2**20:.1f} MiB"
                    if code in _FULL and checkpoint_bytes else "")
            return CheckpointStorageError(
                f"checkpoint storage {storage_path}: {reason} while writing {what}{size} "
                f"({type(current).__name__}: {text}); a restart would fail the same way: free space (or grant "
                "access, or create the bucket) and relaunch with the same checkpoint.run_name to resume from "
                "the last complete checkpoint")
        current = current.__cause__ or current.__context__
    return None


# --------------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """torch, numpy and python RNG states as plain data (loadable with weights_only=True), and the
    CUDA generator of `device` (this rank's GPU; None or a CPU device: no CUDA state).

    One CUDA generator, the rank's own: Ray gives each worker of a node the same
    CUDA_VISIBLE_DEVICES (all the node's GPUs), so torch.cuda.get_rng_state_all() would save every
    GPU of the node, and restoring that list under another per-node layout would fail on a missing
    index or hand this rank another rank's generator."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, cached],
            "python": random.getstate(), "cuda": cuda}


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore rng_state(); its CUDA generator goes to `device` (this rank's GPU)."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # checkpoints before 2026-12-04: every visible GPU's, ambiguous
        if cuda:
            log.warning("the checkpoint holds the CUDA RNG states of %d GPUs and not which one was this rank's; "
                        "this rank's CUDA generator is not restored", len(cuda))
        return
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def export_inference(directory: Path, module: torch.nn.Module, vocab: Vocabulary, extra: dict[str, Any]) -> None:
    """The model as an inference checkpoint with float32 weights (bf16/fp16 training included)."""
    state = {key: value.detach().float() if value.is_floating_point() else value.detach()
             for key, value in module.state_dict().items()}
    model = VSRN(module.config)
    model.load_state_dict(state)
    save_inference_checkpoint(directory, model, vocab, extra)


def save_checkpoint(engine: Any, vocab: Vocabulary, state: TrainState, metrics: dict[str, Any], *,
                    rank: int, run_name: str, storage_path: str = "", world_size: int = 1) -> None:
    """Write this rank's part of a checkpoint and report it through Ray (every rank must call).

    `metrics` are reported with it (rank 0's end up attached to the checkpoint). A write that no
    restart can fix (storage_error) raises CheckpointStorageError naming `storage_path` and the
    checkpoint's size (this rank's part x `world_size`).
    """
    # Nothing in saving may draw from the global RNGs (export_inference builds a VSRN, whose
    # initialization does): a run that saved here must continue exactly like one resumed from here.
    with torch.random.fork_rng(devices=[]):
        _save_checkpoint(engine, vocab, state, metrics, rank=rank, run_name=run_name, storage_path=storage_path,
                         world_size=world_size)


def _save_checkpoint(engine: Any, vocab: Vocabulary, state: TrainState, metrics: dict[str, Any], *,
                     rank: int, run_name: str, storage_path: str, world_size: int) -> None:
    import ray.train

    local = Path(tempfile.mkdtemp(prefix=f"vsrn-ckpt-{state.step}-rank{rank}-"))
    name = checkpoint_dir_name(state.step)
    written = 0
    try:
        tag = f"global_step{state.step}"
        # Every rank saves: stage 0 writes the module and optimizer on rank 0 only, ZeRO 1-2 write
        # each rank's optimizer partition; save_checkpoint synchronizes the ranks itself.
        engine.save_checkpoint(str(local / DEEPSPEED_DIR), tag=tag,
                               client_state={"train_state": asdict(state)}, save_latest=True)
        (local / DEEPSPEED_DIR / RNG_DIR).mkdir(parents=True, exist_ok=True)
        device = next(engine.module.parameters()).device
        torch.save(rng_state(device), local / DEEPSPEED_DIR / RNG_DIR / f"rank_{rank:05d}.pt")
        train_state = None
        if rank == 0:
            export_inference(local / INFERENCE_DIR, engine.module, vocab,
                             {"source": "vsrn-dist training", "run": run_name, "step": state.step,
                              "epoch": state.epoch})
            train_state = state.to_json()
        written = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                         checkpoint_dir_name=name, checkpoint_upload_fn=_uploader(train_state))
        log.debug("rank %d: reported %s", rank, name)
    except Exception as error:
        # The rank's temporary directory filling up is this host's disk, not the run's storage.
        where = storage_path if written else f"{local.parent} (this worker's temporary directory)"
        lasting = storage_error(error, where, name, written * world_size or None)
        if lasting is not None:
            raise lasting from error
        raise
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _uploader(train_state: str | None) -> Callable[[Any, str], Any]:
    """Ray's checkpoint_upload_fn: copy this rank's files, wait for every rank, then (rank 0)
    publish train_state.json, so that its presence means the directory is complete."""

    def upload(checkpoint: Any, dir_name: str) -> Any:
        import pyarrow.fs
        import ray.train
        import torch.distributed as dist

        storage = ray.train.get_context().get_storage()  # DeveloperAPI: the run's filesystem and path
        fs = storage.storage_filesystem
        destination = storage.build_checkpoint_path_from_name(dir_name)
        fs.create_dir(destination)
        # S3 uploads are not thread-safe in pyarrow (Ray's own copy disables threads too).
        pyarrow.fs.copy_files(checkpoint.path, destination, source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs,
                              use_threads=not isinstance(fs, pyarrow.fs.S3FileSystem))
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if train_state is not None:
            temporary = f"{destination}/.{TRAIN_STATE_FILE}.tmp"
            with fs.open_output_stream(temporary) as stream:
                stream.write(train_state.encode())
            fs.move(temporary, f"{destination}/{TRAIN_STATE_FILE}")
        return ray.train.Checkpoint(filesystem=fs, path=destination)

    return upload


# --------------------------------------------------------------------------------------------------
# Restoring
# --------------------------------------------------------------------------------------------------


def read_train_state(checkpoint: Any) -> TrainState:
    """The TrainState of a Ray checkpoint (reads one small file, no download of the rest)."""
    path = f"{checkpoint.path}/{TRAIN_STATE_FILE}"
    try:
        with checkpoint.filesystem.open_input_stream(path) as stream:
            text = stream.read().decode("utf-8")
    except (OSError, FileNotFoundError) as error:
        raise ResumeError(f"{path}: cannot read the train state of the checkpoint to resume ({error}); "
                          "it is incomplete: remove that checkpoint directory and re-run") from None
    try:
        return TrainState.from_json(text, path)
    except TrainStateError as error:  # resuming from it is what fails: one of the errors that stop a run
        raise ResumeError(str(error)) from None


def needs_universal(saved: TrainState, world_size: int, zero_stage: int) -> bool:
    """Whether the engine checkpoint must go through a universal checkpoint to load: ZeRO 1-2
    partition optimizer states by rank, so they only load on the same number of ranks as such."""
    return saved.world_size != world_size and zero_stage > 0


def restore_checkpoint(engine: Any, checkpoint: Any, *, rank: int, world_size: int, zero_stage: int,
                       seed: int) -> TrainState:
    """Load the engine and this rank's RNG states from a Ray checkpoint; returns its TrainState.

    The engine must have been initialized with `{"checkpoint": {"load_universal": true}}` when
    `needs_universal(...)` is true.
    """
    saved = read_train_state(checkpoint)
    with checkpoint.as_directory() as directory:
        root = Path(directory) / DEEPSPEED_DIR
        tag = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
        if tag is None:
            raise ResumeError(f"{root}: no 'latest' file; the checkpoint's DeepSpeed state is incomplete")
        with contextlib.ExitStack() as stack:
            load_dir = root
            if needs_universal(saved, world_size, zero_stage):
                load_dir = stack.enter_context(_universal_copy(root, tag))
                log.warning("resuming a %d-worker ZeRO-%d checkpoint on %d workers through a universal checkpoint",
                            saved.world_size, zero_stage, world_size)
            path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
            if path is None:
                raise ResumeError(f"{load_dir}/{tag}: DeepSpeed could not load the checkpoint")
        rng_file = root / RNG_DIR / f"rank_{rank:05d}.pt"
        if saved.world_size == world_size and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True), next(engine.module.parameters()).device)
        else:
            # Another worker count: there is no state for this rank to continue; derive one.
            seed_everything(seed + 1000 * saved.step + rank)
    if saved.world_size != world_size:
        log.warning("the checkpoint was written by %d workers, this run has %d: step, learning rate and "
                    "model/optimizer state continue; the data order of the rest of epoch %d differs from "
                    "an uninterrupted run", saved.world_size, world_size, saved.epoch)
    return saved


@contextlib.contextmanager
def _universal_copy(root: Path, tag: str):
    """`root/tag` converted by deepspeed.checkpoint.ds_to_universal into a temporary directory."""
    from deepspeed.checkpoint import ds_to_universal

    output = Path(tempfile.mkdtemp(prefix="vsrn-universal-"))
    try:
        args = argparse.Namespace(input_folder=str(root / tag), output_folder=str(output / tag),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                  strict=True, inject_missing_state=True)
        try:
            ds_to_universal.main(args)
        except Exception as error:  # the converter raises assorted errors on unsupported layouts
            raise ResumeError(
                f"{root}: converting this checkpoint of another worker count to a DeepSpeed universal "
                f"checkpoint failed ({type(error).__name__}: {error}). Resume with the checkpoint's "
                "worker count (distributed.workers) or start a new run (another checkpoint.run_name)") from error
        (output / UNIVERSAL_LATEST).write_text(tag)
        yield output
    finally:
        shutil.rmtree(output, ignore_errors=True)
