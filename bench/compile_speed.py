"""Eager against compiled (`model.compile: true`) training steps, through the trainer's own step.

For each batch size, two loops on the same batches from the same initial weights: the worker's
step (trainer/training/step.py `train_step` on `step_inputs`: forward, both losses, backward, the
optimizer of the run's precision and ZeRO stage) on the real DeepSpeed engine of
`trainer.training.engine.build_engine` on a one-rank process group, with the model eager, then compiled
as the trainer compiles it (torch.compile, one graph per caption bucket; `mode="reduce-overhead"`,
CUDA graphs, on CUDA; the default mode on CPU). Captions of 10-22 tokens fall into the buckets of
widths 16 and 24 (model.vsrn.caption_bucket); the warm-up steps visit every bucket of the timed
steps, so the compiled loop's warm-up holds its compilation.

Reported per batch size and loop: `compile_s` (the warm-up's wall time less as many timed steps:
the compilation, for the compiled loop), `ms_per_step` (median of the timed steps, each ended by a
device synchronization), `pairs_per_s` (batch / median step), and the number of compiled graphs
(counted by a torch.compile backend that wraps inductor's: a public API).

    python bench/compile_speed.py --device cuda --batch-sizes 16 128 512 --json OUT.json
    python bench/compile_speed.py --device cpu --widths tiny --batch-sizes 8 --steps 2   # a quick CPU run

Paper widths by default (configs/coco.yaml's model); `--widths tiny` for CPU checks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.step_profile import finish, init_process_group, make_batch, parse_lengths, train_config  # noqa: E402


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and compiles each with inductor
    (through torch.compile itself: the graph module compiled with backend="inductor")."""

    def __init__(self, mode: str | None) -> None:
        self.mode = mode
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs += 1
        return torch.compile(graph, backend="inductor", mode=self.mode, dynamic=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(args: argparse.Namespace, batch_size: int, compiled: bool) -> dict[str, Any]:
    from model.vsrn import VSRN, VSRNConfig, caption_bucket
    from trainer.training.engine import build_engine
    from trainer.training.step import step_inputs, train_step

    ns = argparse.Namespace(**{**vars(args), "batch_size": batch_size, "compile": compiled, "zero_stage": args.zero_stage})
    cfg = train_config(ns)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = VSRN(VSRNConfig.from_dict(cfg.model.to_dict())).to(device)
    backend: Any = "inductor"
    counter = None
    if compiled and args.count_graphs:
        counter = CountingBackend("reduce-overhead" if device.type == "cuda" else None)
        backend = counter
    engine = build_engine(cfg, model, universal=False, compile_backend=backend)
    lengths = parse_lengths(args.lengths)
    rng = np.random.default_rng(0)
    mc = cfg.model
    batches = [make_batch(rng, batch_size, args.regions, mc.img_dim, mc.vocab_size, lengths(rng, batch_size), i)
               for i in range(args.warmup + args.steps)]
    # Warm-up first visits every bucket of the timed batches (each compiles once).
    buckets = {}
    for b in batches:
        buckets.setdefault(caption_bucket(int(b.lengths.max()), mc.max_caption_len), b)
    warm = list(buckets.values()) + batches[:args.warmup]

    def step(batch: Any) -> torch.Tensor:
        losses, _ = train_step(engine, cfg, 1, step_inputs(batch, cfg, device), hardest=True)
        return losses

    _sync(device)
    started = time.perf_counter()
    for batch in warm:
        step(batch)
    _sync(device)
    warm_s = time.perf_counter() - started
    times = []
    for batch in batches[args.warmup:]:
        started = time.perf_counter()
        losses = step(batch)
        _sync(device)
        times.append(time.perf_counter() - started)
    final = losses.cpu().tolist()
    median = statistics.median(times)
    result = {"batch_size": batch_size, "loop": "compiled" if compiled else "eager",
              "compile_s": round(max(warm_s - len(warm) * median, 0.0), 3), "warmup_s": round(warm_s, 3),
              "warmup_steps": len(warm), "ms_per_step": round(1000 * median, 3),
              "ms_per_step_mean": round(1000 * statistics.fmean(times), 3), "pairs_per_s": round(batch_size / median, 1),
              "steps": len(times), "buckets": sorted(buckets), "last_losses": final}
    if counter is not None:
        result["graphs"] = counter.graphs
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    engine = model = None  # free them before the next loop (the step closure holds engine)
    if compiled:
        torch.compiler.reset()
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    init_process_group(args.device)
    results = []
    for batch_size in args.batch_sizes:
        for compiled in (False, True):
            results.append(time_loop(args, batch_size, compiled))
            print(json.dumps(results[-1]), flush=True)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor()
    return {"device": args.device, "device_name": device_name, "precision": args.precision,
            "zero_stage": args.zero_stage, "widths": args.widths, "regions": args.regions, "lengths": args.lengths,
            "results": results, "torch": torch.__version__, "date": datetime.date.today().isoformat()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 128, 512])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2])
    parser.add_argument("--widths", default="paper", choices=["paper", "tiny"])
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--lengths", default="uniform:10:22")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-count-graphs", dest="count_graphs", action="store_false",
                        help="compile with the inductor backend directly (no graph count)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    finish(run(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
