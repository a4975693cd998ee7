"""This project's inference checkpoint: a directory that holds a trained VSRN for encoding.

Layout::

    DIR/model.safetensors   every weight and buffer of the VSRN module's state_dict
    DIR/vocab.json          the vocabulary (Vocabulary.save_json)
    DIR/config.json         {"format": "vsrn-inference", "format_version": 1,
                             "model": VSRNConfig.to_dict(), ...provenance such as "source"}

Nothing in it is pickled: safetensors and JSON cannot run code when read, so a checkpoint from
anywhere is safe to load. ``config.json`` is written last; a directory with it is complete.

Saving is atomic: the files are written into a temporary directory beside the destination, which
then replaces the destination by renames, so a failure never leaves a half-written checkpoint
and an existing one is only removed once the new one is complete.

Locations are local directories for now; :func:`resolve_location` is the one place that turns a
location into a path, where object-store URLs (s3://) will be handled.

This module is library code: it imports nothing from the rest of the project.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.vocab import Vocabulary, VocabularyError
from model.vsrn import VSRN, VSRNConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "CONFIG_FILE",
    "CheckpointError",
    "VOCAB_FILE",
    "WEIGHTS_FILE",
    "load_inference_checkpoint",
    "read_checkpoint_config",
    "resolve_location",
    "save_inference_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vsrn-inference"
CHECKPOINT_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
_RESERVED_KEYS = frozenset({"format", "format_version", "model"})
_MAX_LISTED = 10  # key names listed in an error message before "... and N more"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not fit its model; the message names the file."""


def resolve_location(location: str | os.PathLike[str]) -> Path:
    """The local directory of a checkpoint location.

    Every function here goes through this, so remote locations (s3://bucket/key, to come) need
    handling in one place only.
    """
    text = os.fspath(location)
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise CheckpointError(f"{text}: {scheme}:// checkpoint locations are not supported yet; use a local directory")
    return Path(text)


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown if len(names) <= _MAX_LISTED else f"{shown} ... and {len(names) - _MAX_LISTED} more"


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def save_inference_checkpoint(
    directory: str | os.PathLike[str],
    model: VSRN,
    vocab: Vocabulary,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (weights, buffers, config) and ``vocab`` as a checkpoint directory.

    ``extra`` adds JSON values to config.json (provenance such as ``{"source": ...}``); it may not
    use the keys ``format``, ``format_version`` or ``model``. An existing checkpoint at
    ``directory`` is replaced once the new one is complete; an existing directory that is not a
    checkpoint (no config.json) and not empty is refused. Returns the directory.
    """
    target = resolve_location(directory)
    config: VSRNConfig = model.config
    if len(vocab) != config.vocab_size:
        raise CheckpointError(
            f"the vocabulary has {len(vocab)} words but the model's vocab_size is {config.vocab_size}")
    extra = dict(extra or {})
    clash = sorted(_RESERVED_KEYS & set(extra))
    if clash:
        raise CheckpointError(f"extra config keys {clash} are reserved for the checkpoint format")
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        umask = os.umask(0)  # mkdtemp makes the directory 0700; give it the permissions mkdir would
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        # Weights first and config.json last: config.json marks a complete checkpoint.
        tensors = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        vocab.save_json(staging / VOCAB_FILE)
        payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
                   "model": config.to_dict(), **extra}
        try:
            text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"config.json: the extra values are not JSON ({error})") from None
        (staging / CONFIG_FILE).write_text(text, encoding="utf-8")
        for name in (WEIGHTS_FILE, VOCAB_FILE, CONFIG_FILE):
            _fsync(staging / name)
        _fsync(staging)
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved inference checkpoint %s (%d tensors)", target, len(tensors))
    return target


def _check_replaceable(target: Path) -> None:
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise CheckpointError(f"{target}: exists and is not a directory; refusing to replace it")
    if not (target / CONFIG_FILE).is_file() and any(target.iterdir()):
        raise CheckpointError(f"{target}: exists, is not empty and is not an inference checkpoint "
                              f"(no {CONFIG_FILE}); refusing to replace it")


def _replace_directory(staging: Path, target: Path) -> None:
    """Move the complete ``staging`` directory to ``target``, keeping the old one until then."""
    if not target.exists():
        os.rename(staging, target)
        _fsync(target.parent)
        return
    backup = Path(f"{staging}.old")
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)  # put the previous checkpoint back
        raise
    _fsync(target.parent)
    shutil.rmtree(backup, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk so that a crash after the rename cannot lose it."""
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def read_checkpoint_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked content of a checkpoint's config.json (format, version and model config)."""
    root = resolve_location(directory)
    if not root.exists():
        raise CheckpointError(f"{root}: no such checkpoint directory")
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory; an inference checkpoint is a directory")
    path = root / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {root} is not an inference checkpoint")
    try:
        payload = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: 'format' is {payload.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    version = payload.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported 'format_version' {version!r} "
                              f"(this code reads version {CHECKPOINT_FORMAT_VERSION})")
    if not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"{path}: 'model' must be an object of VSRNConfig fields")
    try:
        VSRNConfig.from_dict(payload["model"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid 'model' config: {error}") from None
    return payload


def load_inference_checkpoint(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[VSRN, Vocabulary]:
    """The model (in eval mode, on ``device``) and vocabulary of a checkpoint directory.

    Raises :class:`CheckpointError` naming the file for a missing file, a wrong format or version,
    a vocabulary whose size differs from the config's, or weights whose keys or shapes differ
    from the model the config describes (naming the keys).
    """
    root = resolve_location(directory)
    payload = read_checkpoint_config(root)
    config = VSRNConfig.from_dict(payload["model"])

    vocab_path = root / VOCAB_FILE
    if not vocab_path.is_file():
        raise CheckpointError(f"{vocab_path}: missing from the checkpoint")
    try:
        vocab = Vocabulary.load_json(vocab_path)
    except VocabularyError as error:
        raise CheckpointError(str(error)) from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"{vocab_path}: {len(vocab)} words, but {root / CONFIG_FILE} says "
                              f"vocab_size {config.vocab_size}")

    weights_path = root / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing from the checkpoint")
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file: {error}") from None

    model = VSRN(config)
    _check_state(model.state_dict(), state, weights_path)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), vocab


def _check_state(expected: dict[str, Tensor], found: dict[str, Tensor], source: Path) -> None:
    """Name the missing, unexpected and mis-shaped keys (load_state_dict's own message does not
    say which file, and stops at shapes it can not copy)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    shapes = [f"{key} {tuple(found[key].shape)} (the config needs {tuple(expected[key].shape)})"
              for key in sorted(set(expected) & set(found)) if found[key].shape != expected[key].shape]
    if shapes:
        problems.append(f"wrong shapes: {_listed(shapes)}")
    if problems:
        raise CheckpointError(f"{source}: the weights do not fit the model in config.json; " + "; ".join(problems))
