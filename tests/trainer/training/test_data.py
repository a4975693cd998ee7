"""Tests of trainer/training/data.py: the synthetic cache (built once, race-safe) and given shards."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from data_shards.convert import convert, plan_precomp
from data_shards.reader import ReaderConfig, load_split
from model.vocab import Vocabulary, build_vocab
from trainer.config import DataConfig
from trainer.training.data import DataError, prepare_data, synthetic_directory


def tiny_data(cache: Path, **overrides: object) -> DataConfig:
    values: dict[str, object] = {"cache_dir": str(cache), "synthetic_train_images": 24, "synthetic_dev_images": 6,
                                 "synthetic_test_images": 6, "synthetic_regions": 4, "synthetic_feature_dim": 8,
                                 "vocab_threshold": 1}
    values.update(overrides)
    return DataConfig(**values)  # type: ignore[arg-type]


def test_synthetic_dataset_is_built_once_and_reused(tmp_path: Path) -> None:
    data = tiny_data(tmp_path)
    first = prepare_data(data)
    root = synthetic_directory(data)
    assert first.synthetic and first.train == str(root / "shards" / "train")
    assert first.feature_shape == (4, 8) and first.storage_options == {}
    for split, images in (("train", 24), ("dev", 6), ("test", 6)):
        spec = load_split(ReaderConfig(getattr(first, split)))
        assert spec.images == images and spec.captions == 5 * images and spec.feature_dtype == "float32"
        assert (root / "precomp" / f"{split}_ims.npy").is_file()
    captions = (root / "precomp" / "train_caps.txt").read_text(encoding="utf-8").splitlines()
    vocab = Vocabulary.load_json(first.vocab)
    assert vocab.idx2word == build_vocab(captions, 1).idx2word and first.vocab_size == len(vocab)
    stamp = os.stat(root / "vocab.json").st_mtime_ns
    assert prepare_data(data) == first  # reused: nothing rebuilt
    assert os.stat(root / "vocab.json").st_mtime_ns == stamp
    # Another parameter, another directory; no temporary directories left behind.
    other = prepare_data(tiny_data(tmp_path, synthetic_train_images=30))
    assert other.train != first.train
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _prepare(cache: str) -> str:
    return prepare_data(tiny_data(Path(cache))).train


def test_concurrent_builds_publish_one_complete_directory(tmp_path: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_prepare, [str(tmp_path)] * 2)
    assert results[0] == results[1]
    assert [p.name for p in tmp_path.iterdir()] == [synthetic_directory(tiny_data(tmp_path)).name]
    assert load_split(ReaderConfig(results[0])).images == 24


def _shards(tmp_path: Path, make_precomp: object) -> dict[str, str]:
    out = {}
    for split in ("train", "dev", "test"):
        make_precomp(tmp_path / "precomp", split, 6, regions=4, dim=8)  # type: ignore[operator]
        plan = plan_precomp(str(tmp_path / "precomp"), split, 4, "float16")
        out[split] = str(tmp_path / split)
        convert(plan, out[split], {}, "float16")
    return out


def test_given_shards_get_a_vocabulary_from_their_captions(tmp_path: Path, make_precomp: object) -> None:
    shards = _shards(tmp_path, make_precomp)
    data = DataConfig(train=shards["train"], dev=shards["dev"], test=shards["test"], vocab_threshold=2,
                      cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(data)
    assert (prepared.train, prepared.dev, prepared.test) == (shards["train"], shards["dev"], shards["test"])
    assert not prepared.synthetic and prepared.feature_shape == (4, 8)
    captions = (tmp_path / "precomp" / "train_caps.txt").read_text(encoding="utf-8").splitlines()
    assert Vocabulary.load_json(prepared.vocab).idx2word == build_vocab(captions, 2).idx2word
    # An explicit vocabulary is used as it is.
    vocab_file = tmp_path / "mine.json"
    build_vocab(["a b c"], 1).save_json(vocab_file)
    explicit = prepare_data(DataConfig(train=shards["train"], dev=shards["dev"], test=shards["test"],
                                       vocab=str(vocab_file), cache_dir=str(tmp_path / "cache")))
    assert explicit.vocab == str(vocab_file) and explicit.vocab_size == 7


def test_given_shards_errors_name_the_key(tmp_path: Path, make_precomp: object) -> None:
    shards = _shards(tmp_path, make_precomp)
    with pytest.raises(DataError, match="data.dev must be set"):
        prepare_data(DataConfig(train=shards["train"], test=shards["test"]))
    with pytest.raises(DataError, match="data.test: .*no manifest"):
        prepare_data(DataConfig(train=shards["train"], dev=shards["dev"], test=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match="data.vocab: .*no such file"):
        prepare_data(DataConfig(train=shards["train"], dev=shards["dev"], test=shards["test"],
                                vocab=str(tmp_path / "missing.json")))
