"""Evaluate image-text retrieval recall (VSRN / VSE++ protocols) from saved embeddings or scores,
or from model checkpoints on sharded splits.

Usage::

    python trainer/evaluate.py --embeddings E.npz [--embeddings E2.npz ...] \\
        --protocol 1k-5fold --protocol all --output metrics.json
    python trainer/evaluate.py --sims S.npy [--sims S2.npy ...] --protocol all
    python trainer/evaluate.py --checkpoint DIR_or_s3 --data TEST_SHARDS [--dev DEV_SHARDS] \\
        [--protocol all ...] [--output metrics.json]
    python trainer/evaluate.py --watch RUN_DIR [--data TEST_SHARDS] [--dev DEV_SHARDS] [--retry-failed] \
        [--metrics-port PORT | --pushgateway URL]

Inputs (one kind; giving several embedding or similarity files evaluates their ensemble, whose
similarity matrices are averaged before ranking):

* ``--embeddings E.npz``: an npz archive with ``images`` (N, D) and ``captions`` (5N, D),
  l2-normalized; image i owns captions 5i .. 5i+4. Optional ``image_ids`` (N,) and
  ``caption_ids`` (5N,): the COCO ids of the rows, for ``eccv`` and ``cxc`` (``image_ids``
  alone: each image's captions are its five of the standard COCO 5K order).
* ``--sims S.npy``: an (N, 5N) similarity matrix, ``S[i, j]`` = score of image i and caption j.
* ``--checkpoint DIR``: a run checkpoint directory (``inference/`` + ``train_state.json``, see
  docs/run_layout.md) or an inference checkpoint directory, local or ``s3://``. The test shards
  (``--data``, a directory with manifest.json) are encoded with it and every ``--protocol`` is
  computed (default: both; ``1k-5fold`` is skipped below 5000 images); ``--dev`` adds the dev
  metrics (protocol ``all`` on the first ``--dev-images`` images) whose rsum selects models.
  Writes the run-layout ``metrics.json`` beside the checkpoint (and, for a run checkpoint, adds
  its line to the run's ``evaluations.jsonl`` and, with dev metrics, updates ``best.json``: the
  evaluation worker's record sequence), or to ``--output`` instead. For a run checkpoint
  the run's ``config.yaml`` (if any) gives the default eval settings (protocols, dev images,
  batch size), so that its dev rsum compares with the run's other checkpoints.
* ``--watch RUN_DIR``: evaluate every complete checkpoint of the run without metrics.json or
  eval_error.json (``--retry-failed``: also those with eval_error.json), in step order, record
  the results as the evaluation worker does (trainer/evaluator/checkpoint_eval.py), then exit: a CronJob runs
  this. Shards, protocols and the dev subset come from ``RUN_DIR/config.yaml`` unless given.

S3 endpoint: ``--endpoint-url``, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (credentials
from the environment, data_shards/storage.py).

Protocols (repeat ``--protocol`` for several): ``1k-5fold`` (the first 5000 images in five folds
of 1000, metrics averaged over the folds; needs N >= 5000), ``all`` (every image against
every caption: COCO 5K, Flickr30K 1K), and on the COCO 5K test split ``eccv`` (ECCV Caption's
mAP@R, R-Precision and R@1 with its extra positives) and ``cxc`` (CrissCrossed Captions R@1/5/10).
These two need the COCO ids of the images and captions: from the embeddings file, the shards
(converted with ``--coco-ids``), or else the standard 5K order (5,000 images x 25,000 captions)
is assumed; ``all``, ``eccv`` and ``cxc`` share one pass of matrix products.

Output: a readable table on stdout and, with ``--output``, a JSON file mapping each protocol to
``i2t_r1, i2t_r5, i2t_r10, i2t_medr, i2t_meanr, t2i_r1, t2i_r5, t2i_r10, t2i_medr, t2i_meanr,
rsum`` (and for ``1k-5fold`` also ``folds``, the same keys per fold; ``eccv``: ``i2t_map_at_r,
i2t_rprecision, i2t_r1, t2i_map_at_r, t2i_rprecision, t2i_r1``; ``cxc``: ``i2t_r1, i2t_r5, i2t_r10,
t2i_r1, t2i_r5, t2i_r10``; all in percent); for ``--checkpoint`` the
file is the run-layout metrics.json (those keys under ``test`` and ``dev``). The file is replaced
atomically, so a failed run never leaves a partial one. Logs go to stderr.

Exit status: 0 on success; 2 on bad arguments or unusable inputs (missing file or key, wrong
shapes, too few images for a protocol, an unreadable checkpoint or split), with a one-line
message on stderr naming the file; 1 if the output file cannot be written; 3 (``--watch``) if
at least one checkpoint failed (recorded in its eval_error.json; the others were evaluated).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

# trainer.evaluator (the --checkpoint/--watch modes: shard reader, model) is imported where
# it is used, so the --embeddings/--sims modes start as fast as before.
from model.atomic import atomic_write
from trainer.config import EvalConfig
from trainer.evaluation import (
    PROTOCOLS,
    RECALL_PROTOCOLS,
    EvaluationInputError,
    GalleryIds,
    evaluate_embeddings_protocols,
    evaluate_similarities_protocols,
    format_table,
    results_table,
    set_tf32,
    validate_protocol,
)
from trainer.run.best import best_dev_rsum
from trainer.run.checkpoints import is_run_checkpoint
from trainer.run.config_yaml import read_run_settings
from trainer.run.layout import METRICS_FILE, run_dir_of
from trainer.run.lease import describe_holder

logger = logging.getLogger("trainer.evaluate")

EXIT_OK = 0
EXIT_WRITE_FAILED = 1
EXIT_BAD_INPUT = 2  # the status argparse uses for usage errors
EXIT_CHECKPOINTS_FAILED = 3  # --watch: some checkpoints could not be evaluated (the rest were)

EMBEDDING_KEYS = ("images", "captions")
ID_KEYS = ("image_ids", "caption_ids")  # optional: COCO ids of the rows (protocols eccv and cxc)


class InputFileError(Exception):
    """An input file is missing, unreadable or lacks what the evaluation needs."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; the input kinds share one mutually exclusive group.

    The group is not ``required`` at the argparse level (nor is ``--protocol``): which options a
    kind needs is checked in :func:`check_arguments`, with the messages argparse gave before
    ``--checkpoint`` and ``--watch`` existed.
    """
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Image-text retrieval recall (R@1/5/10, medr, meanr, rsum) of VSRN-style "
        "embeddings or similarity matrices (several inputs are evaluated as an ensemble), or of "
        "model checkpoints on sharded splits.",
    )
    inputs = parser.add_argument_group("inputs (one kind; repeat --embeddings/--sims for an ensemble)")
    kinds = inputs.add_mutually_exclusive_group()
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
    kinds.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a run checkpoint (with inference/) or an inference checkpoint directory, local or s3://; "
        "needs --data and/or --dev",
    )
    kinds.add_argument(
        "--watch",
        metavar="RUN_DIR",
        help="evaluate every checkpoint of the run not yet evaluated (local or s3://), then exit",
    )
    parser.add_argument(
        "--protocol",
        action="append",
        choices=PROTOCOLS,
        help="evaluation protocol; repeat for several (required with --embeddings/--sims; "
        f"--checkpoint: default {' and '.join(RECALL_PROTOCOLS)}; --watch: default eval.test_protocols of the "
        "run's config.yaml)",
    )
    parser.add_argument("--output", type=Path, metavar=METRICS_FILE, help="write the metrics as JSON")
    parser.add_argument("--device", default="cpu", help="torch device to compute on (default: cpu)")
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        metavar="B",
        help="queries scored at once (default: chosen from a 256 MiB memory budget)",
    )
    models = parser.add_argument_group("--checkpoint and --watch")
    models.add_argument("--data", metavar="SHARDS",
                        help="test shards: a directory or s3:// prefix with manifest.json (--watch: default "
                        "data.test of the run's config.yaml)")
    models.add_argument("--dev", metavar="SHARDS",
                        help="dev shards for the dev rsum that selects the best checkpoint (--watch: default "
                        "data.dev of the run's config.yaml)")
    models.add_argument("--dev-images", type=int, metavar="N",
                        help="dev images ranked (the first N; default: eval.dev_images, 1000)")
    models.add_argument("--batch-size", type=int, metavar="B",
                        help="images encoded per forward pass, with their captions (default: eval.batch_size, 256)")
    models.add_argument("--loader-workers", type=int, default=0, metavar="W",
                        help="processes reading shards (default: 0, read in this process)")
    models.add_argument("--retry-failed", action="store_true",
                        help="--watch: evaluate again the checkpoints that have an eval_error.json")
    models.add_argument("--endpoint-url", metavar="URL",
                        help="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    exported = parser.add_argument_group(
        "Prometheus metrics of --checkpoint and --watch (monitoring/metrics.py: vsrn_eval_*)")
    exported.add_argument("--metrics-port", type=int, metavar="PORT",
                          help="serve /metrics on --metrics-host:PORT while evaluating (0: any free port)")
    exported.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                          help="address for --metrics-port (default: 127.0.0.1; 0.0.0.0 in a pod)")
    exported.add_argument("--metrics-linger", type=float, default=0.0, metavar="SECONDS",
                          help="keep serving this long after the last evaluation, so that a scrape sees "
                          "the final values (default: 0)")
    exported.add_argument("--pushgateway", metavar="URL",
                          help="push the metrics to this Pushgateway after each checkpoint (job vsrn_eval, "
                          "grouped by run): what a CronJob that exits between scrapes needs")
    exported.add_argument("--run-name", metavar="NAME",
                          help="the run label of the metrics (default: the run directory's name)")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="verbosity of the log on stderr (default: INFO)",
    )
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors that argparse cannot express (exits 2 through ``parser.error``)."""
    if not (args.embeddings or args.sims or args.checkpoint or args.watch):
        parser.error("one of the arguments --embeddings --sims is required (or --checkpoint DIR, or --watch RUN_DIR)")
    model_options = {"--data": args.data, "--dev": args.dev, "--dev-images": args.dev_images,
                     "--batch-size": args.batch_size, "--retry-failed": args.retry_failed or None,
                     "--endpoint-url": args.endpoint_url}
    if args.embeddings or args.sims:
        if not args.protocol:
            parser.error("the following arguments are required: --protocol")
        given = [name for name, value in model_options.items() if value is not None]
        if given:
            parser.error(f"{', '.join(given)}: only with --checkpoint or --watch")
    if args.block_size is not None and args.block_size < 1:
        parser.error(f"--block-size must be >= 1, got {args.block_size}")
    if args.checkpoint and args.data is None and args.dev is None:
        parser.error("--checkpoint needs --data (test shards) and/or --dev (dev shards)")
    if args.checkpoint and args.retry_failed:
        parser.error("--retry-failed: only with --watch")
    if args.watch and args.output is not None:
        parser.error("--output: not with --watch (each checkpoint gets its metrics.json)")
    for name, value in (("--dev-images", args.dev_images), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    if args.loader_workers < 0:
        parser.error(f"--loader-workers must be >= 0, got {args.loader_workers}")
    metric_options = {"--metrics-port": args.metrics_port, "--pushgateway": args.pushgateway,
                      "--run-name": args.run_name, "--metrics-linger": args.metrics_linger or None}
    if not (args.checkpoint or args.watch):
        given = [name for name, value in metric_options.items() if value is not None]
        if given:
            parser.error(f"{', '.join(given)}: only with --checkpoint or --watch")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port must be a port number (0-65535), got {args.metrics_port}")
    if args.metrics_linger < 0:
        parser.error(f"--metrics-linger must be >= 0, got {args.metrics_linger}")


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
    images, captions, _ = load_embeddings_and_ids(path)
    return images, captions


def load_embeddings_and_ids(path: Path) -> tuple[np.ndarray, np.ndarray, GalleryIds | None]:
    """:func:`load_embeddings` plus the archive's optional COCO ids (``image_ids``, and
    ``caption_ids`` if present), checked against the embeddings; None without ``image_ids``."""
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
        if "caption_ids" in archive.files and "image_ids" not in archive.files:
            raise InputFileError(f"{path}: has 'caption_ids' but no 'image_ids'; give both, or image_ids alone")
        try:
            images, captions = (archive[key] for key in EMBEDDING_KEYS)
            raw_ids = [archive[key] if key in archive.files else None for key in ID_KEYS]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise InputFileError(f"{path}: cannot read the arrays: {error}") from None
    ids = None
    if raw_ids[0] is not None:
        if np.ndim(images) >= 1 and np.shape(raw_ids[0])[:1] != np.shape(images)[:1]:
            raise InputFileError(f"{path}: 'image_ids' has shape {np.shape(raw_ids[0])}, but 'images' has "
                                 f"{np.shape(images)[0]} rows")
        try:
            ids = GalleryIds.from_arrays(raw_ids[0], raw_ids[1], where=str(path))
        except EvaluationInputError as error:
            raise InputFileError(str(error)) from None
    return images, captions, ids


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


def _check_protocols(protocols: list[str], num_images: int, source: str, ids: GalleryIds | None = None) -> None:
    # Before any work: a protocol that cannot run should not fail after the others have run.
    for protocol in protocols:
        try:
            validate_protocol(protocol, num_images, ids)
        except EvaluationInputError as error:
            raise InputFileError(f"{source}: {error}") from None


def _ensemble_ids(loaded: list[tuple[np.ndarray, np.ndarray, GalleryIds | None]], names: list[str]) -> GalleryIds | None:
    """The ids of an ensemble's files: the members rank the same items, so their ids must agree."""
    given = [(name, entry[2]) for name, entry in zip(names, loaded) if entry[2] is not None]
    if not given:
        return None
    first_name, first = given[0]
    for name, other in given[1:]:
        if not (np.array_equal(other.image_ids, first.image_ids) and np.array_equal(other.caption_ids, first.caption_ids)):
            raise InputFileError(f"{name}: its image_ids/caption_ids differ from those of {first_name}; "
                                 "an ensemble averages the similarities of the same images and captions")
    return first


def evaluate_files(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Load the inputs named by ``args`` and evaluate every requested protocol."""
    protocols = _unique(args.protocol)
    options = {"device": args.device, "block_size": args.block_size}
    started = time.perf_counter()
    if args.embeddings:
        loaded = [load_embeddings_and_ids(path) for path in args.embeddings]
        names = [str(path) for path in args.embeddings]
        models = [(images, captions) for images, captions, _ in loaded]
        ids = _ensemble_ids(loaded, names)
        images = models[0][0]
        if images.ndim == 2:
            _check_protocols(protocols, images.shape[0], names[0], ids)
        logger.info("loaded %d embedding file(s) in %.1f s", len(models), time.perf_counter() - started)
        return evaluate_embeddings_protocols(models, protocols, names=names, ids=ids, **options)
    matrices = [load_similarities(path) for path in args.sims]
    names = [str(path) for path in args.sims]
    if matrices[0].ndim == 2:
        _check_protocols(protocols, matrices[0].shape[0], names[0])
    logger.info("loaded %d similarity file(s) in %.1f s", len(matrices), time.perf_counter() - started)
    return evaluate_similarities_protocols(matrices, protocols, names=names, **options)


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """s3fs options: --endpoint-url, else the environment (None lets every reader use it)."""
    from data_shards.storage import s3_storage_options

    return s3_storage_options(endpoint_url=args.endpoint_url) if args.endpoint_url else None


def _eval_config(args: argparse.Namespace, base: EvalConfig) -> EvalConfig:
    """``base`` with the command line's --protocol, --dev-images and --batch-size applied."""
    changes: dict[str, Any] = {}
    if args.protocol:
        changes["test_protocols"] = _unique(args.protocol)
    if args.dev_images is not None:
        changes["dev_images"] = args.dev_images
    if args.batch_size is not None:
        changes["batch_size"] = args.batch_size
    return dataclasses.replace(base, **changes)


def _full_precision(device: str) -> None:
    if device.startswith("cuda"):
        set_tf32(False)  # metrics in full fp32, as the evaluation actor computes them


class _ExportedMetrics:
    """The vsrn_eval_* series of this process (prometheus-client), served and/or pushed as the
    options say; every method is a no-op without --metrics-port and --pushgateway. A context
    manager: leaving it closes the series (:meth:`close`), however the evaluation ended."""

    def __init__(self, args: argparse.Namespace, run_dir: str) -> None:
        from monitoring.recorders import EvaluationMetrics, PrometheusBackend

        self.backend: PrometheusBackend | None = None
        self.recorder: EvaluationMetrics | None = None
        self.linger = args.metrics_linger
        self.started = time.perf_counter()
        if args.metrics_port is None and args.pushgateway is None:
            return
        run = args.run_name or Path(run_dir.rstrip("/")).name
        self.backend = PrometheusBackend()
        if args.pushgateway is not None:
            self.backend.push_to(args.pushgateway, job="vsrn_eval", grouping_key={"run": run})
        self.recorder = EvaluationMetrics(self.backend, run)
        if args.metrics_port is not None:
            port = self.backend.serve(args.metrics_port, args.metrics_host)
            print(f"metrics: http://{args.metrics_host}:{port}/metrics", file=sys.stderr, flush=True)

    def evaluated(self, payload: dict[str, Any], best_rsum: float | None) -> None:
        if self.recorder is not None:
            self.recorder.record_evaluation(payload, best_rsum, time.perf_counter() - self.started)

    def failed(self) -> None:
        if self.recorder is not None:
            self.recorder.record_failure(time.perf_counter() - self.started)

    def __enter__(self) -> _ExportedMetrics:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self.backend is None:
            return
        self.backend.push()  # the final state (e.g. a run with nothing left to evaluate)
        if self.linger:
            logger.info("serving metrics for %.0f s more (--metrics-linger)", self.linger)
            time.sleep(self.linger)
        self.backend.close()


def run_checkpoint(args: argparse.Namespace, prog: str) -> int:
    """``--checkpoint``: evaluate one checkpoint, print the table, write metrics.json."""
    with _ExportedMetrics(args, run_dir_of(args.checkpoint)) as exported:
        return _evaluate_one_checkpoint(args, prog, exported)


def _evaluate_one_checkpoint(args: argparse.Namespace, prog: str, exported: _ExportedMetrics) -> int:
    from trainer.evaluator.checkpoint_eval import evaluate_checkpoint, record_evaluated

    options = _storage_options(args)
    _full_precision(args.device)
    try:
        # A checkpoint of a run is evaluated with the run's eval settings (dev subset size above
        # all), so that its dev rsum compares with the others in best.json.
        in_run = is_run_checkpoint(args.checkpoint, options)
        settings = read_run_settings(run_dir_of(args.checkpoint), options) if in_run else None
        base = settings.eval if settings is not None else EvalConfig(test_protocols=list(RECALL_PROTOCOLS))
        region_order = settings.region_order if settings is not None else "stored"
        payload = evaluate_checkpoint(args.checkpoint, args.dev, args.data, _eval_config(args, base), options,
                                      args.device, loader_workers=args.loader_workers, region_order=region_order)
    except (ValueError, OSError, RuntimeError) as error:
        # ValueError covers CheckpointError, ShardFormatError, EvaluationDataError, ConfigError;
        # OSError the storage. The messages name the file; add the checkpoint where they do not.
        message = str(error)
        if Path(args.checkpoint.rstrip("/")).name not in message:
            message = f"{args.checkpoint}: {message}"
        print(f"{prog}: error: {message}", file=sys.stderr)
        exported.failed()
        return EXIT_BAD_INPUT
    print(results_table(payload))
    for protocol, reason in payload["skipped"].items():
        print(f"skipped {protocol}: {reason}")
    problem = None
    try:
        if args.output is not None:
            write_json_atomic(args.output, payload)
            logger.info("wrote %s", args.output)
        else:
            # A run checkpoint evaluated by hand must count in the run's history and for model
            # selection as --watch would, which now skips it: the actor's record sequence.
            problem = record_evaluated(args.checkpoint, payload, run_dir_of(args.checkpoint) if in_run else None,
                                       options).problem
            logger.info("wrote %s beside %s", METRICS_FILE, payload["checkpoint"])
    except OSError as error:
        problem = f"{error}"
    if problem is not None:
        target = args.output if args.output is not None else f"the records of {args.checkpoint}"
        print(f"{prog}: error: cannot write {target}: {problem}", file=sys.stderr)
        exported.failed()
        return EXIT_WRITE_FAILED
    if exported.recorder is not None:  # (reading best.json costs a request on S3: only when exported)
        exported.evaluated(payload, best_dev_rsum(run_dir_of(args.checkpoint), options) if in_run else None)
    return EXIT_OK


def run_watch(args: argparse.Namespace, prog: str) -> int:
    """``--watch``: evaluate the run's checkpoints not yet evaluated; 3 if any of them failed."""
    with _ExportedMetrics(args, args.watch) as exported:
        return _evaluate_run(args, prog, exported)


def _evaluate_run(args: argparse.Namespace, prog: str, exported: _ExportedMetrics) -> int:
    from trainer.evaluator.checkpoint_eval import evaluate_run

    options = _storage_options(args)
    _full_precision(args.device)
    # Who trains the run, for the operator; the evaluator needs no lease (it writes only its own
    # records), and an unreadable lease is only reported (describe_holder never raises).
    logger.info("%s", describe_holder(args.watch, options))
    try:
        settings = read_run_settings(args.watch, options)
        eval_config = _eval_config(args, settings.eval if settings is not None else EvalConfig())
        summaries = evaluate_run(args.watch, dev=args.dev, test=args.data, eval_config=eval_config,
                                 storage_options=options, device=args.device, retry_failed=args.retry_failed,
                                 loader_workers=args.loader_workers, metrics=exported.recorder)
    except (ValueError, OSError) as error:  # no shards, an unreadable config.yaml or split, the store
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    failed = [s for s in summaries if s["status"] != "ok"]
    for summary in summaries:
        if summary["status"] == "ok":
            rsum = "n/a" if summary["dev_rsum"] is None else f"{summary['dev_rsum']:.2f}"
            print(f"{summary['path']} (step {summary['step']}): dev rsum {rsum}"
                  + (" (new best)" if summary["is_best"] else "")
                  + (f" (warning: {summary['error']})" if summary["error"] else ""))
        else:
            print(f"{summary['path']} (step {summary['step']}): FAILED: {summary['error']}")
    print(f"{args.watch}: evaluated {len(summaries)} checkpoint(s), {len(failed)} failed")
    return EXIT_CHECKPOINTS_FAILED if failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (argparse itself exits 2 on usage errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.output is not None and not args.output.parent.is_dir():
        print(f"{parser.prog}: error: --output {args.output}: directory "
              f"{args.output.parent} does not exist", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.checkpoint:
        return run_checkpoint(args, parser.prog)
    if args.watch:
        return run_watch(args, parser.prog)

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
