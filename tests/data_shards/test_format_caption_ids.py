"""The optional per-caption ids of a sample (meta.json ``caption_ids``, data_shards/format.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_shards.format import (
    ImageRecord,
    ShardFormatError,
    decode_sample,
    encode_record,
)


def _record(**kwargs: object) -> ImageRecord:
    return ImageRecord(key="test-0000001", regions=np.zeros((2, 3), dtype=np.float32), captions=["a", "b"],
                       split="test", index=1, **kwargs)  # type: ignore[arg-type]


def test_caption_ids_round_trip_and_are_optional() -> None:
    sample = encode_record(_record(source_id="42", caption_ids=["7", "8"]), "float32")
    assert json.loads(sample["meta.json"]) == {"split": "test", "index": 1, "source_id": "42", "caption_ids": ["7", "8"]}
    decoded = decode_sample(sample)
    assert (decoded.source_id, decoded.caption_ids) == ("42", ["7", "8"])
    # Samples written before the field existed decode as before.
    old = encode_record(_record(), "float32")
    assert json.loads(old["meta.json"]) == {"split": "test", "index": 1}
    assert decode_sample(old).caption_ids is None


@pytest.mark.parametrize("bad", [["7"], "7,8", [7, None], [True, 8]])
def test_bad_caption_ids_name_the_sample(bad: object) -> None:
    sample = encode_record(_record(), "float32")
    sample["meta.json"] = json.dumps({"split": "test", "index": 1, "caption_ids": bad}).encode()
    sample["__url__"] = "s.tar"
    with pytest.raises(ShardFormatError, match=r"s.tar: sample test-0000001: meta.json caption_ids must be a list of 2"):
        decode_sample(sample)
    with pytest.raises(ShardFormatError, match="1 caption ids for 2 captions"):
        encode_record(_record(caption_ids=["7"]), "float32")


def test_integer_caption_ids_are_read_as_strings() -> None:
    sample = encode_record(_record(), "float32")
    sample["meta.json"] = json.dumps({"split": "test", "index": 1, "caption_ids": [7, 8]}).encode()
    assert decode_sample(sample).caption_ids == ["7", "8"]
