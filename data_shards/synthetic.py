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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


def _region_features(world: _World, objects: np.ndarray, attributes: np.ndarray, counts: np.ndarray,
                     background: np.ndarray, regions: int, noise: float,
                     rng: np.random.Generator) -> np.ndarray:
    n = objects.shape[0]
    # Regions per object: about three quarters of the regions look at objects, split evenly.
    object_regions = (regions * 3) // 4
    slot = np.arange(regions)[None, :] * counts[:, None] // object_regions  # object index per region
    is_object = np.arange(regions)[None, :] < object_regions
    slot = np.minimum(slot, counts[:, None] - 1)
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


def make_synthetic_split(num_images: int, regions: int = 36, feature_dim: int = 2048, seed: int = 0,
                         world_seed: int = 1234, noise: float = 0.3) -> SyntheticSplit:
    """One split in memory (for small splits; `write_precomp_split` streams to disk)."""
    chunks = list(generate_split(num_images, regions, feature_dim, seed, world_seed, noise))
    return SyntheticSplit(np.concatenate([c[0] for c in chunks]), [s for c in chunks for s in c[1]])


def write_precomp_split(directory: str | Path, split: str, num_images: int, regions: int = 36,
                        feature_dim: int = 2048, seed: int = 0, world_seed: int = 1234) -> tuple[Path, Path]:
    """Write `{split}_ims.npy` and `{split}_caps.txt` (the standard precomputed layout) chunk by
    chunk; files appear under their final names only when complete."""
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
    ims_tmp.replace(ims_path)
    caps_tmp.replace(caps_path)
    return ims_path, caps_path
