"""Fixtures for the data_shards tests.

The S3 server fixtures (`s3_server`, `s3_bucket`, `s3_env`) and `make_precomp` live in
tests/conftest.py, shared with the trainer tests.
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def read_output() -> Any:
    """`read_output(location, storage_options=None) -> (Manifest, [ImageRecord, ...])`: every sample of a
    converted split, read with webdataset in manifest shard order (s3:// through storage.UrlOpener)."""
    import webdataset as wds

    from data_shards.format import MANIFEST_NAME, Manifest, decode_sample
    from data_shards.storage import UrlOpener, open_location

    def read(location: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, list[Any]]:
        loc = open_location(location, storage_options)
        manifest = Manifest.from_json(loc.read_text(MANIFEST_NAME))
        urls = [loc.child_url(info.name) for info in manifest.shards]
        previous = wds.gopen_schemes.get("s3")
        wds.gopen_schemes["s3"] = UrlOpener(dict(loc.storage_options))
        try:
            dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
            records = [decode_sample(sample) for sample in dataset]
        finally:
            if previous is None:
                wds.gopen_schemes.pop("s3", None)
            else:
                wds.gopen_schemes["s3"] = previous
        return manifest, records

    return read
