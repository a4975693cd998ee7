"""Where the training reader's image features live between a loader worker and the main process.

Every caption of an image makes a training pair, so an image's features end up in about five
batches. Built in the worker, each batch would be a fresh shared-memory block written through page
faults, five times per image (the reader's largest cost, docs/benchmarks.md). Instead each image
crosses between the processes once:

* `RowPool`: one per reading slot, created by the main process for an epoch in
  `multiprocessing.shared_memory` (the loader workers inherit or attach it by name). The worker
  copies each decoded image into a free row and sends row numbers with each batch.
* `gather_regions`: the main process gathers a batch's regions from the pool rows (numpy's take,
  one thread) into memory from `BatchBuffers`.
* A row is reused only after the main process has gathered every batch that used it. The main
  process releases a `multiprocessing` semaphore once per batch it gathers (in the slot's order,
  as the DataLoader delivers them); the worker counts the releases to know how far the main
  process has got, blocking on the semaphore when no row is free. The worker never waits on a
  batch it has not sent, so the wait ends; it re-checks once a second that its parent lives.
* `BatchBuffers`: the main process's batch memory, reused once the caller holds no tensor of it.
  Buffers are numpy arrays handed out as `torch.from_numpy` tensors; every tensor (and view, and
  tensor saved by autograd) sharing that memory keeps one reference to the array through its
  storage, so an array whose reference count is back to the pool's own is free. A batch kept by
  the caller keeps its buffer; nothing is overwritten under it.

Public APIs only (multiprocessing.shared_memory, multiprocessing semaphores, torch.from_numpy,
sys.getrefcount): no torch storage internals.
"""

from __future__ import annotations

import collections
import math
import multiprocessing
import os
import sys
import weakref
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import torch

_TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


class RowPool:
    """A slot's image features in shared memory (`shared=True`, for a loader worker) or in
    plain memory (reading in the calling process): `rows` rows of `feature_shape` in `dtype`.

    The main process creates it and frees the shared block with `close()` (or when the pool is
    garbage-collected there; never from a loader worker's copy); loader workers get it with the dataset (inherited when forked, attached by name when
    spawned) and call `put`/`release`; the main process calls `features` and `mark_gathered`.
    `gathered` is the last slot batch counted as gathered before the first one this epoch sends
    (a resumed epoch starts past its first batches).
    """

    def __init__(self, rows: int, feature_shape: tuple[int, int], dtype: np.dtype, gathered: int,
                 shared: bool = True) -> None:
        self.row_count = rows
        self.feature_shape = tuple(feature_shape)
        self.dtype = np.dtype(dtype)
        self.shared = shared
        nbytes = max(1, rows * math.prod(feature_shape) * self.dtype.itemsize)
        # The kernel zero-fills a page on first touch only: untouched rows cost no memory.
        self._memory = shared_memory.SharedMemory(create=True, size=nbytes) if shared else None
        self._finalizer = (weakref.finalize(self, _free_block, self._memory, os.getpid())
                           if self._memory is not None else None)
        self._local = None if shared else np.empty(nbytes, dtype=np.uint8)
        self._gathered_signal = multiprocessing.Semaphore(0) if shared else None
        self._known_gathered = gathered
        self._rows: np.ndarray | None = None
        self._free: list[int] = []
        self._pending: collections.deque[tuple[int, int]] = collections.deque()  # (made, row), made ascending

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_rows"] = None  # views are rebuilt over the attached memory
        state["_finalizer"] = None  # only the creating process frees the block
        return state

    def features(self) -> np.ndarray:
        """The rows, (rows, *feature_shape), over the pool's memory in this process."""
        if self._rows is None:
            memory = self._memory.buf if self._memory is not None else self._local
            flat = np.frombuffer(memory, dtype=np.uint8)
            self._rows = flat[: self.row_count * math.prod(self.feature_shape) * self.dtype.itemsize].view(
                self.dtype).reshape(self.row_count, *self.feature_shape)
            # Rows the main process is done with are taken before untouched ones (the free list is
            # a stack), so only as many rows are ever touched as are in use at once.
            self._free = list(range(self.row_count - 1, -1, -1))
        return self._rows

    # ---- loader worker side ----------------------------------------------------------------

    def put(self, regions: np.ndarray) -> int:
        """Copy one image's features into a free row; its number."""
        rows = self.features()
        row = self._acquire()
        rows[row] = regions
        return row

    def release(self, row: int, made: int) -> None:
        """`row` is free once the main process has gathered slot batch `made`."""
        self._pending.append((made, row))

    def _acquire(self) -> int:
        while True:
            self._take_released()
            if self._free:
                return self._free.pop()
            if self._gathered_signal is None:  # in-process: the caller gathers before asking for more
                raise RuntimeError("the reader's row pool is exhausted in-process (a batch was not gathered)")
            if self._gathered_signal.acquire(timeout=1.0):
                self._known_gathered += 1
            elif os.getppid() == 1:  # the main process is gone (torch's workers watch for this too)
                raise RuntimeError("the reader's main process exited while a loader worker waited for it")

    def _take_released(self) -> None:
        if self._gathered_signal is not None:
            while self._pending and self._pending[0][0] > self._known_gathered \
                    and self._gathered_signal.acquire(block=False):
                self._known_gathered += 1
        while self._pending and self._pending[0][0] <= self._known_gathered:
            self._free.append(self._pending.popleft()[1])

    # ---- main process side -----------------------------------------------------------------

    def mark_gathered(self, made: int) -> None:
        """The main process has gathered slot batch `made` (batches are gathered in order)."""
        if self._gathered_signal is not None:
            self._gathered_signal.release()
        else:
            self._known_gathered = made

    def close(self) -> None:
        """Drop this process's views; in the creating process, free the shared block."""
        self._rows = None
        if self._finalizer is not None:
            self._finalizer()


def _free_block(memory: shared_memory.SharedMemory, creator: int) -> None:
    if os.getpid() != creator:  # a forked loader worker's copy: the main process owns the block
        return
    try:
        memory.close()
    except BufferError:  # a numpy view of the rows is still alive here: the mapping goes with it
        pass
    memory.unlink()


class BatchBuffers:
    """The main process's memory for batch regions, reused once nothing else holds it.

    A fresh 19 MB batch (128 x 36 x 2048 float16) costs thousands of page faults, more than
    filling it, whenever the allocator hands back new pages (it does above glibc's mmap
    threshold). A buffer is a numpy array handed out as a tensor over its memory; it is handed out
    again only when no tensor holds it any more (see the module docstring).
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.buffers: list[np.ndarray] = []

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numpy_dtype = np.dtype(str(dtype).removeprefix("torch."))
        for i in range(len(self.buffers)):
            if self.buffers[i].shape == shape and self.buffers[i].dtype == numpy_dtype and self._unused(i):
                return torch.from_numpy(self.buffers[i])
        self.buffers.append(np.empty(shape, dtype=numpy_dtype))
        if len(self.buffers) > self.keep:
            # Forget the oldest buffer still in use (its holder frees it), else the oldest.
            held = [i for i in range(len(self.buffers) - 1) if not self._unused(i)]
            self.buffers.pop(held[0] if held else 0)
        return torch.from_numpy(self.buffers[-1])

    def _unused(self, i: int) -> bool:
        # No local name binds the array here: its references are the list's and getrefcount's
        # argument, plus one per tensor storage over it.
        return sys.getrefcount(self.buffers[i]) == 2


def gather_regions(features: np.ndarray, index: np.ndarray, reordered: bool, out: torch.Tensor,
                   scratch: BatchBuffers) -> None:
    """Fill `out` (B, R, D) with a batch's regions from a slot's pool: `index` holds B pool rows,
    or, when the regions are `reordered`, B x R rows of the (rows x R, D) region table.

    numpy's take, single-threaded: the main process also runs the training step, and torch's
    intra-op threads would spin on the cores the loader workers use. (mode="clip" because with
    "raise" numpy buffers `out`; the indices come from the pool and are in range.)
    """
    dim = features.shape[-1]
    source = features.reshape(-1, dim) if reordered else features
    if out.dtype == _TORCH_DTYPES[features.dtype]:
        target = out.numpy()
        np.take(source, index, axis=0, out=target.reshape(-1, dim) if reordered else target, mode="clip")
        return
    staged = scratch.take(tuple(out.shape), _TORCH_DTYPES[features.dtype])
    gather_regions(features, index, reordered, staged, scratch)
    out.copy_(staged)  # torch converts float16 <-> float32 several times faster than numpy
