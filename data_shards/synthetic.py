"""A synthetic image-caption world in which the captions are determined by the regions.

The world (fixed by `world_seed`, shared by every split):
- concepts named by English words: OBJECTS, ATTRIBUTES (colours, sizes, materials) and
  BACKGROUNDS (scene stuff); each has a fixed random prototype vector in feature space;
- RELATIONS (spatial words) that captions use between two objects.

An image (drawn with `seed`) holds 2-4 objects, each with one attribute, over one background.
Every region is a noisy copy of one prototype: most regions look at one of the objects (object
prototype + its attribute's prototype), the rest at the background. Regions are stored the way
bottom-up features are, by descending "detector confidence": object regions first, in order of
the objects, background regions last. Features are non-negative like pooled ReLU activations.

Each image has five captions from varied templates that name some of its objects, their
attributes, a relation between two of them and sometimes the background, so every caption is
grounded in the regions but no caption names everything. Chance R@1 on 1000 images is 0.1 %; a
model that learns the concepts reaches high recall (docs and the trainer's tests show it).

Everything is vectorized over images and deterministic given (seed, world_seed): a 5000-image
split of 36 x 2048 features takes seconds, written chunk by chunk so memory stays flat.

The world can also be looked at. Every image has a size and a layout (`scene_layout`): each object
a box, drawn from a generator of its own so that features and captions are what they were before
layouts existed. An object's regions share its box and background regions span the whole image
(`region_boxes`), as a detector's boxes would. `render_scene` draws an image as a PNG: a flat
background in its scene's colour, one shape per object in its attribute's colour with the
object's word written on it. Attention maps (trainer/explain.py) are drawn over these pictures.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OBJECTS = (
    "dog", "cat", "horse", "bird", "cow", "sheep", "elephant", "giraffe", "bear", "zebra",
    "car", "bus", "train", "truck", "boat", "bicycle", "motorcycle", "airplane", "man", "woman",
    "child", "table", "chair", "bench", "pizza", "cake", "sandwich", "banana", "kite", "umbrella",
    "clock", "vase", "laptop", "phone", "book", "bottle", "cup", "ball", "surfboard", "skateboard",
)
ATTRIBUTES = (
    "red", "blue", "green", "yellow", "white", "black", "brown", "small", "large", "wooden",
    "striped", "old",
)
BACKGROUNDS = ("street", "beach", "kitchen", "field", "park", "room", "snow", "water")
RELATIONS = ("near", "beside", "behind", "in front of", "next to", "under", "on top of", "with")

# {a0} {o0}: first object and its attribute; {a1} {o1}: second; {o2}: a third object when the
# image has one (else the second is repeated by the generator); {r}: relation; {b}: background.
TEMPLATES = (
    "a {a0} {o0} {r} a {a1} {o1}",
    "a {o0} and a {a1} {o1} in the {b}",
    "there is a {a0} {o0} {r} the {o1}",
    "the {a1} {o1} is {r} a {o0} in the {b}",
    "a photo of a {a0} {o0} with a {o2}",
    "a {o1} {r} a {a0} {o0}",
    "a {a0} {o0} and a {o2} in the {b}",
    "in the {b} a {a1} {o1} stands {r} a {o0}",
)

MIN_OBJECTS, MAX_OBJECTS = 2, 4
CAPTIONS_PER_IMAGE = 5

# How images are drawn (RGB). Attributes that are not colours still get a colour of their own, so
# that every object's shape is told apart by what its captions say of it.
ATTRIBUTE_COLOURS = {
    "red": (214, 39, 40), "blue": (31, 119, 180), "green": (44, 160, 44), "yellow": (240, 200, 30),
    "white": (250, 250, 250), "black": (20, 20, 20), "brown": (140, 86, 75), "small": (148, 103, 189),
    "large": (255, 127, 14), "wooden": (188, 143, 90), "striped": (23, 190, 207), "old": (127, 127, 127),
}
BACKGROUND_COLOURS = {
    "street": (170, 170, 165), "beach": (238, 214, 175), "kitchen": (225, 205, 185), "field": (170, 205, 120),
    "park": (140, 190, 130), "room": (215, 200, 220), "snow": (235, 240, 248), "water": (150, 190, 230),
}
IMAGE_WIDTHS = (480, 512, 560, 640)  # image sizes are drawn from these (height: 3/4 of the width)
LAYOUT_STREAM = 7  # the layout generator: seeded by (seed, world_seed, LAYOUT_STREAM)


@dataclass(frozen=True)
class SyntheticSplit:
    images: np.ndarray  # (N, regions, feature_dim) float32
    captions: list[str]  # 5N captions, captions 5i..5i+4 describe image i


@dataclass(frozen=True)
class _World:
    objects: np.ndarray  # (len(OBJECTS), dim)
    attributes: np.ndarray  # (len(ATTRIBUTES), dim)
    backgrounds: np.ndarray  # (len(BACKGROUNDS), dim)


def _world(feature_dim: int, world_seed: int) -> _World:
    rng = np.random.default_rng(world_seed)

    def protos(n: int) -> np.ndarray:
        # Sparse non-negative prototypes, unit scale: a few strongly active channels each, as
        # pooled CNN features tend to be.
        p = rng.random((n, feature_dim), dtype=np.float32)
        return np.where(p > 0.8, p * 2.0, 0.0).astype(np.float32)

    return _World(protos(len(OBJECTS)), protos(len(ATTRIBUTES)), protos(len(BACKGROUNDS)))


def _scenes(num_images: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(objects (N, MAX_OBJECTS), attributes (N, MAX_OBJECTS), counts (N,), background (N,))."""
    # A random permutation prefix per image gives distinct objects.
    objects = np.argsort(rng.random((num_images, len(OBJECTS))), axis=1)[:, :MAX_OBJECTS]
    attributes = rng.integers(0, len(ATTRIBUTES), size=(num_images, MAX_OBJECTS))
    counts = rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1, size=num_images)
    background = rng.integers(0, len(BACKGROUNDS), size=num_images)
    return objects, attributes, counts, background


def region_slots(counts: np.ndarray, regions: int) -> tuple[np.ndarray, np.ndarray]:
    """(object slot of each region (N, regions), whether it looks at an object (1, regions)).

    About three quarters of the regions look at objects, split evenly in object order; the rest
    look at the background (their slot is meaningless).
    """
    object_regions = (regions * 3) // 4
    slot = np.arange(regions)[None, :] * counts[:, None] // object_regions
    is_object = np.arange(regions)[None, :] < object_regions
    return np.minimum(slot, counts[:, None] - 1), is_object


def _region_features(world: _World, objects: np.ndarray, attributes: np.ndarray, counts: np.ndarray,
                     background: np.ndarray, regions: int, noise: float,
                     rng: np.random.Generator) -> np.ndarray:
    n = objects.shape[0]
    slot, is_object = region_slots(counts, regions)
    obj_ids = np.take_along_axis(objects, slot, axis=1)
    attr_ids = np.take_along_axis(attributes, slot, axis=1)
    feats = world.objects[obj_ids] + 0.5 * world.attributes[attr_ids]
    feats = np.where(is_object[..., None], feats, world.backgrounds[background][:, None, :])
    feats += noise * rng.standard_normal((n, regions, feats.shape[-1]), dtype=np.float32)
    return np.maximum(feats, 0.0, out=feats)


def _captions(objects: np.ndarray, attributes: np.ndarray, counts: np.ndarray, background: np.ndarray,
              rng: np.random.Generator) -> list[str]:
    n = objects.shape[0]
    templates = np.argsort(rng.random((n, len(TEMPLATES))), axis=1)[:, :CAPTIONS_PER_IMAGE]
    # Which two (or three) objects each caption speaks of: a random ordered choice per caption.
    picks = np.argsort(rng.random((n, CAPTIONS_PER_IMAGE, MAX_OBJECTS)), axis=2)
    relations = rng.integers(0, len(RELATIONS), size=(n, CAPTIONS_PER_IMAGE))
    captions: list[str] = []
    article = re.compile(r"\ba (?=[aeiou])")  # "a airplane" -> "an airplane"
    for i in range(n):
        k = int(counts[i])
        for c in range(CAPTIONS_PER_IMAGE):
            order = [int(j) for j in picks[i, c] if j < k]
            first, second = order[0], order[1]
            third = order[2] if k > 2 else order[1]
            captions.append(article.sub("an ", TEMPLATES[templates[i, c]].format(
                o0=OBJECTS[objects[i, first]], a0=ATTRIBUTES[attributes[i, first]],
                o1=OBJECTS[objects[i, second]], a1=ATTRIBUTES[attributes[i, second]],
                o2=OBJECTS[objects[i, third]], r=RELATIONS[relations[i, c]],
                b=BACKGROUNDS[background[i]])))
    return captions


def _check(num_images: int, regions: int, feature_dim: int) -> None:
    if num_images < 1:
        raise ValueError(f"number of images must be >= 1, got {num_images}")
    if regions < 4:
        raise ValueError(f"regions must be >= 4 (objects and background need regions), got {regions}")
    if feature_dim < 1:
        raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")


def generate_split(num_images: int, regions: int = 36, feature_dim: int = 2048, seed: int = 0,
                   world_seed: int = 1234, noise: float = 0.3, chunk: int = 512):
    """Yield (features chunk (n, regions, dim) float32, captions of the chunk) in image order."""
    _check(num_images, regions, feature_dim)
    world = _world(feature_dim, world_seed)
    rng = np.random.default_rng(seed)
    objects, attributes, counts, background = _scenes(num_images, rng)
    captions = _captions(objects, attributes, counts, background, rng)
    for start in range(0, num_images, chunk):
        stop = min(num_images, start + chunk)
        feats = _region_features(world, objects[start:stop], attributes[start:stop], counts[start:stop],
                                 background[start:stop], regions, noise, rng)
        yield feats, captions[CAPTIONS_PER_IMAGE * start:CAPTIONS_PER_IMAGE * stop]


@dataclass(frozen=True)
class SceneLayout:
    """What the images of a split show and where: enough to draw them and to box their regions."""

    objects: np.ndarray  # (N, MAX_OBJECTS) indices into OBJECTS; the first counts[i] are in image i
    attributes: np.ndarray  # (N, MAX_OBJECTS) indices into ATTRIBUTES
    counts: np.ndarray  # (N,) objects per image
    background: np.ndarray  # (N,) index into BACKGROUNDS
    sizes: np.ndarray  # (N, 2) int: width, height in pixels
    object_boxes: np.ndarray  # (N, MAX_OBJECTS, 4) float32: x1, y1, x2, y2 of each object

    def __len__(self) -> int:
        return int(self.counts.shape[0])


def scene_layout(num_images: int, seed: int = 0, world_seed: int = 1234) -> SceneLayout:
    """The scenes of the split `generate_split(num_images, seed=seed, world_seed=world_seed)` makes,
    with image sizes and object boxes (the same scenes: they are the generator's first draws)."""
    _check(num_images, 4, 1)
    objects, attributes, counts, background = _scenes(num_images, np.random.default_rng(seed))
    rng = np.random.default_rng([seed, world_seed, LAYOUT_STREAM])
    widths = np.asarray(IMAGE_WIDTHS)[rng.integers(0, len(IMAGE_WIDTHS), size=num_images)]
    sizes = np.stack([widths, widths * 3 // 4], axis=1)
    # Objects take 25-55 % of each side, anywhere in the image; later objects may overlap earlier ones.
    extent = rng.uniform(0.25, 0.55, size=(num_images, MAX_OBJECTS, 2))
    corner = rng.uniform(0.0, 1.0, size=(num_images, MAX_OBJECTS, 2)) * (1.0 - extent)
    scale = sizes[:, None, :].astype(np.float64)
    boxes = np.concatenate([corner * scale, (corner + extent) * scale], axis=2)
    return SceneLayout(objects, attributes, counts, background, sizes.astype(np.int64),
                       np.round(boxes).astype(np.float32))


def region_boxes(layout: SceneLayout, regions: int) -> np.ndarray:
    """(N, regions, 4) float32 boxes: an object's regions share its box, background regions span
    the image."""
    slot, is_object = region_slots(layout.counts, regions)
    objects = np.take_along_axis(layout.object_boxes, slot[..., None], axis=1)
    whole = np.zeros((len(layout), 1, 4), dtype=np.float32)
    whole[:, 0, 2:] = layout.sizes
    return np.where(is_object[..., None], objects, whole).astype(np.float32)


def render_scene(layout: SceneLayout, index: int) -> Image.Image:
    """Image `index` of the layout as an RGB picture: its background's colour, one shape per object
    (rectangle, ellipse or triangle by object) in its attribute's colour, the object's word on it."""
    width, height = (int(v) for v in layout.sizes[index])
    image = Image.new("RGB", (width, height), BACKGROUND_COLOURS[BACKGROUNDS[layout.background[index]]])
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, height // 24))
    for k in range(int(layout.counts[index])):
        x1, y1, x2, y2 = (float(v) for v in layout.object_boxes[index, k])
        obj = int(layout.objects[index, k])
        colour = ATTRIBUTE_COLOURS[ATTRIBUTES[layout.attributes[index, k]]]
        outline = (0, 0, 0) if sum(colour) > 300 else (255, 255, 255)
        shape = obj % 3
        if shape == 0:
            draw.rectangle((x1, y1, x2, y2), fill=colour, outline=outline, width=2)
        elif shape == 1:
            draw.ellipse((x1, y1, x2, y2), fill=colour, outline=outline, width=2)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=colour, outline=outline)
        label = OBJECTS[obj]
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        draw.text(((x1 + x2 - (right - left)) / 2, (y1 + y2 - (bottom - top)) / 2), label, fill=outline, font=font)
    return image


def write_scene_images(directory: str | Path, layout: SceneLayout, names: Iterable[str]) -> list[Path]:
    """Render every image of the layout to `directory/<name>.png`, names in image order."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, name in enumerate(names):
        path = directory / f"{name}.png"
        render_scene(layout, index).save(path, format="PNG", optimize=False)
        paths.append(path)
    if len(paths) != len(layout):
        raise ValueError(f"{len(paths)} names for {len(layout)} images")
    return paths


def make_synthetic_split(num_images: int, regions: int = 36, feature_dim: int = 2048, seed: int = 0,
                         world_seed: int = 1234, noise: float = 0.3) -> SyntheticSplit:
    """One split in memory (for small splits; `write_precomp_split` streams to disk)."""
    chunks = list(generate_split(num_images, regions, feature_dim, seed, world_seed, noise))
    return SyntheticSplit(np.concatenate([c[0] for c in chunks]), [s for c in chunks for s in c[1]])


def write_precomp_split(directory: str | Path, split: str, num_images: int, regions: int = 36,
                        feature_dim: int = 2048, seed: int = 0, world_seed: int = 1234) -> tuple[Path, Path]:
    """Write `{split}_ims.npy` and `{split}_caps.txt` (the standard precomputed layout) chunk by
    chunk, with the boxes and image sizes beside them (`{split}_ims_bbx.npy`, `{split}_ims_size.npy`,
    which data_shards/convert.py writes into the shards); files appear under their final names
    only when complete. Returns the features' and the captions' paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ims_path, caps_path = directory / f"{split}_ims.npy", directory / f"{split}_caps.txt"
    ims_tmp, caps_tmp = ims_path.with_suffix(".npy.partial"), caps_path.with_suffix(".txt.partial")
    array = np.lib.format.open_memmap(ims_tmp, mode="w+", dtype=np.float32,
                                      shape=(num_images, regions, feature_dim))
    offset = 0
    with open(caps_tmp, "w", encoding="utf-8") as caps:
        for feats, captions in generate_split(num_images, regions, feature_dim, seed, world_seed):
            array[offset:offset + len(feats)] = feats
            offset += len(feats)
            caps.write("".join(c + "\n" for c in captions))
    array.flush()
    del array
    layout = scene_layout(num_images, seed, world_seed)
    for suffix, array in (("ims_bbx", region_boxes(layout, regions)), ("ims_size", layout.sizes)):
        tmp = directory / f"{split}_{suffix}.npy.partial"
        with open(tmp, "wb") as stream:
            np.save(stream, array)
        tmp.replace(directory / f"{split}_{suffix}.npy")
    ims_tmp.replace(ims_path)
    caps_tmp.replace(caps_path)
    return ims_path, caps_path
