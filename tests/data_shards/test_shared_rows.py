"""data_shards/shared_rows.py: `RowPool` (rows reused only after the main process gathered the
batches that used them) and `BatchBuffers` (batch memory reused only when nothing else holds it)."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from data_shards.shared_rows import BatchBuffers, RowPool


def test_batch_buffers_are_reused_only_when_nobody_holds_them() -> None:
    buffers = BatchBuffers(keep=2)
    first = buffers.take((2, 3), torch.float32)
    first.fill_(1.0)
    second = buffers.take((2, 3), torch.float32)  # `first` is held: new memory
    assert second.data_ptr() != first.data_ptr()
    weight = torch.ones(3, requires_grad=True)
    loss = (first * weight).sum()  # autograd keeps `first` for the backward pass
    held_by_autograd = first.data_ptr()
    del first, second
    third = buffers.take((2, 3), torch.float32)
    assert third.data_ptr() != held_by_autograd  # the saved tensor is not handed out again
    del third
    loss.backward()
    del loss
    assert buffers.take((2, 3), torch.float32).data_ptr() in {b.ctypes.data for b in buffers.buffers}
    assert buffers.take((5,), torch.float16).shape == (5,)  # another shape: its own buffer


def test_row_pool_reuses_a_row_only_after_its_batch_was_gathered() -> None:
    pool = RowPool(rows=2, feature_shape=(2, 3), dtype=np.dtype(np.float16), gathered=-1)
    image = np.arange(6, dtype=np.float16).reshape(2, 3)
    a, b = pool.put(image), pool.put(image + 1)
    assert {a, b} == {0, 1} and np.array_equal(pool.features()[b], image + 1)
    pool.release(a, made=0)
    pool.release(b, made=1)
    gathered = []

    def main_process() -> None:  # gathers batch 0 a little later, from another thread
        time.sleep(0.2)
        gathered.append(time.perf_counter())
        pool.mark_gathered(0)

    thread = threading.Thread(target=main_process)
    thread.start()
    assert pool.put(image + 2) == a  # waits for batch 0, then reuses its row, not batch 1's
    assert gathered and time.perf_counter() >= gathered[0]
    thread.join()
    assert np.array_equal(pool.features()[a], image + 2) and np.array_equal(pool.features()[b], image + 1)
    pool.mark_gathered(1)
    assert pool.put(image) == b
    pool.close()

