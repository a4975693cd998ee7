"""The training loop that Ray Train runs on every worker: `train_loop_per_worker(config)`.

Process group: Ray's TorchTrainer creates it (gloo on CPU, NCCL on GPU) before this function
runs; DeepSpeed finds it initialized and uses it as it is.

Optimization (the reference's defaults live in trainer/config.py): Adam without weight decay and
gradient clipping, handed to DeepSpeed as a client optimizer (DeepSpeed's own CPU Adam would
JIT-compile a C++ op on first use); ZeRO stage 0-2; bf16, or fp16 with dynamic loss scaling on
GPUs. ZeRO 0 (fp32, bf16): `FlatAdam`, torch's fused Adam over one flat float32 master copy of all
parameters, clipping on the device, in a handful of operators per step; DeepSpeed's engine
averages the gradients and checkpoints, with its own clipping off. ZeRO 1-2 and fp16: torch's
fused Adam inside DeepSpeed's wrappers, which clip (gradient_clipping set explicitly: DeepSpeed
clips at 1.0 when the key is missing). The learning rate is
`learning_rate * lr_decay_factor ** (epoch // lr_decay_every_epochs)`, set at the start of each
epoch from the epoch number alone, so a resumed run gets it right without scheduler state.

Precision (distributed.precision). fp32: everything in float32. bf16 (what the COCO
configuration trains with): the module's parameters are bf16 and its buffers (BatchNorm running
statistics) float32; the optimizer keeps float32 master weights and float32 Adam states (ZeRO 0:
`FlatAdam`, which casts the parameters itself, as DeepSpeed's bf16 mode would, without DeepSpeed's
ZeRO-0 bf16 wrapper and its per-parameter overflow checks; ZeRO 1-2: DeepSpeed's `bf16`, the
float32 partitions, no overflow check), so every update accumulates in float32 and only the
forward/backward see bf16 weights. Gradients are bf16 and all-reduced in bf16 (DeepSpeed's
default communication dtype for bf16): one rounding per step (no accumulation over micro-steps
here) into float32 master weights, for half the gradient traffic between nodes. Inside the
model, products run in bf16 and BatchNorm, the GRU recurrences on CPU, the joint-space embeddings
and both losses in float32 (model/vsrn.py's docstring gives the list and why); region features
arrive in the shards' dtype and are cast by the model. Inference checkpoints are exported with float32 weights (run_checkpoint.export_inference).
fp16 (GPUs only, refused on CPU by the configuration): the same with dynamic loss scaling.

Batch: the global batch is fixed (optim.global_batch_size) and each of the W workers takes
global / W pairs from its share of the sharded reader (data_shards/reader.py splits the shards by
rank and gives every rank the same number of batches).

Loss: L = L_M + λ·L_G (model.caption_loss_weight = λ).
* L_M is the hinge loss with hardest negatives over the GLOBAL batch: the embeddings of all workers
  are gathered with autograd and each rank's loss is the sum over its own anchors (model/loss.py),
  so the ranks' losses sum to the reference's loss of one batch of `global` pairs. DeepSpeed
  averages gradients over ranks (a factor 1/W), so each rank's L_M is multiplied by W: the averaged
  gradient is then exactly the reference's single-process gradient of the global batch, and
  clipping at 2.0 and the learning rate mean what they mean in the reference, for any W.
* L_G (caption NLL summed over tokens / local batch) is already a per-pair mean: the average over
  ranks is the mean over the global batch, as in the reference. No factor.
Similarities, hinges and the hardest-negative max run in float32 whatever the precision (model/loss.py).

Logs: rank 0 writes a progress line per logging interval (epoch, step, samples/s, both loss terms,
learning rate, data wait) and one JSON line per step to RUN_DIR/train_log.jsonl (loss_matching,
loss_caption, loss, lr, samples_per_s, data_wait_s, step_time_s; global-batch values, so the
numbers do not depend on the worker count). The means since the previous checkpoint and the
reader's counters are reported to Ray with each checkpoint. Checkpoints: trainer/run_checkpoint.py.

No host sync in a non-logging step (issue 21; bench/step_profile.py counts them): the batch's
caption shape facts (bucketed width, last positions, L_G's labels) are made on the host from its
lengths (model.vsrn.caption_inputs) and sent with non-blocking copies; the batch size is checked on
the host instead of by the loss's collective; the losses stay on the device. At a step that closes
a logging interval (and before a checkpoint) one collective and one copy bring the steps' losses
and the hard-negative summary to the host, and the step log lines, the metrics, the non-finite
check (which stops the run, naming the step) and the collapse detector run then. On a GPU a
non-logging step's step_time_s is the host's time to issue it; the interval's samples/s is exact.
`model.compile: true` compiles the model (torch.compile, one graph per caption bucket, CUDA graphs
on GPUs).

Hard-negative diagnostics (trainer/diagnostics.py): the loss also returns its per-anchor stats
(gaps between positive and hardest-negative scores, active hinges, hardest negatives from other
workers), kept on the device for a logging interval and gathered over the ranks once, at the
logging step: they go to the progress line, to that step's train_log.jsonl line (gap_i2t_mean,
gap_i2t_p10, gap_t2i_mean, gap_t2i_p10, active_hinge_ratio, remote_hardest_ratio, collapsed) and to
the Ray metrics. The collapse detector (monitoring.collapse_intervals) watches the interval mean of
L_M against 2 * global batch * margin under hardest negatives; when it trips, rank 0 logs a
warning saying what to try and every rank sets vsrn_train_collapsed to 1.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from data_shards.reader import ReaderConfig, TrainBatch, TrainReader
from data_shards.storage import open_location
from model.loss import HardNegativeStats, gathered_hardest_negative_loss
from model.vocab import Vocabulary
from model.vsrn import VSRN, CaptionInputs, VSRNConfig, VSRNOutput, caption_inputs
from monitoring.recorders import RayBackend, TrainingMetrics
from trainer import allocator
from trainer.config import OptimConfig, TrainConfig, config_from_dict
from trainer.diagnostics import CollapseDetector, HardNegativeInterval, HardNegativeSummary
from trainer.failures import FATAL_ERRORS, fatal_training_error
from trainer.run_checkpoint import (
    TrainState,
    needs_universal,
    read_train_state,
    require_shared_storage,
    restore_checkpoint,
    save_checkpoint,
    seed_everything,
)
from trainer.run.layout import TRAIN_LOG
from trainer.run.step_log import COLLAPSED_FIELD

log = logging.getLogger("trainer.worker")



# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------


def learning_rate(optim: OptimConfig, epoch: int) -> float:
    """Step decay: x lr_decay_factor every lr_decay_every_epochs epochs (the reference's lr_update)."""
    return optim.learning_rate * optim.lr_decay_factor ** (epoch // optim.lr_decay_every_epochs)


def hardest_negatives(optim: OptimConfig, epoch: int, step: int) -> bool:
    """Max violation after the warm-up (all negatives during the first warmup_epochs / warmup_steps)."""
    return optim.max_violation and epoch >= optim.warmup_epochs and step >= optim.warmup_steps


# --------------------------------------------------------------------------------------------------
# DeepSpeed
# --------------------------------------------------------------------------------------------------


def flat_optimizer(cfg: TrainConfig) -> bool:
    """Whether the run's optimizer is `FlatAdam` (ZeRO 0 in fp32 or bf16) rather than DeepSpeed's
    wrappers around torch's Adam (ZeRO 1-2, and fp16's dynamic loss scaling)."""
    return cfg.distributed.zero_stage == 0 and cfg.distributed.precision != "fp16"


def deepspeed_config(cfg: TrainConfig, universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed configuration of a run (per-worker batch derived from the global one).

    ZeRO 0 in fp32 or bf16: DeepSpeed's plain data-parallel engine (it averages the gradients,
    in their dtype, and saves checkpoints) around `FlatAdam`, which clips and keeps the float32
    master weights itself; so DeepSpeed's own clipping is off (0.0) and, for bf16, the engine is
    not told (the module's parameters are cast by `build_engine`): DeepSpeed's ZeRO-0 bf16 wrapper
    (FP16_UnfusedOptimizer) checks every parameter for overflow, a host sync each, which bf16 does
    not need. ZeRO 1-2: DeepSpeed's ZeRO optimizer clips (gradient_clipping, explicit: its default
    is 1.0), bf16 without its overflow check.
    """
    flat = flat_optimizer(cfg)
    ds: dict[str, Any] = {
        "train_batch_size": cfg.optim.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.per_worker_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0 if flat else cfg.optim.grad_clip,  # FlatAdam clips; DeepSpeed's default is 1.0
        "zero_optimization": {"stage": cfg.distributed.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch Adam as a client optimizer under ZeRO 1-2
        "steps_per_print": 2**31 - 1,  # progress is logged here
        "wall_clock_breakdown": False,
    }
    if cfg.distributed.precision == "bf16" and not flat:
        ds["bf16"] = {"enabled": True, "check_grad_overflow": False}
    elif cfg.distributed.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    if universal:
        ds["checkpoint"] = {"load_universal": True}
    return ds


def _skip_cpu_shm_comm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op on CPU.

    Its TorchBackend builds `deepspeed_shm_comm` (a minute or two of C++ compilation on a small
    machine, on first use) for inference_all_reduce, which training never calls: gradients go
    through torch.distributed (gloo). `deepspeed.ops.__compatible_ops__` is only consulted for that
    op (deepspeed 0.19), and setting it also skips probing every other op's compiler support.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}


class FlatAdam(torch.optim.Adam):
    """Adam (no weight decay) with gradient clipping over ONE flat float32 master copy of all the
    model's parameters: the trainer's optimizer under ZeRO 0, in fp32 and bf16.

    The model's parameters become views of one flat buffer (float32: the master itself; bf16:
    a bf16 buffer that the master is copied into after each update), so a step is a handful of
    operators whatever the number of parameter tensors: the gradients concatenated (and cast to
    float32), the global norm and the clipping factor (torch.nn.utils.clip_grad_norm_: computed and
    applied on the device, min(1, max_norm / (norm + 1e-6)), no host sync, no overflow check),
    torch's fused Adam on the master, and for bf16 one copy back. DeepSpeed's ZeRO-0 bf16 wrapper
    spends about 1,341 operators and 67 host syncs on the same step (docs/benchmarks.md).

    Checkpoints keep the per-parameter layouts the trainer wrote before (DeepSpeed saves
    `state_dict()`): float32, torch Adam's state dict; bf16, that inside the layout of DeepSpeed's
    FP16_UnfusedOptimizer (`optimizer_state_dict`, `fp32_groups`, loss-scale fields), so runs
    resume across the change in either direction.
    """

    def __init__(self, params: Any, lr: float, clip: float) -> None:
        self.model_params = [p for p in params if p.requires_grad]
        if not self.model_params:
            raise ValueError("FlatAdam needs parameters")
        first = self.model_params[0]
        self.numels = [p.numel() for p in self.model_params]
        self.clip = clip
        with torch.no_grad():
            master = torch.cat([p.detach().reshape(-1).float() for p in self.model_params])
            self.low_precision = first.dtype != torch.float32
            # The model's parameters become views of one flat buffer: the master (float32) or its
            # low-precision copy.
            self.flat_params = master.to(first.dtype) if self.low_precision else master
            for p, view in zip(self.model_params, self.flat_params.split(self.numels)):
                p.data = view.view_as(p)
        super().__init__([master], lr=lr, fused=master.device.type in ("cpu", "cuda"))
        self.master = master

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        grads = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in self.model_params]
        self.master.grad = torch.cat(grads).float()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_([self.master], self.clip, foreach=True)
        result = super().step(closure)
        self.master.grad = None
        if self.low_precision:
            self.flat_params.copy_(self.master)
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params:
            p.grad = None
        self.master.grad = None

    # Checkpoints: per-parameter layouts (see the class docstring).

    def _per_parameter(self) -> dict[str, Any]:
        flat = super().state_dict()
        state = flat["state"].get(0, {})
        per_param: dict[int, dict[str, Any]] = {}
        for i, (offset, numel, p) in enumerate(zip(self._offsets(), self.numels, self.model_params)):
            entry: dict[str, Any] = {}
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() == 1 and value.numel() == self.master.numel():
                    entry[key] = value[offset:offset + numel].view(p.shape).clone()
                else:
                    entry[key] = value.clone() if torch.is_tensor(value) else value
            if entry:
                per_param[i] = entry
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(self.model_params)))}
                  for g in flat["param_groups"]]
        return {"state": per_param, "param_groups": groups}

    def _offsets(self) -> list[int]:
        offsets, total = [], 0
        for n in self.numels:
            offsets.append(total)
            total += n
        return offsets

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        adam = self._per_parameter()
        if not self.low_precision:
            return adam
        return {"dynamic_loss_scale": False, "cur_scale": 1.0, "cur_iter": 0, "optimizer_state_dict": adam,
                "fp32_groups": [[m.view(p.shape).clone() for m, p in
                                 zip(self.master.split(self.numels), self.model_params)]]}

    def load_state_dict(self, state_dict: dict[str, Any], load_optimizer_states: bool = True) -> None:  # type: ignore[override]
        adam = state_dict.get("optimizer_state_dict", state_dict)
        with torch.no_grad():
            if "fp32_groups" in state_dict:
                masters = [t for group in state_dict["fp32_groups"] for t in group]
                self.master.copy_(torch.cat([t.reshape(-1).float().to(self.master.device) for t in masters]))
            else:  # float32: the model's parameters (loaded by DeepSpeed) are the master weights
                self.master.copy_(torch.cat([p.detach().reshape(-1).float() for p in self.model_params]))
            if self.low_precision:
                self.flat_params.copy_(self.master)
        if not load_optimizer_states:
            return
        saved = adam["state"]
        flat_state: dict[str, Any] = {}
        if saved:
            keys = next(iter(saved.values())).keys()
            for key in keys:
                values = [saved[i][key] for i in sorted(saved)]
                if torch.is_tensor(values[0]) and values[0].dim() > 0:
                    flat_state[key] = torch.cat([v.reshape(-1).float() for v in values]).to(self.master.device)
                else:  # the step count, the same for every parameter
                    flat_state[key] = values[0].clone() if torch.is_tensor(values[0]) else values[0]
        groups = [{**g, "params": [0]} for g in adam["param_groups"]]
        super().load_state_dict({"state": {0: flat_state} if flat_state else {}, "param_groups": groups})

    def refresh_fp32_params(self) -> None:
        """DeepSpeed calls this after loading the module only: the masters from the weights."""
        with torch.no_grad():
            self.master.copy_(torch.cat([p.detach().reshape(-1).float() for p in self.model_params]))


def _no_grad_norm_sync_in_zero_optimizer() -> None:
    """DeepSpeed 0.19's ZeRO 1-2 optimizer asks `bool(...)` of the gradient norm at every step
    (`is_invalid_grad_norm`: a host sync) to skip steps with an inf/NaN norm, which only fp16's
    loss scaling needs. Outside fp16 the trainer never skips a step on it: a non-finite loss stops
    the run at the next logging step. So for fp32 and bf16 the ZeRO optimizer's check answers
    False without reading the norm (the clipping itself is computed on the device), and its
    marking of an inf/NaN norm (as -1) uses a Python scalar instead of a tensor made on the device
    and read back. Both are module globals of deepspeed.runtime.zero.stage_1_and_2, set here for
    the process (a training worker runs one engine)."""
    import deepspeed.runtime.zero.stage_1_and_2 as zero

    original = getattr(zero, "_vsrn_original_is_invalid_grad_norm", zero.is_invalid_grad_norm)
    zero._vsrn_original_is_invalid_grad_norm = original

    def is_invalid_grad_norm(norm: Any) -> bool:
        if torch.is_tensor(norm):
            return False
        return bool(original(norm))

    zero.is_invalid_grad_norm = is_invalid_grad_norm

    def mask_nan_or_inf_with_val_inplace(input: torch.Tensor, device: Any = None, val: float = -1.0) -> None:
        # DeepSpeed's marks an inf/NaN norm as -1 with a masked_fill_ by a 0-dim tensor that it
        # builds from a Python float on the device (a blocking copy) and that the kernel reads back
        # (.item()); a Python scalar does the same without either.
        input.masked_fill_(~torch.isfinite(input), -1.0)

    zero.mask_nan_or_inf_with_val_inplace = mask_nan_or_inf_with_val_inplace


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The module's parameters to `dtype`, its buffers (BatchNorm statistics) left float32, as
    DeepSpeed's bf16 mode casts a module."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(dtype)


def compile_model(model: VSRN, device_type: str, backend: Any = "inductor") -> None:
    """model.compile: torch.compile of the model's forward in place (parameter names and state
    dict unchanged), one graph per caption bucket (dynamic=False: every bucket is its own static
    graph). On CUDA mode="reduce-overhead" (CUDA graphs); on CPU the default mode."""
    mode = "reduce-overhead" if device_type == "cuda" and backend == "inductor" else None
    model.compile(backend=backend, mode=mode, dynamic=False)


def build_engine(cfg: TrainConfig, model: VSRN, universal: bool, compile_backend: Any = "inductor") -> Any:
    import deepspeed

    if not cfg.distributed.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_cpu_shm_comm_op()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # No weight decay, as the reference. fused: one kernel over all parameters instead of a chain of
    # elementwise ops per tensor (CPU and CUDA; bench/train_throughput.py measures the difference).
    optimizer: torch.optim.Optimizer
    if flat_optimizer(cfg):
        if cfg.distributed.precision == "bf16":
            _cast_parameters(model, torch.bfloat16)
        optimizer = FlatAdam(model.parameters(), lr=cfg.optim.learning_rate, clip=cfg.optim.grad_clip)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.learning_rate, fused=True)
        if cfg.distributed.precision != "fp16":
            _no_grad_norm_sync_in_zero_optimizer()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, universal),
                                           dist_init_required=False)
    if cfg.model.compile:
        compile_model(engine.module, next(engine.module.parameters()).device.type, compile_backend)
    return engine


def set_learning_rate(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------------------------------
# The per-step log
# --------------------------------------------------------------------------------------------------


class StepLog:
    """RUN_DIR/train_log.jsonl, one JSON object per step, written by rank 0.

    Local run directories are appended to line by line. On s3:// the file is kept locally and
    uploaded whole at every checkpoint (objects cannot be appended to). After a restart, lines
    of steps beyond the restored checkpoint (replayed now) are dropped first, so every step
    appears once.
    """

    def __init__(self, run_dir: str, storage_options: dict[str, Any] | None) -> None:
        self.location = open_location(run_dir, storage_options)
        if self.location.is_s3:
            self.path = os.path.join(tempfile.mkdtemp(prefix="vsrn-trainlog-"), TRAIN_LOG)
            try:
                existing = self.location.read_bytes(TRAIN_LOG)
            except FileNotFoundError:
                existing = b""
            with open(self.path, "wb") as stream:
                stream.write(existing)
        else:
            self.location.makedirs()
            self.path = self.location.child_path(TRAIN_LOG)

    def truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as stream:
            lines = [line for line in stream if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w", encoding="utf-8") as stream:
            stream.writelines(lines)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")

    def sync(self) -> None:
        if self.location.is_s3 and os.path.exists(self.path):
            with open(self.path, "rb") as stream:
                self.location.write_bytes_atomic(TRAIN_LOG, stream.read())


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class Interval:
    """Sums over a span of steps (since the last progress line, or since the last checkpoint)."""

    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    data_wait: float = 0.0
    loss_matching: float = 0.0
    loss_caption: float = 0.0
    hardest_steps: int = 0  # steps with hardest negatives (the collapse detector wants only those)

    def add(self, samples: int, seconds: float, wait: float, matching: float, caption: float,
            hardest: bool = False) -> None:
        self.steps += 1
        self.samples += samples
        self.seconds += seconds
        self.data_wait += wait
        self.loss_matching += matching
        self.loss_caption += caption
        self.hardest_steps += int(hardest)

    def metrics(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        return {"loss_matching": self.loss_matching / steps, "loss_caption": self.loss_caption / steps,
                "samples_per_s": self.samples / max(self.seconds, 1e-9), "data_wait_s": self.data_wait / steps,
                "step_time_s": (self.seconds - self.data_wait) / steps}


def _setup_logging(rank: int) -> None:
    """INFO from this project's packages, warnings from the rest (Ray logs every report at INFO)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s", force=True)
    for package in ("trainer", "data_shards", "model"):
        logging.getLogger(package).setLevel(logging.INFO)


def _fail_once(run_dir: str, storage_options: dict[str, Any] | None, step: int) -> None:
    """debug.fail_at_step: hard-exit this process once per run (a marker in RUN_DIR remembers)."""
    location = open_location(run_dir, storage_options)
    marker = f".debug-failed-at-step-{step}"
    if location.exists(marker):
        return
    location.write_bytes_atomic(marker, b"")
    # Ray commits a checkpoint only once it has collected every rank's report (it polls every few
    # seconds); wait for that, so the simulated crash resumes from a known checkpoint (the last one).
    import ray.train

    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                           timeout_s=60)
    log.warning("debug.fail_at_step: exiting at step %d to simulate a worker failure", step)
    logging.shutdown()
    os._exit(1)


def training_loss(out: VSRNOutput, image_ids: torch.Tensor, cfg: TrainConfig, world: int,
                  hardest: bool, check_sizes: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss this rank back-propagates, this rank's share of L_M).

    L_M is this rank's anchors against the gathered global batch, times W: DeepSpeed averages the
    gradients over the W ranks, and the reference sums L_M over the whole batch, so the averaged
    gradient equals the reference's gradient of one global batch (see the module docstring).
    L_G is a per-pair mean already: the average over ranks is the global mean, no factor.
    """
    matching = gathered_hardest_negative_loss(out.image_emb, out.caption_emb, image_ids,
                                              margin=cfg.optim.margin, max_violation=hardest,
                                              check_sizes=check_sizes)
    return _total_loss(matching, out, cfg, world), matching


def training_loss_with_stats(out: VSRNOutput, image_ids: torch.Tensor, cfg: TrainConfig, world: int,
                             hardest: bool, check_sizes: bool = True
                             ) -> tuple[torch.Tensor, torch.Tensor, HardNegativeStats]:
    """:func:`training_loss` plus the loss's hard-negative stats of this rank's anchors (the same
    loss and gradients: the stats are computed without autograd from the loss's own scores).
    `check_sizes=False`: the caller has checked on the host that every rank's local batch has the
    same shape (the trainer: each batch has the configured per-worker size)."""
    matching, stats = gathered_hardest_negative_loss(out.image_emb, out.caption_emb, image_ids,
                                                     margin=cfg.optim.margin, max_violation=hardest,
                                                     with_stats=True, check_sizes=check_sizes)
    return _total_loss(matching, out, cfg, world), matching, stats


def _total_loss(matching: torch.Tensor, out: VSRNOutput, cfg: TrainConfig, world: int) -> torch.Tensor:
    loss = matching * world
    if out.caption_loss is not None:
        loss = loss + cfg.model.caption_loss_weight * out.caption_loss.float()
    return loss


def step_losses(matching: torch.Tensor, caption: torch.Tensor | None) -> torch.Tensor:
    """This rank's (L_M, L_G) of a step as one detached float32 device tensor (2,): summed over the
    ranks at the next logging step (L_M of the global batch is the sum, L_G's mean the sum / W)."""
    values = [matching.detach().float()]
    values.append(caption.detach().float() if caption is not None else torch.zeros_like(values[0]))
    return torch.stack(values)


@dataclass
class StepInputs:
    """A training batch on the device, its caption shape facts made on the host (no sync)."""

    regions: torch.Tensor
    captions: CaptionInputs
    boxes: torch.Tensor | None
    image_ids: torch.Tensor


def step_inputs(batch: TrainBatch, cfg: TrainConfig, device: torch.device) -> StepInputs:
    """The data hand-off: the batch's host lengths give the caption bucket, each caption's last
    position and L_G's labels (model.vsrn.caption_inputs), sent with the tokens in one copy; all
    copies to the device are non-blocking (pinned batches on a GPU). Checks on the host that the
    batch has the configured per-worker size: every rank then has the same local shape, which the
    gathered loss needs (so it does not check it with a collective and a sync every step)."""
    if batch.tokens.shape[0] != cfg.per_worker_batch_size:
        raise ValueError(f"a training batch of {batch.tokens.shape[0]} pairs, the configuration says "
                         f"{cfg.per_worker_batch_size} per worker: the reader must give full batches")
    captions = caption_inputs(batch.tokens, batch.lengths, cfg.model.max_caption_len, device=device,
                              counted_positions=not cfg.model.compile)  # one shape per bucket when compiled
    return StepInputs(regions=batch.regions.to(device, non_blocking=True), captions=captions,
                      boxes=None if batch.boxes is None else batch.boxes.to(device, non_blocking=True),
                      image_ids=batch.image_ids.to(device, non_blocking=True))


@dataclass
class PendingStep:
    """A step whose losses are still on the device (logged at the next logging step)."""

    epoch: int
    position: int
    batches: int
    step: int
    lr: float
    hardest: bool
    seconds: float
    wait: float
    losses: torch.Tensor  # (2,): this rank's L_M, L_G
    finished_at: float = 0.0  # time.time() at the end of the step


def train_step(engine: Any, cfg: TrainConfig, world: int, inputs: StepInputs,
               hardest: bool) -> tuple[torch.Tensor, HardNegativeStats]:
    """Forward, both losses, backward and the optimizer step on `inputs`: (this rank's (L_M, L_G) as
    a device tensor, the loss's hard-negative stats). Nothing is read back from the device."""
    if cfg.model.compile and inputs.regions.is_cuda:
        torch.compiler.cudagraph_mark_step_begin()  # a new iteration for the CUDA graphs of mode="reduce-overhead"
    out = engine(inputs.regions, inputs.captions, None, inputs.boxes)
    loss, matching, stats = training_loss_with_stats(out, inputs.image_ids, cfg, world, hardest, check_sizes=False)
    engine.backward(loss)
    engine.step()
    return step_losses(matching, out.caption_loss), stats


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config`: {"train": TrainConfig as a dict, "data": PreparedData as a
    dict, "vocab_words": [...], "run_dir": RUN_DIR, "run_name": name} (built by trainer/launch.py).

    Errors that a restart cannot fix (trainer/failures.py: a damaged shard, a configuration, data
    or checkpoint error, a non-finite loss) leave as FatalTrainingError, which stops the run
    instead of spending Ray's restarts on it."""
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _setup_logging(rank)
    try:
        _train(config, rank, world)
    except FATAL_ERRORS as error:
        fatal = fatal_training_error(error, rank)
        log.error("stopping: %s", fatal)
        raise fatal from error  # type: ignore[misc]  # never None for FATAL_ERRORS


def _train(config: dict[str, Any], rank: int, world: int) -> None:
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(config["train"])
    data = config["data"]
    run_dir: str = config["run_dir"]
    storage_options = data.get("storage_options") or None
    host = ray.util.get_node_ip_address()
    log.info("rank %d of %d on node %s (%s)", rank, world, ray.get_runtime_context().get_node_id(), host)
    # The driver checked the nodes it saw; a node added since (an autoscaler) is checked here.
    require_shared_storage(cfg, [host], config.get("driver_host", host))
    if world != cfg.distributed.workers:
        raise RuntimeError(f"Ray started {world} workers but distributed.workers is {cfg.distributed.workers}")

    vocab = Vocabulary(config["vocab_words"])
    model_config = VSRNConfig.from_dict({**cfg.model.to_dict(), "vocab_size": len(vocab)})
    seed_everything(cfg.optim.seed)  # the same initial weights on every rank (DeepSpeed broadcasts rank 0's anyway)
    model = VSRN(model_config)
    device = ray.train.torch.get_device() if cfg.distributed.use_gpu else torch.device("cpu")
    model.to(device)

    checkpoint = ray.train.get_checkpoint()
    saved = read_train_state(checkpoint) if checkpoint is not None else None
    universal = saved is not None and needs_universal(saved, world, cfg.distributed.zero_stage)
    engine = build_engine(cfg, model, universal)
    step_log = StepLog(run_dir, storage_options) if rank == 0 else None

    seed_everything(cfg.optim.seed + 1 + rank)  # per-rank dropout masks
    epoch, start_batch, step = 0, 0, 0
    if checkpoint is not None:
        saved = restore_checkpoint(engine, checkpoint, rank=rank, world_size=world,
                                   zero_stage=cfg.distributed.zero_stage, seed=cfg.optim.seed)
        epoch, start_batch = saved.next_position()
        step = saved.step
        if rank == 0:
            log.info("resuming at step %d: epoch %d, batch %d (checkpoint %s)", step, epoch, start_batch,
                     checkpoint.path)
        if saved.global_batch_size != cfg.optim.global_batch_size:
            log.warning("the checkpoint was trained with a global batch of %d, this run uses %d",
                        saved.global_batch_size, cfg.optim.global_batch_size)

    if step_log is not None:
        # Steps logged after the checkpoint we continue from (or all, when there is none) are redone now.
        step_log.truncate_after(step)
    reader = TrainReader(
        ReaderConfig(location=data["train"], batch_size=cfg.per_worker_batch_size,
                     num_workers=cfg.data.loader_workers, seed=cfg.optim.seed,
                     pool_images=max(cfg.per_worker_batch_size, cfg.data.pool_images),
                     region_order=cfg.data.region_order, bad_data=cfg.data.bad_data,
                     # the shards' dtype as it is: the model casts the regions on its device
                     output_dtype="stored", storage_options=storage_options),
        vocab.encode, rank=rank, world_size=world)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        log.info("training %d parameters on %d %s worker(s): global batch %d (%d per worker), %s, ZeRO %d, "
                 "epochs %d, lr %.2e; malloc: %s", params, world, "GPU" if cfg.distributed.use_gpu else "CPU",
                 cfg.optim.global_batch_size, cfg.per_worker_batch_size, cfg.distributed.precision,
                 cfg.distributed.zero_stage, cfg.optim.epochs, cfg.optim.learning_rate,
                 allocator.describe())

    run_name = config.get("run_name", "")
    metrics = TrainingMetrics(RayBackend(), run=run_name, rank=rank) if cfg.monitoring.enabled else None
    loop = _Loop(cfg, engine, reader, vocab, step_log, rank, world, run_dir, storage_options, run_name, metrics)
    loop.run(epoch, start_batch, step)


class _Loop:
    """The epoch/step loop; state that outlives a step lives here."""

    def __init__(self, cfg: TrainConfig, engine: Any, reader: TrainReader, vocab: Vocabulary,
                 step_log: StepLog | None, rank: int, world: int, run_dir: str,
                 storage_options: dict[str, Any] | None, run_name: str,
                 metrics: TrainingMetrics | None = None) -> None:
        self.cfg, self.engine, self.reader, self.vocab, self.step_log = cfg, engine, reader, vocab, step_log
        self.rank, self.world, self.run_dir, self.storage_options, self.run_name = (
            rank, world, run_dir, storage_options, run_name)
        self.metrics = metrics
        self.interval = Interval()  # since the last progress line
        self.since_checkpoint = Interval()  # since the last checkpoint (reported to Ray with it)
        self.hard_negatives = HardNegativeInterval()  # the loss's stats since the last progress line
        self.collapse = CollapseDetector(cfg.optim.global_batch_size, cfg.optim.margin,
                                         cfg.monitoring.collapse_intervals)
        self.device = next(engine.module.parameters()).device
        self.pending: list[PendingStep] = []  # steps since the last flush, their losses on the device

    def run(self, first_epoch: int, start_batch: int, step: int) -> None:
        cfg = self.cfg
        for epoch in range(first_epoch, cfg.optim.epochs):
            lr = learning_rate(cfg.optim, epoch)
            set_learning_rate(self.engine, lr)
            batches = self.reader.batches_per_epoch(epoch)
            first, start_batch = start_batch, 0
            if first >= batches:  # a checkpoint at the very end of an epoch not marked complete
                continue
            # Pinned batches on a GPU: the copy to the device can overlap the step.
            iterator = iter(self.reader.epoch(epoch, first, pin_memory=self.device.type == "cuda"))
            for position in range(first, batches):
                waited = time.perf_counter()
                # torch's DataLoader draws its base seed from the global RNG when its iterator starts
                # (at the first batch of an epoch, or of a resumed epoch); keep that draw off the
                # RNG the model uses (dropout), or a resumed run would diverge from an uninterrupted one.
                with torch.random.fork_rng(devices=[]):
                    batch = next(iterator)
                started = time.perf_counter()
                wait = started - waited
                hardest = hardest_negatives(cfg.optim, epoch, step)
                losses, stats = self.train_step(batch, hardest)
                step += 1
                seconds = time.perf_counter() - started
                self.pending.append(PendingStep(epoch, position, batches, step, lr, hardest, seconds, wait, losses,
                                                time.time()))
                self.hard_negatives.add(stats)
                end_of_epoch = position + 1 == batches
                stop = bool(cfg.debug.max_steps) and step >= cfg.debug.max_steps
                periodic = bool(cfg.checkpoint.every_steps) and step % cfg.checkpoint.every_steps == 0
                fail_step = cfg.debug.fail_at_step == step
                fail = fail_step and self.rank == cfg.debug.fail_rank
                closes_interval = step % cfg.logging.interval_steps == 0 or end_of_epoch
                # The host learns the steps' numbers only here: at logging steps, and before a
                # checkpoint (never saved past a non-finite loss) or a simulated failure. A flush
                # is a collective: the condition must be the same on every rank.
                if closes_interval or stop or periodic or fail_step:
                    self.flush(closes_interval)

                if fail:
                    _fail_once(self.run_dir, self.storage_options, step)
                if end_of_epoch or stop or periodic:
                    self.checkpoint(TrainState(epoch=epoch, step=step, batch_in_epoch=position + 1,
                                               epoch_complete=end_of_epoch, world_size=self.world,
                                               global_batch_size=cfg.optim.global_batch_size))
                if stop:
                    if self.rank == 0:
                        log.info("debug.max_steps: stopping after step %d; re-run with the same "
                                 "checkpoint.run_name to continue", step)
                    iterator.close()
                    return
            iterator.close()

    def train_step(self, batch: TrainBatch, hardest: bool) -> tuple[torch.Tensor, HardNegativeStats]:
        """One step (see `train_step`): this rank's (L_M, L_G) on the device and the loss's stats."""
        return train_step(self.engine, self.cfg, self.world, step_inputs(batch, self.cfg, self.device), hardest)

    def flush(self, closes_interval: bool) -> None:
        """Bring the pending steps' losses (and, when the last one closes a logging interval, the
        hard-negative summary) to the host in one collective and one copy, then check and log them
        in order. A collective: every rank flushes at the same steps."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        local = torch.stack([p.losses for p in pending]).flatten()
        summary: HardNegativeSummary | None = None
        interval_steps = self.hard_negatives.steps
        gathered = self.hard_negatives.summarize_on_device(self.world, extra=local) if closes_interval else None
        if gathered is not None:
            summary_values, losses = gathered
            host = torch.cat([summary_values, losses]).cpu().tolist()  # the one host sync of the interval
            summary = HardNegativeSummary.from_values(host[:6], interval_steps)
            host = host[6:]
        else:
            if self.world > 1:
                dist.all_reduce(local)  # on the losses' device: NCCL reduces GPU tensors only
            host = local.cpu().tolist()
        for i, p in enumerate(pending):
            matching, caption = host[2 * i], host[2 * i + 1] / self.world
            if not (math.isfinite(matching) and math.isfinite(caption)):
                if self.metrics is not None:  # what the loss-NaN alert looks for, before this worker fails
                    self.metrics.record_losses({"matching": matching, "caption": caption,
                                                "total": matching + self.cfg.model.caption_loss_weight * caption})
                raise FloatingPointError(f"non-finite loss at step {p.step}: L_M {matching}, L_G {caption}")
            last = i == len(pending) - 1
            self.record(p.epoch, p.position, p.batches, p.step, p.lr, p.hardest, matching, caption, p.seconds,
                        p.wait, summary=summary if last else None, closes=closes_interval if last else None,
                        finished_at=p.finished_at or None)

    def record(self, epoch: int, position: int, batches: int, step: int, lr: float, hardest: bool,
               matching: float, caption: float, seconds: float, wait: float,
               summary: HardNegativeSummary | None = None, closes: bool | None = None,
               finished_at: float | None = None) -> None:
        """Log one step from host numbers. ``summary``: the hard-negative summary of the logging
        interval this step closes (`flush`), which also runs the collapse detector. ``closes``:
        whether the step closes a logging interval (default: from the step and position).
        ``finished_at``: when the step ended (default: now)."""
        cfg = self.cfg
        samples = cfg.optim.global_batch_size
        total = cfg.model.caption_loss_weight * caption + matching
        self.interval.add(samples, seconds + wait, wait, matching, caption, hardest)
        self.since_checkpoint.add(samples, seconds + wait, wait, matching, caption, hardest)
        closes_interval = closes if closes is not None else (
            step % cfg.logging.interval_steps == 0 or position + 1 == batches)
        collapsed: bool | None = None
        if summary is not None:
            collapsed = self.check_collapse(step, summary)
        if self.step_log is not None:
            record: dict[str, Any] = {
                "step": step, "epoch": epoch, "batch": position, "loss": total, "loss_matching": matching,
                "loss_caption": caption, "lr": lr, "hardest_negatives": hardest,
                "samples_per_s": samples / max(seconds + wait, 1e-9), "data_wait_s": wait, "step_time_s": seconds,
                "time": finished_at if finished_at is not None else time.time()}
            if summary is not None:
                record.update(summary.log_fields())
                record[COLLAPSED_FIELD] = bool(collapsed)
            self.step_log.append(record)
        if self.metrics is not None:
            self.metrics.record_step(epoch=epoch, samples=cfg.per_worker_batch_size, learning_rate=lr,
                                     losses={"matching": matching, "caption": caption, "total": total},
                                     step_seconds=seconds, data_wait_seconds=wait)
            if closes_interval:
                self.metrics.record_reader_stats(self.reader.stats.as_dict())
                if self.device.type == "cuda":
                    self.metrics.record_accelerator_memory(
                        torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device),
                        torch.cuda.max_memory_allocated(self.device))
                if summary is not None:
                    self.metrics.record_hard_negatives(
                        gap_mean=summary.gap_mean, gap_p10=summary.gap_p10,
                        active_hinge_ratio=summary.active_hinge_ratio,
                        remote_hardest_ratio=summary.remote_hardest_ratio)
                if collapsed is not None:
                    self.metrics.record_collapse(collapsed)
        if not closes_interval:
            return
        if self.rank == 0:
            iv = self.interval
            m = iv.metrics()
            log.info("epoch %d step %d (batch %d/%d)  L_M %.4f  L_G %.4f  lr %.2e  %.0f samples/s  "
                     "data wait %.3fs/step (%.0f%%)  %s%s", epoch, step, position + 1, batches, m["loss_matching"],
                     m["loss_caption"], lr, m["samples_per_s"], m["data_wait_s"],
                     100 * iv.data_wait / max(iv.seconds, 1e-9), "hardest negatives" if hardest else "all negatives",
                     "" if summary is None else "  " + summary.progress() + ("  COLLAPSED" if collapsed else ""))
        self.interval = Interval()  # on every rank: the collapse detector reads it everywhere

    def check_collapse(self, step: int, summary: HardNegativeSummary | None) -> bool:
        """Feed the closing interval to the collapse detector; warn (rank 0) when it trips or clears.

        Every rank runs it on the same global numbers, so all ranks agree on the state."""
        iv = self.interval
        mean_matching = iv.loss_matching / max(iv.steps, 1)
        update = self.collapse.update(mean_matching, hardest_only=iv.steps > 0 and iv.hardest_steps == iv.steps)
        if self.rank == 0 and update.started:
            log.warning("%s", self.collapse.warning(step, mean_matching, summary))
        elif self.rank == 0 and update.ended:
            log.info("step %d: L_M (%.4g) has left the collapse level %.4g; the collapse warning no longer holds",
                     step, mean_matching, self.collapse.level)
        return update.collapsed

    def checkpoint(self, state: TrainState) -> None:
        if self.rank == 0:
            if self.step_log is not None:
                self.step_log.sync()
        # Metrics go to Ray with the checkpoints only: the controller collects one report per worker
        # per poll (every ~2 s) and a worker's next report waits for that, so reporting every
        # logging interval would throttle fast steps.
        metrics = {"epoch": state.epoch, "step": state.step, "lr": learning_rate(self.cfg.optim, state.epoch),
                   **self.since_checkpoint.metrics(),
                   **{f"data/{k}": v for k, v in self.reader.stats.as_dict().items()}}
        self.since_checkpoint = Interval()
        started = time.perf_counter()
        try:
            save_checkpoint(self.engine, self.vocab, state, metrics, rank=self.rank, run_name=self.run_name)
        except Exception:
            if self.metrics is not None:
                self.metrics.record_checkpoint_failure()
            raise
        if self.metrics is not None:
            self.metrics.record_checkpoint(time.perf_counter() - started)
        if self.rank == 0:
            log.info("checkpoint at step %d (epoch %d, batch %d) in %.1fs", state.step, state.epoch,
                     state.batch_in_epoch, time.perf_counter() - started)
