"""Evaluate image-text retrieval recall (VSRN / VSE++ protocols) from saved embeddings or scores.

Usage::

    python trainer/evaluate.py --embeddings E.npz [--embeddings E2.npz ...] \\
        --protocol 1k-5fold --protocol all --output metrics.json
    python trainer/evaluate.py --sims S.npy [--sims S2.npy ...] --protocol all

Inputs (one kind, not both; giving several files evaluates their ensemble, whose similarity
matrices are averaged before ranking):

* ``--embeddings E.npz``: an npz archive with ``images`` (N, D) and ``captions`` (5N, D),
  l2-normalized; image i owns captions 5i .. 5i+4.
* ``--sims S.npy``: an (N, 5N) similarity matrix, ``S[i, j]`` = score of image i and caption j.

Protocols (repeat ``--protocol`` for several): ``1k-5fold`` (the first 5000 images in five folds
of 1000, metrics averaged over the folds; needs N >= 5000) and ``all`` (every image against
every caption: COCO 5K, Flickr30K 1K).

Output: a readable table on stdout and, with ``--output``, a JSON file mapping each protocol to
``i2t_r1, i2t_r5, i2t_r10, i2t_medr, i2t_meanr, t2i_r1, t2i_r5, t2i_r10, t2i_medr, t2i_meanr,
rsum`` (and for ``1k-5fold`` also ``folds``, the same keys per fold). The file is replaced
atomically, so a failed run never leaves a partial one. Logs go to stderr.

Exit status: 0 on success; 2 on bad arguments or unusable inputs (missing file or key, wrong
shapes, too few images for a protocol), with a one-line message on stderr naming the file;
1 if the output file cannot be written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from model.atomic import atomic_write
from trainer.evaluation import (
    PROTOCOLS,
    EvaluationInputError,
    evaluate_embeddings,
    evaluate_similarities,
    format_table,
    validate_protocol,
)

logger = logging.getLogger("trainer.evaluate")

EXIT_OK = 0
EXIT_WRITE_FAILED = 1
EXIT_BAD_INPUT = 2  # the status argparse uses for usage errors

EMBEDDING_KEYS = ("images", "captions")


class InputFileError(Exception):
    """An input file is missing, unreadable or lacks what the evaluation needs."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; input kinds share one mutually exclusive group, so that more kinds
    (a model checkpoint, say) can be added beside ``--embeddings`` and ``--sims``."""
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Image-text retrieval recall (R@1/5/10, medr, meanr, rsum) of VSRN-style "
        "embeddings or similarity matrices; several inputs are evaluated as an ensemble.",
    )
    inputs = parser.add_argument_group("inputs (one kind; repeat the option for an ensemble)")
    kinds = inputs.add_mutually_exclusive_group(required=True)
    kinds.add_argument(
        "--embeddings",
        action="append",
        type=Path,
        metavar="E.npz",
        help="npz archive with 'images' (N, D) and 'captions' (5N, D)",
    )
    kinds.add_argument(
        "--sims",
        action="append",
        type=Path,
        metavar="S.npy",
        help="npy file with an (N, 5N) image x caption similarity matrix",
    )
    parser.add_argument(
        "--protocol",
        action="append",
        required=True,
        choices=PROTOCOLS,
        help="evaluation protocol; repeat for several",
    )
    parser.add_argument("--output", type=Path, metavar="metrics.json", help="write the metrics as JSON")
    parser.add_argument("--device", default="cpu", help="torch device to compute on (default: cpu)")
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        metavar="B",
        help="queries scored at once (default: chosen from a 256 MiB memory budget)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="verbosity of the log on stderr (default: INFO)",
    )
    return parser


def _open_npy_or_npz(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a directory, not a file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise InputFileError(f"{path}: cannot be read by numpy.load: {error}") from None


def load_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The ``images`` and ``captions`` arrays of an npz archive (shapes are checked later)."""
    archive = _open_npy_or_npz(path)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputFileError(
            f"{path}: expected an .npz archive with arrays {' and '.join(EMBEDDING_KEYS)}, "
            f"got a single array of shape {np.shape(archive)}"
        )
    with archive:
        missing = [key for key in EMBEDDING_KEYS if key not in archive.files]
        if missing:
            raise InputFileError(
                f"{path}: missing key {', '.join(repr(k) for k in missing)}; the archive holds "
                f"{archive.files}, expected 'images' (N, D) and 'captions' (5N, D)"
            )
        try:
            images, captions = (archive[key] for key in EMBEDDING_KEYS)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise InputFileError(f"{path}: cannot read the arrays: {error}") from None
    return images, captions


def load_similarities(path: Path) -> np.ndarray:
    """The (N, 5N) similarity matrix of an npy file (the shape is checked later)."""
    array = _open_npy_or_npz(path)
    if not isinstance(array, np.ndarray):
        array.close()
        raise InputFileError(f"{path}: expected an .npy file with one (N, 5N) array, got an npz archive")
    return array


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` so readers see the old file or the complete new one."""
    with atomic_write(path) as stream:
        json.dump(payload, stream, indent=2)
        stream.write("\n")


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _check_protocols(protocols: list[str], num_images: int, source: str) -> None:
    # Before any work: a protocol that cannot run should not fail after the others have run.
    for protocol in protocols:
        try:
            validate_protocol(protocol, num_images)
        except EvaluationInputError as error:
            raise InputFileError(f"{source}: {error}") from None


def evaluate_files(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Load the inputs named by ``args`` and evaluate every requested protocol."""
    protocols = _unique(args.protocol)
    options = {"device": args.device, "block_size": args.block_size}
    started = time.perf_counter()
    if args.embeddings:
        models = [load_embeddings(path) for path in args.embeddings]
        names = [str(path) for path in args.embeddings]
        images = models[0][0]
        if images.ndim == 2:
            _check_protocols(protocols, images.shape[0], names[0])
        logger.info("loaded %d embedding file(s) in %.1f s", len(models), time.perf_counter() - started)
        return {p: evaluate_embeddings(models, p, names=names, **options) for p in protocols}
    matrices = [load_similarities(path) for path in args.sims]
    names = [str(path) for path in args.sims]
    if matrices[0].ndim == 2:
        _check_protocols(protocols, matrices[0].shape[0], names[0])
    logger.info("loaded %d similarity file(s) in %.1f s", len(matrices), time.perf_counter() - started)
    return {p: evaluate_similarities(matrices, p, names=names, **options) for p in protocols}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (argparse itself exits 2 on usage errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.block_size is not None and args.block_size < 1:
        parser.error(f"--block-size must be >= 1, got {args.block_size}")
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.output is not None and not args.output.parent.is_dir():
        print(f"{parser.prog}: error: --output {args.output}: directory "
              f"{args.output.parent} does not exist", file=sys.stderr)
        return EXIT_BAD_INPUT

    try:
        results = evaluate_files(args)
    except (InputFileError, EvaluationInputError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT

    print(format_table(results))
    if args.output is not None:
        try:
            write_json_atomic(args.output, results)
        except OSError as error:
            print(f"{parser.prog}: error: cannot write {args.output}: {error}", file=sys.stderr)
            return EXIT_WRITE_FAILED
        logger.info("wrote %s", args.output)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
