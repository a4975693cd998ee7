"""Checking what is handed to the evaluation: arrays as 2-D tensors (no copy where possible), their
compute dtype and device, finite values, names of ensemble members, and whether a protocol can run
on a gallery (:func:`validate_protocol`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from trainer.evaluation.coco_ids import GalleryIds, resolve_ids
from trainer.evaluation.metrics import (
    ANNOTATED_PROTOCOLS,
    FOLD_IMAGES,
    FOLD_PROTOCOL_MIN_IMAGES,
    NUM_FOLDS,
    PROTOCOL_1K_5FOLD,
    PROTOCOLS,
    DeviceLike,
    EvaluationInputError,
)

def member_names(names: Sequence[str] | None, count: int) -> list[str]:
    if names is None:
        return [f"model {index}" for index in range(count)]
    if len(names) != count:
        raise EvaluationInputError(f"got {len(names)} names for {count} inputs")
    return list(names)


def to_tensor(value: Any, what: str) -> torch.Tensor:
    """A tensor view of ``value`` (no copy for tensors and numpy arrays), checked to be 2-D."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        array = np.asarray(value)
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise EvaluationInputError(f"{what}: expected a numeric array, got dtype {array.dtype}")
        with warnings.catch_warnings():
            # Read-only arrays (np.load with mmap, say) are fine: the tensor is never written.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            try:
                tensor = torch.from_numpy(array)
            except (TypeError, ValueError):
                # Negative strides, non-native byte order or a dtype torch lacks: copy into a
                # layout torch can share.
                tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")))
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise EvaluationInputError(f"{what}: expected a real-valued array, got dtype {tensor.dtype}")
    if tensor.ndim != 2:
        raise EvaluationInputError(
            f"{what}: expected a 2-D array, got {tensor.ndim}-D with shape {tuple(tensor.shape)}"
        )
    return tensor


def compute_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    # float32 accumulation at least (half-precision embeddings are upcast, so products neither
    # round to fp16 nor create ties); float64 inputs keep their precision.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def resolve_device(device: DeviceLike | None, tensors: Sequence[torch.Tensor]) -> torch.device:
    if device is None:
        # Tensors already on an accelerator stay there; numpy arrays are evaluated on the CPU.
        resolved = tensors[0].device if tensors else torch.device("cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError as error:
            raise EvaluationInputError(f"invalid device {device!r}: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationInputError(f"device {str(resolved)!r} requested but CUDA is not available")
    return resolved


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Refuse NaN and infinite values.

    A NaN positive compares as "nothing scores higher" and would report a perfect rank, so
    non-finite inputs are refused instead of silently producing flattering metrics. A plain sum
    is several times cheaper than ``isfinite()`` over a whole block and is non-finite whenever
    any value is; only then is the exact check run, so a sum that merely overflowed does not
    reject valid values.
    """
    if not math.isfinite(float(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
        raise EvaluationInputError(f"{what} contains NaN or infinite values")


def validate_protocol_name(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise EvaluationInputError(
            f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}"
        )


def validate_protocol(protocol: str, num_images: int, ids: GalleryIds | None = None) -> None:
    """Raise :class:`EvaluationInputError` if ``protocol`` cannot run on ``num_images`` images
    (for ``eccv`` and ``cxc``: with the COCO ids ``ids``, or without ids in the standard order)."""
    validate_protocol_name(protocol)
    if protocol == PROTOCOL_1K_5FOLD and num_images < FOLD_PROTOCOL_MIN_IMAGES:
        raise EvaluationInputError(
            f"protocol {PROTOCOL_1K_5FOLD!r} needs at least {FOLD_PROTOCOL_MIN_IMAGES} images "
            f"({NUM_FOLDS} folds of {FOLD_IMAGES}), got N={num_images}"
        )
    if protocol in ANNOTATED_PROTOCOLS:
        resolve_ids(ids, num_images, protocol)
