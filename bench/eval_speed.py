"""Benchmark: vectorized recall evaluation (trainer/evaluation/) vs the reference's loop.

Times the ``all`` protocol on N images x 5N captions (default 5000 x 25000, D = 2048: COCO 5K
with VSRN's embedding size) of random l2-normalized float32 embeddings, twice:

* vectorized: ``evaluate_embeddings([(images, captions)], "all")``, blocked matrix products and
  rank counting in torch, end to end from the numpy arrays;
* reference loop: one query at a time in numpy, as the reference VSRN / VSE++ ``evaluation.py``
  does: per image, ``np.dot(im, captions.T)``, ``argsort`` descending and ``np.where`` of its 5
  captions; per image's 5 captions, ``np.dot(queries, images.T)`` and, per caption, ``argsort``
  and ``np.where`` of its image.

It checks that both give the same ranks and metrics and reports both times, their ratio and the
peak memory of the vectorized path.

``--protocol all eccv cxc`` also times those protocols evaluated together (one pass of matrix
products shared by all three, trainer/evaluation/scorer.py) against ``all`` alone, alternating the
two in the same run, and reports the ratio (goal: at most 1.5x). The ids are the COCO 5K test
split's standard order (the random embeddings mean nothing to the annotations: only the time
counts). The loop takes minutes on a few cores; ``--loop-queries K``
times it on the first K images (i2t) and their 5K captions (t2i) only and extrapolates linearly
to all queries (agreement is then checked on those queries).

Usage::

    python bench/eval_speed.py [--images 5000] [--dim 2048] [--loop-queries K]
                               [--protocol all eccv cxc] [--device cpu|cuda] [--json OUT]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.evaluation import (
    PROTOCOL_ALL,
    PROTOCOLS,
    embedding_ranks,
    evaluate_embeddings,
    evaluate_embeddings_protocols,
    metrics_from_ranks,
)

MIB = 2**20


# ----------------------------------------------------------------------------------------------
# Data


def make_embeddings(num_images: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random l2-normalized float32 embeddings; caption k of image i is the image's embedding
    plus Gaussian noise of norm ~``noise``, normalized, so recall is neither 0 nor 100. Built in
    chunks so that generating them does not raise the process's peak memory above the data's."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((num_images, dim), dtype=np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    captions = np.empty((5 * num_images, dim), dtype=np.float32)
    chunk = 500
    for start in range(0, num_images, chunk):
        stop = min(start + chunk, num_images)
        block = rng.standard_normal((5 * (stop - start), dim), dtype=np.float32)
        block *= noise / np.sqrt(dim)
        block += np.repeat(images[start:stop], 5, axis=0)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        captions[5 * start:5 * stop] = block
    return images, captions


# ----------------------------------------------------------------------------------------------
# The reference's per-query loop


def reference_i2t_ranks(images: np.ndarray, captions: np.ndarray, num_queries: int) -> np.ndarray:
    ranks = np.zeros(num_queries)
    for index in range(num_queries):
        im = images[index].reshape(1, images.shape[1])
        d = np.dot(im, captions.T).flatten()
        inds = np.argsort(d)[::-1]
        rank = 1e20
        for i in range(5 * index, 5 * index + 5, 1):
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    return ranks


def reference_t2i_ranks(images: np.ndarray, captions: np.ndarray, num_images: int) -> np.ndarray:
    ranks = np.zeros(5 * num_images)
    for index in range(num_images):
        queries = captions[5 * index:5 * index + 5]
        d = np.dot(queries, images.T)
        inds = np.zeros(d.shape)
        for i in range(len(inds)):
            inds[i] = np.argsort(d[i])[::-1]
            ranks[5 * index + i] = np.where(inds[i] == index)[0][0]
    return ranks


# ----------------------------------------------------------------------------------------------
# Memory


class PeakRss:
    """Peak resident memory above the level at entry, sampled from /proc every few ms.

    ``ru_maxrss`` alone is the process's all-time high, which data generation may already have
    set; sampling isolates the evaluation's own working memory (torch allocations included,
    which tracemalloc does not see)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.start = self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_bytes(self) -> int:
        return self.peak - self.start


def near_tie_gap(images: np.ndarray, captions: np.ndarray, direction: str, query: int) -> float:
    """In float64, how close the nearest other candidate scores to the query's positive: a
    rank that differs between two float32 implementations should be a near-tie."""
    images64, captions64 = images.astype(np.float64), captions.astype(np.float64)
    if direction == "i2t":
        scores = captions64 @ images64[query]
        own = np.zeros(scores.shape, dtype=bool)
        own[5 * query:5 * query + 5] = True
        positive = scores[own].max()
    else:
        scores = images64 @ captions64[query]
        own = np.zeros(scores.shape, dtype=bool)
        own[query // 5] = True
        positive = scores[own][0]
    return float(np.abs(scores[~own] - positive).min())


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="N images (5N captions); default 5000")
    parser.add_argument("--dim", type=int, default=2048, help="embedding dimension D; default 2048")
    parser.add_argument(
        "--noise",
        type=float,
        default=15.0,
        help="caption noise norm; the default 15 gives recalls like a real model on COCO 5K",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeat", type=int, default=1, help="timed vectorized runs; the fastest is kept")
    parser.add_argument(
        "--loop-queries",
        type=int,
        default=None,
        metavar="K",
        help="time the reference loop on the first K images and their 5K captions only and "
        "extrapolate linearly (default: all queries)",
    )
    parser.add_argument("--protocol", nargs="+", choices=PROTOCOLS, default=[PROTOCOL_ALL], metavar="P",
                        help="also time these protocols evaluated together against 'all' alone "
                        f"(choices: {', '.join(PROTOCOLS)}; e.g. all eccv cxc)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    protocols = list(dict.fromkeys(args.protocol))
    n, dim = args.images, args.dim
    loop_images = n if args.loop_queries is None else max(1, min(args.loop_queries, n))
    extrapolated = loop_images < n
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), numpy {np.__version__}", flush=True)
    # Other processes on the machine slow either side; the load average makes that visible.
    load_before = os.getloadavg()
    print(f"load average at start: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)
    if args.device == "cuda":
        print(f"gpu: {torch.cuda.get_device_name()}", flush=True)
    started = time.perf_counter()
    images, captions = make_embeddings(n, dim, args.noise, args.seed)
    input_bytes = images.nbytes + captions.nbytes
    print(f"data: {n} images x {5 * n} captions, D={dim}, float32 ({input_bytes / MIB:.0f} MiB), "
          f"made in {time.perf_counter() - started:.1f} s", flush=True)

    # Warm-up on a small slice: library initialization (oneDNN, CUDA context, cuBLAS) is not
    # what is being measured.
    evaluate_embeddings([(images[:50], captions[:250])], "all", device=args.device)

    times = []
    rss_before = max_rss_bytes()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRss() as peak:
        for _ in range(args.repeat):
            started = time.perf_counter()
            metrics = evaluate_embeddings([(images, captions)], "all", device=args.device)
            times.append(time.perf_counter() - started)
    vectorized_s = min(times)
    memory: dict[str, Any] = {
        "rss_extra_mib": peak.extra_bytes / MIB,
        "max_rss_mib": max_rss_bytes() / MIB,
        "max_rss_rose_mib": max(0, max_rss_bytes() - rss_before) / MIB,
    }
    if args.device == "cuda":
        memory["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
    print(f"vectorized ({args.device}): {vectorized_s:.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)}); "
          f"peak RSS {peak.extra_bytes / MIB:.0f} MiB above the inputs' process, "
          f"process max RSS {memory['max_rss_mib']:.0f} MiB"
          + (f", CUDA max allocated {memory['cuda_max_allocated_mib']:.0f} MiB" if args.device == "cuda" else ""),
          flush=True)

    together: dict[str, Any] | None = None
    if protocols != [PROTOCOL_ALL]:
        # Alternated with 'all' alone so that both see the same machine load.
        # CPU seconds of this process too: on a shared machine they depend far less on the other
        # jobs than wall time does (CPU device only; a GPU's work is not in them).
        alone_s, together_s, alone_cpu_s, together_cpu_s = [], [], [], []
        for _ in range(args.repeat):
            started, started_cpu = time.perf_counter(), time.process_time()
            evaluate_embeddings([(images, captions)], PROTOCOL_ALL, device=args.device)
            alone_s.append(time.perf_counter() - started)
            alone_cpu_s.append(time.process_time() - started_cpu)
            started, started_cpu = time.perf_counter(), time.process_time()
            results = evaluate_embeddings_protocols([(images, captions)], protocols, device=args.device)
            together_s.append(time.perf_counter() - started)
            together_cpu_s.append(time.process_time() - started_cpu)
        # Each pair ran back to back: the median of the pairs' ratios is the figure least
        # disturbed by other jobs on a shared machine; the ratio of the minima is reported too.
        pair_ratios = [t / a for a, t in zip(alone_s, together_s)]
        together = {"protocols": protocols, "all_alone_s": min(alone_s), "all_alone_runs_s": alone_s,
                    "together_s": min(together_s), "together_runs_s": together_s,
                    "ratio_of_minima": min(together_s) / min(alone_s), "pair_ratios": pair_ratios,
                    "median_pair_ratio": float(np.median(pair_ratios)),
                    "all_alone_cpu_s": alone_cpu_s, "together_cpu_s": together_cpu_s,
                    "cpu_ratio_of_minima": min(together_cpu_s) / min(alone_cpu_s), "metrics": results}
        print(f"protocols {' + '.join(protocols)} together: {together['together_s']:.2f} s (runs: "
              f"{', '.join(f'{t:.2f}' for t in together_s)}); 'all' alone in the same run: "
              f"{together['all_alone_s']:.2f} s (runs: {', '.join(f'{t:.2f}' for t in alone_s)}); "
              f"ratio of the minima {together['ratio_of_minima']:.2f}x, median of the pairs' ratios "
              f"{together['median_pair_ratio']:.2f}x (goal <= 1.5x)", flush=True)
        print(f"  CPU seconds: together {', '.join(f'{t:.2f}' for t in together_cpu_s)}; 'all' alone "
              f"{', '.join(f'{t:.2f}' for t in alone_cpu_s)}; ratio of the minima "
              f"{together['cpu_ratio_of_minima']:.2f}x", flush=True)

    print(f"reference loop: {loop_images} image queries and {5 * loop_images} caption queries"
          + (f" (of {n} and {5 * n}; extrapolated)" if extrapolated else "") + " ...", flush=True)
    started = time.perf_counter()
    loop_i2t = reference_i2t_ranks(images, captions, loop_images)
    i2t_s = time.perf_counter() - started
    started = time.perf_counter()
    loop_t2i = reference_t2i_ranks(images, captions, loop_images)
    t2i_s = time.perf_counter() - started
    scale = n / loop_images
    loop_s = (i2t_s + t2i_s) * scale
    print(f"reference loop: i2t {i2t_s:.1f} s + t2i {t2i_s:.1f} s measured"
          + (f", x{scale:.1f} -> {loop_s:.1f} s extrapolated" if extrapolated else f" = {loop_s:.1f} s"), flush=True)

    # Agreement: the same ranks query by query (the reference's float32 np.dot and torch's
    # blocked matmul round differently, so a near-tie may in principle swap; it is reported).
    vec_i2t, vec_t2i = embedding_ranks([(images, captions)], device=args.device)
    i2t_differ = np.flatnonzero(vec_i2t[:loop_images] != loop_i2t)
    t2i_differ = np.flatnonzero(vec_t2i[: 5 * loop_images] != loop_t2i)
    gaps = [near_tie_gap(images, captions, "i2t", int(q)) for q in i2t_differ]
    gaps += [near_tie_gap(images, captions, "t2i", int(q)) for q in t2i_differ]
    max_rank_difference = max(
        int(np.abs(vec_i2t[:loop_images] - loop_i2t).max()), int(np.abs(vec_t2i[: 5 * loop_images] - loop_t2i).max())
    )
    agreement: dict[str, Any] = {
        "i2t_queries_compared": loop_images,
        "t2i_queries_compared": 5 * loop_images,
        "i2t_rank_mismatches": len(i2t_differ),
        "t2i_rank_mismatches": len(t2i_differ),
        "max_rank_difference": max_rank_difference,
        "max_float64_gap_at_mismatches": max(gaps) if gaps else None,
    }
    if metrics != metrics_from_ranks(vec_i2t, vec_t2i).to_dict():
        raise SystemExit("evaluate_embeddings and embedding_ranks disagree")
    if not extrapolated:
        loop_metrics = metrics_from_ranks(loop_i2t, loop_t2i).to_dict()
        agreement["metric_differences"] = {
            key: abs(loop_metrics[key] - metrics[key]) for key in metrics if loop_metrics[key] != metrics[key]
        }
    print(f"agreement: {len(i2t_differ)} of {loop_images} i2t and {len(t2i_differ)} of {5 * loop_images} "
          "t2i ranks differ"
          + (f" (by at most {max_rank_difference}; nearest other candidate within {max(gaps):.1e} of the positive "
             "in float64, i.e. float32 rounding of near-ties)" if gaps else "")
          + (f"; metrics that differ: {agreement['metric_differences'] or 'none'}" if not extrapolated else ""),
          flush=True)
    print("metrics: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()), flush=True)

    load_after = os.getloadavg()
    print(f"load average at end: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}", flush=True)
    ratio = loop_s / vectorized_s
    loop_note = f"extrapolated from {loop_images} of {n} images" if extrapolated else "measured"
    print(f"speed-up: {ratio:.1f}x (goal >= 20x)")
    peak_note = (f"{memory['cuda_max_allocated_mib']:.0f} MiB CUDA, inputs included" if args.device == "cuda"
                 else f"{peak.extra_bytes / MIB:.0f} MiB RSS beyond the inputs")
    print("\n| N x 5N, D | device | vectorized | reference loop | speed-up | peak memory |")
    print("|---|---|---|---|---|---|")
    print(f"| {n} x {5 * n}, {dim} | {args.device} | {vectorized_s:.2f} s | {loop_s:.1f} s ({loop_note}) "
          f"| {ratio:.1f}x | {peak_note} |")

    if args.json is not None:
        figures = {
            "date": datetime.date.today().isoformat(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
            "images": n, "captions": 5 * n, "dim": dim, "device": args.device,
            "vectorized_s": vectorized_s, "vectorized_runs_s": times,
            "loop_s": loop_s, "loop_i2t_measured_s": i2t_s, "loop_t2i_measured_s": t2i_s,
            "loop_queries": loop_images, "loop_extrapolated": extrapolated,
            "speedup": ratio, "memory": memory, "agreement": agreement, "metrics": metrics,
            "load_average_start": load_before, "load_average_end": load_after,
            "protocols_together": together,
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
