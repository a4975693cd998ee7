"""The DeepSpeed engine of a training worker, and the schedules that drive it.

Optimization (the reference's defaults live in trainer/config.py): Adam without weight decay and
gradient clipping; ZeRO stage 0-2; fp32, bf16, or fp16 with dynamic loss scaling on GPUs.
* ZeRO 0 (fp32, bf16): `FlatAdam` (trainer/training/optimizer.py), torch's fused Adam over one
  flat float32 master copy of all parameters, clipping on the device, in a handful of operators
  per step; DeepSpeed's engine averages the gradients and checkpoints, with its own clipping off.
* ZeRO 1-2 and fp16: torch's fused Adam inside DeepSpeed's wrappers, which clip
  (gradient_clipping set explicitly: DeepSpeed clips at 1.0 when the key is missing).
The learning rate is `learning_rate * lr_decay_factor ** (epoch // lr_decay_every_epochs)`, set at
the start of each epoch from the epoch number alone, so a resumed run gets it right without
scheduler state; hardest negatives follow the all-negatives warm-up.

Precision (distributed.precision). fp32: everything in float32. bf16 (what the COCO configuration
trains with): the module's parameters are bf16 and its buffers (BatchNorm running statistics)
float32; the optimizer keeps float32 master weights and float32 Adam states (ZeRO 0: `FlatAdam`,
which casts the parameters itself, as DeepSpeed's bf16 mode would, without DeepSpeed's ZeRO-0
bf16 wrapper and its per-parameter overflow checks; ZeRO 1-2: DeepSpeed's `bf16`, the float32
partitions, no overflow check), so every update accumulates in float32 and only the
forward/backward see bf16 weights. Gradients are bf16 and all-reduced in bf16 (DeepSpeed's default
communication dtype for bf16): one rounding per step into float32 master weights, for half the
gradient traffic between nodes. Inside the model, products run in bf16 and BatchNorm, the GRU
recurrences on CPU, the joint-space embeddings and both losses in float32 (model/vsrn.py's
docstring gives the list and why). fp16 (GPUs only, refused on CPU by the configuration): the
same with dynamic loss scaling. `model.compile: true` compiles the model (torch.compile, one
graph per caption bucket, CUDA graphs on GPUs).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from model.vsrn import VSRN
from trainer.config import OptimConfig, TrainConfig
from trainer.training.optimizer import FlatAdam

log = logging.getLogger(__name__)


def learning_rate(optim: OptimConfig, epoch: int) -> float:
    """Step decay: x lr_decay_factor every lr_decay_every_epochs epochs (the reference's lr_update)."""
    return optim.learning_rate * optim.lr_decay_factor ** (epoch // optim.lr_decay_every_epochs)


def hardest_negatives(optim: OptimConfig, epoch: int, step: int) -> bool:
    """Max violation after the warm-up (all negatives during the first warmup_epochs / warmup_steps)."""
    return optim.max_violation and epoch >= optim.warmup_epochs and step >= optim.warmup_steps


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


def _no_grad_norm_sync_in_zero_optimizer() -> None:
    """DeepSpeed 0.19's ZeRO 1-2 optimizer asks `bool(...)` of the gradient norm at every step
    (`is_invalid_grad_norm`: a host sync) to skip steps with an inf/NaN norm, which only fp16's
    loss scaling needs. Outside fp16 the trainer never skips a step on it: a non-finite loss stops
    the run at the next logging step. So for fp32 and bf16 the ZeRO optimizer's check answers
    False without reading the norm (the clipping itself is computed on the device), and its
    marking of an inf/NaN norm (as -1) uses a Python scalar instead of a tensor made on the device
    and read back. Both are module globals of deepspeed.runtime.zero.stage_1_and_2, set here for
    the process (a training worker runs one engine)."""
    # Private: these are module globals of DeepSpeed's ZeRO 1-2 optimizer, not an API. No public
    # switch turns the check off (bf16's check_grad_overflow does not reach it), and without this
    # every ZeRO 1-2 step would wait on the device. Tested over setup.py's DeepSpeed range (0.19):
    # tests/trainer/training/test_step.py counts zero host syncs per step through the real engine,
    # so a DeepSpeed that renames them fails there; here a missing name only costs the syncs.
    import deepspeed
    import deepspeed.runtime.zero.stage_1_and_2 as zero

    if not (hasattr(zero, "is_invalid_grad_norm") and hasattr(zero, "mask_nan_or_inf_with_val_inplace")):
        log.warning("DeepSpeed %s's ZeRO optimizer has no is_invalid_grad_norm / mask_nan_or_inf_with_val_inplace: "
                    "its per-step gradient-norm sync stays", deepspeed.__version__)
        return
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
