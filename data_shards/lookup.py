"""Looking things up in a split by sample key: what the interpretation and retrieval tools need.

* :func:`split_index`: every image's key, captions and source id in source order (the order the
  evaluation reader yields), reading only the small `captions.json` and `meta.json` members of each
  shard (the features stream past without being decoded).
* :func:`read_records`: the full records (features, boxes, size, captions) of a few keys, reading
  shards in manifest order and stopping once every key is found.

Unknown keys are an error naming them and the split.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from webdataset.tariterators import group_by_keys

from data_shards.format import MANIFEST_NAME, ImageRecord, ShardFormatError
from data_shards.shard_reader import ShardReader, ShardStream, open_shard, shard_files
from data_shards.split import SplitSpec, read_split
from data_shards.storage import open_location

_INDEX_MEMBERS = ("captions.json", "meta.json")


class UnknownKeyError(KeyError):
    """Sample keys that the split does not hold; the message names them and the split."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class SplitIndex:
    """The images of a split in source order: keys, captions and source ids."""

    location: str
    keys: tuple[str, ...]
    captions: tuple[tuple[str, ...], ...]  # each image's captions in stored order
    source_ids: tuple[str | None, ...]
    manifest_sha256: str  # identifies the split's content (caches key on it)

    def __len__(self) -> int:
        return len(self.keys)

    def position(self, key: str) -> int:
        """The image's position in source order."""
        positions = self._positions()
        if key not in positions:
            raise UnknownKeyError(f"{self.location}: no sample with key {key!r}")
        return positions[key]

    def positions(self, keys: Iterable[str]) -> list[int]:
        """Positions of several keys; every unknown key is named in one error."""
        keys = list(keys)
        table = self._positions()
        missing = [k for k in keys if k not in table]
        if missing:
            raise UnknownKeyError(f"{self.location}: no sample with key {', '.join(map(repr, missing))} "
                                  f"(the split holds {len(self.keys)} images, keys like {self.keys[0]!r})")
        return [table[k] for k in keys]

    def _positions(self) -> dict[str, int]:
        cached = self.__dict__.get("_table")
        if cached is None:
            cached = {key: i for i, key in enumerate(self.keys)}
            object.__setattr__(self, "_table", cached)
        return cached


def manifest_digest(location: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """sha256 of the split's manifest.json (which lists every shard's sha256)."""
    return hashlib.sha256(open_location(location, storage_options).read_bytes(MANIFEST_NAME)).hexdigest()


def split_index(location: str, storage_options: Mapping[str, Any] | None = None) -> SplitIndex:
    """Keys, captions and source ids of every image of the split at `location`, in source order."""
    spec = read_split(location, storage_options=storage_options)
    keys: list[str] = []
    captions: list[tuple[str, ...]] = []
    source_ids: list[str | None] = []
    for shard in spec.shards:
        with open_shard(shard.url, spec.storage_options) as raw:
            stream = ShardStream(raw, shard.url, hashing=False)
            files = shard_files(stream, shard.url, lambda name: name.endswith(_INDEX_MEMBERS))
            for sample in group_by_keys(files):
                key = sample["__key__"]
                try:
                    texts = json.loads(sample["captions.json"])
                    meta = json.loads(sample["meta.json"])
                except (KeyError, ValueError) as error:
                    raise ShardFormatError(f"{shard.url}: sample {key}: unreadable captions.json or "
                                           f"meta.json ({error!r})") from error
                keys.append(key)
                captions.append(tuple(str(t) for t in texts))
                sid = meta.get("source_id") if isinstance(meta, dict) else None
                source_ids.append(None if sid is None else str(sid))
    if len(keys) != spec.images:
        raise ShardFormatError(f"{spec.location}: read {len(keys)} samples, the manifest lists {spec.images}")
    return SplitIndex(location=spec.location, keys=tuple(keys), captions=tuple(captions),
                      source_ids=tuple(source_ids), manifest_sha256=manifest_digest(location, storage_options))


def read_records(location: str | SplitSpec, keys: Iterable[str],
                 storage_options: Mapping[str, Any] | None = None) -> list[ImageRecord]:
    """The checked records of `keys` (in the order given), reading shards until all are found."""
    spec = location if isinstance(location, SplitSpec) else read_split(location, storage_options=storage_options)
    wanted = list(dict.fromkeys(keys))
    found: dict[str, ImageRecord] = {}
    reader = ShardReader(spec, bad_data="strict")
    for shard in spec.shards:
        for record in reader.records(shard):
            if record.key in wanted:
                found[record.key] = record
        if len(found) == len(wanted):
            break
    missing = [k for k in wanted if k not in found]
    if missing:
        raise UnknownKeyError(f"{spec.location}: no sample with key {', '.join(map(repr, missing))}")
    return [found[k] for k in keys]
