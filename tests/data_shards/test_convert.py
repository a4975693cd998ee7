"""The converter: precomputed layout and BUTD TSV + Karpathy JSON to shards, resume, S3, bad input."""

from __future__ import annotations

import base64
import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_shards import convert
from data_shards.format import MANIFEST_NAME, Manifest, float16_tolerance
from data_shards.verify import verify

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> int:
    return convert.main([str(a) for a in args])


def _manifest(out: Path) -> Manifest:
    return Manifest.from_json((out / MANIFEST_NAME).read_text())


def _shard_mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("*.tar"))}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_precomp_round_trip(tmp_path: Path, make_precomp: Any, read_output: Any, dtype: str) -> None:
    data = make_precomp(tmp_path / "precomp", "dev", 23)
    out = tmp_path / "out"
    assert _run("--precomp", tmp_path / "precomp", "--split", "dev", "--output", out,
                "--shard-size", "10", "--dtype", dtype) == 0
    manifest, records = read_output(str(out))
    assert [s.name for s in manifest.shards] == ["dev-000000.tar", "dev-000001.tar", "dev-000002.tar"]
    assert [s.samples for s in manifest.shards] == [10, 10, 3]
    assert (manifest.images, manifest.captions, manifest.split) == (23, 115, "dev")
    assert (manifest.feature_shape, manifest.feature_dtype) == ((4, 8), dtype)
    assert [r.key for r in records] == [f"dev-{i:07d}" for i in range(23)]
    assert [(r.split, r.index) for r in records] == [("dev", i) for i in range(23)]
    # every caption exactly once, in order, as UTF-8 text (not bytes)
    assert [c for r in records for c in r.captions] == data.captions
    for record, expected in zip(records, data.ims):
        assert record.regions.dtype == np.dtype(dtype) and record.boxes is None and record.size is None
        if dtype == "float32":
            assert np.array_equal(record.regions, expected)
        else:
            assert np.abs(record.regions.astype(np.float32) - expected).max() <= float16_tolerance(expected)
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_NAME] + [s.name for s in manifest.shards])
    assert verify(str(out)).ok


def test_per_caption_ims_variant_gives_identical_shards(tmp_path: Path, make_precomp: Any) -> None:
    make_precomp(tmp_path / "a", "test", 12)
    make_precomp(tmp_path / "b", "test", 12, per_caption=True)  # 60 rows: rows 5i..5i+4 = image i
    assert np.load(tmp_path / "b" / "test_ims.npy").shape == (60, 4, 8)
    for name in "ab":
        assert _run("--precomp", tmp_path / name, "--split", "test", "--output", tmp_path / f"out-{name}",
                    "--shard-size", "5") == 0
    a, b = _manifest(tmp_path / "out-a"), _manifest(tmp_path / "out-b")
    assert a.shards == b.shards and b.images == 12 and b.conversion["rows_per_image"] == 5


def test_per_caption_variant_with_differing_rows_is_refused(tmp_path: Path, make_precomp: Any,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    make_precomp(tmp_path, "test", 4, per_caption=True)
    ims = np.load(tmp_path / "test_ims.npy")
    ims[5 * 3 + 2] += 1  # image 3 (the last, always sampled): one of its rows differs
    np.save(tmp_path / "test_ims.npy", ims)
    assert _run("--precomp", tmp_path, "--split", "test", "--output", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'test_ims.npy'}: rows 15..19 (image 3) differ" in err
    assert not (tmp_path / "out").exists()


def test_workers_write_the_same_shards(tmp_path: Path, make_precomp: Any) -> None:
    make_precomp(tmp_path / "precomp", "train", 30)
    for workers in ("1", "2"):
        assert _run("--precomp", tmp_path / "precomp", "--split", "train", "--output", tmp_path / f"out{workers}",
                    "--shard-size", "8", "--workers", workers) == 0
    one, two = _manifest(tmp_path / "out1"), _manifest(tmp_path / "out2")
    assert len(two.shards) == 4 and one.shards == two.shards
    assert [p.read_bytes() for p in sorted((tmp_path / "out1").glob("*.tar"))] == \
        [p.read_bytes() for p in sorted((tmp_path / "out2").glob("*.tar"))]


def test_resume_skips_complete_shards_and_rewrites_bad_ones(tmp_path: Path, make_precomp: Any,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="data_shards.convert")
    make_precomp(tmp_path / "precomp", "test", 25)
    args = ("--precomp", tmp_path / "precomp", "--split", "test", "--output", tmp_path / "out", "--shard-size", "10")
    out = tmp_path / "out"
    assert _run(*args) == 0
    first = _manifest(out)
    mtimes = _shard_mtimes(out)

    caplog.clear()
    assert _run(*args) == 0
    assert [m for m in caplog.messages if m.startswith("skip")] == [
        f"skip test-00000{i}.tar: complete, sha256 matches" for i in range(3)]
    assert not [m for m in caplog.messages if m.startswith("wrote")]
    assert _shard_mtimes(out) == mtimes, "complete shards are not rewritten"
    assert _manifest(out) == first

    # corrupt one shard, delete another: both are rewritten, byte-identical, the third is skipped
    shard1 = bytearray((out / "test-000001.tar").read_bytes())
    shard1[600] ^= 0xFF
    (out / "test-000001.tar").write_bytes(bytes(shard1))
    (out / "test-000002.tar").unlink()
    caplog.clear()
    assert _run(*args) == 0
    assert "test-000001.tar: sha256" in caplog.text and "does not match its record" in caplog.text
    assert "test-000002.tar: recorded as complete but missing; rewriting it" in caplog.text
    assert "skip test-000000.tar: complete, sha256 matches" in caplog.messages
    assert _manifest(out) == first and verify(str(out)).ok
    assert _shard_mtimes(out)["test-000000.tar"] == mtimes["test-000000.tar"]


def test_interrupted_run_resumes_from_completion_records(tmp_path: Path, make_precomp: Any,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A run that finished only shard 1 (and died): the next run keeps it and writes the others."""
    caplog.set_level(logging.INFO, logger="data_shards.convert")
    make_precomp(tmp_path / "precomp", "test", 25)
    out = tmp_path / "out"
    plan = convert.plan_precomp(str(tmp_path / "precomp"), "test", 10, "float16")
    convert.write_shard(convert.ShardJob(output=str(out), storage_options={}, dtype="float16",
                                         fingerprint=plan.fingerprint, source=plan.source, shard=plan.shards[1]))
    assert sorted(p.name for p in out.iterdir()) == ["_progress", "test-000001.tar"]  # no manifest yet
    before = _shard_mtimes(out)
    caplog.clear()
    assert _run("--precomp", tmp_path / "precomp", "--split", "test", "--output", out, "--shard-size", "10") == 0
    assert "skip test-000001.tar: complete, sha256 matches" in caplog.messages
    assert sum(m.startswith("wrote") for m in caplog.messages) == 2
    assert _shard_mtimes(out)["test-000001.tar"] == before["test-000001.tar"]
    assert not (out / "_progress").exists(), "completion records go once the manifest is written"
    assert verify(str(out)).ok


def test_different_conversion_in_same_output_needs_overwrite(tmp_path: Path, make_precomp: Any,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    make_precomp(tmp_path / "precomp", "test", 25)
    out = tmp_path / "out"
    base = ("--precomp", tmp_path / "precomp", "--split", "test", "--output", out)
    assert _run(*base, "--shard-size", "5") == 0
    kept = (out / MANIFEST_NAME).read_bytes()
    assert _run(*base, "--shard-size", "10") == 1
    err = capsys.readouterr().err
    assert f"{out / MANIFEST_NAME} describes a different conversion (shard_size: 5 -> 10" in err
    assert (out / MANIFEST_NAME).read_bytes() == kept and len(list(out.glob("*.tar"))) == 5
    assert _run(*base, "--shard-size", "10", "--overwrite") == 0
    assert sorted(p.name for p in out.glob("*.tar")) == [f"test-00000{i}.tar" for i in range(3)]
    assert verify(str(out)).ok and not verify(str(out)).warnings


def test_bad_input_names_the_file_and_writes_nothing(tmp_path: Path, make_precomp: Any,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    precomp = tmp_path / "precomp"
    make_precomp(precomp, "test", 6)
    out = tmp_path / "out"
    assert _run("--precomp", precomp, "--split", "test", "--output", out, "--shard-size", "4") == 0
    snapshot = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def fails(split: str, expected: str) -> None:
        assert _run("--precomp", precomp, "--split", split, "--output", out, "--shard-size", "4") == 1
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == snapshot

    fails("val", f"{precomp / 'val_ims.npy'}: features file not found")
    make_precomp(precomp, "short", 6)
    lines = (precomp / "short_caps.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    (precomp / "short_caps.txt").write_text("".join(lines[:-1]), encoding="utf-8")
    fails("short", f"{precomp / 'short_caps.txt'}: 29 caption lines, but {precomp / 'short_ims.npy'} has 6 rows: "
                   "expected 30 lines")
    make_precomp(precomp, "latin", 6)
    (precomp / "latin_caps.txt").write_bytes("".join(c + "\n" for c in lines).encode("latin-1", "replace"))
    fails("latin", f"{precomp / 'latin_caps.txt'}: line 1 is not UTF-8")
    make_precomp(precomp, "blank", 6)
    (precomp / "blank_caps.txt").write_text("".join(lines[:7]) + "   \n" + "".join(lines[8:]), encoding="utf-8")
    fails("blank", f"{precomp / 'blank_caps.txt'}: line 8 is an empty caption")
    fails("bad.name", "split name 'bad.name' must match")


def test_nan_or_float16_overflow_names_the_image(tmp_path: Path, make_precomp: Any,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    make_precomp(tmp_path, "test", 6)
    ims = np.load(tmp_path / "test_ims.npy")
    ims[4, 1, 2] = 1e6
    np.save(tmp_path / "test_ims.npy", ims)
    assert _run("--precomp", tmp_path, "--split", "test", "--output", tmp_path / "out") == 1
    assert f"{tmp_path / 'test_ims.npy'}: image 4 (row 4): features exceed the float16 range" in capsys.readouterr().err
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    ims[4, 1, 2] = np.nan
    np.save(tmp_path / "test_ims.npy", ims)
    assert _run("--precomp", tmp_path, "--split", "test", "--output", tmp_path / "out", "--dtype", "float32") == 1
    assert "image 4 (row 4): features contain NaN or Inf" in capsys.readouterr().err


# ---- S3 ----------------------------------------------------------------------------------------


def test_convert_and_verify_on_s3_via_cli(tmp_path: Path, make_precomp: Any, read_output: Any,
                                          s3_env: Any, s3_bucket: str) -> None:
    """The CLIs as users run them, configured by AWS_* variables only."""
    data = make_precomp(tmp_path / "precomp", "test", 17)
    output = f"s3://{s3_bucket}/coco/test"
    command = [sys.executable, "data_shards/convert.py", "--precomp", str(tmp_path / "precomp"), "--split", "test",
               "--output", output, "--shard-size", "6", "--workers", "2"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    keys = sorted(o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == ["coco/test/manifest.json"] + [f"coco/test/test-00000{i}.tar" for i in range(3)]
    manifest, records = read_output(output, s3_env.storage_options)
    assert [c for r in records for c in r.captions] == data.captions and manifest.images == 17

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stderr.count("complete, sha256 matches") == 3, again.stderr

    checked = subprocess.run([sys.executable, "data_shards/verify.py", output], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith(f"OK {output}: 3 shards, 17 images, 85 captions")


def test_s3_resume_rewrites_a_corrupt_object(tmp_path: Path, make_precomp: Any, s3_server: Any, s3_bucket: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="data_shards.convert")
    make_precomp(tmp_path / "precomp", "test", 9)
    plan = convert.plan_precomp(str(tmp_path / "precomp"), "test", 4, "float16")
    output = f"s3://{s3_bucket}/p"
    first = convert.convert(plan, output, s3_server.storage_options, "float16")
    s3_server.client().put_object(Bucket=s3_bucket, Key="p/test-000002.tar", Body=b"garbage")
    caplog.clear()
    assert convert.convert(plan, output, s3_server.storage_options, "float16") == first
    assert "skip test-000000.tar: complete, sha256 matches" in caplog.messages
    assert any(m.startswith("wrote test-000002.tar") for m in caplog.messages)
    assert verify(output, s3_server.storage_options).ok


def test_missing_bucket_is_a_clear_error(tmp_path: Path, make_precomp: Any, s3_env: Any,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    make_precomp(tmp_path, "test", 3)
    assert _run("--precomp", tmp_path, "--split", "test", "--output", "s3://absent-bucket-xyz/p") == 1
    assert "s3://absent-bucket-xyz/p: bucket 'absent-bucket-xyz' does not exist" in capsys.readouterr().err


# ---- BUTD TSV + Karpathy JSON ------------------------------------------------------------------


def _write_tsv(path: Path, images: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, delimiter="\t", fieldnames=convert.TSV_FIELDS)  # "\r\n" lines, as BUTD's
        for image in images:
            writer.writerow({
                "image_id": image["id"], "image_w": image["w"], "image_h": image["h"],
                "num_boxes": len(image["boxes"]),
                "boxes": base64.b64encode(image["boxes"].astype(np.float32).tobytes()).decode(),
                "features": base64.b64encode(image["features"].astype(np.float32).tobytes()).decode()})


def _butd_world(tmp_path: Path, boxes_per_image: list[int] | None = None, dim: int = 8) -> dict[str, Any]:
    """Seven COCO-like images spread over two TSV files in an order unlike the JSON's."""
    rng = np.random.default_rng(5)
    ids = [391895, 522418, 184613, 318219, 554625, 397133, 37777]
    splits = ["test", "train", "test", "restval", "test", "train", "val"]
    counts = boxes_per_image or [4] * len(ids)
    images = []
    for i, (image_id, count) in enumerate(zip(ids, counts)):
        xy = rng.uniform(0, 300, (count, 2))
        images.append({"id": image_id, "w": 640 - i, "h": 480 + i, "split": splits[i],
                       "boxes": np.concatenate([xy, xy + rng.uniform(1, 100, (count, 2))], axis=1).astype(np.float32),
                       "features": rng.standard_normal((count, dim)).astype(np.float32)})
    _write_tsv(tmp_path / "a.tsv", [images[i] for i in (4, 0, 5)])
    _write_tsv(tmp_path / "b.tsv", [images[i] for i in (2, 6, 3, 1)])
    karpathy = {"dataset": "coco", "images": [
        {"filename": f"COCO_val2014_{im['id']:012d}.jpg", "imgid": i, "cocoid": im["id"], "split": im["split"],
         "sentences": [{"raw": f"Image {im['id']} sentence {k}. ", "tokens": []} for k in range(5 + i % 2)]}
        for i, im in enumerate(images)]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy), encoding="utf-8")
    return {"images": images, "karpathy": tmp_path / "dataset_coco.json",
            "tsv": [tmp_path / "a.tsv", tmp_path / "b.tsv"]}


def _tsv_args(world: dict[str, Any], *extra: Any) -> list[Any]:
    args: list[Any] = []
    for path in world["tsv"]:
        args += ["--tsv", path]
    return args + ["--karpathy", world["karpathy"], *extra]


def test_tsv_keeps_boxes_and_sizes_in_json_order(tmp_path: Path, read_output: Any) -> None:
    world = _butd_world(tmp_path)
    out = tmp_path / "out"
    assert _run(*_tsv_args(world, "--split", "test", "--output", out, "--shard-size", "2", "--dtype", "float32")) == 0
    manifest, records = read_output(str(out))
    test_images = [im for im in world["images"] if im["split"] == "test"]  # JSON order, not TSV order
    assert [r.source_id for r in records] == [str(im["id"]) for im in test_images]
    assert [r.key for r in records] == ["test-0000000", "test-0000001", "test-0000002"]
    assert (manifest.feature_shape, manifest.images, manifest.captions) == ((4, 8), 3, 15)
    for record, image in zip(records, test_images):
        assert np.array_equal(record.regions, image["features"]) and np.array_equal(record.boxes, image["boxes"])
        assert record.size == (image["w"], image["h"])
        # the first five captions (Karpathy COCO images can have more), stripped
        assert record.captions == [f"Image {image['id']} sentence {k}." for k in range(5)]
    assert verify(str(out)).ok


def test_tsv_train_with_restval_and_all_captions(tmp_path: Path, read_output: Any) -> None:
    world = _butd_world(tmp_path)
    out = tmp_path / "out"
    assert _run(*_tsv_args(world, "--split", "train", "--include-restval", "--captions-per-image", "0",
                           "--output", out)) == 0
    _, records = read_output(str(out))
    assert [r.source_id for r in records] == ["522418", "318219", "397133"]  # train, restval, train: JSON order
    assert {r.split for r in records} == {"train"} and [r.index for r in records] == [0, 1, 2]
    assert [len(r.captions) for r in records] == [6, 6, 6]


def test_tsv_variable_box_counts(tmp_path: Path, read_output: Any, capsys: pytest.CaptureFixture[str]) -> None:
    world = _butd_world(tmp_path, boxes_per_image=[5, 6, 7, 5, 6, 10, 3])
    out = tmp_path / "out"
    assert _run(*_tsv_args(world, "--split", "test", "--output", out)) == 1
    err = capsys.readouterr().err
    assert "image 184613 (COCO_val2014_000000184613.jpg) has 7 boxes, but image 391895 has 5" in err
    assert "--regions K" in err and not out.exists()
    assert _run(*_tsv_args(world, "--split", "test", "--output", out, "--regions", "5", "--dtype", "float32")) == 0
    _, records = read_output(str(out))
    for record, index in zip(records, (0, 2, 4)):
        image = world["images"][index]
        assert np.array_equal(record.regions, image["features"][:5]) and np.array_equal(record.boxes, image["boxes"][:5])
    assert _run(*_tsv_args(world, "--split", "val", "--output", tmp_path / "val", "--regions", "5")) == 1
    assert "image 37777 (COCO_val2014_000000037777.jpg) has 3 boxes, fewer than --regions 5" in capsys.readouterr().err


def test_tsv_missing_image_and_filename_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    world = _butd_world(tmp_path)
    # Flickr30K-style JSON: no cocoid, ids come from the number in the filename
    data = json.loads(world["karpathy"].read_text())
    for image in data["images"]:
        image.pop("cocoid")
    world["karpathy"].write_text(json.dumps(data))
    assert _run(*_tsv_args(world, "--split", "test", "--output", tmp_path / "ok")) == 0
    assert _run("--tsv", world["tsv"][0], "--karpathy", world["karpathy"], "--split", "test",
                "--output", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"image 184613 (COCO_val2014_000000184613.jpg) of {world['karpathy']} split 'test' is in none of the TSV files" in err
    assert _run(*_tsv_args(world, "--split", "nosuch", "--output", tmp_path / "out")) == 1
    assert "no images in split 'nosuch' (splits present: restval, test, train, val)" in capsys.readouterr().err
    assert _run(*_tsv_args(world, "--split", "test", "--include-restval", "--output", tmp_path / "out")) == 1
    assert "--include-restval adds the 'restval' images to split 'train'" in capsys.readouterr().err


def test_help_runs_from_repo_root() -> None:
    done = subprocess.run([sys.executable, "data_shards/convert.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0 and "--shard-size" in done.stdout


def test_precomp_boxes_and_sizes_are_written_into_the_shards(tmp_path: Path, make_precomp: Any,
                                                             read_output: Any) -> None:
    # The companions some precomputed sets ship ({split}_ims_bbx.npy, {split}_ims_size.npy).
    make_precomp(tmp_path / "precomp", "dev", 6)
    boxes = np.random.default_rng(0).uniform(0, 50, size=(6, 4, 4)).astype(np.float32)
    boxes[..., 2:] += 50
    sizes = np.array([[100 + i, 80 + i] for i in range(6)])
    np.save(tmp_path / "precomp" / "dev_ims_bbx.npy", boxes)
    np.save(tmp_path / "precomp" / "dev_ims_size.npy", sizes)
    out = tmp_path / "out"
    assert _run("--precomp", tmp_path / "precomp", "--split", "dev", "--output", out, "--dtype", "float32") == 0
    _, records = read_output(str(out))
    for record, expected, size in zip(records, boxes, sizes):
        assert np.array_equal(record.boxes, expected) and record.size == tuple(int(v) for v in size)
    # A companion of the wrong shape is refused, naming it, before anything is written.
    np.save(tmp_path / "precomp" / "dev_ims_size.npy", sizes[:5])
    with pytest.raises(convert.ConversionError, match=r"dev_ims_size\.npy: shape \(5, 2\), expected \(6, 2\)"):
        convert.plan_precomp(str(tmp_path / "precomp"), "dev", 10, "float32")


def test_coco_ids_are_written_for_the_5k_test_split(tmp_path: Path, make_precomp: Any, read_output: Any,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from data_shards.coco_annotations import coco_5k_test_ids

    make_precomp(tmp_path / "precomp", "testall", 5000, regions=1, dim=2)
    out = tmp_path / "out"
    assert _run("--precomp", tmp_path / "precomp", "--split", "testall", "--coco-ids", "--output", out,
                "--shard-size", "2000", "--dtype", "float32") == 0
    manifest, records = read_output(str(out))
    image_ids, caption_ids = coco_5k_test_ids()
    assert [r.source_id for r in records] == [str(i) for i in image_ids]
    assert [c for r in records for c in r.caption_ids] == [str(c) for c in caption_ids]
    assert "coco_ids" in manifest.conversion and verify(str(out)).ok
    # Without --coco-ids the same source is a different conversion (the ids are part of it).
    assert _run("--precomp", tmp_path / "precomp", "--split", "testall", "--output", out,
                "--shard-size", "2000", "--dtype", "float32") == 1
    assert "different conversion" in capsys.readouterr().err

    make_precomp(tmp_path / "small", "testall", 12)
    assert _run("--precomp", tmp_path / "small", "--split", "testall", "--coco-ids", "--output", tmp_path / "o2") == 1
    error = capsys.readouterr().err
    assert "testall_ims.npy has 12 images" in error and "5000 images" in error
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").iterdir())
    with pytest.raises(SystemExit):
        _run("--tsv", tmp_path / "x.tsv", "--karpathy", tmp_path / "k.json", "--split", "test", "--coco-ids",
             "--output", tmp_path / "o3")
    assert "--coco-ids applies to --precomp only" in capsys.readouterr().err
