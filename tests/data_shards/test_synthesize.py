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


# --------------------------------------------------------------------------------------------------
# The world as pictures: layouts, region boxes, rendering
# --------------------------------------------------------------------------------------------------


def test_layouts_keep_the_features_and_captions_and_box_every_region(tmp_path: Path) -> None:
    from data_shards.synthetic import ATTRIBUTE_COLOURS, BACKGROUND_COLOURS, region_boxes, render_scene, scene_layout

    # The features and captions of a seed are those written before layouts existed (the digest
    # of the 7-image split of test_writer_streams_to_the_precomp_layout is unchanged by them).
    ims, caps = write_precomp_split(tmp_path, "dev", 7, regions=5, feature_dim=8, seed=11)
    again = make_synthetic_split(7, regions=5, feature_dim=8, seed=11)
    assert np.array_equal(np.load(ims), again.images) and caps.read_text().splitlines() == again.captions
    layout = scene_layout(7, seed=11)
    boxes = np.load(tmp_path / "dev_ims_bbx.npy")
    sizes = np.load(tmp_path / "dev_ims_size.npy")
    assert np.array_equal(boxes, region_boxes(layout, 5)) and np.array_equal(sizes, layout.sizes)
    assert boxes.shape == (7, 5, 4) and boxes.dtype == np.float32 and sizes.shape == (7, 2)

    layout = scene_layout(40, seed=3)
    boxes = region_boxes(layout, 12)
    split = make_synthetic_split(40, regions=12, feature_dim=16, seed=3)
    for i in range(40):
        width, height = layout.sizes[i]
        assert height == width * 3 // 4
        # 9 object regions in object order, then 3 background regions spanning the image.
        assert all(np.array_equal(boxes[i, j], [0, 0, width, height]) for j in range(9, 12))
        slots = [j * layout.counts[i] // 9 for j in range(9)]
        for j in range(9):
            assert np.array_equal(boxes[i, j], layout.object_boxes[i, slots[j]])
        x1, y1, x2, y2 = layout.object_boxes[i, : layout.counts[i]].T
        assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= width).all() and (y2 <= height).all()
        assert (x2 > x1).all() and (y2 > y1).all()
        # The captions speak of the layout's objects: the scenes are the generator's own.
        words = " ".join(split.captions[5 * i:5 * i + 5])
        named = {OBJECTS[o] for o in layout.objects[i, : layout.counts[i]]}
        assert {w for w in words.split() if w in OBJECTS} <= named

    # Rendering: the image size, its background colour in a corner no object covers, the last
    # object's attribute colour near its box's top-left inside the shape (rectangles and ellipses).
    picture = render_scene(layout, 0)
    assert picture.size == tuple(int(v) for v in layout.sizes[0]) and picture.mode == "RGB"
    pixels = np.asarray(picture)
    covered = np.zeros(pixels.shape[:2], dtype=bool)
    for x1, y1, x2, y2 in layout.object_boxes[0, : layout.counts[0]]:
        covered[int(y1):int(y2) + 1, int(x1):int(x2) + 1] = True
    free = np.argwhere(~covered)
    assert len(free) > 0
    y, x = free[0]
    assert tuple(pixels[y, x]) == BACKGROUND_COLOURS[BACKGROUNDS[layout.background[0]]]
    colours = {ATTRIBUTE_COLOURS[ATTRIBUTES[a]] for a in layout.attributes[0, : layout.counts[0]]}
    assert colours & {tuple(p) for p in pixels.reshape(-1, 3)[:: 7]}
    assert np.array_equal(np.asarray(render_scene(layout, 0)), pixels)  # deterministic


def test_scene_images_are_written_per_key(tmp_path: Path) -> None:
    from data_shards.synthetic import scene_layout, write_scene_images

    layout = scene_layout(3, seed=0)
    paths = write_scene_images(tmp_path / "images", layout, ["a-0", "a-1", "a-2"])
    assert [p.name for p in paths] == ["a-0.png", "a-1.png", "a-2.png"] and all(p.stat().st_size > 0 for p in paths)
    with pytest.raises(ValueError, match="2 names for 3 images"):
        write_scene_images(tmp_path / "other", layout, ["x", "y"])
