"""What one training step of the worker asks of the device: ATen dispatches, top-level operator
calls, compute ops and host-sync points per step, split by model part, and the number of distinct
step shapes over an epoch (issue 21). Counted on CPU with torch.profiler, exactly: these counts,
not wall time, are the measure of how launch- and sync-bound the step is on a GPU.

The step is the worker's (trainer/training/step.py): the real DeepSpeed engine of
`trainer.training.engine.build_engine` on a one-rank gloo process group, the worker's loop object
(`_Loop`) doing the data hand-off, forward, both losses, backward and optimizer step, and the
logging of the step (`record`), with a step log in a temporary directory. Default configuration:
the paper's structure (configs/coco.yaml's model: 4 RRR layers, GSR, caption branch; batch 128,
36 regions, captions of 10-22 tokens), bf16, ZeRO 0. The counts do not depend on the widths
(img_dim, D, vocabulary...): `--widths tiny` runs the same structure with tiny widths, faster,
with the same counts (checked; see docs/benchmarks.md).

Definitions (what the numbers mean):

* dispatch: an ATen operator call recorded by torch.profiler (an event named `aten::*`).
* top level: a dispatch with no `aten::` ancestor in the profiler's event tree (on its thread;
  CPU backward runs on the calling thread). These are the operator calls the step issues,
  forward, backward (autograd's calls) and optimizer alike; on CUDA each becomes at most a
  launch or a view. CPU's composite kernels (GRU, the packed GRU) call many ATen ops inside one
  top-level op, so the all-dispatch count overstates what CUDA launches.
* compute op: a top-level dispatch that is, or calls, something other than a view or metadata
  op (VIEW_OPS below: views, reshapes without copy, detach, empty allocations, no-op casts):
  roughly the kernels the step launches.
* host dispatch: a dispatch on host data (below); counted apart, not in the three above.
* sync point: a place where the host must wait for the device:
  - `aten::_local_scalar_dense` (what `.item()`, `bool(t)`, `int(t)`, `float(t)` dispatch);
  - operators whose output shape depends on the data: `aten::nonzero` (boolean-mask indexing
    calls it), `aten::masked_select`, `aten::unique*`, `aten::repeat_interleave`,
    `aten::_pack_padded_sequence`, and `aten::equal` (returns a host bool);
  - device-to-host copies: `Tensor.cpu()`, `.to("cpu")`, `.tolist()`, `.numpy()` of a device tensor;
  - blocking host-to-device copies: `Tensor.to(device)` of host data without `non_blocking=True`,
    `torch.tensor(data, device=...)`, `torch.as_tensor(data, device=...)`, `Tensor.new_tensor(data)`
    (torch waits for such copies to finish).
  A sync operator nested in another is counted once; a scalar read inside torch's fused Adam is
  not counted (its CPU kernel reads the step counts on the host, its CUDA kernel on the device).
  On a CPU run host and device are the same memory, so a TorchFunctionMode tracks what the code
  means (DeepSpeed's `.to(get_accelerator().current_device_name())` is a move to its device, named
  "cpu" on a CPU run): host tensors are those made from host data without a device argument (or with the device
  given as the string "cpu"), copies made by `.cpu()` / `.to("cpu")`, and the results of operators
  whose tensor inputs are all host tensors; such operators run inside a `host:` profiler range and
  are neither syncs nor device dispatches. Everything else is a device tensor.
* parts: profiler ranges the script opens around the model's image encoder, text encoder, caption
  branch (L_G), the matching loss (L_M and the total), `engine.backward`, `engine.step`
  (optimizer), the rest of the step (`hand-off & other`: moving the batch, the loss bookkeeping)
  and the logging (`record`); set from the outside (hooks and wrappers), the code is unchanged.

A non-logging step and a logging step (the one closing a logging interval, which brings the
interval's numbers to the host) are profiled after warm-up steps; each is one step of the same
batch composition (seeded).

Distinct step shapes per epoch: the number of distinct shapes of the device inputs the model sees
over one epoch (the shapes a compiled graph or a CUDA graph is specialised to), for an epoch of
`--epoch-pairs` captions (default COCO's 566,435) in batches of the global batch, with caption
lengths drawn from `--epoch-lengths` (default: `--lengths`), a length model: "uniform:10:22", or
"tail:10:22:0.01:60": that with 1 % of captions drawn uniformly from 23 to 60 tokens instead, a
stand-in for COCO's long tail of long captions (always reported too, as
`distinct_step_shapes_per_epoch_long_tail`).

    python bench/step_profile.py [--json OUT.json] [--batch-size 128] [--precision bf16|fp32]
        [--zero-stage 0|1|2] [--widths paper|tiny] [--lengths uniform:10:22] [--epoch-lengths SPEC]

Pinned output (--json): an object with at least `dispatches_per_step`, `top_level_dispatches_per_step`,
`syncs_per_step` (a non-logging step), `syncs_per_logging_step`, `distinct_step_shapes_per_epoch`
(numbers) and `syncs_by_part` (part name -> count, non-logging step).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PART_PREFIX = "part:"
HOST_RANGE = "host:"
OTHER_PART = "hand-off & other"
LOGGING_PART = "logging"
PARTS = ("image_encoder", "text_encoder", "caption_branch", "matching_loss", "backward", "optimizer",
         OTHER_PART, LOGGING_PART)
COCO_TRAIN_PAIRS = 566_435
LONG_TAIL = "tail:10:22:0.01:60"  # also reported: 1 % of captions of 23-60 tokens

# Ops without a kernel of their own: views, metadata, allocations, no-op casts. A top-level op is
# a compute op unless it and everything it calls are in this set.
VIEW_OPS = frozenset(f"aten::{name}" for name in (
    "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "expand_as",
    "squeeze", "unsqueeze", "slice", "select", "narrow", "split", "split_with_sizes", "chunk", "unbind",
    "as_strided", "alias", "detach", "detach_", "view_as", "lift_fresh", "contiguous", "to", "type_as",
    "empty", "empty_like", "empty_strided", "resize_", "result_type", "size", "stride", "flatten",
    "unflatten", "movedim", "diagonal", "numpy_T", "_has_compatible_shallow_copy_type", "set_",
    "requires_grad_", "is_same_size", "_nested_tensor_from_mask_left_aligned", "broadcast_tensors",
    "is_nonzero", "item", "_local_scalar_dense", "retain_grad", "_version", "output_nr", "is_leaf",
    "values", "indices", "_values", "_indices", "real", "conj", "resolve_conj", "resolve_neg"))
# Kernels whose CPU implementation reads a scalar on the host that their CUDA implementation reads
# on the device: torch's fused Adam reads each step count with `.item()` on CPU; the CUDA kernel
# takes the step counts as device tensors. Their `_local_scalar_dense` is not a sync on a GPU.
CPU_ONLY_SCALAR_READS = frozenset({"aten::_fused_adam_", "aten::_fused_adamw_", "aten::_fused_adam",
                                   "aten::_fused_adamw"})
# Operators that make the host wait for the device (see the module docstring).
SYNC_OPS = frozenset(f"aten::{name}" for name in (
    "_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
    "unique_dim", "unique_dim_consecutive", "repeat_interleave", "_pack_padded_sequence", "equal"))


# ----------------------------------------------------------------------------------------------
# Parts and host tracking


class _PartStack:
    """The part the step is in (innermost), for the function mode's attribution."""

    def __init__(self) -> None:
        self.stack: list[str] = []

    @contextlib.contextmanager
    def enter(self, name: str) -> Iterator[None]:
        self.stack.append(name)
        try:
            with record_function(PART_PREFIX + name):
                yield
        finally:
            self.stack.pop()

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else OTHER_PART


PARTS_STACK = _PartStack()


def _is_cpu_string(device: Any) -> bool:
    return isinstance(device, str) and device.split(":")[0] == "cpu"


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _from_deepspeed(frame: Any) -> bool:
    """Whether the call comes from DeepSpeed's code, which names its accelerator's device with
    `get_accelerator().current_device_name()`: "cpu" on a CPU run, "cuda:N" on a GPU."""
    return frame is not None and str(frame.f_globals.get("__name__", "")).startswith("deepspeed")


_D2H = {"cpu", "tolist", "numpy"}
_SCALAR_READS = {"item", "__bool__", "__int__", "__float__", "__index__"}
_FROM_DATA = {"tensor", "as_tensor", "asarray"}


class SyncCounter(TorchFunctionMode):
    """Tracks host tensors and counts the host transfers that the profiler cannot see on a CPU run
    (see the module docstring); calls on host data only run inside a `host:` profiler range."""

    def __init__(self) -> None:
        super().__init__()
        self.host: dict[int, weakref.ref[torch.Tensor]] = {}  # id -> the host tensor (tensors do not hash by value)
        self.syncs: Counter[str] = Counter()
        self.where: Counter[str] = Counter()

    def _count(self, what: str) -> None:
        self.syncs[PARTS_STACK.current] += 1
        self.where[f"{PARTS_STACK.current}: {what}"] += 1

    def _is_host(self, t: torch.Tensor) -> bool:
        ref = self.host.get(id(t))
        return ref is not None and ref() is t

    def _tag(self, value: Any) -> None:
        for t in _tensors(value):
            self.host[id(t)] = weakref.ref(t)

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = [t for t in _tensors(args)] + [t for t in _tensors(kwargs)]
        all_host = bool(inputs) and all(self._is_host(t) for t in inputs)
        if name in _FROM_DATA and not isinstance(args[0] if args else None, torch.Tensor):
            device = kwargs.get("device")
            result = func(*args, **kwargs)
            if device is None or (_is_cpu_string(device) and not _from_deepspeed(sys._getframe(1))):
                self._tag(result)
            else:
                self._count(f"torch.{name}(data, device=...)")
            return result
        if name == "new_tensor":
            self._count("Tensor.new_tensor")
            return func(*args, **kwargs)
        if name in ("to", "cpu", "cuda") and args and isinstance(args[0], torch.Tensor):
            source = args[0]
            device = kwargs.get("device")
            for a in args[1:]:
                if isinstance(a, (str, torch.device)):
                    device = a
            result = func(*args, **kwargs)
            if name == "to" and _is_cpu_string(device) and _from_deepspeed(sys._getframe(1)):
                return result  # DeepSpeed's accelerator device, named "cpu" on a CPU run: not the host
            if name == "cpu" or _is_cpu_string(device):
                if not self._is_host(source):
                    self._count("device-to-host copy (.cpu() / .to('cpu'))")
                    if result is source:  # CPU: a no-op; the host copy must be another tensor
                        with record_function(HOST_RANGE + "transfer"):
                            result = source.clone()
                self._tag(result)
                return result
            if device is not None and self._is_host(source):
                if not kwargs.get("non_blocking", False):
                    self._count("blocking host-to-device copy (.to(device))")
                if result is source:  # CPU: .to(device) is a no-op; the device copy must be another tensor
                    with record_function(HOST_RANGE + "transfer"):
                        result = source.clone()
            elif self._is_host(source) and device is None:
                self._tag(result)  # a dtype cast of host data stays on the host
            return result
        if name in _D2H and name != "cpu":
            if not self._is_host(args[0]):
                self._count(f"device-to-host copy (.{name}())")
            return func(*args, **kwargs)
        if all_host:
            with record_function(HOST_RANGE + name):
                result = func(*args, **kwargs)
            if name not in _SCALAR_READS:
                self._tag(result)
            return result
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# Counting a profile


@dataclass
class StepCounts:
    dispatches: int = 0
    top_level: int = 0
    compute: int = 0
    host_dispatches: int = 0
    syncs: int = 0
    by_part: dict[str, dict[str, int]] = field(default_factory=dict)
    sync_sites: dict[str, int] = field(default_factory=dict)
    top_ops: dict[str, dict[str, int]] = field(default_factory=dict)  # part -> most frequent top-level ops

    def as_dict(self) -> dict[str, Any]:
        return {"dispatches": self.dispatches, "top_level": self.top_level, "compute": self.compute,
                "host_dispatches": self.host_dispatches, "syncs": self.syncs, "by_part": self.by_part,
                "sync_sites": self.sync_sites, "top_ops": self.top_ops}


def _ancestors(event: Any) -> Iterator[Any]:
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _subtree(event: Any) -> Iterator[Any]:
    for child in event.cpu_children:
        yield child
        yield from _subtree(child)


def count_events(events: Any, function_syncs: Counter[str], function_sites: Counter[str]) -> StepCounts:
    """The counts of one profiled step (see the module docstring for the definitions)."""
    counts = StepCounts()
    parts: dict[str, Counter[str]] = {p: Counter() for p in PARTS}

    def part_of(event: Any) -> str:
        for a in _ancestors(event):
            if a.name.startswith(PART_PREFIX):
                return a.name[len(PART_PREFIX):]
        return OTHER_PART

    sites: Counter[str] = Counter()
    top_ops: dict[str, Counter[str]] = {}
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        ancestors = list(_ancestors(event))
        part = part_of(event)
        parts.setdefault(part, Counter())
        if any(a.name.startswith(HOST_RANGE) for a in ancestors):
            counts.host_dispatches += 1
            parts[part]["host_dispatches"] += 1
            continue
        counts.dispatches += 1
        parts[part]["dispatches"] += 1
        aten_ancestors = [a for a in ancestors if a.name.startswith("aten::")]
        if not aten_ancestors:
            counts.top_level += 1
            parts[part]["top_level"] += 1
            top_ops.setdefault(part, Counter())[event.name] += 1
            if event.name not in VIEW_OPS or any(
                    c.name.startswith("aten::") and c.name not in VIEW_OPS for c in _subtree(event)):
                counts.compute += 1
                parts[part]["compute"] += 1
        if event.name in SYNC_OPS and not any(a.name in SYNC_OPS or a.name in CPU_ONLY_SCALAR_READS
                                              for a in aten_ancestors):
            counts.syncs += 1
            parts[part]["syncs"] += 1
            sites[f"{part}: {event.name}"] += 1
    for part, n in function_syncs.items():
        parts.setdefault(part, Counter())["syncs"] += n
        counts.syncs += n
    sites.update(function_sites)
    counts.by_part = {p: {k: int(c[k]) for k in ("dispatches", "top_level", "compute", "syncs", "host_dispatches")}
                      for p, c in parts.items()}
    counts.sync_sites = dict(sorted(sites.items()))
    counts.top_ops = {p: dict(c.most_common(12)) for p, c in top_ops.items()}
    return counts


def profile_call(fn: Callable[[], Any], track_host: bool = True,
                 host_inputs: Any = ()) -> tuple[Any, StepCounts]:
    """Run `fn` once under the profiler (and the host tracker) and count its events.
    `host_inputs`: tensors (or containers of them) that live on the host, as the data reader's
    batches do."""
    counter = SyncCounter()
    counter._tag(host_inputs)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with counter if track_host else contextlib.nullcontext():
            result = fn()
    return result, count_events(prof.events(), counter.syncs, counter.where)


# ----------------------------------------------------------------------------------------------
# Inputs


def parse_lengths(spec: str) -> Callable[[np.random.Generator, int], np.ndarray]:
    """A caption-length model: "uniform:LO:HI" or "tail:LO:HI:FRACTION:MAX" (tokens with <start>/<end>)."""
    kind, *values = spec.split(":")
    if kind == "uniform" and len(values) == 2:
        lo, hi = map(int, values)
        return lambda rng, n: rng.integers(lo, hi + 1, n)
    if kind == "tail" and len(values) == 4:
        lo, hi, top = int(values[0]), int(values[1]), int(values[3])
        fraction = float(values[2])

        def draw(rng: np.random.Generator, n: int) -> np.ndarray:
            lengths = rng.integers(lo, hi + 1, n)
            long = rng.random(n) < fraction
            lengths[long] = rng.integers(hi + 1, top + 1, int(long.sum()))
            return lengths

        return draw
    raise ValueError(f"--lengths: 'uniform:LO:HI' or 'tail:LO:HI:FRACTION:MAX', got {spec!r}")


def make_batch(rng: np.random.Generator, batch: int, regions: int, img_dim: int, vocab: int,
               lengths: np.ndarray, index: int) -> Any:
    """A TrainBatch as the reader gives it: float32 regions, 0-padded tokens (<start> .. <end>),
    int64 lengths and distinct image ids, CPU tensors."""
    from data_shards.batches import TrainBatch

    width = int(lengths.max())
    tokens = rng.integers(4, vocab, (batch, width))
    tokens[:, 0] = 1
    tokens[np.arange(batch), lengths - 1] = 2
    tokens[np.arange(width)[None, :] >= lengths[:, None]] = 0
    return TrainBatch(regions=torch.from_numpy(rng.standard_normal((batch, regions, img_dim), dtype=np.float32)),
                      boxes=None, tokens=torch.from_numpy(tokens.astype(np.int64)),
                      lengths=torch.from_numpy(lengths.astype(np.int64)),
                      image_ids=torch.arange(batch, dtype=torch.long) + index * batch,
                      caption_index=torch.zeros(batch, dtype=torch.long), keys=[""] * batch, captions=[""] * batch,
                      epoch=0, index=index, slot=0)


def _batch_tensors(batch: Any) -> list[torch.Tensor]:
    return [t for t in vars(batch).values() if isinstance(t, torch.Tensor)]


# ----------------------------------------------------------------------------------------------
# The worker's step, instrumented


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_process_group(device: str) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=0, world_size=1)


def train_config(args: argparse.Namespace) -> Any:
    from trainer.config import load_config

    overrides = [
        "distributed.workers=1", f"distributed.use_gpu={str(args.device.startswith('cuda')).lower()}",
        f"distributed.precision={args.precision}", f"distributed.zero_stage={args.zero_stage}",
        f"optim.global_batch_size={args.batch_size}", "optim.warmup_epochs=0", "logging.interval_steps=2",
        "monitoring.enabled=false", "checkpoint.every_steps=0", f"model.compile={str(args.compile).lower()}"]
    if not args.compile:
        overrides.pop()
    if args.widths == "tiny":
        overrides += ["model.img_dim=64", "model.embed_size=128", "model.word_dim=32", "model.vocab_size=500",
                      "model.caption_hidden=64", "model.caption_word_dim=32"]
    return load_config(ROOT / "configs" / "coco.yaml", overrides)


def instrument(engine: Any, worker: Any, model_parts: bool = True) -> None:
    """Open the part ranges around the model's parts (unless `model_parts` is False: a compiled
    model is one graph), the loss, backward and optimizer step. `worker`: the module whose globals
    the step looks its loss up in (trainer_modules)."""
    model = engine.module

    def hook(name: str) -> None:
        module = getattr(model, name)
        module.register_forward_pre_hook(lambda *_: _enter(name))
        module.register_forward_hook(lambda *_: _exit(name))

    if model_parts:
        for name in ("image_encoder", "text_encoder"):
            hook(name)
        if model.caption_generator is not None:
            model.caption_generator.loss = _wrap(model.caption_generator.loss, "caption_branch")
    engine.backward = _wrap(engine.backward, "backward")
    engine.step = _wrap(engine.step, "optimizer")
    for name in ("training_loss_with_stats", "training_loss"):
        if hasattr(worker, name) and not getattr(getattr(worker, name), "_part", None):
            setattr(worker, name, _wrap(getattr(worker, name), "matching_loss"))


_OPEN: dict[str, contextlib.ExitStack] = {}


def _enter(name: str) -> None:
    stack = contextlib.ExitStack()
    stack.enter_context(PARTS_STACK.enter(name))
    _OPEN[name] = stack


def _exit(name: str) -> None:
    _OPEN.pop(name).close()


def _wrap(fn: Callable[..., Any], part: str) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with PARTS_STACK.enter(part):
            return fn(*args, **kwargs)

    wrapped._part = part  # type: ignore[attr-defined]
    return wrapped


def trainer_modules() -> tuple[Any, Any]:
    """(the module with build_engine, the module whose globals the step looks its loss up in):
    trainer/training/ (engine.py, step.py) since 2026-12-04, or the flat trainer/worker.py of
    earlier trees, on which the "before" figures of docs/benchmarks.md were counted."""
    try:
        import trainer.training.engine as engine_module
        import trainer.training.step as step_module
    except ImportError:
        import trainer.worker as worker  # type: ignore[import-not-found]

        return worker, worker
    return engine_module, step_module


class WorkerStep:
    """The worker's loop on a one-rank engine, stepping as trainer/training/loop.py does."""

    def __init__(self, cfg: Any, engine: Any, run_dir: str) -> None:
        self.cfg = cfg
        self.step = 0
        try:
            from trainer.run.step_log import StepLog
            from trainer.training.loop import TrainingLoop
            from trainer.training.recorder import PendingStep, Recorder
        except ImportError:  # an earlier tree: the flat trainer/worker.py's _Loop
            import trainer.worker as worker  # type: ignore[import-not-found]

            self.loop = worker._Loop(cfg, engine, None, None, worker.StepLog(run_dir, None), 0, 1,  # type: ignore[arg-type]
                                     run_dir, None, "step-profile", None)
            self.recorder, self.pending_step = self.loop, getattr(worker, "PendingStep", None)
            return
        device = next(engine.module.parameters()).device
        self.recorder = Recorder(cfg, None, StepLog(run_dir, None), 0, 1, device)  # type: ignore[arg-type]
        self.loop = TrainingLoop(cfg, engine, None, None, self.recorder, 0, 1, run_dir, None,  # type: ignore[arg-type]
                                 "step-profile")
        self.pending_step = PendingStep

    def __call__(self, batch: Any, batches_in_epoch: int) -> None:
        """One step at position `self.step` of an epoch of `batches_in_epoch` batches (so that
        the step closes a logging interval when `step % logging.interval_steps == 0`)."""
        loop, position = self.loop, self.step % batches_in_epoch
        started = time.perf_counter()
        if not hasattr(self.recorder, "flush"):  # before issue 21: every step brings its losses to the host
            matching, caption, stats = loop.train_step(batch, True)
            self.step += 1
            with PARTS_STACK.enter(LOGGING_PART):
                loop.record(0, position, batches_in_epoch, self.step, 2e-4, True, matching, caption,
                            time.perf_counter() - started, 0.0, stats)
            return
        # As the loop: the losses stay on the device until a step closes a logging interval.
        losses, stats = loop.train_step(batch, True)
        self.step += 1
        with PARTS_STACK.enter(LOGGING_PART):
            pending = self.pending_step(0, position, batches_in_epoch, self.step, 2e-4, True,
                                        time.perf_counter() - started, 0.0, losses)
            if hasattr(self.recorder, "add"):
                self.recorder.add(pending, stats)
            else:  # the flat worker of issue 21, before trainer/training/
                self.recorder.pending.append(pending)
                self.recorder.hard_negatives.add(stats)
            closes = self.step % self.cfg.logging.interval_steps == 0 or position + 1 == batches_in_epoch
            if closes:
                self.recorder.flush(closes)


# ----------------------------------------------------------------------------------------------
# Shapes over an epoch


def step_shape(tokens_width: int, cfg: Any) -> tuple[int, ...]:
    """The device input shape a batch of this padded token width gives the model (the captions'
    width; regions, batch and vocabulary are fixed within a run)."""
    try:
        from model.vsrn import caption_bucket  # type: ignore[attr-defined]
    except ImportError:  # before issue 21: the batch's longest caption, unrolled as it is
        return (tokens_width,)
    return (caption_bucket(tokens_width, cfg.model.max_caption_len),)


def distinct_shapes(lengths: np.ndarray, batch: int, cfg: Any, rng: np.random.Generator) -> dict[str, Any]:
    order = rng.permutation(len(lengths))
    batches = len(lengths) // batch
    maxima = lengths[order[: batches * batch]].reshape(batches, batch).max(axis=1)
    shapes = Counter(step_shape(int(m), cfg) for m in maxima)
    return {"distinct": len(shapes), "batches": batches,
            "shapes": {"x".join(map(str, k)): v for k, v in sorted(shapes.items())}}


# ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from model.vsrn import VSRN, VSRNConfig

    torch.manual_seed(0)
    init_process_group(args.device)
    cfg = train_config(args)
    model = VSRN(VSRNConfig.from_dict(cfg.model.to_dict()))
    model.to(args.device)
    engine_module, step_module = trainer_modules()
    engine = engine_module.build_engine(cfg, model, universal=False)
    instrument(engine, step_module, model_parts=not args.compile)
    length_model = parse_lengths(args.lengths)
    epoch_model = parse_lengths(args.epoch_lengths or args.lengths)
    rng = np.random.default_rng(0)
    mc = cfg.model
    batches = [make_batch(rng, args.batch_size, args.regions, mc.img_dim, mc.vocab_size,
                          length_model(rng, args.batch_size), i) for i in range(args.warmup + 2)]
    with tempfile.TemporaryDirectory(prefix="step-profile-") as run_dir:
        step = WorkerStep(cfg, engine, run_dir)
        epoch = 1000  # no step of this run ends an epoch
        timings = []
        for batch in batches[: args.warmup]:
            started = time.perf_counter()
            step(batch, epoch)
            timings.append(time.perf_counter() - started)
        interval = cfg.logging.interval_steps
        while (step.step + 1) % interval == 0:  # the next step must not close an interval
            step(batches[0], epoch)
        track = not args.compile  # a function mode and a compiled graph do not mix: profiler counts only
        _, plain = profile_call(lambda: step(batches[args.warmup], epoch), track_host=track,
                                host_inputs=_batch_tensors(batches[args.warmup]))
        while (step.step + 1) % interval != 0:
            step(batches[0], epoch)
        _, logging_step = profile_call(lambda: step(batches[args.warmup + 1], epoch), track_host=track,
                                       host_inputs=_batch_tensors(batches[args.warmup + 1]))
    lengths = epoch_model(np.random.default_rng(1), args.epoch_pairs)
    source = f"length model {args.epoch_lengths or args.lengths}, {args.epoch_pairs} captions"
    shapes = distinct_shapes(lengths, args.batch_size, cfg, np.random.default_rng(2))
    tail = distinct_shapes(parse_lengths(LONG_TAIL)(np.random.default_rng(1), args.epoch_pairs), args.batch_size,
                           cfg, np.random.default_rng(2))
    return {
        "dispatches_per_step": plain.dispatches,
        "top_level_dispatches_per_step": plain.top_level,
        "compute_ops_per_step": plain.compute,
        "host_dispatches_per_step": plain.host_dispatches,
        "syncs_per_step": plain.syncs,
        "syncs_per_logging_step": logging_step.syncs,
        "distinct_step_shapes_per_epoch": shapes["distinct"],
        "syncs_by_part": {part: c["syncs"] for part, c in plain.by_part.items()},
        "by_part": plain.by_part,
        "sync_sites": plain.sync_sites,
        "top_ops": plain.top_ops,
        "logging_step": logging_step.as_dict(),
        "epoch_shapes": {**shapes, "source": source},
        "distinct_step_shapes_per_epoch_long_tail": tail["distinct"],
        "epoch_shapes_long_tail": {**tail, "source": f"length model {LONG_TAIL}, {args.epoch_pairs} captions"},
        "profiled_batches_longest_caption": [int(batches[args.warmup].lengths.max()),
                                             int(batches[args.warmup + 1].lengths.max())],
        "warmup_step_seconds": timings,
        "config": {"batch_size": args.batch_size, "regions": args.regions, "precision": args.precision,
                   "zero_stage": args.zero_stage, "widths": args.widths, "lengths": args.lengths,
                   "device": args.device, "compile": args.compile, "model": cfg.model.to_dict()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "date": datetime.date.today().isoformat(),
    }


def finish(result: dict[str, Any], json_path: str | None) -> None:
    """Write `result` as JSON (when asked) and end the one-rank process group (this script's and
    bench/compile_speed.py's end)."""
    import torch.distributed as dist

    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2])
    parser.add_argument("--widths", default="paper", choices=["paper", "tiny"])
    parser.add_argument("--lengths", default="uniform:10:22")
    parser.add_argument("--epoch-pairs", type=int, default=COCO_TRAIN_PAIRS)
    parser.add_argument("--epoch-lengths", help="length model of the epoch's shapes (default: --lengths)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help="model.compile=true (torch.compile); the model is then one part, and only the "
                             "profiler's sync operators are counted (no host tracking)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    result = run(args)
    summary = {k: result[k] for k in ("dispatches_per_step", "top_level_dispatches_per_step", "compute_ops_per_step",
                                      "syncs_per_step", "syncs_per_logging_step", "distinct_step_shapes_per_epoch",
                                      "distinct_step_shapes_per_epoch_long_tail", "syncs_by_part")}
    print(json.dumps(summary, indent=1))
    finish(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
