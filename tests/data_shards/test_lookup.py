"""Tests of data_shards/lookup.py: the split index and records by key."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_shards.convert import convert, plan_precomp
from data_shards.lookup import (
    SplitIndex,
    UnknownKeyError,
    manifest_digest,
    read_records,
)


@pytest.fixture
def shards(tmp_path: Path, make_precomp: Any) -> tuple[Path, Any]:
    data = make_precomp(tmp_path / "precomp", "test", 23)
    out = tmp_path / "shards"
    convert(plan_precomp(str(tmp_path / "precomp"), "test", 10, "float32"), str(out), {}, "float32")
    return out, data


def test_the_index_finds_keys_and_names_the_unknown_ones() -> None:
    index = SplitIndex.from_listing("shards/test", [(f"test-{i:07d}", (f"caption {i}",) * 5) for i in range(23)])
    assert len(index) == 23 and index.captions[4] == ("caption 4",) * 5
    assert index.positions(["test-0000012", "test-0000003"]) == [12, 3] and index.position("test-0000022") == 22
    with pytest.raises(UnknownKeyError, match=r"shards/test: no sample with key 'nope', 'test-9'"):
        index.positions(["test-0000001", "nope", "test-9"])


def test_records_by_key_in_the_order_asked(shards: tuple[Path, Any]) -> None:
    out, data = shards
    records = read_records(str(out), ["test-0000021", "test-0000002"])
    assert [r.key for r in records] == ["test-0000021", "test-0000002"]
    assert np.array_equal(records[0].regions, data.ims[21]) and records[1].captions == data.captions[10:15]
    with pytest.raises(UnknownKeyError, match=r"shards: no sample with key 'test-0000099'"):
        read_records(str(out), ["test-0000001", "test-0000099"])
    assert manifest_digest(str(out)) == hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
