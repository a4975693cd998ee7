"""Training-step throughput of VSRN (paper configuration) on one device.

One step = image and text encoders, caption loss (L_G), hardest-negative matching loss (L_M),
backward, gradient clipping and an Adam update, on random region features (36 regions × 2048) and
random captions of COCO-like lengths. Reports pairs/s and peak accelerator memory per precision.

    python bench/model_speed.py --device cuda --batch-size 128 --precision fp32 bf16 [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time

import torch

from model.loss import hardest_negative_loss
from model.vsrn import END_ID, START_ID, VSRN, VSRNConfig


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


def time_steps(config: VSRNConfig, device: str, precision: str, batch: int, regions: int,
               steps: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = VSRN(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    gen = torch.Generator().manual_seed(0)
    feats, tokens, lengths = make_batch(batch, regions, config.img_dim, config.vocab_size, device, gen)
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
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {"precision": precision, "batch": batch, "steps": steps,
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
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--small", action="store_true", help="D=256 model for a quick CPU run")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    config = VSRNConfig(embed_size=256, caption_hidden=128) if args.small else VSRNConfig()
    machine = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
               else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)")
    results = []
    for precision in args.precision:
        r = time_steps(config, args.device, precision, args.batch_size, args.regions, args.steps, args.warmup)
        results.append(r)
        mem = f", peak {r['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in r else ""
        print(f"{machine} | {precision} | batch {r['batch']} | {r['seconds_per_step'] * 1000:.1f} ms/step"
              f" | {r['pairs_per_second']:.0f} pairs/s{mem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
