"""Looking things up in a split by sample key: what the interpretation and retrieval tools need.

* :class:`SplitIndex`: the images' keys and captions in source order (as an encoding of the split
  lists them, trainer/inference/encoding.py), and the position of a key.
* :func:`read_records`: the full records (features, boxes, size, captions) of a few keys, reading
  shards in manifest order and stopping once every key is found.
* :func:`manifest_digest`: what identifies a split's content (caches key on it).

Unknown keys are an error naming them and the split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from data_shards.format import MANIFEST_NAME, ImageRecord
from data_shards.shard_reader import ShardReader
from data_shards.split import SplitSpec, read_split
from data_shards.storage import open_location


class UnknownKeyError(KeyError):
    """Sample keys that the split does not hold; the message names them and the split."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class SplitIndex:
    """The images of a split in source order: keys and captions."""

    location: str
    keys: tuple[str, ...]
    captions: tuple[tuple[str, ...], ...]  # each image's captions in stored order

    @classmethod
    def from_listing(cls, location: str, listing: Sequence[tuple[str, Sequence[str]]]) -> SplitIndex:
        """From ``(key, captions)`` per image, in source order."""
        return cls(location=location, keys=tuple(key for key, _ in listing),
                   captions=tuple(tuple(captions) for _, captions in listing))

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
