"""Convert precomputed region features and captions into WebDataset shards (schema version 1).

Two sources:

    # SCAN / VSRN / VSE-infinity precomputed layout: DIR/{split}_ims.npy + DIR/{split}_caps.txt
    # (+ optional DIR/{split}_ims_bbx.npy (N, regions, 4) boxes and DIR/{split}_ims_size.npy (N, 2)
    # width and height, the companions some precomputed sets ship, written into the shards)
    python data_shards/convert.py --precomp DIR --split test --output OUT [--shard-size 1000]
        [--dtype float16|float32] [--workers N]
    # COCO 5K test (testall): also each image's COCO id and its captions' annotation ids, from
    # the eccv-caption package, for the eccv / cxc evaluation protocols
    python data_shards/convert.py --precomp DIR --split testall --coco-ids --output OUT

    # bottom-up-attention TSV files + a Karpathy-style JSON (keeps boxes and image sizes)
    python data_shards/convert.py --tsv FILE [--tsv FILE2 ...] --karpathy dataset_coco.json \\
        --split test --output OUT [--include-restval] [--regions K] [--image-id auto]

OUT is a local directory or `s3://bucket/prefix` (endpoint and credentials: data_shards/storage.py).
One split per OUT: shards `{split}-000000.tar`, ... and `manifest.json`, written last.

Resume: every finished shard gets a completion record `_progress/{shard}.json` (sample count,
sha256, the conversion's fingerprint). A re-run skips a shard whose file exists and hashes to its
record (or to the existing manifest's entry) and rewrites a missing or corrupt one; tars are
byte-for-byte reproducible, so a rewritten shard equals the original. When every shard is complete
the manifest is written and the completion records are removed. An OUT whose manifest comes from a
different conversion (other source, split, dtype or shard size) is refused unless --overwrite.
The format and the decisions behind these options are described in data_shards/README.md.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_shards.coco_annotations import COCO_5K_IMAGES, AnnotationsUnavailableError, coco_5k_test_ids
from data_shards.format import (
    EXPECTED_CAPTIONS,
    FEATURE_DTYPES,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    ImageRecord,
    Manifest,
    ShardFormatError,
    ShardInfo,
    check_split_name,
    encode_record,
    sample_key,
    shard_name,
)
from data_shards.storage import (
    Location,
    StorageError,
    is_s3_url,
    open_location,
    s3_storage_options,
    sha256_file,
)

logger = logging.getLogger("data_shards.convert")

PROGRESS_DIR = "_progress"
TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
# Fixed tar metadata so that a shard's bytes depend on its samples only (resume compares sha256).
TAR_MTIME = 0
TAR_USER = "vsrn"
TAR_MODE = 0o444
REPEAT_CHECK_SAMPLES = 16  # images whose five per-caption rows are compared (the variant layout)
UTF8_BOM = b"\xef\xbb\xbf"


class ConversionError(Exception):
    """Bad input or an unusable output; the message names the file, key or value."""


# --------------------------------------------------------------------------------------------
# Work items. They are plain picklable data: shards are written by spawned worker processes.


@dataclass(frozen=True)
class PrecompSource:
    """A split in the precomputed layout."""

    ims_path: str
    caps_path: str
    split: str
    rows_per_image: int  # 1, or 5 in the variant with one row per caption
    boxes_path: str | None = None  # {split}_ims_bbx.npy: (images, regions, 4) x1, y1, x2, y2 in pixels
    sizes_path: str | None = None  # {split}_ims_size.npy: (images, 2) width, height
    # --coco-ids: the COCO image id of each image and the annotation ids of its five captions
    image_ids: tuple[str, ...] | None = None
    caption_ids: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PrecompShard:
    """One shard of a precomputed split: a contiguous range of images."""

    name: str
    start: int  # first image index
    stop: int  # one past the last image index
    caption_offset: int  # byte offset of image `start`'s first caption line


@dataclass(frozen=True)
class TsvItem:
    """One image of a TSV shard: where its features are and its captions."""

    index: int  # position in the selected split (Karpathy JSON order)
    image_id: str  # TSV image_id
    file: int  # index into TsvSource.tsv_paths
    offset: int  # byte offset of the image's line
    captions: tuple[str, ...]


@dataclass(frozen=True)
class TsvSource:
    """BUTD TSV files and what every image must look like."""

    tsv_paths: tuple[str, ...]
    split: str
    regions: int  # boxes kept per image (the first `regions` in stored order)
    feature_dim: int


@dataclass(frozen=True)
class TsvShard:
    """One shard of a TSV conversion: images in Karpathy JSON order."""

    name: str
    items: tuple[TsvItem, ...]


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker process needs to write (or skip) one shard."""

    output: str
    storage_options: dict[str, Any]
    dtype: str
    fingerprint: str
    source: PrecompSource | TsvSource
    shard: PrecompShard | TsvShard
    known: ShardInfo | None = None  # the existing manifest's entry, when it has this fingerprint


@dataclass(frozen=True)
class ShardDone:
    """A finished shard: its manifest entry, its caption count, and whether it was already there."""

    info: ShardInfo
    captions: int
    skipped: bool


@dataclass
class Plan:
    """Everything decided before any output is touched."""

    split: str
    source: PrecompSource | TsvSource
    shards: list[PrecompShard | TsvShard]
    feature_shape: tuple[int, int]
    images: int
    conversion: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return str(self.conversion["fingerprint"])


def _fingerprint(conversion: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(conversion, sort_keys=True).encode()).hexdigest()


def _file_identity(path: str) -> dict[str, Any]:
    # Large inputs are identified like make does (size, mtime) instead of hashed: hashing 30 GB of
    # features would cost as much as converting them. Touching the file forces a re-conversion.
    stat = os.stat(path)
    return {"name": os.path.basename(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


# --------------------------------------------------------------------------------------------
# Precomputed layout


def _read_caption_line(raw: bytes, path: str, line_number: int) -> str:
    if line_number == 1 and raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConversionError(f"{path}: line {line_number} is not UTF-8 ({exc.reason} at byte {exc.start}); "
                              "captions must be UTF-8 text") from exc
    caption = text.strip()
    if not caption:
        raise ConversionError(f"{path}: line {line_number} is an empty caption")
    return caption


def _scan_captions(path: str, shard_lines: int) -> tuple[int, list[int], str]:
    """(line count, byte offsets of lines 0, shard_lines, 2*shard_lines, ..., sha256) of a caption
    file, checking every line is non-empty UTF-8. Streams: memory stays flat."""
    digest = hashlib.sha256()
    offsets: list[int] = []
    offset = 0
    count = 0
    with open(path, "rb") as stream:
        # Split on b"\n" only: text mode would also split on \r, \x85 or U+2028 inside a caption.
        for raw in stream:
            if count % shard_lines == 0:
                offsets.append(offset)
            count += 1
            _read_caption_line(raw, path, count)
            digest.update(raw)
            offset += len(raw)
    return count, offsets, digest.hexdigest()


def _open_ims(path: str) -> np.ndarray:
    try:
        ims = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError as exc:
        raise ConversionError(f"{path}: features file not found") from exc
    except (ValueError, OSError) as exc:
        raise ConversionError(f"{path}: not a readable .npy array ({exc})") from exc
    if not isinstance(ims, np.ndarray) or ims.ndim != 3:
        raise ConversionError(f"{path}: expected an array (images, regions, feature_dim), got shape "
                              f"{getattr(ims, 'shape', None)}")
    if ims.dtype.kind != "f":
        raise ConversionError(f"{path}: features must be floating point, got {ims.dtype}")
    if ims.shape[0] == 0 or ims.shape[1] == 0 or ims.shape[2] == 0:
        raise ConversionError(f"{path}: empty array of shape {ims.shape}")
    return ims


def plan_precomp(precomp_dir: str, split: str, shard_size: int, dtype: str, coco_ids: bool = False) -> Plan:
    """Check a precomputed split (files, shapes, caption count and encoding) and plan its shards.

    ``coco_ids``: the split is the COCO 5K test split in the standard order (SCAN's ``testall``);
    each image's COCO id (``source_id``) and its captions' annotation ids (``caption_ids``) are
    written into the shards, from the eccv-caption package (data_shards/coco_annotations.py)."""
    ims_path = os.path.join(precomp_dir, f"{split}_ims.npy")
    caps_path = os.path.join(precomp_dir, f"{split}_caps.txt")
    if not os.path.isdir(precomp_dir):
        raise ConversionError(f"{precomp_dir}: precomputed-features directory not found")
    if not os.path.isfile(ims_path):
        raise ConversionError(f"{ims_path}: features file not found")
    if not os.path.isfile(caps_path):
        raise ConversionError(f"{caps_path}: captions file not found")
    ims = _open_ims(ims_path)
    rows = ims.shape[0]
    lines, offsets, caps_sha = _scan_captions(caps_path, EXPECTED_CAPTIONS * shard_size)
    if lines == EXPECTED_CAPTIONS * rows:
        rows_per_image = 1
    elif lines == rows and rows % EXPECTED_CAPTIONS == 0:
        rows_per_image = EXPECTED_CAPTIONS
    else:
        raise ConversionError(
            f"{caps_path}: {lines} caption lines, but {ims_path} has {rows} rows: expected "
            f"{EXPECTED_CAPTIONS * rows} lines (five captions per image, in image order)"
            + (f" or {rows} (one row per caption)" if rows % EXPECTED_CAPTIONS == 0 else ""))
    images = lines // EXPECTED_CAPTIONS
    if rows_per_image > 1:
        _check_repeated_rows(ims, ims_path, images, rows_per_image)
    boxes_path, sizes_path = _precomp_layout_files(precomp_dir, split, images, (int(ims.shape[1]), 4))
    image_ids, caption_ids = _coco_5k_ids(images, ims_path) if coco_ids else (None, None)
    source = PrecompSource(ims_path=ims_path, caps_path=caps_path, split=split, rows_per_image=rows_per_image,
                           boxes_path=boxes_path, sizes_path=sizes_path, image_ids=image_ids,
                           caption_ids=caption_ids)
    shards: list[PrecompShard | TsvShard] = []
    for number, start in enumerate(range(0, images, shard_size)):
        shards.append(PrecompShard(name=shard_name(split, number), start=start,
                                   stop=min(start + shard_size, images), caption_offset=offsets[number]))
    feature_shape = (int(ims.shape[1]), int(ims.shape[2]))
    conversion = {
        "converter": "precomp", "schema_version": SCHEMA_VERSION, "split": split, "dtype": dtype,
        "shard_size": shard_size, "feature_shape": list(feature_shape), "images": images,
        "rows_per_image": rows_per_image, "ims": _file_identity(ims_path),
        "captions": {"name": os.path.basename(caps_path), "sha256": caps_sha},
    }
    # Only when present, so that the fingerprint of a conversion without them stays what it was.
    if boxes_path is not None:
        conversion["boxes"] = _file_identity(boxes_path)
    if sizes_path is not None:
        conversion["sizes"] = _file_identity(sizes_path)
    if coco_ids:
        conversion["coco_ids"] = {"source": "eccv-caption coco_test_ids (COCO 5K test, standard order)"}
    conversion["fingerprint"] = _fingerprint(conversion)
    return Plan(split=split, source=source, shards=shards, feature_shape=feature_shape, images=images,
                conversion=conversion)


def _coco_5k_ids(images: int, ims_path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The COCO ids of the 5K test split in the standard order, as the shards store them (from the
    evaluation's annotations, the eccv-caption package, which is imported only when they are asked for)."""
    if images != COCO_5K_IMAGES:
        raise ConversionError(f"--coco-ids: {ims_path} has {images} images; the ids are those of the COCO 5K test "
                              f"split in the standard order ({COCO_5K_IMAGES} images, {5 * COCO_5K_IMAGES} captions, "
                              "the precomputed 'testall' split)")
    try:
        image_ids, caption_ids = coco_5k_test_ids()
    except AnnotationsUnavailableError as error:
        raise ConversionError(f"--coco-ids: {error}") from None
    return tuple(str(i) for i in image_ids), tuple(str(c) for c in caption_ids)


def _precomp_layout_files(precomp_dir: str, split: str, images: int,
                          box_shape: tuple[int, int]) -> tuple[str | None, str | None]:
    """The optional boxes and image-size companions of a precomputed split, checked against it."""
    found: list[str | None] = []
    for suffix, shape in (("ims_bbx", (images, *box_shape)), ("ims_size", (images, 2))):
        path = os.path.join(precomp_dir, f"{split}_{suffix}.npy")
        if not os.path.isfile(path):
            found.append(None)
            continue
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ConversionError(f"{path}: cannot be read as an .npy array: {error}") from None
        if not isinstance(array, np.ndarray) or tuple(array.shape) != shape:
            raise ConversionError(f"{path}: shape {getattr(array, 'shape', None)}, expected {shape} "
                                  f"(one row per image of {split}_ims.npy)")
        if array.dtype.kind not in "fiu":
            raise ConversionError(f"{path}: dtype {array.dtype} is not numeric")
        found.append(path)
    return found[0], found[1]


def _check_repeated_rows(ims: np.ndarray, path: str, images: int, rows_per_image: int) -> None:
    """In the one-row-per-caption variant the rows of an image must repeat; checked on a spread of
    images (first, last, evenly between) rather than all, which would read the file five times."""
    picks = sorted({int(i) for i in np.linspace(0, images - 1, num=min(images, REPEAT_CHECK_SAMPLES))})
    for image in picks:
        block = np.asarray(ims[image * rows_per_image:(image + 1) * rows_per_image])
        for r in range(1, rows_per_image):
            if not np.array_equal(block[0], block[r], equal_nan=True):
                row = image * rows_per_image
                raise ConversionError(
                    f"{path}: rows {row}..{row + rows_per_image - 1} (image {image}) differ; a file with one "
                    "row per caption must repeat each image's features five times")


def _precomp_records(source: PrecompSource, shard: PrecompShard, dtype: str) -> Iterator[ImageRecord]:
    ims = _open_ims(source.ims_path)  # memory-mapped: one image is read at a time
    boxes = np.load(source.boxes_path, mmap_mode="r") if source.boxes_path is not None else None
    sizes = np.load(source.sizes_path, mmap_mode="r") if source.sizes_path is not None else None
    with open(source.caps_path, "rb") as caps:
        caps.seek(shard.caption_offset)
        for index in range(shard.start, shard.stop):
            captions = []
            for k in range(EXPECTED_CAPTIONS):
                line_number = index * EXPECTED_CAPTIONS + k + 1
                raw = caps.readline()
                if not raw:
                    raise ConversionError(f"{source.caps_path}: ends before line {line_number} (changed during conversion?)")
                captions.append(_read_caption_line(raw, source.caps_path, line_number))
            row = index * source.rows_per_image
            regions = _cast_features(np.asarray(ims[row]), dtype, f"{source.ims_path}: image {index} (row {row})")
            image_boxes = None
            if boxes is not None:
                image_boxes = np.asarray(boxes[index], dtype=np.float32)
                if not np.isfinite(image_boxes).all():
                    raise ConversionError(f"{source.boxes_path}: image {index}: boxes contain NaN or Inf")
            size = (int(sizes[index][0]), int(sizes[index][1])) if sizes is not None else None
            ids = {}
            if source.image_ids is not None and source.caption_ids is not None:
                ids = {"source_id": source.image_ids[index],
                       "caption_ids": list(source.caption_ids[EXPECTED_CAPTIONS * index:EXPECTED_CAPTIONS * (index + 1)])}
            yield ImageRecord(key=sample_key(source.split, index), regions=regions, captions=captions,
                              split=source.split, index=index, boxes=image_boxes, size=size, **ids)


def _cast_features(features: np.ndarray, dtype: str, where: str) -> np.ndarray:
    if not np.isfinite(features).all():
        raise ConversionError(f"{where}: features contain NaN or Inf")
    with np.errstate(over="ignore"):  # overflow to Inf is detected below, with a better message
        cast = features.astype(dtype)
    if not np.isfinite(cast).all():
        raise ConversionError(f"{where}: features exceed the {dtype} range (|x| > {np.finfo(dtype).max}); "
                              "use --dtype float32")
    return cast


# --------------------------------------------------------------------------------------------
# Bottom-up-attention TSV + Karpathy JSON


def _raise_csv_field_limit() -> None:
    # BUTD lines hold ~400 KB of base64 per field; csv's default limit is 128 KB.
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # C long is 32-bit on some platforms
            limit //= 2


def _normalize_id(value: Any) -> str:
    text = str(value).strip()
    return str(int(text)) if text.isdigit() else text


def karpathy_image_id(image: dict[str, Any], mode: str) -> str:
    """The id that matches a Karpathy JSON image to a TSV `image_id` (both normalized: no leading zeros).

    auto: `cocoid` when present (COCO), else the number in `filename` (Flickr30K: 1000092795.jpg;
    also COCO_val2014_000000391895.jpg), else `imgid`.
    """
    if mode in ("auto", "cocoid") and "cocoid" in image:
        return _normalize_id(image["cocoid"])
    if mode == "cocoid":
        raise KeyError("cocoid")
    if mode in ("auto", "filename") and "filename" in image:
        match = re.search(r"(\d+)\.[A-Za-z0-9]+$", str(image["filename"]))
        if match:
            return _normalize_id(match.group(1))
        if mode == "filename":
            raise KeyError(f"a number in filename {image['filename']!r}")
    if mode in ("auto", "imgid") and "imgid" in image:
        return _normalize_id(image["imgid"])
    raise KeyError({"auto": "cocoid, filename or imgid"}.get(mode, mode))


def _load_karpathy(path: str, split: str, include_restval: bool, id_mode: str,
                   captions_per_image: int) -> list[tuple[str, str, tuple[str, ...]]]:
    """(image id, filename, captions) of the selected split, in the JSON's order."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
    except FileNotFoundError as exc:
        raise ConversionError(f"{path}: Karpathy JSON not found") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: not a UTF-8 JSON file ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ConversionError(f"{path}: expected a JSON object with an 'images' list (Karpathy format)")
    wanted = {split, "restval"} if include_restval else {split}
    selected = []
    seen: dict[str, str] = {}
    for position, image in enumerate(data["images"]):
        if not isinstance(image, dict) or image.get("split") not in wanted:
            continue
        filename = str(image.get("filename", f"images[{position}]"))
        where = f"{path}: image {filename}"
        try:
            image_id = karpathy_image_id(image, id_mode)
        except KeyError as exc:
            raise ConversionError(f"{where}: no {exc.args[0]} to match TSV image ids by (--image-id {id_mode})") from exc
        if image_id in seen:
            raise ConversionError(f"{where}: image id {image_id} also belongs to {seen[image_id]}")
        seen[image_id] = filename
        try:
            raws = [str(sentence["raw"]).strip() for sentence in image["sentences"]]
        except (KeyError, TypeError) as exc:
            raise ConversionError(f"{where}: needs sentences[].raw ({exc!r})") from exc
        if any(not raw for raw in raws):
            raise ConversionError(f"{where}: has an empty caption")
        if captions_per_image:
            if len(raws) < captions_per_image:
                raise ConversionError(f"{where}: has {len(raws)} captions, fewer than --captions-per-image "
                                      f"{captions_per_image}")
            raws = raws[:captions_per_image]
        elif not raws:
            raise ConversionError(f"{where}: has no captions")
        selected.append((image_id, filename, tuple(raws)))
    if not selected:
        present = sorted({str(i.get("split")) for i in data["images"] if isinstance(i, dict)})
        raise ConversionError(f"{path}: no images in split {split!r} (splits present: {', '.join(present)})")
    return selected


def _index_tsv(paths: Sequence[str], wanted: set[str]) -> dict[str, tuple[int, int, int]]:
    """image_id -> (file, byte offset of its line, num_boxes) for the wanted ids.

    One sequential pass per file: the TSV is not indexed and not in the JSON's order, so the
    converter seeks to each image afterwards. Only the first four (small) fields are parsed here.
    """
    index: dict[str, tuple[int, int, int]] = {}
    duplicates = 0
    for file_number, path in enumerate(paths):
        try:
            stream = open(path, "rb")
        except FileNotFoundError as exc:
            raise ConversionError(f"{path}: TSV file not found") from exc
        with stream:
            offset = 0
            for line_number, raw in enumerate(stream, start=1):
                if raw.strip():
                    parts = raw.split(b"\t", 4)
                    try:
                        image_id = _normalize_id(parts[0].decode("ascii"))
                        num_boxes = int(parts[3])
                    except (IndexError, ValueError, UnicodeDecodeError) as exc:
                        raise ConversionError(f"{path}: line {line_number} is not a bottom-up-attention record "
                                              f"(tab-separated {', '.join(TSV_FIELDS)})") from exc
                    if image_id in wanted:
                        if image_id in index:
                            duplicates += 1  # e.g. overlapping trainval files: the first one wins
                        else:
                            index[image_id] = (file_number, offset, num_boxes)
                offset += len(raw)
    if duplicates:
        logger.warning("%d images appear more than once in the TSV files; the first occurrence is used", duplicates)
    return index


def _read_tsv_record(path: str, offset: int, expected_id: str, feature_dim: int | None) -> dict[str, Any]:
    """Parse the TSV line at `offset` (csv, tab-delimited, base64 float32 arrays)."""
    with open(path, "rb") as stream:
        stream.seek(offset)
        raw = stream.readline()
    where = f"{path}: image {expected_id}"
    try:
        row = next(csv.DictReader(io.StringIO(raw.decode("ascii")), delimiter="\t", fieldnames=TSV_FIELDS))
        image_id = _normalize_id(row["image_id"])
        num_boxes = int(row["num_boxes"])
        width, height = int(float(row["image_w"])), int(float(row["image_h"]))
        boxes = np.frombuffer(base64.b64decode(row["boxes"]), dtype=np.float32)
        features = np.frombuffer(base64.b64decode(row["features"]), dtype=np.float32)
    except (StopIteration, KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{where}: unreadable record at byte {offset} ({exc!r})") from exc
    if image_id != expected_id:
        raise ConversionError(f"{where}: byte {offset} holds image {image_id} (the file changed during conversion?)")
    if num_boxes <= 0 or boxes.size != num_boxes * 4:
        raise ConversionError(f"{where}: boxes hold {boxes.size} values, expected num_boxes {num_boxes} × 4")
    if features.size == 0 or features.size % num_boxes:
        raise ConversionError(f"{where}: features hold {features.size} values, not a multiple of num_boxes {num_boxes}")
    dim = features.size // num_boxes
    if feature_dim is not None and dim != feature_dim:
        raise ConversionError(f"{where}: feature dimension {dim}, but other images have {feature_dim}")
    return {"image_id": image_id, "size": (width, height), "boxes": boxes.reshape(num_boxes, 4),
            "features": features.reshape(num_boxes, dim)}


def plan_tsv(tsv_paths: Sequence[str], karpathy_path: str, split: str, include_restval: bool,
             regions: int | None, id_mode: str, captions_per_image: int, shard_size: int, dtype: str) -> Plan:
    """Select the split from the JSON, index the TSV files, check box counts; plan the shards."""
    _raise_csv_field_limit()
    if include_restval and split != "train":
        raise ConversionError(f"--include-restval adds the 'restval' images to split 'train', not {split!r}")
    for path in tsv_paths:
        if not os.path.isfile(path):
            raise ConversionError(f"{path}: TSV file not found")
    if not os.path.isfile(karpathy_path):
        raise ConversionError(f"{karpathy_path}: Karpathy JSON not found")
    selected = _load_karpathy(karpathy_path, split, include_restval, id_mode, captions_per_image)
    index = _index_tsv(tsv_paths, {image_id for image_id, _, _ in selected})
    missing = [(image_id, filename) for image_id, filename, _ in selected if image_id not in index]
    if missing:
        image_id, filename = missing[0]
        raise ConversionError(f"image {image_id} ({filename}) of {karpathy_path} split {split!r} is in none of the "
                              f"TSV files {', '.join(tsv_paths)} ({len(missing)} of {len(selected)} images missing)")
    first_id = selected[0][0]
    first_count = index[first_id][2]
    if regions is None:
        for image_id, filename, _ in selected:
            count = index[image_id][2]
            if count != first_count:
                low = min(index[i][2] for i, _, _ in selected)
                raise ConversionError(
                    f"{tsv_paths[index[image_id][0]]}: image {image_id} ({filename}) has {count} boxes, but image "
                    f"{first_id} has {first_count}; shards need a fixed number of regions: pass --regions K "
                    f"to keep each image's first K boxes (K <= {low}, the smallest count)")
        regions = first_count
    else:
        for image_id, filename, _ in selected:
            count = index[image_id][2]
            if count < regions:
                raise ConversionError(f"{tsv_paths[index[image_id][0]]}: image {image_id} ({filename}) has {count} "
                                      f"boxes, fewer than --regions {regions} (padding is not supported)")
    file_number, offset, _ = index[first_id]
    feature_dim = _read_tsv_record(tsv_paths[file_number], offset, first_id, None)["features"].shape[1]
    items = [TsvItem(index=i, image_id=image_id, file=index[image_id][0], offset=index[image_id][1], captions=caps)
             for i, (image_id, _, caps) in enumerate(selected)]
    shards: list[PrecompShard | TsvShard] = [
        TsvShard(name=shard_name(split, number), items=tuple(items[start:start + shard_size]))
        for number, start in enumerate(range(0, len(items), shard_size))]
    source = TsvSource(tsv_paths=tuple(os.path.abspath(p) for p in tsv_paths), split=split, regions=regions,
                       feature_dim=feature_dim)
    conversion = {
        "converter": "butd-tsv", "schema_version": SCHEMA_VERSION, "split": split, "dtype": dtype,
        "shard_size": shard_size, "feature_shape": [regions, feature_dim], "images": len(items),
        "include_restval": include_restval, "image_id": id_mode, "captions_per_image": captions_per_image,
        "tsv": [_file_identity(p) for p in tsv_paths],
        "karpathy": {"name": os.path.basename(karpathy_path), "sha256": sha256_file(karpathy_path)},
    }
    conversion["fingerprint"] = _fingerprint(conversion)
    return Plan(split=split, source=source, shards=shards, feature_shape=(regions, feature_dim), images=len(items),
                conversion=conversion)


def _tsv_records(source: TsvSource, shard: TsvShard, dtype: str) -> Iterator[ImageRecord]:
    for item in shard.items:
        path = source.tsv_paths[item.file]
        record = _read_tsv_record(path, item.offset, item.image_id, source.feature_dim)
        where = f"{path}: image {item.image_id}"
        regions = _cast_features(record["features"][:source.regions], dtype, where)
        boxes = record["boxes"][:source.regions].copy()
        if not np.isfinite(boxes).all():
            raise ConversionError(f"{where}: boxes contain NaN or Inf")
        yield ImageRecord(key=sample_key(source.split, item.index), regions=regions, captions=list(item.captions),
                          split=source.split, index=item.index, boxes=boxes, size=record["size"],
                          source_id=item.image_id)


# --------------------------------------------------------------------------------------------
# Writing


def _progress_name(shard: str) -> str:
    return f"{PROGRESS_DIR}/{shard}.json"


def _read_progress(location: Location, shard: str, fingerprint: str) -> ShardInfo | None:
    """The completion record of `shard` if it belongs to this conversion."""
    name = _progress_name(shard)
    try:
        record = json.loads(location.read_bytes(name))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        logger.warning("%s: unreadable completion record, ignoring it", location.child_url(name))
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    try:
        return ShardInfo(name=shard, samples=int(record["samples"]), sha256=str(record["sha256"]))
    except (KeyError, TypeError, ValueError):
        return None


def write_shard(job: ShardJob) -> ShardDone:
    """Write one shard (or skip it when a complete copy is already there); runs in a worker."""
    location = open_location(job.output, job.storage_options)
    name = job.shard.name
    known = _read_progress(location, name, job.fingerprint) or job.known
    expected_captions = _shard_captions(job.shard)
    if known is not None:
        if location.exists(name):
            actual = location.sha256(name)
            if actual == known.sha256:
                logger.info("skip %s: complete, sha256 matches", name)
                return ShardDone(info=known, captions=expected_captions, skipped=True)
            logger.warning("%s: sha256 %s does not match its record %s; rewriting it", name, actual[:12], known.sha256[:12])
        else:
            logger.warning("%s: recorded as complete but missing; rewriting it", name)
    # webdataset imports torch (seconds): only a process that writes a shard pays for it.
    from webdataset import TarWriter

    if isinstance(job.source, PrecompSource) and isinstance(job.shard, PrecompShard):
        records = _precomp_records(job.source, job.shard, job.dtype)
    elif isinstance(job.source, TsvSource) and isinstance(job.shard, TsvShard):
        records = _tsv_records(job.source, job.shard, job.dtype)
    else:  # pragma: no cover - plans pair them
        raise TypeError(f"mismatched source {type(job.source).__name__} and shard {type(job.shard).__name__}")
    samples = captions = 0
    with location.atomic_writer(name) as (stream, result):
        with TarWriter(stream, user=TAR_USER, group=TAR_USER, mode=TAR_MODE, mtime=TAR_MTIME, encoder=False) as tar:
            for record in records:
                tar.write(encode_record(record, job.dtype))
                samples += 1
                captions += len(record.captions)
    info = ShardInfo(name=name, samples=samples, sha256=result.sha256)
    # The completion record is written only after the shard is published: its presence means done.
    progress = {"samples": samples, "captions": captions, "sha256": result.sha256, "fingerprint": job.fingerprint}
    location.write_bytes_atomic(_progress_name(name), (json.dumps(progress, indent=1) + "\n").encode())
    logger.info("wrote %s: %d images, %d bytes", name, samples, result.size)
    return ShardDone(info=info, captions=captions, skipped=False)


def _shard_captions(shard: PrecompShard | TsvShard) -> int:
    if isinstance(shard, PrecompShard):
        return (shard.stop - shard.start) * EXPECTED_CAPTIONS
    return sum(len(item.captions) for item in shard.items)


def _init_worker(level: int) -> None:
    # Spawned workers start with an unconfigured logging module.
    logging.basicConfig(level=level, format="%(message)s")


def _existing_manifest(location: Location) -> Manifest | None:
    if not location.exists(MANIFEST_NAME):
        return None
    try:
        return Manifest.from_json(location.read_text(MANIFEST_NAME), location.child_url(MANIFEST_NAME))
    except ShardFormatError as exc:
        raise ConversionError(f"{exc}; remove it or pass --overwrite") from exc


def convert(plan: Plan, output: str, storage_options: dict[str, Any], dtype: str, workers: int = 1,
            overwrite: bool = False) -> Manifest:
    """Write the planned shards to `output` (resuming), then the manifest; returns the manifest."""
    location = open_location(output, storage_options)
    location.makedirs()
    previous = _existing_manifest(location)
    known: dict[str, ShardInfo] = {}
    if previous is not None:
        if previous.conversion.get("fingerprint") == plan.fingerprint:
            known = {info.name: info for info in previous.shards}
        elif not overwrite:
            raise ConversionError(_difference(location.child_url(MANIFEST_NAME), previous.conversion, plan.conversion))
        else:
            # Readers must not see the old manifest describe shards that are being replaced.
            logger.warning("--overwrite: removing %s of a different conversion", location.child_url(MANIFEST_NAME))
            location.remove(MANIFEST_NAME)
    jobs = [ShardJob(output=output, storage_options=storage_options, dtype=dtype, fingerprint=plan.fingerprint,
                     source=plan.source, shard=shard, known=known.get(shard.name)) for shard in plan.shards]
    done = _run_jobs(jobs, workers)
    written = sum(not d.skipped for d in done)
    planned = {shard.name for shard in plan.shards}
    stale = [name for name in location.list(".tar") if name not in planned and _is_split_shard(name, plan.split)]
    if stale and overwrite:
        for name in stale:
            logger.warning("--overwrite: removing %s, not part of this conversion", name)
            location.remove(name)
    elif stale:
        logger.warning("%s holds shards that are not part of this conversion: %s", location.url, ", ".join(stale))
    manifest = Manifest(feature_shape=plan.feature_shape, feature_dtype=dtype, images=sum(d.info.samples for d in done),
                        captions=sum(d.captions for d in done), shards=[d.info for d in done], split=plan.split,
                        conversion=plan.conversion)
    if manifest.images != plan.images:  # pragma: no cover - a bug, not bad input
        raise RuntimeError(f"wrote {manifest.images} images, planned {plan.images}")
    location.write_bytes_atomic(MANIFEST_NAME, manifest.to_json().encode())
    progress = location.child(PROGRESS_DIR)
    for name in progress.list(".json"):
        progress.remove(name)
    progress.remove_if_empty()
    logger.info("%s: %d shards (%d written, %d already complete), %d images, %d captions, features %s %s",
                location.url, len(done), written, len(done) - written, manifest.images, manifest.captions,
                plan.feature_shape, dtype)
    return manifest


def _is_split_shard(name: str, split: str) -> bool:
    return re.fullmatch(re.escape(split) + r"-\d{6}\.tar", name) is not None


def _difference(where: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if k != "fingerprint" and old.get(k) != new.get(k)]
    detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) or "unknown conversion"
    return (f"{where} describes a different conversion ({detail}); choose another output or pass --overwrite "
            "to replace it")


def _run_jobs(jobs: list[ShardJob], workers: int) -> list[ShardDone]:
    if workers <= 1 or len(jobs) <= 1:
        return [write_shard(job) for job in jobs]
    # spawn, not fork: a forked child would inherit the parent's s3fs event loop and threads.
    context = multiprocessing.get_context("spawn")
    results: list[ShardDone | None] = [None] * len(jobs)
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context,
                                                initializer=_init_worker,
                                                initargs=(logging.getLogger().getEffectiveLevel(),)) as pool:
        futures = {pool.submit(write_shard, job): i for i, job in enumerate(jobs)}
        try:
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
        except concurrent.futures.BrokenExecutor as exc:  # BrokenProcessPool
            pool.shutdown(wait=True, cancel_futures=True)
            raise ConversionError(f"a worker process died abruptly (killed, out of memory?): {exc}; finished "
                                  "shards are kept, re-run to resume") from exc
        except BaseException:
            # Finished shards stay (with their completion records); a re-run resumes from them.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return [r for r in results if r is not None]


# --------------------------------------------------------------------------------------------
# Command line


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python data_shards/convert.py",
        description="Convert precomputed region features and captions into WebDataset shards.",
        epilog="S3 outputs read AWS_ENDPOINT_URL(_S3), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION "
               "from the environment. Format and resume behaviour: data_shards/README.md.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--precomp", metavar="DIR", help="directory with {split}_ims.npy and {split}_caps.txt")
    source.add_argument("--tsv", metavar="FILE", action="append",
                        help="bottom-up-attention TSV file (repeat for several); needs --karpathy")
    parser.add_argument("--karpathy", metavar="JSON", help="Karpathy-style dataset JSON (captions and splits)")
    parser.add_argument("--split", required=True, help="split name (precomp: file prefix; TSV: Karpathy split)")
    parser.add_argument("--output", required=True, metavar="OUT", help="local directory or s3://bucket/prefix")
    parser.add_argument("--shard-size", type=_positive, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--dtype", choices=FEATURE_DTYPES, default="float16", help="stored feature dtype")
    parser.add_argument("--workers", type=_positive, default=1, help="processes writing shards (default 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an OUT that holds a different conversion")
    parser.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    parser.add_argument("--coco-ids", action="store_true",
                        help="--precomp of the COCO 5K test split (testall) in the standard order: write each "
                        "image's COCO id and its captions' annotation ids (from eccv-caption), which the eccv "
                        "and cxc evaluation protocols rank by")
    tsv = parser.add_argument_group("TSV source")
    tsv.add_argument("--include-restval", action="store_true",
                     help="with --split train: also take the Karpathy 'restval' images, in JSON order")
    tsv.add_argument("--regions", type=_positive, metavar="K",
                     help="keep each image's first K boxes (required when box counts vary)")
    tsv.add_argument("--image-id", choices=("auto", "cocoid", "filename", "imgid"), default="auto",
                     help="JSON field matched to the TSV image_id (auto: cocoid, else filename number, else imgid)")
    tsv.add_argument("--captions-per-image", type=int, default=EXPECTED_CAPTIONS, metavar="N",
                     help="keep the first N captions of each image (default 5; 0 keeps all)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the converter; 0 on success, 1 with one line on stderr for bad input, 2 for bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(message)s")
    if args.tsv and not args.karpathy:
        parser.error("--tsv needs --karpathy")
    if args.precomp and (args.karpathy or args.include_restval or args.regions):
        parser.error("--karpathy, --include-restval and --regions apply to --tsv only")
    if args.coco_ids and not args.precomp:
        parser.error("--coco-ids applies to --precomp only (TSV shards carry the COCO image ids already)")
    if args.captions_per_image < 0:
        parser.error("--captions-per-image must be >= 0")
    try:
        split = check_split_name(args.split)
        if args.precomp:
            plan = plan_precomp(args.precomp, split, args.shard_size, args.dtype, coco_ids=args.coco_ids)
        else:
            plan = plan_tsv(args.tsv, args.karpathy, split, args.include_restval, args.regions, args.image_id,
                            args.captions_per_image, args.shard_size, args.dtype)
        options = s3_storage_options(endpoint_url=args.endpoint_url) if is_s3_url(args.output) else {}
        if options.get("endpoint_url"):
            logger.info("S3 endpoint %s", options["endpoint_url"])
        convert(plan, args.output, options, args.dtype, workers=args.workers, overwrite=args.overwrite)
    except (ConversionError, ShardFormatError, StorageError) as exc:
        print(f"convert: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # unreachable endpoint, permissions, full disk: the environment, not a bug
        print(f"convert: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
