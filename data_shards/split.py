"""A split's shards: the manifest read and the selection resolved (in the main process).

`read_split` turns a location and a shard selection into a `SplitSpec`, plain
picklable data that loader workers take along (no filesystem objects: each worker opens its own).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import braceexpand

from data_shards.format import MANIFEST_NAME, Manifest, ShardFormatError
from data_shards.storage import open_location


@dataclass(frozen=True)
class ShardRef:
    """A selected shard: its position in the selection, URL and what the manifest says about it."""

    position: int
    name: str
    url: str
    samples: int
    sha256: str


@dataclass(frozen=True)
class SplitSpec:
    """What loader workers need to read a split: plain, picklable data (no filesystem objects)."""

    location: str
    shards: tuple[ShardRef, ...]
    feature_shape: tuple[int, int]
    feature_dtype: str
    split: str
    images: int  # manifest totals, for the captions-per-image ratio
    captions: int
    storage_options: dict[str, Any]



def read_split(location: str, shards: str | Sequence[str] | None = None,
               storage_options: Mapping[str, Any] | None = None) -> SplitSpec:
    """Read the manifest of `location` and resolve the `shards` selection (names or brace
    patterns, all of which must be in the manifest; None: every shard) against it."""
    opened = open_location(location, storage_options)
    manifest_url = opened.child_url(MANIFEST_NAME)
    try:
        text = opened.read_text(MANIFEST_NAME)
    except FileNotFoundError as exc:
        raise ShardFormatError(f"{manifest_url}: no manifest; is {location} a converted split?") from exc
    manifest = Manifest.from_json(text, where=manifest_url)
    if not manifest.shards or manifest.images < 1:
        raise ShardFormatError(f"{manifest_url}: lists no images")
    by_name = {info.name: i for i, info in enumerate(manifest.shards)}
    if shards is None:
        chosen = list(range(len(manifest.shards)))
    else:
        patterns = [shards] if isinstance(shards, str) else list(shards)
        chosen = []
        for pattern in patterns:
            for name in braceexpand.braceexpand(pattern):
                base = name.rstrip("/").rsplit("/", 1)[-1]  # a full URL names the same file
                if base not in by_name:
                    raise ShardFormatError(f"{manifest_url}: selected shard {name!r} is not in the manifest")
                if by_name[base] in chosen:
                    raise ShardFormatError(f"{manifest_url}: shard {base!r} selected twice")
                chosen.append(by_name[base])
        chosen.sort()  # manifest order is source order (evaluation relies on it)
        if not chosen:
            raise ShardFormatError(f"{manifest_url}: the selection {shards!r} matches no shard")
    refs = tuple(ShardRef(position=p, name=manifest.shards[i].name, url=opened.child_url(manifest.shards[i].name),
                          samples=manifest.shards[i].samples, sha256=manifest.shards[i].sha256)
                 for p, i in enumerate(chosen))
    return SplitSpec(location=opened.url, shards=refs, feature_shape=tuple(manifest.feature_shape),
                     feature_dtype=manifest.feature_dtype, split=manifest.split, images=manifest.images,
                     captions=manifest.captions, storage_options=dict(opened.storage_options))

