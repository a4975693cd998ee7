"""Training-step throughput of VSRN (paper configuration) on one device, in two precision paths.

One step = image and text encoders, caption loss (L_G), hardest-negative matching loss (L_M),
backward, gradient clipping at 2.0 and an Adam update, on random region features (36 regions x
2048) and random captions of COCO-like lengths. Reports pairs/s and peak accelerator memory.

Paths (--path, both by default):
* trainer: what the training workers run: trainer.worker.build_engine's DeepSpeed engine on a
  one-process group (NCCL on CUDA, gloo on CPU), so bf16/fp16 are DeepSpeed's (the parameters cast
  to the low precision, float32 master weights and Adam states in its optimizer, fp16 with dynamic
  loss scaling), the worker's training loss (trainer.worker.training_loss) and engine.backward /
  engine.step. On CUDA the GRUs then run in cuDNN's bf16/fp16 kernels.
* autocast: float32 weights under torch.autocast (bf16 only) with torch's Adam: what the figures
  recorded before 2026-12-04 measured; it never runs a GRU with low-precision weights.

    python bench/model_speed.py --device cuda --batch-size 128 --precision fp32 bf16 \
        [--path trainer autocast] [--small] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

if __name__ == "__main__" and __package__ in (None, ""):  # `python bench/model_speed.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.loss import hardest_negative_loss  # noqa: E402
from model.vsrn import END_ID, START_ID, VSRN, VSRNConfig  # noqa: E402

PATHS = ("trainer", "autocast")


def make_batch(batch: int, regions: int, img_dim: int, vocab: int, device: str,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    feats = torch.randn(batch, regions, img_dim, generator=generator).to(device)
    # COCO captions: 8-20 words, mean ~10.5, plus <start> and <end>
    lengths = torch.randint(10, 23, (batch,), generator=generator)
    tokens = torch.randint(4, vocab, (batch, int(lengths.max())), generator=generator)
    tokens[:, 0] = START_ID
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n - 1] = END_ID
        tokens[i, n:] = 0
    return feats, tokens.to(device), lengths


@contextlib.contextmanager
def one_process_group(device: str) -> Iterator[None]:
    """A one-rank torch.distributed group (NCCL on CUDA, gloo on CPU), as Ray Train makes for a
    one-worker run, for DeepSpeed to find initialized; destroyed afterwards."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def trainer_step(config: VSRNConfig, device: str, precision: str, batch: int, feats: torch.Tensor,
                 tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[Callable[[], None], Any]:
    """(one training step of the worker's DeepSpeed engine, the engine)."""
    from trainer.config import load_config
    from trainer.worker import build_engine, training_loss

    cfg = load_config(None, [f"distributed.precision={precision}", "distributed.workers=1",
                             f"distributed.use_gpu={'true' if device.startswith('cuda') else 'false'}",
                             f"optim.global_batch_size={batch}", "distributed.zero_stage=0"])
    model = VSRN(config).to(device)
    engine = build_engine(cfg, model, universal=False)
    ids = torch.arange(batch, device=device)
    lengths_device = lengths.to(device)

    def step() -> None:
        out = engine(feats, tokens, lengths_device)
        loss, _ = training_loss(out, ids, cfg, world=1, hardest=True)
        engine.backward(loss)
        engine.step()

    return step, engine


def autocast_step(config: VSRNConfig, device: str, precision: str, batch: int, feats: torch.Tensor,
                  tokens: torch.Tensor, lengths: torch.Tensor) -> Callable[[], None]:
    model = VSRN(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    ids = torch.arange(batch, device=device)
    autocast = (torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
                if precision == "bf16" else contextlib.nullcontext())

    def step() -> None:
        with autocast:
            out = model(feats, tokens, lengths)
            loss = hardest_negative_loss(out.image_emb, out.caption_emb, ids) + out.caption_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()

    return step


def time_steps(config: VSRNConfig, device: str, precision: str, batch: int, regions: int,
               steps: int, warmup: int, path: str = "trainer") -> dict[str, Any]:
    if path == "autocast" and precision == "fp16":
        raise ValueError("the autocast path times fp32 and bf16 (fp16 under autocast needs a grad scaler); "
                         "fp16 runs in the trainer path")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    feats, tokens, lengths = make_batch(batch, regions, config.img_dim, config.vocab_size, device, gen)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with one_process_group(device) if path == "trainer" else contextlib.nullcontext():
        if path == "trainer":
            step, _engine = trainer_step(config, device, precision, batch, feats, tokens, lengths)
        else:
            step = autocast_step(config, device, precision, batch, feats, tokens, lengths)
        for _ in range(warmup):
            step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    result: dict[str, Any] = {"path": path, "precision": precision, "batch": batch, "steps": steps,
                              "seconds_per_step": elapsed / steps, "pairs_per_second": batch * steps / elapsed}
    if device.startswith("cuda"):
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
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
                        help="trainer: the worker's DeepSpeed engine; autocast: float32 weights under autocast")
    parser.add_argument("--small", action="store_true", help="D=256 model for a quick CPU run")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    config = VSRNConfig(embed_size=256, caption_hidden=128) if args.small else VSRNConfig()
    machine = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
               else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)")
    results = []
    for path in args.path:
        for precision in args.precision:
            if path == "autocast" and precision == "fp16":
                continue  # see time_steps
            r = time_steps(config, args.device, precision, args.batch_size, args.regions, args.steps, args.warmup,
                           path)
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
