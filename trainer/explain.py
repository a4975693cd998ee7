"""What a trained image representation holds: the paper's interpretation method (Sec. 4.5).

Usage (from the repository root)::

    python trainer/explain.py --checkpoint CKPT --data SHARDS --key KEY [--key KEY ...] --output DIR \\
        [--image FILE_OR_DIR] [--lambda 50]

For each key: the reasoned region features V* (after the RRR layers, as the global reasoning reads
them) and the image representation I; the correlation v*_i . I of each region (Eq. 8's inner
product); the regions ranked by it (rank 1: the highest); the score s_i = lambda (k - r_i)^2; the
attention map whose value at a pixel is the sum of the scores of the regions whose box holds it
(model/interpret.py). Writes

* ``DIR/KEY.json``: ``{"key", "lambda", "regions": [{"index", "box" ([x1, y1, x2, y2] or null),
  "correlation", "rank", "score"}]}``, regions in stored order;
* ``DIR/KEY.png``: the map over the picture with ``--image`` (a file for one key, or a directory
  holding ``KEY.png`` / ``KEY.jpg`` per key: the synthetic dataset's ``images/<split>/``), else
  over a canvas of the stored image size with the top regions' boxes outlined, else (no boxes
  stored) a bar chart of the scores; with a colour bar and the image's captions.

CKPT is a run checkpoint directory or its ``inference/`` directory, local or ``s3://``; SHARDS a
split directory. Exit status: 0 on success; 2 on unusable inputs (unknown key, unreadable
checkpoint, split or picture), with a one-line message naming it; 1 if an output cannot be written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from data_shards.format import ImageRecord, ShardFormatError
from data_shards.lookup import UnknownKeyError, read_records
from model.atomic import atomic_write
from model.checkpoint import CheckpointError
from model.interpret import PAPER_LAMBDA, RegionAttention
from trainer.inference.figures import attention_png, load_picture
from trainer.inference.arguments import add_checkpoint_arguments, run_region_order, storage_options_of
from trainer.inference.attention import records_attention
from trainer.inference.checkpoint import load_checkpoint

logger = logging.getLogger("trainer.explain")

EXIT_OK, EXIT_WRITE_FAILED, EXIT_BAD_INPUT = 0, 1, 2
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")


def explanation(record: ImageRecord, attention: RegionAttention, lam: float) -> dict[str, Any]:
    """The pinned ``KEY.json`` payload."""
    boxes = record.boxes
    return {
        "key": record.key,
        "lambda": lam,
        "regions": [
            {"index": i,
             "box": None if boxes is None else [float(v) for v in boxes[i]],
             "correlation": float(attention.correlation[i]),
             "rank": int(attention.rank[i]),
             "score": float(attention.score[i])}
            for i in range(attention.regions)
        ],
    }


def picture_for(image: Path | None, key: str, single: bool) -> np.ndarray | None:
    """The picture of `key`: --image itself (one key) or DIR/KEY.{png,jpg,jpeg}; None without --image."""
    if image is None:
        return None
    if image.is_dir():
        for suffix in PICTURE_SUFFIXES:
            candidate = image / f"{key}{suffix}"
            if candidate.is_file():
                return load_picture(candidate)
        raise FileNotFoundError(f"{image}: no picture for key {key} ({', '.join(key + s for s in PICTURE_SUFFIXES)})")
    if not single:
        raise ValueError(f"--image {image} is one file for several keys: give a directory holding KEY.png "
                         "or KEY.jpg per key")
    return load_picture(image)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="explain.py",
        description="The attention of a checkpoint's image representation over an image's regions (paper Sec. 4.5).")
    add_checkpoint_arguments(parser)
    parser.add_argument("--key", action="append", required=True, metavar="KEY",
                        help="sample key of an image of the split (repeat for several)")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR", help="directory for KEY.json and KEY.png")
    parser.add_argument("--image", type=Path, metavar="FILE_OR_DIR",
                        help="the picture to draw the map over: a file (one key) or a directory of KEY.png/KEY.jpg")
    parser.add_argument("--lambda", dest="lam", type=float, default=PAPER_LAMBDA, metavar="L",
                        help=f"the score's emphasis of high ranks, s_i = L (k - r_i)^2 (default: {PAPER_LAMBDA:g})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not math.isfinite(args.lam) or args.lam <= 0:
        parser.error(f"--lambda must be a positive number, got {args.lam}")
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prog = parser.prog
    keys = list(dict.fromkeys(args.key))
    options = storage_options_of(args.endpoint_url)
    try:
        if args.image is not None and not args.image.exists():
            raise FileNotFoundError(f"--image {args.image}: no such file or directory")
        loaded = load_checkpoint(args.checkpoint, options, device=args.device)
        records = read_records(args.data, keys, options)
        pictures = {key: picture_for(args.image, key, len(keys) == 1) for key in keys}
        order = run_region_order(loaded, options)
        attentions = records_attention(loaded.model, records, args.lam, order, args.device)
    except (CheckpointError, UnknownKeyError, ShardFormatError, FileNotFoundError, ValueError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        args.output.mkdir(parents=True, exist_ok=True)
        for record, attention in zip(records, attentions):
            payload = explanation(record, attention, args.lam)
            with atomic_write(args.output / f"{record.key}.json", "w") as stream:
                stream.write(json.dumps(payload, indent=1) + "\n")
            png = attention_png(attention, key=record.key, captions=record.captions, boxes=record.boxes,
                                size=record.size, picture=pictures[record.key], lam=args.lam)
            with atomic_write(args.output / f"{record.key}.png", "wb") as stream:
                stream.write(png)
            top = ", ".join(str(i) for i in np.argsort(attention.rank)[:3])
            print(f"{record.key}: top regions {top} -> {args.output / record.key}.json, .png")
    except OSError as error:
        print(f"{prog}: error: cannot write to {args.output}: {error}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
