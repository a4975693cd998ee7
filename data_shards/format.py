"""The shard format (schema version 1): one WebDataset sample per image, plus a manifest.

A sample is a group of tar members sharing a key (see data_shards/README.md):

    <key>.regions.npy    (regions, feature_dim) float16 (default) or float32
    <key>.boxes.npy      optional (regions, 4) float32: x1, y1, x2, y2 in pixels
    <key>.size.json      optional {"width": W, "height": H}
    <key>.captions.json  the image's captions, raw text, in source order
    <key>.meta.json      {"split": ..., "index": position of the image in the source split,
                          "source_id": the image's id in its source dataset (optional),
                          "caption_ids": the captions' ids there, one per caption (optional;
                          e.g. COCO annotation ids, which the eccv / cxc protocols rank by)}

`manifest.json` beside the shards records the schema version, the feature shape and dtype, the
number of images and captions, and each shard's name, sample count and sha256.

This module knows nothing of the model: it turns records into bytes and back, and checks them.
"""

from __future__ import annotations

import io
import json
import math
import re
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
FEATURE_DTYPES = ("float16", "float32")
EXPECTED_CAPTIONS = 5
REQUIRED_MEMBERS = ("regions.npy", "captions.json", "meta.json")
OPTIONAL_MEMBERS = ("boxes.npy", "size.json")
# Split names become part of keys and shard names: no dots (WebDataset splits member names at the
# first dot of the basename), no slashes, nothing a shell or URL would mangle.
SPLIT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext


class ShardFormatError(ValueError):
    """A shard, sample or manifest does not follow the format; the message names where."""


@dataclass
class ImageRecord:
    """One image with everything the shards store about it."""

    key: str
    regions: np.ndarray  # (regions, feature_dim)
    captions: list[str]
    split: str
    index: int
    boxes: np.ndarray | None = None  # (regions, 4) float32
    size: tuple[int, int] | None = None  # (width, height)
    source_id: str | None = None  # the image's id in its source dataset (e.g. the COCO id), if any
    caption_ids: list[str] | None = None  # the captions' ids in the source dataset, one per caption, if any


def shard_name(split: str, index: int) -> str:
    """The file name of shard `index` (0-based) of `split`, e.g. `test-000003.tar`."""
    return f"{split}-{index:06d}.tar"


def check_split_name(split: str) -> str:
    """`split` if it is usable in keys and shard names; ShardFormatError otherwise."""
    if not SPLIT_NAME_PATTERN.match(split):
        raise ShardFormatError(f"split name {split!r} must match {SPLIT_NAME_PATTERN.pattern} "
                               "(letters, digits, '_' and '-'; no dots or slashes)")
    return split


def sample_key(split: str, index: int) -> str:
    """The key of image `index` (0-based position in its source split): `{split}-{index:07d}`.

    Stable across re-conversions of the same source, unique within a split, dot-free.
    """
    return f"{check_split_name(split)}-{index:07d}"


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, member suffix) of a tar member name, split at the first dot of the basename exactly
    as WebDataset groups members into samples; None for names without a dot."""
    match = _MEMBER_NAME.match(name)
    return (match.group(1), match.group(2)) if match else None


def _meta(record: ImageRecord) -> dict[str, Any]:
    meta: dict[str, Any] = {"split": record.split, "index": int(record.index)}
    if record.source_id is not None:
        meta["source_id"] = str(record.source_id)
    if record.caption_ids is not None:
        if len(record.caption_ids) != len(record.captions):
            raise ShardFormatError(f"sample {record.key}: {len(record.caption_ids)} caption ids for "
                                   f"{len(record.captions)} captions")
        meta["caption_ids"] = [str(c) for c in record.caption_ids]
    return meta


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_record(record: ImageRecord, dtype: str = "float16") -> dict[str, Any]:
    """A record as a WebDataset sample dict (`__key__` plus member name -> bytes)."""
    if dtype not in FEATURE_DTYPES:
        raise ShardFormatError(f"feature dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
    if "." in record.key or "/" in record.key or not record.key:
        # WebDataset splits member names at the first dot of the basename.
        raise ShardFormatError(f"sample key {record.key!r} must be non-empty without '.' or '/'")
    sample: dict[str, Any] = {
        "__key__": record.key,
        "regions.npy": _npy_bytes(np.ascontiguousarray(record.regions, dtype=dtype)),
        "captions.json": json.dumps(list(record.captions), ensure_ascii=False).encode("utf-8"),
        "meta.json": json.dumps(_meta(record), ensure_ascii=False).encode("utf-8"),
    }
    if record.boxes is not None:
        sample["boxes.npy"] = _npy_bytes(np.ascontiguousarray(record.boxes, dtype=np.float32))
    if record.size is not None:
        sample["size.json"] = json.dumps({"width": int(record.size[0]), "height": int(record.size[1])}).encode()
    return sample


# Parsed .npy headers by their exact bytes: (dtype, shape, fortran_order). Every sample of a split
# has the same few headers, and numpy's header parser (ast.literal_eval) costs more than the rest
# of decoding an image; identical bytes parse identically, so the cache cannot change a result.
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}
_NPY_HEADERS_MAX = 256  # distinct headers kept; beyond that, parse without caching (flat memory)
_NPY_MAGIC = b"\x93NUMPY"


def _npy_header(data: bytes | bytearray | memoryview) -> tuple[int, tuple[np.dtype, tuple[int, ...], bool]] | None:
    """(offset of the array data, parsed header) of a version 1.0/2.0 .npy without objects, or
    None for anything else (left to np.load, which raises the same errors as before)."""
    if len(data) < 12 or bytes(data[:6]) != _NPY_MAGIC or data[7] != 0 or data[6] not in (1, 2):
        return None
    start = 10 if data[6] == 1 else 12
    end = start + int.from_bytes(data[8:start], "little")
    if end > len(data):
        return None
    key = bytes(data[:end])
    parsed = _NPY_HEADERS.get(key)
    if parsed is None:
        stream = io.BytesIO(key)
        try:
            version = np.lib.format.read_magic(stream)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = reader(stream)
        except Exception:  # noqa: BLE001 - np.load reports it (unreadable .npy)
            return None
        if dtype.hasobject or dtype.itemsize == 0:
            return None  # np.load refuses objects (allow_pickle=False); zero-size items: rare, left to it
        parsed = (dtype, tuple(shape), bool(fortran_order))
        if len(_NPY_HEADERS) < _NPY_HEADERS_MAX:
            _NPY_HEADERS[key] = parsed
    return end, parsed


def _load_npy(data: bytes | bytearray | memoryview, where: str) -> np.ndarray:
    """The array of a .npy member, as np.load(allow_pickle=False) reads it.

    Fast path (the common headers): the array is read straight from `data`, as a view when `data`
    is writable (the reader's member buffers: the features are not copied again) and as a copy
    otherwise (bytes are immutable; np.load returns writable arrays). Anything unusual, short data
    included, goes through np.load itself, so errors are unchanged.
    """
    header = _npy_header(data)
    if header is not None:
        offset, (dtype, shape, fortran_order) = header
        count = math.prod(shape)
        if len(data) - offset >= count * dtype.itemsize:
            array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
            if memoryview(data).readonly:
                array = array.copy()
            if fortran_order:
                return array.reshape(shape[::-1]).transpose()
            return array.reshape(shape)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # numpy raises several types for corrupt headers
        raise ShardFormatError(f"{where}: unreadable .npy ({exc})") from exc


_finite_scratch = threading.local()  # per thread: a uint16 buffer for _all_finite


def _all_finite(values: np.ndarray) -> bool:
    """np.isfinite(values).all(), fast for native float16: numpy has no vectorized isfinite for
    half floats (a scalar loop, ~2 ns per value: 150 us per 36 x 2048 image), whereas the exponent
    bits can be checked with integer ops: a half is NaN or Inf exactly when its five exponent bits
    are all ones, i.e. (bits & 0x7fff) >= 0x7c00 (12 us per image)."""
    if values.dtype == np.float16 and values.dtype.isnative and values.size:
        bits = np.ascontiguousarray(values).reshape(-1).view(np.uint16)
        # A reused buffer for the masked bits: a fresh temporary of an image's size (147 KB) is a
        # new mmap'ed allocation each time, whose page faults cost more than the check.
        scratch = getattr(_finite_scratch, "buffer", None)
        if scratch is None or scratch.size < bits.size:
            scratch = _finite_scratch.buffer = np.empty(bits.size, dtype=np.uint16)
        masked = np.bitwise_and(bits, 0x7FFF, out=scratch[: bits.size])
        return int(masked.max()) < 0x7C00
    return bool(np.isfinite(values).all())


def _load_json(data: bytes | bytearray | memoryview, where: str) -> Any:
    try:
        return json.loads(str(data, "utf-8"))  # str(): any bytes-like member, as the reader may hand over
    except UnicodeDecodeError as exc:
        raise ShardFormatError(f"{where}: not UTF-8 ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise ShardFormatError(f"{where}: invalid JSON ({exc})") from exc


def decode_sample(sample: dict[str, Any]) -> ImageRecord:
    """Parse a raw WebDataset sample (member bytes) into a record; structural errors raise
    ShardFormatError naming the shard (`__url__`) and key."""
    key = sample.get("__key__", "?")
    where = f"{sample.get('__url__', '?')}: sample {key}"
    for member in ("regions.npy", "captions.json", "meta.json"):
        if member not in sample:
            raise ShardFormatError(f"{where}: missing {member}")
    captions = _load_json(sample["captions.json"], f"{where} captions.json")
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ShardFormatError(f"{where}: captions.json must be a list of strings")
    meta = _load_json(sample["meta.json"], f"{where} meta.json")
    if not isinstance(meta, dict) or "split" not in meta or "index" not in meta:
        raise ShardFormatError(f"{where}: meta.json must hold 'split' and 'index'")
    if not isinstance(meta["index"], int) or isinstance(meta["index"], bool):
        raise ShardFormatError(f"{where}: meta.json index must be an integer, got {meta['index']!r}")
    boxes = _load_npy(sample["boxes.npy"], f"{where} boxes.npy") if "boxes.npy" in sample else None
    size = None
    if "size.json" in sample:
        s = _load_json(sample["size.json"], f"{where} size.json")
        try:
            size = (int(s["width"]), int(s["height"]))
        except (TypeError, KeyError, ValueError) as exc:
            raise ShardFormatError(f"{where}: size.json must hold integer 'width' and 'height' ({exc!r})") from exc
    source_id = meta.get("source_id")
    caption_ids = meta.get("caption_ids")
    if caption_ids is not None:
        if (not isinstance(caption_ids, list) or len(caption_ids) != len(captions)
                or not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in caption_ids)):
            raise ShardFormatError(f"{where}: meta.json caption_ids must be a list of {len(captions)} ids "
                                   f"(strings or integers, one per caption), got {caption_ids!r:.80}")
        caption_ids = [str(c) for c in caption_ids]
    return ImageRecord(key=key, regions=_load_npy(sample["regions.npy"], f"{where} regions.npy"),
                       captions=captions, split=str(meta["split"]), index=meta["index"],
                       boxes=boxes, size=size, source_id=None if source_id is None else str(source_id),
                       caption_ids=caption_ids)


def record_problems(record: ImageRecord, feature_shape: tuple[int, int], feature_dtype: str) -> list[str]:
    """What is wrong with a decoded record, as short phrases (empty: nothing).

    A caption count other than five is not a problem (it is counted by the reader instead).
    """
    problems = []
    if tuple(record.regions.shape) != tuple(feature_shape):
        problems.append(f"feature shape {tuple(record.regions.shape)} != manifest {tuple(feature_shape)}")
    if record.regions.dtype != np.dtype(feature_dtype):
        problems.append(f"feature dtype {record.regions.dtype} != manifest {feature_dtype}")
    if record.regions.dtype.kind == "f" and not _all_finite(record.regions):
        problems.append("features contain NaN or Inf")
    if record.boxes is not None:
        if record.boxes.shape != (record.regions.shape[0], 4):
            problems.append(f"boxes shape {record.boxes.shape} != ({record.regions.shape[0]}, 4)")
        if record.boxes.dtype != np.float32:
            problems.append(f"boxes dtype {record.boxes.dtype} != float32")
        elif not np.isfinite(record.boxes).all():
            problems.append("boxes contain NaN or Inf")
    if not record.captions:
        problems.append("no captions")
    for i, caption in enumerate(record.captions):
        if not caption.strip():
            problems.append(f"caption {i} is empty")
    return problems


@dataclass
class ShardInfo:
    """One shard as the manifest lists it: file name, number of samples, sha256 of its bytes."""

    name: str
    samples: int
    sha256: str


@dataclass
class Manifest:
    """The description of a sharded split, stored as manifest.json beside its shards."""

    feature_shape: tuple[int, int]
    feature_dtype: str
    images: int = 0
    captions: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    split: str = ""
    schema_version: int = SCHEMA_VERSION
    # How the shards were made (converter, inputs, options, fingerprint); informational, and the
    # converter compares the fingerprint to refuse mixing two different conversions in one place.
    conversion: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["feature_shape"] = list(self.feature_shape)
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_NAME) -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ShardFormatError(f"{where}: invalid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ShardFormatError(f"{where}: must be a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ShardFormatError(f"{where}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
        for key in ("feature_shape", "feature_dtype", "images", "captions", "shards"):
            if key not in data:
                raise ShardFormatError(f"{where}: missing key {key!r}")
        shape = data["feature_shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(x, int) and x > 0 for x in shape)):
            raise ShardFormatError(f"{where}: feature_shape must be [regions, feature_dim], got {shape!r}")
        if data["feature_dtype"] not in FEATURE_DTYPES:
            raise ShardFormatError(f"{where}: feature_dtype must be one of {FEATURE_DTYPES}, got {data['feature_dtype']!r}")
        try:
            shards = [ShardInfo(name=str(s["name"]), samples=int(s["samples"]), sha256=str(s["sha256"]))
                      for s in data["shards"]]
        except (TypeError, KeyError, ValueError) as exc:
            raise ShardFormatError(f"{where}: each shard needs name, samples, sha256 ({exc})") from exc
        conversion = data.get("conversion", {})
        if not isinstance(conversion, dict):
            raise ShardFormatError(f"{where}: conversion must be a JSON object")
        manifest = cls(feature_shape=(shape[0], shape[1]), feature_dtype=data["feature_dtype"],
                       images=int(data["images"]), captions=int(data["captions"]), shards=shards,
                       split=str(data.get("split", "")), conversion=conversion)
        if sum(s.samples for s in shards) != manifest.images:
            raise ShardFormatError(f"{where}: shard sample counts sum to {sum(s.samples for s in shards)}, "
                                   f"but images = {manifest.images}")
        return manifest


def float16_tolerance(values: np.ndarray) -> float:
    """The largest rounding error of storing `values` (finite, within float16 range) as float16:
    half a unit in the last place at the largest magnitude (relative 2**-11), and never less than
    half the subnormal spacing (2**-25), which bounds the error of values below 2**-14."""
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if peak == 0.0:
        return 0.0
    return max(2.0 ** (math.floor(math.log2(peak)) - 11), 2.0 ** -25)
