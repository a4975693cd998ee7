"""The WebDataset reader: evaluation order, equal batches per rank, shuffling, region order,
tokenization, resume, every bad-data case under both policies, and S3 through a local server.

Shards are written here with webdataset.TarWriter + format.encode_record (bad data is easier to
inject that way); one test goes through the converter. Ranks are simulated by building readers
with rank=0/1, world_size=2 in this process, each with real DataLoader worker processes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds

from data_shards.format import (
    MANIFEST_NAME,
    ImageRecord,
    Manifest,
    ShardFormatError,
    ShardInfo,
    encode_record,
    sample_key,
)
from data_shards.reader import (
    EvalReader,
    ReaderConfig,
    TrainBatch,
    TrainReader,
    make_plan,
)

REGIONS, DIM = 4, 8
Mutate = Callable[[int, dict[str, Any]], dict[str, Any] | None]


def tokenize(caption: str) -> list[int]:
    """A stand-in for Vocabulary.encode: <start>=1, one id per word, <end>=2 (module level: picklable)."""
    return [1] + [3 + sum(map(ord, word)) % 97 for word in caption.split()] + [2]


def features(index: int) -> np.ndarray:
    return np.random.default_rng(index).standard_normal((REGIONS, DIM)).astype(np.float16)


def boxes_for(index: int) -> np.ndarray:
    rng = np.random.default_rng(10_000 + index)
    x1y1 = rng.uniform(0, 50, size=(REGIONS, 2))
    wh = rng.uniform(1, 40, size=(REGIONS, 2))
    return np.concatenate([x1y1, x1y1 + wh], axis=1).astype(np.float32)


def caption(index: int, j: int) -> str:
    return f"image {index} says caption {j} here"


def write_split(directory: Path, sizes: list[int], *, split: str = "train", captions: int = 5,
                mutate: Mutate | None = None) -> Manifest:
    """Shards of `sizes` images (indices consecutive from 0) and their manifest.

    `mutate(index, sample)` may change a sample's member bytes (or return None to leave it out).
    The manifest's sha256 is that of the files as written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    index, infos, total_captions = 0, [], 0
    for number, size in enumerate(sizes):
        name = f"{split}-{number:06d}.tar"
        buffer = io.BytesIO()
        written = 0
        with wds.TarWriter(buffer) as writer:
            for _ in range(size):
                record = ImageRecord(key=sample_key(split, index), regions=features(index),
                                     captions=[caption(index, j) for j in range(captions)], split=split,
                                     index=index, boxes=boxes_for(index))
                sample = encode_record(record, "float16")
                if mutate is not None:
                    sample = mutate(index, sample)
                if sample is not None:
                    writer.write(sample)
                    written += 1
                    total_captions += len(json.loads(sample["captions.json"])) if _is_json(sample) else captions
                index += 1
        data = buffer.getvalue()
        (directory / name).write_bytes(data)
        infos.append(ShardInfo(name=name, samples=written, sha256=hashlib.sha256(data).hexdigest()))
    manifest = Manifest(feature_shape=(REGIONS, DIM), feature_dtype="float16", images=sum(i.samples for i in infos),
                        captions=total_captions, shards=infos, split=split)
    (directory / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def _is_json(sample: dict[str, Any]) -> bool:
    try:
        json.loads(sample["captions.json"])
        return True
    except ValueError:
        return False


def pairs_of(batches: list[TrainBatch]) -> list[tuple[int, int]]:
    return [(i, j) for b in batches for i, j in zip(b.image_ids.tolist(), b.caption_index.tolist())]


def run_ranks(directory: Path, world: int, epoch: int = 0, **config: Any) -> list[list[TrainBatch]]:
    """Every rank's epoch, each read through its own DataLoader (worker processes if num_workers > 0)."""
    out = []
    for rank in range(world):
        reader = TrainReader(ReaderConfig(str(directory), **config), tokenize, rank=rank, world_size=world)
        out.append(list(reader.epoch(epoch)))
    return out


# --------------------------------------------------------------------------------------------------
# Evaluation mode
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_reads_every_image_and_caption_once_in_source_order(tmp_path: Path, workers: int) -> None:
    write_split(tmp_path, [4, 3, 5, 1, 4], split="test")
    reader = EvalReader(ReaderConfig(str(tmp_path), batch_size=3, num_workers=workers), tokenize)
    batches = list(reader)
    image_ids = torch.cat([b.image_ids for b in batches]).tolist()
    assert image_ids == list(range(17))
    regions = torch.cat([b.regions for b in batches])
    assert regions.dtype == torch.float32 and regions.shape == (17, REGIONS, DIM)
    assert torch.equal(regions, torch.from_numpy(np.stack([features(i) for i in range(17)]).astype(np.float32)))
    captions = [c for b in batches for c in b.captions]
    assert captions == [caption(i, j) for i in range(17) for j in range(5)]
    assert torch.cat([b.caption_image_ids for b in batches]).tolist() == [i for i in range(17) for _ in range(5)]
    assert [k for b in batches for k in b.keys] == [sample_key("test", i) for i in range(17)]
    for b in batches:  # tokens line up with the captions
        for row, text in enumerate(b.captions):
            assert b.tokens[row, : b.lengths[row]].tolist() == tokenize(text)
    stats = reader.stats.as_dict()
    assert stats["images_read"] == 17 and stats["shards_completed"] == 5 and stats.get("skipped_samples", 0) == 0


def test_eval_through_the_converter(tmp_path: Path, make_precomp: Any) -> None:
    """precomp -> convert.py -> EvalReader gives the source back, in order (float16 rounding aside)."""
    from data_shards import convert

    data = make_precomp(tmp_path / "precomp", "dev", images=11)
    assert convert.main(["--precomp", str(tmp_path / "precomp"), "--split", "dev", "--output",
                         str(tmp_path / "shards"), "--shard-size", "4", "--log-level", "WARNING"]) == 0
    batches = list(EvalReader(ReaderConfig(str(tmp_path / "shards"), batch_size=5, num_workers=2), tokenize))
    assert torch.cat([b.image_ids for b in batches]).tolist() == list(range(11))
    assert [c for b in batches for c in b.captions] == data.captions
    regions = torch.cat([b.regions for b in batches]).numpy()
    np.testing.assert_allclose(regions, data.ims, atol=float(np.abs(data.ims).max()) * 2 ** -10)


# --------------------------------------------------------------------------------------------------
# Training: ranks, workers, epochs
# --------------------------------------------------------------------------------------------------


def test_two_ranks_two_workers_read_the_whole_split_once(tmp_path: Path) -> None:
    # 8 shards x 6 images x 5 captions = 240 pairs; 4 slots of 60 pairs = 10 batches of 6: remainder 0.
    write_split(tmp_path, [6] * 8)
    ranks = run_ranks(tmp_path, world=2, batch_size=6, num_workers=2)
    assert [len(r) for r in ranks] == [20, 20]
    everything = pairs_of(ranks[0]) + pairs_of(ranks[1])
    assert len(everything) == len(set(everything)) == 240
    assert set(everything) == {(i, j) for i in range(48) for j in range(5)}
    for batches in ranks:
        assert [b.index for b in batches] == list(range(20))
        assert {b.slot for b in batches} == {0, 1}
        assert all(b.regions.shape == (6, REGIONS, DIM) and b.regions.dtype == torch.float32 for b in batches)
    # The features travel with the right image through the worker processes.
    batch = ranks[1][3]
    for row, image in enumerate(batch.image_ids.tolist()):
        assert torch.equal(batch.regions[row], torch.from_numpy(features(image).astype(np.float32)))
        assert batch.captions[row] == caption(image, int(batch.caption_index[row]))


def test_uneven_shards_give_equal_batches_per_rank_without_duplicates(tmp_path: Path) -> None:
    sizes = [3, 7, 5, 9, 2, 6, 4, 8, 1, 11]
    write_split(tmp_path, sizes)
    for epoch in (0, 1):
        ranks = run_ranks(tmp_path, world=2, epoch=epoch, batch_size=4, num_workers=2)
        plan = make_plan(sizes, images=sum(sizes), captions=5 * sum(sizes), world_size=2, slots_per_rank=2,
                         batch_size=4, seed=0, epoch=epoch)
        assert len(ranks[0]) == len(ranks[1]) == plan.batches_per_rank > 0
        everything = pairs_of(ranks[0]) + pairs_of(ranks[1])
        assert len(everything) == len(set(everything))  # nothing twice, across ranks and workers
        # The remainder is what the plan says it is, less than a batch per slot plus rank imbalance.
        assert 5 * sum(sizes) - len(everything) == plan.dropped_pairs
        assert plan.dropped_pairs < 4 * 4 + max(sizes) * 5


def test_plan_is_balanced_and_refuses_too_few_shards() -> None:
    plan = make_plan([100] * 7 + [10], images=710, captions=3550, world_size=3, slots_per_rank=2,
                     batch_size=16, seed=3, epoch=2)
    assert len({sum(b) for b in plan.batches}) == 1
    assert sorted(p for rank in plan.shards for slot in rank for p in slot) == list(range(8))
    with pytest.raises(ValueError, match="less than one batch"):
        make_plan([5, 5], images=10, captions=50, world_size=3, slots_per_rank=1, batch_size=4, seed=0, epoch=0)


def test_order_is_a_function_of_seed_and_epoch(tmp_path: Path) -> None:
    write_split(tmp_path, [10] * 4)

    def order(epoch: int, seed: int = 0) -> list[tuple[int, int]]:
        return pairs_of(run_ranks(tmp_path, world=1, epoch=epoch, batch_size=8, num_workers=2, seed=seed)[0])

    first = order(0)
    assert order(0) == first
    assert sorted(first) == sorted(set(first))
    assert order(1) != first and order(0, seed=1) != first


def test_two_captions_of_one_image_rarely_share_a_batch(tmp_path: Path) -> None:
    # 600 images, 3000 pairs, batches of 32 from a pool of 256 images: only the tail batches of
    # the slot (fewer images left than a batch) can pair an image with itself.
    write_split(tmp_path, [100] * 6)
    batches = run_ranks(tmp_path, world=1, batch_size=32, num_workers=0)[0]
    assert len(batches) == 3000 // 32
    collisions = [32 - len(set(b.image_ids.tolist())) for b in batches]
    assert sum(1 for c in collisions if c) <= 2
    assert sum(collisions) <= 32
    assert all(c == 0 for c in collisions[:-2])
    # Each image's captions are spread over many batches (the pool shuffles, it does not just cycle).
    first_seen: dict[int, int] = {}
    spans = []
    for number, b in enumerate(batches):
        for image in b.image_ids.tolist():
            spans.append(number - first_seen.setdefault(image, number))
    assert np.mean(spans) > 5


# --------------------------------------------------------------------------------------------------
# Regions and captions
# --------------------------------------------------------------------------------------------------


def test_region_order_area_and_random(tmp_path: Path) -> None:
    write_split(tmp_path, [8, 8])
    (stored,) = run_ranks(tmp_path, world=1, batch_size=8, num_workers=0)
    (area,) = run_ranks(tmp_path, world=1, batch_size=8, num_workers=0, region_order="area")
    (rand,) = run_ranks(tmp_path, world=1, batch_size=8, num_workers=0, region_order="random")
    assert pairs_of(stored) == pairs_of(area) == pairs_of(rand)  # order of pairs does not change
    shuffled_rows = 0
    for b_stored, b_area, b_rand in zip(stored, area, rand):
        assert b_stored.boxes is not None and b_area.boxes is not None
        for row, image in enumerate(b_stored.image_ids.tolist()):
            box = boxes_for(image)
            expected = np.argsort(-(box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]), kind="stable")
            assert torch.equal(b_area.regions[row], torch.from_numpy(features(image)[expected].astype(np.float32)))
            assert torch.equal(b_area.boxes[row], torch.from_numpy(box[expected]))
            # random: a permutation of the stored regions, boxes permuted alike
            perm = [int(np.flatnonzero((features(image) == r.numpy().astype(np.float16)).all(1))[0])
                    for r in b_rand.regions[row]]
            assert sorted(perm) == list(range(REGIONS))
            assert torch.equal(b_rand.boxes[row], torch.from_numpy(box[perm]))
            shuffled_rows += perm != list(range(REGIONS))
    assert shuffled_rows > len(pairs_of(stored)) // 2
    (again,) = run_ranks(tmp_path, world=1, batch_size=8, num_workers=0, region_order="random")
    assert all(torch.equal(a.regions, b.regions) for a, b in zip(rand, again))


def test_area_order_needs_boxes(tmp_path: Path) -> None:
    def drop_boxes(index: int, sample: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in sample.items() if k != "boxes.npy"} if index == 5 else sample

    write_split(tmp_path, [8], mutate=drop_boxes)
    with pytest.raises(ShardFormatError, match=r"train-000000\.tar: sample train-0000005: no boxes"):
        run_ranks(tmp_path, world=1, batch_size=4, num_workers=0, region_order="area")


def test_tokens_lengths_and_padding(tmp_path: Path) -> None:
    write_split(tmp_path, [6])

    def words(text: str) -> list[int]:  # variable lengths: 1 + (index % 4) words
        return [1] + list(range(3, 3 + 1 + len(text) % 4)) + [2]

    reader = TrainReader(ReaderConfig(str(tmp_path), batch_size=5, num_workers=0), words, rank=0, world_size=1)
    for batch in reader.epoch(0):
        expected = [words(c) for c in batch.captions]
        assert batch.lengths.tolist() == [len(e) for e in expected]
        assert batch.tokens.dtype == torch.long and batch.tokens.shape == (5, max(map(len, expected)))
        for row, ids in enumerate(expected):
            assert batch.tokens[row, : len(ids)].tolist() == ids
            assert (batch.tokens[row, len(ids):] == 0).all()


def test_float16_output_and_pin_memory_passthrough(tmp_path: Path) -> None:
    write_split(tmp_path, [4])
    (batches,) = run_ranks(tmp_path, world=1, batch_size=4, num_workers=0, output_dtype="float16")
    assert batches[0].regions.dtype == torch.float16
    moved = batches[0].to("cpu")
    assert isinstance(moved, TrainBatch) and torch.equal(moved.tokens, batches[0].tokens)


# --------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_batch_k_equals_the_uninterrupted_epoch(tmp_path: Path, workers: int) -> None:
    # Uneven shards: the two slots make different numbers of batches, so round-robin ends unevenly.
    write_split(tmp_path, [12, 3, 4, 2])
    reader = TrainReader(ReaderConfig(str(tmp_path), batch_size=4, num_workers=workers), tokenize, rank=0, world_size=1)
    plan = reader.plan(3)
    if workers:
        assert plan.batches[0][0] != plan.batches[0][1]
    full = list(reader.epoch(3))
    assert [b.index for b in full] == list(range(plan.batches_per_rank))
    for k in sorted({1, 2, 5, len(full) - 2, len(full) - 1, len(full)}):
        resumed = list(reader.epoch(3, start_batch=k))
        assert [b.index for b in resumed] == list(range(k, len(full)))
        for a, b in zip(full[k:], resumed):
            assert a.keys == b.keys and a.captions == b.captions and torch.equal(a.regions, b.regions)
            assert a.slot == b.slot


# --------------------------------------------------------------------------------------------------
# Bad data
# --------------------------------------------------------------------------------------------------

BAD_INDEX = 6  # in shard train-000001.tar (shards of 5 images)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _sample_mutation(kind: str) -> Mutate:
    def mutate(index: int, sample: dict[str, Any]) -> dict[str, Any]:
        if index != BAD_INDEX:
            return sample
        if kind == "shape":
            sample["regions.npy"] = _npy(np.zeros((REGIONS + 1, DIM), np.float16))
        elif kind == "dtype":
            sample["regions.npy"] = _npy(np.zeros((REGIONS, DIM), np.float32))
        elif kind == "nan":
            sample["regions.npy"] = _npy(np.full((REGIONS, DIM), np.nan, np.float16))
        elif kind == "inf":
            values = features(index)
            values[1, 2] = np.inf
            sample["regions.npy"] = _npy(values)
        elif kind == "empty_caption":
            sample["captions.json"] = json.dumps(["a dog", " ", "x", "y", "z"]).encode()
        elif kind == "non_utf8":
            sample["captions.json"] = b'["a caf\xe9 latte", "b", "c", "d", "e"]'
        elif kind == "corrupt_member":
            sample["regions.npy"] = b"\x93NUMPY garbage" + sample["regions.npy"][14:]
        return sample

    return mutate


SAMPLE_CASES = {
    "shape": ("feature_shape", "feature shape"),
    "dtype": ("feature_dtype", "feature dtype"),
    "nan": ("nonfinite", "NaN or Inf"),
    "inf": ("nonfinite", "NaN or Inf"),
    "empty_caption": ("empty_caption", "caption 1 is empty"),
    "non_utf8": ("non_utf8", "not UTF-8"),
    "corrupt_member": ("corrupt_sample", "unreadable .npy"),
}


@pytest.mark.parametrize("kind", sorted(SAMPLE_CASES))
def test_bad_sample_strict_names_shard_and_key_skip_counts(tmp_path: Path, kind: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    reason, phrase = SAMPLE_CASES[kind]
    write_split(tmp_path, [5, 5, 5], mutate=_sample_mutation(kind))
    with pytest.raises(ShardFormatError) as error:
        list(EvalReader(ReaderConfig(str(tmp_path), batch_size=4, num_workers=0), tokenize))
    assert "train-000001.tar" in str(error.value) and sample_key("train", BAD_INDEX) in str(error.value)
    assert phrase in str(error.value)

    caplog.set_level(logging.WARNING, logger="data_shards.reader")
    reader = EvalReader(ReaderConfig(str(tmp_path), batch_size=4, num_workers=0, bad_data="skip"), tokenize)
    ids = torch.cat([b.image_ids for b in reader]).tolist()
    assert ids == [i for i in range(15) if i != BAD_INDEX]
    stats = reader.stats.as_dict()
    assert stats["skipped_samples"] == 1 and stats[f"skipped_samples/{reason}"] == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "train-000001.tar" in warnings[0].getMessage()


def test_skip_warns_once_per_shard_and_training_stats_cross_workers(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    def mutate(index: int, sample: dict[str, Any]) -> dict[str, Any]:
        if index in (1, 2, 3, 7):  # three in shard 0, one in shard 1
            sample["regions.npy"] = _npy(np.full((REGIONS, DIM), np.inf, np.float16))
        return sample

    write_split(tmp_path, [5, 5, 5, 5], mutate=mutate)
    caplog.set_level(logging.WARNING, logger="data_shards.reader")
    reader = EvalReader(ReaderConfig(str(tmp_path), batch_size=4, num_workers=0, bad_data="skip"), tokenize)
    list(reader)
    assert reader.stats["skipped_samples/nonfinite"] == 4
    warned = sorted(r.getMessage().split(":")[0].rsplit("/", 1)[-1] for r in caplog.records)
    assert warned == ["train-000000.tar", "train-000001.tar"]
    # Training with 2 worker processes: the main process sums the workers' counts from the batches.
    # 16 good images = 80 pairs against a planned 100: the short slots top up with a second pass.
    train = TrainReader(ReaderConfig(str(tmp_path), batch_size=5, num_workers=2, bad_data="skip"), tokenize,
                        rank=0, world_size=1)
    batches = list(train.epoch(0))
    assert len(batches) == train.batches_per_epoch(0) == 20
    assert not {1, 2, 3, 7} & {i for b in batches for i in b.image_ids.tolist()}
    stats = train.stats.as_dict()
    assert stats["skipped_samples/nonfinite"] >= 4 and stats["topup_images"] > 0
    assert stats["images_read"] >= 16


def test_other_than_five_captions_is_allowed_and_counted(tmp_path: Path) -> None:
    def mutate(index: int, sample: dict[str, Any]) -> dict[str, Any]:
        if index in (2, 9):
            sample["captions.json"] = json.dumps([caption(index, j) for j in range(3 + index % 2 * 3)]).encode()
        return sample

    write_split(tmp_path, [5, 5], mutate=mutate)
    reader = EvalReader(ReaderConfig(str(tmp_path), batch_size=4, num_workers=0), tokenize)  # strict
    batches = list(reader)
    counts = Counter(torch.cat([b.caption_image_ids for b in batches]).tolist())
    assert counts[2] == 3 and counts[9] == 6 and all(counts[i] == 5 for i in range(10) if i not in (2, 9))
    assert reader.stats["images_caption_count_not_5"] == 2
    train = TrainReader(ReaderConfig(str(tmp_path), batch_size=4, num_workers=0), tokenize, rank=0, world_size=1)
    pairs = pairs_of(list(train.epoch(0)))
    # 49 captions: 12 batches of 4, one caption left out; every pair exists and appears once.
    assert len(pairs) == len(set(pairs)) == 48
    assert all(j < counts[i] for i, j in pairs)
    assert train.stats["images_caption_count_not_5"] == 2


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _member_offset(path: Path, member: str) -> tuple[int, int]:
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
        return info.offset, info.offset_data


@pytest.mark.parametrize("where", ["mid_member", "at_header"])
def test_truncated_tar(tmp_path: Path, where: str) -> None:
    write_split(tmp_path, [5, 5, 5])
    shard = tmp_path / "train-000001.tar"
    header, data = _member_offset(shard, f"{sample_key('train', 7)}.regions.npy")
    _truncate(shard, data + 100 if where == "mid_member" else header)
    with pytest.raises(ShardFormatError) as error:
        list(EvalReader(ReaderConfig(str(tmp_path), batch_size=4, num_workers=0), tokenize))
    message = str(error.value)
    assert "train-000001.tar" in message and sample_key("train", 7 if where == "at_header" else 6) in message
    reader = EvalReader(ReaderConfig(str(tmp_path), batch_size=4, num_workers=0, bad_data="skip"), tokenize)
    ids = torch.cat([b.image_ids for b in reader]).tolist()
    assert ids == [0, 1, 2, 3, 4, 5, 6, 10, 11, 12, 13, 14]
    assert reader.stats["skipped_samples"] == 3 and reader.stats["bad_shards"] == 1


def test_corrupt_tar_header(tmp_path: Path) -> None:
    write_split(tmp_path, [5, 5])
    shard = tmp_path / "train-000000.tar"
    header, _ = _member_offset(shard, f"{sample_key('train', 2)}.captions.json")
    data = bytearray(shard.read_bytes())
    data[header : header + 100] = b"\x07" * 100  # the member name and the header checksum
    shard.write_bytes(bytes(data))
    # tarfile's stream mode ends the archive silently there: the partial sample 2 and the sample
    # count give it away, with checksums off too.
    with pytest.raises(ShardFormatError, match=r"train-000000\.tar: sample train-0000002: missing"):
        list(EvalReader(ReaderConfig(str(tmp_path), batch_size=4, num_workers=0, checksums="off"), tokenize))
    reader = EvalReader(ReaderConfig(str(tmp_path), batch_size=4, num_workers=0, checksums="off", bad_data="skip"),
                        tokenize)
    assert torch.cat([b.image_ids for b in reader]).tolist() == [0, 1, 5, 6, 7, 8, 9]
    assert (reader.stats["skipped_samples/corrupt_sample"], reader.stats["skipped_samples/sample_count"]) == (1, 2)


def test_missing_shard(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_split(tmp_path, [5, 5, 5])
    (tmp_path / "train-000002.tar").unlink()
    with pytest.raises(ShardFormatError, match=r"train-000002\.tar: cannot open shard"):
        list(EvalReader(ReaderConfig(str(tmp_path), batch_size=4, num_workers=0), tokenize))
    caplog.set_level(logging.WARNING, logger="data_shards.reader")
    reader = EvalReader(ReaderConfig(str(tmp_path), batch_size=4, num_workers=2, bad_data="skip"), tokenize)
    assert torch.cat([b.image_ids for b in reader]).tolist() == list(range(10))
    assert reader.stats["skipped_samples/missing_shard"] == 5 and reader.stats["bad_shards/missing_shard"] == 1


@pytest.mark.parametrize("mode", ["stream", "before"])
def test_wrong_checksum(tmp_path: Path, mode: str) -> None:
    write_split(tmp_path, [5, 5, 5])
    manifest = Manifest.from_json((tmp_path / MANIFEST_NAME).read_text())
    manifest.shards[1].sha256 = "0" * 64
    (tmp_path / MANIFEST_NAME).write_text(manifest.to_json())
    with pytest.raises(ShardFormatError, match=r"train-000001\.tar: sha256 [0-9a-f]{64} != manifest 0{64}"):
        list(EvalReader(ReaderConfig(str(tmp_path), batch_size=4, num_workers=0, checksums=mode), tokenize))
    reader = EvalReader(ReaderConfig(str(tmp_path), batch_size=4, num_workers=0, checksums=mode, bad_data="skip"),
                        tokenize)
    ids = torch.cat([b.image_ids for b in reader]).tolist()
    if mode == "before":  # verified before use: the shard's samples never reach the model
        assert ids == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14] and reader.stats["skipped_samples/checksum"] == 5
    else:  # found at the end of the shard: already used, counted
        assert ids == list(range(15)) and reader.stats["checksum_mismatches"] == 1
    off = EvalReader(ReaderConfig(str(tmp_path), batch_size=4, num_workers=0, checksums="off"), tokenize)
    assert len(torch.cat([b.image_ids for b in off])) == 15


def test_strict_error_from_a_loader_worker_names_shard_and_key(tmp_path: Path) -> None:
    write_split(tmp_path, [5, 5, 5, 5], mutate=_sample_mutation("nan"))
    reader = TrainReader(ReaderConfig(str(tmp_path), batch_size=5, num_workers=2), tokenize, rank=0, world_size=1)
    with pytest.raises(ShardFormatError, match=r"train-000001\.tar: sample train-0000006: features contain NaN"):
        list(reader.epoch(0))


def test_dataloader_with_other_worker_count_is_refused(tmp_path: Path) -> None:
    write_split(tmp_path, [5, 5])
    reader = TrainReader(ReaderConfig(str(tmp_path), batch_size=5, num_workers=2), tokenize, rank=0, world_size=1)
    with pytest.raises(RuntimeError, match="planned for 2 reading slot"):
        list(torch.utils.data.DataLoader(reader.dataset(0), batch_size=None, num_workers=0))


def test_rank_and_world_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_split(tmp_path, [5, 5])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    reader = TrainReader(ReaderConfig(str(tmp_path), batch_size=5), tokenize)
    assert (reader.rank, reader.world_size) == (1, 2)


def test_shard_selection_by_brace_pattern(tmp_path: Path) -> None:
    write_split(tmp_path, [3, 3, 3, 3])
    reader = EvalReader(ReaderConfig(str(tmp_path), shards="train-{000001..000002}.tar", num_workers=0), tokenize)
    assert torch.cat([b.image_ids for b in reader]).tolist() == [3, 4, 5, 6, 7, 8]
    with pytest.raises(ShardFormatError, match="not in the manifest"):
        EvalReader(ReaderConfig(str(tmp_path), shards="train-000009.tar"), tokenize)


# --------------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------------


def test_reading_from_s3(tmp_path: Path, s3_server: Any, s3_bucket: str) -> None:
    write_split(tmp_path, [6] * 4)
    client = s3_server.client()
    for path in tmp_path.iterdir():
        client.upload_file(str(path), s3_bucket, f"coco/train/{path.name}")
    location = f"s3://{s3_bucket}/coco/train"
    options = s3_server.storage_options
    ranks = []
    for rank in range(2):  # 2 ranks x 2 worker processes, each building its own s3fs filesystem
        reader = TrainReader(ReaderConfig(location, batch_size=6, num_workers=2, storage_options=options), tokenize,
                             rank=rank, world_size=2)
        ranks.append(list(reader.epoch(0)))
        assert reader.stats["shards_completed"] == 2
    everything = pairs_of(ranks[0]) + pairs_of(ranks[1])
    assert len(ranks[0]) == len(ranks[1]) == 10 and sorted(everything) == [(i, j) for i in range(24) for j in range(5)]
    evaluation = EvalReader(ReaderConfig(location, batch_size=5, num_workers=2, storage_options=options,
                                         checksums="before"), tokenize)
    assert torch.cat([b.image_ids for b in evaluation]).tolist() == list(range(24))
    client.delete_object(Bucket=s3_bucket, Key="coco/train/train-000003.tar")
    with pytest.raises(ShardFormatError, match=rf"s3://{s3_bucket}/coco/train/train-000003\.tar: cannot open"):
        list(EvalReader(ReaderConfig(location, num_workers=0, storage_options=options), tokenize))


def _shared_blocks() -> set[str]:
    """The multiprocessing.shared_memory blocks of this machine (Linux: /dev/shm/psm_*)."""
    return {p.name for p in Path("/dev/shm").glob("psm_*")} if Path("/dev/shm").is_dir() else set()


def test_an_epoch_frees_its_shared_memory_even_when_left_early(tmp_path: Path) -> None:
    write_split(tmp_path, [10, 10, 10, 10])
    before = _shared_blocks()
    reader = TrainReader(ReaderConfig(str(tmp_path), batch_size=5, num_workers=2), tokenize, rank=0, world_size=1)
    assert len(list(reader.epoch(0))) == reader.batches_per_epoch(0)
    assert _shared_blocks() == before
    epoch = reader.epoch(1)
    next(epoch)
    assert len(_shared_blocks() - before) == 2  # one pool per loader worker while the epoch runs
    epoch.close()  # the caller stops early (a failure, the end of a step budget)
    assert _shared_blocks() == before
