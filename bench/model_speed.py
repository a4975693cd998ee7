"""Training-step throughput of VSRN (paper configuration) on one device, in two precision paths.

One step = image and text encoders, caption loss (L_G), hardest-negative matching loss (L_M),
backward, gradient clipping at 2.0 and an Adam update, on random region features (36 regions x
2048) and random captions of COCO-like lengths (10-22 tokens). Reports pairs/s and peak
accelerator memory.

Paths (--path, both by default):
* trainer: what the training workers run: the worker's own step (trainer/training/step.py `train_step`)
  on the DeepSpeed engine of `trainer.training.engine.build_engine`, on a one-process group (NCCL on CUDA,
  gloo on CPU), eager; so bf16/fp16 are the trainer's (the parameters cast to the low precision,
  float32 master weights and Adam states, fp16 with dynamic loss scaling) and on CUDA the GRUs run
  cuDNN's bf16/fp16 kernels. The timing loop is bench/compile_speed.py's eager one (median step,
  each ended by a device synchronization).
* autocast: float32 weights under torch.autocast (bf16) with torch's Adam: what the figures
  recorded before 2026-12-04 measured; it never runs a GRU with low-precision weights.

    python bench/model_speed.py --device cuda --batch-size 128 --precision fp32 bf16 \
        [--path trainer autocast] [--small] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/model_speed.py` from a checkout
    sys.path.insert(0, str(ROOT))

from bench.compile_speed import time_loop  # noqa: E402
from bench.step_profile import init_process_group, train_config  # noqa: E402
from model.loss import hardest_negative_loss  # noqa: E402
from model.vsrn import END_ID, START_ID, VSRN, VSRNConfig  # noqa: E402

PATHS = ("trainer", "autocast")
LENGTHS = "uniform:10:22"  # COCO captions: 8-20 words, plus <start> and <end>


def _loop_args(args: argparse.Namespace, precision: str) -> argparse.Namespace:
    """The settings of bench/compile_speed.py's loop for one precision (--small: its tiny widths)."""
    return argparse.Namespace(device=args.device, precision=precision, zero_stage=0,
                              widths="tiny" if args.small else "paper", regions=args.regions, lengths=LENGTHS,
                              steps=args.steps, warmup=args.warmup, count_graphs=False)


def model_config(args: argparse.Namespace, batch: int) -> VSRNConfig:
    """The model both paths time: configs/coco.yaml's (or its tiny widths with --small)."""
    cfg = train_config(argparse.Namespace(**{**vars(_loop_args(args, "fp32")), "batch_size": batch, "compile": False}))
    return VSRNConfig.from_dict(cfg.model.to_dict())


def make_batch(batch: int, regions: int, img_dim: int, vocab: int, device: str,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    feats = torch.randn(batch, regions, img_dim, generator=generator).to(device)
    lengths = torch.randint(10, 23, (batch,), generator=generator)
    tokens = torch.randint(4, vocab, (batch, int(lengths.max())), generator=generator)
    tokens[:, 0] = START_ID
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n - 1] = END_ID
        tokens[i, n:] = 0
    return feats, tokens.to(device), lengths


def time_autocast(config: VSRNConfig, device: str, precision: str, batch: int, regions: int, steps: int,
                  warmup: int) -> dict[str, Any]:
    """The autocast path: float32 weights, torch.autocast(bf16) over the forward, torch's Adam."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    feats, tokens, lengths = make_batch(batch, regions, config.img_dim, config.vocab_size, device, gen)
    model = VSRN(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    ids = torch.arange(batch, device=device)
    autocast = (torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
                if precision == "bf16" else contextlib.nullcontext())
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with autocast:
            out = model(feats, tokens, lengths)
            loss = hardest_negative_loss(out.image_emb, out.caption_emb, ids) + out.caption_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    result: dict[str, Any] = {"path": "autocast", "precision": precision, "batch": batch, "steps": steps,
                              "seconds_per_step": median, "pairs_per_second": batch / median}
    if device.startswith("cuda"):
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def time_trainer(args: argparse.Namespace, precision: str, batch: int) -> dict[str, Any]:
    """The trainer path: bench/compile_speed.py's eager loop over the worker's own step."""
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    loop = time_loop(_loop_args(args, precision), batch, compiled=False)
    result: dict[str, Any] = {"path": "trainer", "precision": precision, "batch": batch, "steps": loop["steps"],
                              "seconds_per_step": loop["ms_per_step"] / 1000.0,
                              "pairs_per_second": loop["pairs_per_s"]}
    if "peak_memory_gib" in loop:
        result["peak_memory_gib"] = loop["peak_memory_gib"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--path", nargs="+", default=list(PATHS), choices=PATHS,
                        help="trainer: the worker's step on its DeepSpeed engine; autocast: float32 weights under autocast")
    parser.add_argument("--small", action="store_true", help="tiny widths (bench/compile_speed.py's) for a quick CPU run")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    machine = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
               else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)")
    if "trainer" in args.path:
        init_process_group(args.device)  # one group for the process: DeepSpeed keeps references to it
    results = []
    for path in args.path:
        for precision in args.precision:
            if path == "autocast" and precision == "fp16":
                continue  # fp16 under autocast needs a grad scaler: fp16 is timed in the trainer path
            if path == "trainer":
                r = time_trainer(args, precision, args.batch_size)
            else:
                r = time_autocast(model_config(args, args.batch_size), args.device, precision, args.batch_size,
                                  args.regions, args.steps, args.warmup)
            results.append(r)
            mem = f", peak {r['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in r else ""
            print(f"{machine} | {path} | {precision} | batch {r['batch']} | {r['seconds_per_step'] * 1000:.1f} ms/step"
                  f" | {r['pairs_per_second']:.0f} pairs/s{mem}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
