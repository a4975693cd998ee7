"""Tests of data_shards/synthetic.py and the data_shards/synthesize.py CLI."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_shards.synthetic import (
    ATTRIBUTES,
    BACKGROUNDS,
    OBJECTS,
    generate_split,
    make_synthetic_split,
    write_precomp_split,
)

ROOT = Path(__file__).resolve().parents[2]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_data_other_seed_other_data() -> None:
    a = make_synthetic_split(20, regions=6, feature_dim=16, seed=3)
    b = make_synthetic_split(20, regions=6, feature_dim=16, seed=3)
    c = make_synthetic_split(20, regions=6, feature_dim=16, seed=4)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert not np.array_equal(a.images, c.images) and a.captions != c.captions
    assert a.images.shape == (20, 6, 16) and a.images.dtype == np.float32 and len(a.captions) == 100


def test_chunking_does_not_change_the_data() -> None:
    whole = list(generate_split(9, 6, 16, seed=1, chunk=100))
    pieces = list(generate_split(9, 6, 16, seed=1, chunk=4))
    assert len(pieces) == 3
    assert np.array_equal(whole[0][0], np.concatenate([p[0] for p in pieces]))
    assert whole[0][1] == [c for p in pieces for c in p[1]]


def test_captions_name_only_what_the_image_holds() -> None:
    split = make_synthetic_split(50, regions=12, feature_dim=32, seed=0, world_seed=7)
    words = set(OBJECTS) | set(ATTRIBUTES) | set(BACKGROUNDS)
    for i in range(50):
        caps = split.captions[5 * i:5 * i + 5]
        assert len(set(caps)) >= 3  # varied phrasing
        named = [{w for w in c.split() if w in OBJECTS} for c in caps]
        assert all(len(n) >= 1 for n in named)
        # Whatever objects the five captions name, an image holds at most four.
        assert len(set().union(*named)) <= 4
        assert all(w.isalpha() for c in caps for w in c.split())
    assert words & set(" ".join(split.captions).split())


def test_regions_are_grounded_in_the_named_objects() -> None:
    """The features of an image are closest to the prototypes of the objects its captions name:
    nearest-prototype labelling of the regions recovers the captioned objects."""
    from data_shards.synthetic import _world

    split = make_synthetic_split(30, regions=16, feature_dim=256, seed=2, world_seed=5)
    world = _world(256, 5)
    for i in range(30):
        scores = split.images[i] @ world.objects.T  # (regions, objects)
        found = {OBJECTS[j] for j in scores.argmax(1)[:12]}  # the object regions are stored first
        named = {w for c in split.captions[5 * i:5 * i + 5] for w in c.split() if w in OBJECTS}
        assert named <= found


def test_writer_streams_to_the_precomp_layout(tmp_path: Path) -> None:
    ims, caps = write_precomp_split(tmp_path, "dev", 7, regions=5, feature_dim=8, seed=11)
    expected = make_synthetic_split(7, regions=5, feature_dim=8, seed=11)
    assert np.array_equal(np.load(ims), expected.images)
    assert caps.read_text(encoding="utf-8").splitlines() == expected.captions
    assert not list(tmp_path.glob("*.partial"))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "data_shards/synthesize.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_is_deterministic_and_writes_three_splits(tmp_path: Path) -> None:
    common = ["--train-images", "6", "--dev-images", "3", "--test-images", "4", "--regions", "5",
              "--feature-dim", "8", "--seed", "9"]
    assert _run("--output", str(tmp_path / "a"), *common).returncode == 0
    assert _run("--output", str(tmp_path / "b"), *common).returncode == 0
    for split, n in (("train", 6), ("dev", 3), ("test", 4)):
        for suffix in ("_ims.npy", "_caps.txt"):
            assert _digest(tmp_path / "a" / f"{split}{suffix}") == _digest(tmp_path / "b" / f"{split}{suffix}")
        assert np.load(tmp_path / "a" / f"{split}_ims.npy").shape == (n, 5, 8)
        assert len((tmp_path / "a" / f"{split}_caps.txt").read_text().splitlines()) == 5 * n
    # splits are different images
    assert (tmp_path / "a" / "dev_caps.txt").read_text() != (tmp_path / "a" / "test_caps.txt").read_text()[:len((tmp_path / "a" / "dev_caps.txt").read_text())]


@pytest.mark.parametrize("args,message", [
    (["--train-images", "0", "--dev-images", "1", "--test-images", "1"], "--train-images must be >= 1"),
    (["--train-images", "1", "--dev-images", "1", "--test-images", "1", "--regions", "2"], "--regions must be >= 4"),
])
def test_cli_rejects_bad_sizes(tmp_path: Path, args: list[str], message: str) -> None:
    result = _run("--output", str(tmp_path), *args)
    assert result.returncode == 2 and message in result.stderr
