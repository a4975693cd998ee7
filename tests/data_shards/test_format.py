"""The shard format: records to sample bytes and back, keys, the manifest, float16 rounding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_shards.format import (
    ImageRecord,
    Manifest,
    ShardFormatError,
    ShardInfo,
    check_split_name,
    decode_sample,
    encode_record,
    float16_tolerance,
    record_problems,
    sample_key,
    shard_name,
    split_member_name,
)


def _record(**overrides: object) -> ImageRecord:
    rng = np.random.default_rng(0)
    fields: dict = dict(key="test-0000003", regions=rng.standard_normal((4, 8)).astype(np.float32),
                        captions=["a dog", "ein Hund – café"], split="test", index=3)
    fields.update(overrides)
    return ImageRecord(**fields)


def test_round_trip_float32_is_bit_exact_and_keeps_optional_members() -> None:
    boxes = np.array([[0, 0, 10, 20], [1, 2, 3, 4], [5, 5, 6, 6], [0, 1, 2, 3]], dtype=np.float32)
    record = _record(boxes=boxes, size=(640, 480), source_id="391895")
    sample = encode_record(record, "float32")
    assert set(sample) == {"__key__", "regions.npy", "captions.json", "meta.json", "boxes.npy", "size.json"}
    back = decode_sample(sample)
    assert back.regions.dtype == np.float32 and np.array_equal(back.regions, record.regions)
    assert np.array_equal(back.boxes, boxes) and back.size == (640, 480)
    assert (back.key, back.captions, back.split, back.index, back.source_id) == (
        "test-0000003", ["a dog", "ein Hund – café"], "test", 3, "391895")
    assert json.loads(sample["meta.json"]) == {"split": "test", "index": 3, "source_id": "391895"}


def test_round_trip_float16_within_tolerance() -> None:
    record = _record()
    back = decode_sample(encode_record(record, "float16"))
    assert back.regions.dtype == np.float16
    error = np.abs(back.regions.astype(np.float32) - record.regions).max()
    assert error <= float16_tolerance(record.regions)
    assert back.source_id is None and "source_id" not in json.loads(encode_record(record)["meta.json"])


@pytest.mark.parametrize("scale", [1e-7, 1e-5, 1e-2, 1.0, 300.0, 3e4])
def test_float16_tolerance_bounds_rounding_including_subnormals(scale: float) -> None:
    values = (np.random.default_rng(1).standard_normal(20000) * scale).astype(np.float32)
    values = values[np.abs(values) < 65504]
    error = np.abs(values.astype(np.float16).astype(np.float32) - values).max()
    assert error <= float16_tolerance(values)
    assert float16_tolerance(np.zeros(3)) == 0.0


def test_keys_and_shard_names() -> None:
    assert sample_key("test", 12) == "test-0000012"
    assert shard_name("test", 3) == "test-000003.tar"
    for bad in ("te.st", "a/b", "", "-x", "tést"):
        with pytest.raises(ShardFormatError, match="split name"):
            check_split_name(bad)
    with pytest.raises(ShardFormatError, match="must be non-empty without"):
        encode_record(_record(key="a.b"))


def test_split_member_name_groups_members_like_webdataset() -> None:
    from webdataset.tariterators import base_plus_ext

    for name in ("test-0000001.regions.npy", "dir/k.captions.json", "k.a.b.c", "nodot", "d.x/k.npy", ".hidden"):
        expected = base_plus_ext(name)
        assert split_member_name(name) == (None if expected == (None, None) else expected)


def test_decode_errors_name_shard_and_key() -> None:
    sample = encode_record(_record())
    sample["__url__"] = "s/test-000000.tar"
    broken = dict(sample, **{"size.json": b'{"width": 3}'})
    with pytest.raises(ShardFormatError, match=r"s/test-000000.tar: sample test-0000003: size.json"):
        decode_sample(broken)
    with pytest.raises(ShardFormatError, match="missing regions.npy"):
        decode_sample({k: v for k, v in sample.items() if k != "regions.npy"})
    with pytest.raises(ShardFormatError, match="index must be an integer"):
        decode_sample(dict(sample, **{"meta.json": b'{"split": "test", "index": "3"}'}))
    with pytest.raises(ShardFormatError, match="not UTF-8"):
        decode_sample(dict(sample, **{"captions.json": b'["\xff"]'}))


def test_record_problems() -> None:
    record = _record(regions=np.ones((4, 8), np.float16))
    assert record_problems(record, (4, 8), "float16") == []
    assert "feature shape (4, 8) != manifest (36, 8)" in record_problems(record, (36, 8), "float16")
    assert "feature dtype float16 != manifest float32" in record_problems(record, (4, 8), "float32")
    record.regions[1, 2] = np.nan
    assert "features contain NaN or Inf" in record_problems(record, (4, 8), "float16")
    bad_boxes = _record(regions=np.ones((4, 8), np.float16), boxes=np.zeros((4, 4), np.float64), captions=[" "])
    assert record_problems(bad_boxes, (4, 8), "float16") == ["boxes dtype float64 != float32", "caption 0 is empty"]


def test_manifest_round_trip_and_validation() -> None:
    manifest = Manifest(feature_shape=(36, 2048), feature_dtype="float16", images=3, captions=15,
                        shards=[ShardInfo("test-000000.tar", 2, "a" * 64), ShardInfo("test-000001.tar", 1, "b" * 64)],
                        split="test", conversion={"converter": "precomp", "fingerprint": "f"})
    assert Manifest.from_json(manifest.to_json()) == manifest
    data = json.loads(manifest.to_json())
    assert data["schema_version"] == 1 and data["feature_shape"] == [36, 2048]
    old = {k: v for k, v in data.items() if k != "conversion"}  # written before the field existed
    assert Manifest.from_json(json.dumps(old)).conversion == {}
    with pytest.raises(ShardFormatError, match="schema_version 2 is not supported"):
        Manifest.from_json(json.dumps(dict(data, schema_version=2)), "m.json")
    with pytest.raises(ShardFormatError, match="sum to 3, but images = 4"):
        Manifest.from_json(json.dumps(dict(data, images=4)))
    with pytest.raises(ShardFormatError, match="m.json: invalid JSON"):
        Manifest.from_json("{", "m.json")
