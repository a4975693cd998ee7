"""Entry point of the main job.

Today: `python trainer/launch.py` trains a tiny VSRN in this process on the built-in synthetic data
(CPU, a minute or two) and prints the losses and the recall table. The distributed trainer issue
turns this into the Ray/DeepSpeed job with the same command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from trainer.evaluation import format_table
from trainer.local_train import LocalTrainConfig, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = LocalTrainConfig()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--train-images", type=int, default=defaults.train_images)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = LocalTrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                           train_images=args.train_images, seed=args.seed)
    result = train(cfg)
    print(format_table(result["metrics"]))
    print(json.dumps({"final_loss": result["losses"][-1], "metrics": result["metrics"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
