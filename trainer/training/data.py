"""Data of a training run, resolved on the driver before any worker starts.

`prepare_data(config.data)` returns a `PreparedData`: where the train/dev/test shards and the
vocabulary are, plus what the model must agree with (feature shape, vocabulary size).

* `data.train` empty: the built-in synthetic dataset (data_shards/synthetic.py). It is generated
  once into `data.cache_dir/synthetic-<hash>/`, the hash covering every parameter that changes the
  bytes, so a different configuration gets its own directory and an unchanged one is reused:

      precomp/{train,dev,test}_ims.npy, {split}_caps.txt   the standard precomputed layout
               {split}_ims_bbx.npy, {split}_ims_size.npy  region boxes and image sizes
      shards/{train,dev,test}/                              WebDataset shards (with boxes and sizes)
      images/{dev,test}/<key>.png                           the images drawn (trainer/explain.py --image)
      vocab.json                                           model/vocab.py, from the train captions

  Features are sharded as float32: the synthetic sets are small, and float32 keeps them bit-exact
  with the precomputed files (encode.py/evaluate.py can read either). Everything is built in a
  hidden temporary directory beside the destination and renamed into place, so a reader sees no
  directory or a complete one; when two processes race, both build and the first rename wins (the
  loser's copy is removed), which is correct without any lock.
* Otherwise `data.train`/`dev`/`test` are used as given (local or s3://). `data.vocab` empty: the
  vocabulary is built from the train shards' captions (reading only the caption members, but
  every shard is streamed: give `data.vocab` for large splits) and cached under `data.cache_dir`.

This module runs on the driver; workers receive the resolved locations.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data_shards.convert import convert, plan_precomp
from data_shards.format import MANIFEST_NAME, Manifest, sample_key
from data_shards.shard_reader import ShardStream, open_shard, shard_files
from data_shards.split import read_split
from data_shards.storage import is_s3_url, open_location, s3_storage_options
from data_shards.synthetic import scene_layout, write_precomp_split, write_scene_images
from model.vocab import Vocabulary, build_vocab
from trainer.config import DataConfig

log = logging.getLogger(__name__)

SYNTHETIC_FORMAT = 2  # bump when the cache layout or the generation changes (2: boxes, sizes, images)
SYNTHETIC_RENDERED_SPLITS = ("dev", "test")  # drawn as PNGs: the splits explanations look at
SYNTHETIC_DTYPE = "float32"
SYNTHETIC_SEEDS = {"train": 0, "dev": 1, "test": 2}  # one world (world_seed), three draws of images
SYNTHETIC_WORLD_SEED = 1234
VOCAB_FILE = "vocab.json"


class DataError(ValueError):
    """The data of a run cannot be prepared; the message names the location or key."""


@dataclass(frozen=True)
class PreparedData:
    """Resolved locations of a run's data (local paths or s3:// URLs) and what they hold."""

    train: str
    dev: str
    test: str
    vocab: str  # a LOCAL vocab.json path (remote vocabularies are cached locally)
    vocab_size: int
    feature_shape: tuple[int, int]  # (regions, feature_dim) of the train split
    storage_options: dict[str, Any]  # s3fs options for s3:// locations (may hold secrets: never log)
    synthetic: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def storage_options_for(data: DataConfig) -> dict[str, Any]:
    """s3fs options: `data.s3_endpoint_url` if set, else the environment (storage.py rules)."""
    return s3_storage_options(endpoint_url=data.s3_endpoint_url or None)


def prepare_data(data: DataConfig) -> PreparedData:
    """Generate (if needed) or check the run's data and return where everything is."""
    if not data.train:
        return _prepare_synthetic(data)
    missing = [name for name in ("dev", "test") if not getattr(data, name)]
    if missing:
        raise DataError(f"data.train is set, so data.{missing[0]} must be set too (a split directory with "
                        "manifest.json)")
    options = storage_options_for(data)
    for name in ("train", "dev", "test"):
        location = getattr(data, name)
        try:
            read_split(location, storage_options=options if is_s3_url(location) else None)
        except (OSError, ValueError) as error:
            raise DataError(f"data.{name}: {error}") from error
    vocab_path = _remote_vocab(data, options) if data.vocab else _vocab_from_shards(data, options)
    return _resolved(data.train, data.dev, data.test, vocab_path, options, synthetic=False)


def _resolved(train: str, dev: str, test: str, vocab_path: Path, options: dict[str, Any],
              synthetic: bool) -> PreparedData:
    vocab = Vocabulary.load_json(vocab_path)
    spec = read_split(train, storage_options=options if is_s3_url(train) else None)
    return PreparedData(train=train, dev=dev, test=test, vocab=str(vocab_path), vocab_size=len(vocab),
                        feature_shape=tuple(spec.feature_shape), storage_options=options, synthetic=synthetic)


# --------------------------------------------------------------------------------------------------
# The synthetic dataset
# --------------------------------------------------------------------------------------------------


def synthetic_parameters(data: DataConfig) -> dict[str, Any]:
    """Everything that determines the bytes of the synthetic cache (hashed into its name)."""
    images = {"train": data.synthetic_train_images, "dev": data.synthetic_dev_images,
              "test": data.synthetic_test_images}
    return {
        "format": SYNTHETIC_FORMAT, "images": images, "regions": data.synthetic_regions,
        "feature_dim": data.synthetic_feature_dim, "seeds": SYNTHETIC_SEEDS, "world_seed": SYNTHETIC_WORLD_SEED,
        "dtype": SYNTHETIC_DTYPE, "shard_sizes": {split: shard_size(n) for split, n in images.items()},
        "vocab_threshold": data.vocab_threshold,
    }


def synthetic_directory(data: DataConfig) -> Path:
    """`cache_dir/synthetic-<hash of the parameters>`."""
    digest = hashlib.sha256(json.dumps(synthetic_parameters(data), sort_keys=True).encode()).hexdigest()[:16]
    return Path(os.path.expanduser(data.cache_dir)) / f"synthetic-{digest}"


def shard_size(images: int) -> int:
    """Images per shard: about 16 shards per split (the reader deals whole shards to every
    rank x loader worker, so a split needs several), at most 1000 per shard."""
    return max(1, min(1000, math.ceil(images / 16)))


def _prepare_synthetic(data: DataConfig) -> PreparedData:
    final = synthetic_directory(data)
    if not (final / VOCAB_FILE).is_file():
        _build_synthetic(data, final)
    else:
        log.info("synthetic dataset: reusing %s", final)
    shards = final / "shards"
    return _resolved(str(shards / "train"), str(shards / "dev"), str(shards / "test"), final / VOCAB_FILE, {},
                     synthetic=True)


def _build_synthetic(data: DataConfig, final: Path) -> None:
    params = synthetic_parameters(data)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    log.info("synthetic dataset: generating %s into %s", params["images"], final)
    try:
        precomp = staging / "precomp"
        for split, images in params["images"].items():
            write_precomp_split(precomp, split, images, regions=data.synthetic_regions,
                                feature_dim=data.synthetic_feature_dim, seed=SYNTHETIC_SEEDS[split],
                                world_seed=SYNTHETIC_WORLD_SEED)
            plan = plan_precomp(str(precomp), split, params["shard_sizes"][split], SYNTHETIC_DTYPE)
            with _quiet("data_shards.convert"):  # it logs every shard at INFO
                convert(plan, str(staging / "shards" / split), {}, SYNTHETIC_DTYPE, workers=1)
            if split in SYNTHETIC_RENDERED_SPLITS:
                layout = scene_layout(images, SYNTHETIC_SEEDS[split], SYNTHETIC_WORLD_SEED)
                write_scene_images(staging / "images" / split, layout,
                                   (sample_key(split, i) for i in range(images)))
        captions = (precomp / "train_caps.txt").read_text(encoding="utf-8").splitlines()
        build_vocab(captions, data.vocab_threshold).save_json(staging / VOCAB_FILE)
        (staging / "parameters.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(staging, final)  # atomic; fails if another process published first
        except OSError:
            if not (final / VOCAB_FILE).is_file():
                raise
            log.info("synthetic dataset: another process built %s first; using it", final)
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------------------------------
# Vocabularies of given shards
# --------------------------------------------------------------------------------------------------


def _cache_root(data: DataConfig) -> Path:
    root = Path(os.path.expanduser(data.cache_dir)) / "vocab"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _publish(path: Path, text: str) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.replace(temporary, path)


def _remote_vocab(data: DataConfig, options: dict[str, Any]) -> Path:
    """A local copy of `data.vocab` (local paths are used in place), checked by loading it."""
    if not is_s3_url(data.vocab) and "://" not in data.vocab:
        path = Path(os.path.expanduser(data.vocab))
        if not path.is_file():
            raise DataError(f"data.vocab: {path}: no such file")
    else:
        parent, name = data.vocab.rstrip("/").rsplit("/", 1)
        try:
            payload = open_location(parent, options).read_bytes(name)
        except (OSError, ValueError) as error:
            raise DataError(f"data.vocab: cannot read {data.vocab}: {error}") from error
        path = _cache_root(data) / f"{hashlib.sha256(payload).hexdigest()[:16]}.json"
        if not path.is_file():
            _publish(path, payload.decode("utf-8"))
    try:
        Vocabulary.load_json(path)
    except ValueError as error:
        raise DataError(f"data.vocab: {error}") from error
    return path


def _vocab_from_shards(data: DataConfig, options: dict[str, Any]) -> Path:
    """Build the vocabulary of the train shards' captions, cached by manifest and threshold."""
    spec = read_split(data.train, storage_options=options if is_s3_url(data.train) else None)
    manifest = Manifest.from_json(open_location(spec.location, spec.storage_options).read_text(MANIFEST_NAME))
    key = hashlib.sha256(json.dumps([manifest.to_json(), data.vocab_threshold]).encode()).hexdigest()[:16]
    path = _cache_root(data) / f"train-{key}.json"
    if path.is_file():
        return path
    log.warning("data.vocab is empty: building the vocabulary from the captions of %d train shards "
                "(threshold %d); set data.vocab to skip this", len(spec.shards), data.vocab_threshold)
    vocab = build_vocab(_shard_captions([s.url for s in spec.shards], spec.storage_options), data.vocab_threshold)
    vocab.save_json(path)
    log.info("vocabulary: %d words -> %s", len(vocab), path)
    return path


def _shard_captions(urls: list[str], options: dict[str, Any]) -> Iterator[str]:
    """Every caption of the shards, keeping only their `captions.json` members in memory
    (data_shards/shard_reader.py reads them, as the training reader does)."""
    for url in urls:
        with open_shard(url, options) as raw:
            for file in shard_files(ShardStream(raw, url, hashing=False), url,
                                    select=lambda name: name.endswith(".captions.json")):
                try:
                    captions = json.loads(file["data"].decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as error:
                    raise DataError(f"{url}: {file['fname']}: unreadable captions ({error})") from error
                yield from captions
