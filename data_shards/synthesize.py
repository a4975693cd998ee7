"""Write the synthetic dataset (data_shards/synthetic.py) in the standard precomputed layout.

    python data_shards/synthesize.py --output DIR --train-images N --dev-images M --test-images K \
        [--seed S] [--regions 36] [--feature-dim 2048]

writes DIR/{train,dev,test}_ims.npy (images, regions, feature_dim) float32 and
DIR/{train,dev,test}_caps.txt (five captions per image, in image order). The same arguments give
the same bytes. Splits share one world (the concept prototypes) and draw their images with
different seeds derived from --seed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from data_shards.synthetic import write_precomp_split

log = logging.getLogger("data_shards.synthesize")

# Seed offsets keep the splits' images distinct while one --seed fixes them all.
SPLIT_SEED_OFFSETS = {"train": 0, "dev": 1_000_003, "test": 2_000_029}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="directory for {split}_ims.npy and {split}_caps.txt")
    parser.add_argument("--train-images", type=int, required=True)
    parser.add_argument("--dev-images", type=int, required=True)
    parser.add_argument("--test-images", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--feature-dim", type=int, default=2048)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for split, count in (("train", args.train_images), ("dev", args.dev_images), ("test", args.test_images)):
        if count < 1:
            parser.error(f"--{split}-images must be >= 1, got {count}")
    if args.regions < 4:
        parser.error(f"--regions must be >= 4, got {args.regions}")
    if args.feature_dim < 1:
        parser.error(f"--feature-dim must be >= 1, got {args.feature_dim}")
    for split, count in (("train", args.train_images), ("dev", args.dev_images), ("test", args.test_images)):
        start = time.perf_counter()
        ims, caps = write_precomp_split(args.output, split, count, args.regions, args.feature_dim,
                                        seed=args.seed + SPLIT_SEED_OFFSETS[split])
        log.info("%s: %d images -> %s, %s (%.1f s)", split, count, ims, caps, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
