"""Tests of data_shards/lookup.py: the split index and records by key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_shards.convert import convert, plan_precomp
from data_shards.lookup import UnknownKeyError, read_records, split_index
from data_shards.reader import EvalReader, ReaderConfig


@pytest.fixture
def shards(tmp_path: Path, make_precomp: Any) -> tuple[Path, Any]:
    data = make_precomp(tmp_path / "precomp", "test", 23)
    out = tmp_path / "shards"
    convert(plan_precomp(str(tmp_path / "precomp"), "test", 10, "float32"), str(out), {}, "float32")
    return out, data


def test_the_index_lists_images_in_the_evaluation_readers_order(shards: tuple[Path, Any]) -> None:
    out, data = shards
    index = split_index(str(out))
    reader_keys = [key for batch in EvalReader(ReaderConfig(location=str(out), batch_size=4, num_workers=0),
                                               lambda caption: [1, 2]) for key in batch.keys]
    assert list(index.keys) == reader_keys and len(index) == 23
    assert [c for texts in index.captions for c in texts] == data.captions
    assert index.source_ids == (None,) * 23 and len(index.manifest_sha256) == 64
    assert index.positions(["test-0000012", "test-0000003"]) == [12, 3]
    with pytest.raises(UnknownKeyError, match=r"no sample with key 'nope', 'test-9'"):
        index.positions(["test-0000001", "nope", "test-9"])


def test_records_by_key_in_the_order_asked(shards: tuple[Path, Any]) -> None:
    out, data = shards
    records = read_records(str(out), ["test-0000021", "test-0000002"])
    assert [r.key for r in records] == ["test-0000021", "test-0000002"]
    assert np.array_equal(records[0].regions, data.ims[21]) and records[1].captions == data.captions[10:15]
    with pytest.raises(UnknownKeyError, match=r"shards: no sample with key 'test-0000099'"):
        read_records(str(out), ["test-0000001", "test-0000099"])
