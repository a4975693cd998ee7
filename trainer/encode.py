"""Encode region features and captions with an inference checkpoint into joint-space embeddings.

Usage (from the repository root)::

    python trainer/encode.py --checkpoint DIR [--images ims.npy] [--captions caps.txt] --output E.npz

* ``--images``: an .npy array (N, regions, img_dim) of region features (SCAN's precomputed
  ``{split}_ims.npy``), memory-mapped and read in batches, so a 31 GB array is never loaded whole.
* ``--captions``: UTF-8 text, one caption per line (``{split}_caps.txt``); lines are stripped of
  surrounding whitespace as the reference does and tokenized with the checkpoint's vocabulary.

On a GPU the computation is full fp32 unless ``--allow-tf32`` is given (cuDNN would otherwise run
the GRUs in TF32). Writes an npz archive with ``images`` (N, D) and/or ``captions`` (M, D), float32, l2-normalized,
rows in input order: the format ``trainer/evaluate.py --embeddings`` reads. The archive is written
beside its destination and renamed into place, so a failed run never leaves a partial one.

Exit status: 0 on success; 2 on unusable inputs (missing file, wrong feature size, empty caption
line ...), with a one-line message on stderr naming the file; 1 if the output cannot be written.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from model.atomic import atomic_write
from model.checkpoint import CheckpointError, load_inference_checkpoint
from model.vocab import Vocabulary, pad_captions
from model.vsrn import VSRN

logger = logging.getLogger("trainer.encode")

EXIT_OK = 0
EXIT_WRITE_FAILED = 1
EXIT_BAD_INPUT = 2


class InputFileError(Exception):
    """An input file is missing, unreadable or not what the encoder needs; the message names it."""


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def open_region_features(path: Path, img_dim: int) -> np.ndarray:
    """The (N, regions, img_dim) array of an .npy file, memory-mapped (read lazily)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a directory, not an .npy file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise InputFileError(f"{path}: cannot be read as an .npy array: {error}") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise InputFileError(
            f"{path}: expected an .npy file with one (N, regions, {img_dim}) array, got an npz archive")
    if array.ndim != 3 or array.shape[2] != img_dim:
        raise InputFileError(f"{path}: region features have shape {array.shape}; the checkpoint needs "
                             f"(N, regions, {img_dim}) (img_dim {img_dim})")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputFileError(f"{path}: shape {array.shape} holds no regions to encode")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputFileError(f"{path}: dtype {array.dtype} is not numeric")
    return array


def read_captions(path: Path) -> list[str]:
    """One caption per line of a UTF-8 file (a leading BOM is ignored), stripped of surrounding
    whitespace like the reference's ``line.strip()``; an empty line is an error naming it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a directory, not a text file") from None
    except OSError as error:
        raise InputFileError(f"{path}: cannot be read: {error}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise InputFileError(f"{path}: line {line} is not UTF-8 ({error.reason} at byte {error.start})") from None
    # Split on "\n" only, as the reference read its files (str.splitlines would also split on
    # form feeds and unicode line separators inside a caption).
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    captions = [line.strip() for line in lines]
    for number, caption in enumerate(captions, start=1):
        if not caption:
            raise InputFileError(f"{path}: line {number} is empty; every line must hold one caption")
    if not captions:
        raise InputFileError(f"{path}: no captions (the file is empty)")
    return captions


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_images(model: VSRN, regions: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """(N, regions, img_dim) features -> (N, D) float32 embeddings, ``batch_size`` images at a time."""
    model.eval()
    count = regions.shape[0]
    output = np.empty((count, model.config.embed_size), dtype=np.float32)
    started = time.perf_counter()
    for start in range(0, count, batch_size):
        # Only this slice of a memory-mapped array is read from disk; np.array copies it into
        # writable memory (torch does not take read-only arrays).
        batch = torch.from_numpy(np.array(regions[start:start + batch_size], dtype=np.float32)).to(device)
        output[start:start + len(batch)] = model.encode_images(batch).float().cpu().numpy()
        _progress("images", start + len(batch), count, started)
    return output


@torch.no_grad()
def encode_captions(model: VSRN, vocab: Vocabulary, captions: list[str], batch_size: int,
                    device: torch.device) -> np.ndarray:
    """Captions -> (M, D) float32 embeddings in input order (the text encoder takes unsorted lengths)."""
    model.eval()
    output = np.empty((len(captions), model.config.embed_size), dtype=np.float32)
    started = time.perf_counter()
    for start in range(0, len(captions), batch_size):
        ids = [vocab.encode(caption) for caption in captions[start:start + batch_size]]
        tokens, lengths = pad_captions(ids)
        output[start:start + len(ids)] = model.encode_captions(tokens.to(device), lengths).float().cpu().numpy()
        _progress("captions", start + len(ids), len(captions), started)
    return output


def _progress(what: str, done: int, total: int, started: float) -> None:
    # About ten lines per input, whatever its size.
    step = max(1, total // 10)
    if done == total or done // step != (done - 1) // step:
        logger.info("encoded %d/%d %s (%.1f s)", done, total, what, time.perf_counter() - started)


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an uncompressed npz atomically (temporary file in the same directory, then rename)."""
    with atomic_write(path, "wb") as stream:
        np.savez(stream, **arrays)  # a file object: numpy does not append ".npz" to the name


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="encode.py",
        description="Embed region features and/or captions with a VSRN inference checkpoint "
        "(model/checkpoint.py) into an npz archive for trainer/evaluate.py.",
    )
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="inference checkpoint directory")
    parser.add_argument("--images", type=Path, metavar="ims.npy", help="region features (N, regions, img_dim), .npy")
    parser.add_argument("--captions", type=Path, metavar="caps.txt", help="UTF-8 text, one caption per line")
    parser.add_argument("--output", type=Path, required=True, metavar="E.npz", help="the npz archive to write")
    parser.add_argument("--batch-size", type=int, default=128, metavar="B",
                        help="items per forward pass (default: 128)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--allow-tf32", action="store_true",
                        help="let CUDA matrix products and cuDNN's GRUs use TF32: faster on recent GPUs, but "
                        "embeddings then differ from fp32 by about 1e-4 (default: full fp32)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="verbosity of the log on stderr (default: INFO)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (argparse itself exits 2 on usage errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images is None and args.captions is None:
        parser.error("give --images and/or --captions")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prog = parser.prog
    if not args.output.parent.is_dir():
        print(f"{prog}: error: --output {args.output}: directory {args.output.parent} does not exist", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        print(f"{prog}: error: --device {args.device!r}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from trainer.evaluation import set_tf32  # the one TF32 switch (why: its docstring)

    set_tf32(args.allow_tf32)

    try:
        # Every input is checked before the first forward pass, so a bad caption file does not
        # fail after an hour of image encoding.
        captions = read_captions(args.captions) if args.captions is not None else None
        model, vocab = load_inference_checkpoint(args.checkpoint, device=device)
        regions = open_region_features(args.images, model.config.img_dim) if args.images is not None else None
    except (InputFileError, CheckpointError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as error:  # e.g. a device that is not there
        print(f"{prog}: error: cannot load {args.checkpoint} on {device}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT

    arrays: dict[str, np.ndarray] = {}
    if regions is not None:
        logger.info("encoding %d images of %d regions from %s on %s",
                    regions.shape[0], regions.shape[1], args.images, device)
        arrays["images"] = encode_images(model, regions, args.batch_size, device)
    if captions is not None:
        logger.info("encoding %d captions from %s on %s", len(captions), args.captions, device)
        arrays["captions"] = encode_captions(model, vocab, captions, args.batch_size, device)
    try:
        write_npz_atomic(args.output, arrays)
    except OSError as error:
        print(f"{prog}: error: cannot write {args.output}: {error}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    shapes = ", ".join(f"{key} {value.shape}" for key, value in arrays.items())
    print(f"wrote {args.output}: {shapes}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
