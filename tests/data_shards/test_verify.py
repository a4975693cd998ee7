"""verify.py: each kind of damage is reported naming the shard (and the sample key)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from webdataset import TarWriter

from data_shards import convert, verify
from data_shards.format import MANIFEST_NAME, ImageRecord, encode_record
from data_shards.storage import sha256_file


@pytest.fixture
def out(tmp_path: Path, make_precomp: Any) -> Path:
    """A good converted split: 22 images in 3 shards (10, 10, 2), float16 (4, 8)."""
    make_precomp(tmp_path / "precomp", "test", 22)
    assert convert.main(["--precomp", str(tmp_path / "precomp"), "--split", "test", "--output",
                         str(tmp_path / "out"), "--shard-size", "10"]) == 0
    return tmp_path / "out"


def _verify(out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = verify.main([str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _edit_manifest(out: Path, **changes: Any) -> None:
    data = json.loads((out / MANIFEST_NAME).read_text())
    for shard in data["shards"]:
        shard.update(changes.get(shard["name"], {}))
    data["images"] = sum(s["samples"] for s in data["shards"])
    (out / MANIFEST_NAME).write_text(json.dumps(data))


def _rewrite_shard(out: Path, name: str, records: list[ImageRecord], dtype: str = "float16") -> None:
    """Replace a shard by one holding `records` and update its checksum, so only the samples are wrong."""
    with TarWriter(str(out / name), encoder=False) as tar:
        for record in records:
            tar.write(encode_record(record, dtype))
    _edit_manifest(out, **{name: {"sha256": sha256_file(out / name), "samples": len(records)}})


def _records(count: int = 2, start: int = 20, shape: tuple[int, int] = (4, 8)) -> list[ImageRecord]:
    return [ImageRecord(key=f"test-{i:07d}", regions=np.ones(shape, np.float32), split="test", index=i,
                        captions=[f"caption {i} {k}" for k in range(5)]) for i in range(start, start + count)]


def test_good_output_passes_with_one_line(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, stderr = _verify(out, capsys)
    assert code == 0 and stderr == ""
    assert stdout == f"OK {out}: 3 shards, 22 images, 110 captions, features (4, 8) float16, checksums match\n"


def test_truncated_tar(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = (out / "test-000001.tar").read_bytes()
    (out / "test-000001.tar").write_bytes(data[:3000])
    code, _, err = _verify(out, capsys)
    assert code == 1
    assert f"{out}/test-000001.tar: unreadable tar" in err
    assert f"{out}/test-000001.tar: sha256" in err and "test-000000.tar" not in err


def test_flipped_byte_fails_the_checksum(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray((out / "test-000002.tar").read_bytes())
    data[len(data) // 3] ^= 0x01
    (out / "test-000002.tar").write_bytes(bytes(data))
    code, _, err = _verify(out, capsys)
    assert code == 1 and f"{out}/test-000002.tar: sha256" in err and "does not match manifest.json" in err


def test_missing_shard(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (out / "test-000000.tar").unlink()
    code, _, err = _verify(out, capsys)
    assert code == 1 and f"{out}/test-000000.tar: missing (listed in manifest.json)" in err


def test_wrong_sample_count(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edit_manifest(out, **{"test-000001.tar": {"samples": 11}})
    code, _, err = _verify(out, capsys)
    assert code == 1 and f"{out}/test-000001.tar: 10 samples, manifest.json lists 11" in err


def test_wrong_shape_dtype_and_nan_name_the_sample(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = _records(3)
    records[0].regions = np.ones((5, 8), np.float32)
    records[2].regions[1, 1] = np.nan
    _rewrite_shard(out, "test-000002.tar", records)
    # a float32 sample in a float16 manifest
    with TarWriter(str(out / "test-000001.tar"), encoder=False) as tar:
        for i, record in enumerate(_records(10, start=10)):
            tar.write(encode_record(record, "float32" if i == 4 else "float16"))
    _edit_manifest(out, **{"test-000001.tar": {"sha256": sha256_file(out / "test-000001.tar")}})
    code, _, err = _verify(out, capsys)
    assert code == 1
    shard = f"{out}/test-000002.tar"
    assert f"{shard}: sample test-0000020: feature shape (5, 8) != manifest (4, 8)" in err
    assert f"{shard}: sample test-0000022: features contain NaN or Inf" in err
    assert f"{out}/test-000001.tar: sample test-0000014: feature dtype float32 != manifest float16" in err
    assert "test-0000021" not in err


def test_unreadable_member_and_duplicate_keys(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = _records(2, start=0)  # keys test-0000000/1 are already in shard 0
    sample = encode_record(records[1])
    sample["regions.npy"] = b"not an npy file"
    with TarWriter(str(out / "test-000002.tar"), encoder=False) as tar:
        tar.write(encode_record(records[0]))
        tar.write(sample)
    _edit_manifest(out, **{"test-000002.tar": {"sha256": sha256_file(out / "test-000002.tar"), "samples": 2}})
    code, _, err = _verify(out, capsys)
    assert code == 1
    assert f"{out}/test-000002.tar: sample test-0000001 regions.npy: unreadable .npy" in err
    assert f"{out}/test-000002.tar: sample test-0000000: key also in test-000000.tar" in err


def test_unlisted_shard_is_a_warning(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (out / "test-000007.tar").write_bytes((out / "test-000000.tar").read_bytes())
    code, stdout, err = _verify(out, capsys)
    assert code == 0 and stdout.startswith("OK")
    assert f"verify: warning: {out}/test-000007.tar: not listed in manifest.json" in err


def test_missing_or_invalid_manifest(out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _verify(tmp_path / "nothing-here", capsys)
    assert code == 1 and f"{tmp_path / 'nothing-here'}/manifest.json: missing" in err
    (out / MANIFEST_NAME).write_text('{"schema_version": 9}')
    code, _, err = _verify(out, capsys)
    assert code == 1 and f"{out}/manifest.json: schema_version 9 is not supported" in err


def test_verify_on_s3(out: Path, s3_server: Any, s3_bucket: str) -> None:
    client = s3_server.client()
    for path in sorted(out.glob("*.tar")) + [out / MANIFEST_NAME]:
        client.put_object(Bucket=s3_bucket, Key=f"split/{path.name}", Body=path.read_bytes())
    report = verify.verify(f"s3://{s3_bucket}/split", s3_server.storage_options, workers=2)
    assert report.ok and report.manifest is not None and report.manifest.images == 22
    client.put_object(Bucket=s3_bucket, Key="split/test-000001.tar", Body=b"x" * 1024)
    report = verify.verify(f"s3://{s3_bucket}/split", s3_server.storage_options)
    assert not report.ok
    assert all(e.startswith(f"s3://{s3_bucket}/split/test-000001.tar: ") for e in report.errors), report.errors
    client.delete_object(Bucket=s3_bucket, Key="split/test-000002.tar")
    report = verify.verify(f"s3://{s3_bucket}/split", s3_server.storage_options)
    assert f"s3://{s3_bucket}/split/test-000002.tar: missing (listed in manifest.json)" in report.errors
