"""Retrieval from a trained checkpoint: a split encoded once as a gallery, queried by text or image.

The gallery's embeddings are the evaluator's: `trainer.inference.encoding.encode_split` encodes the
split in source order (image i owns captions 5i .. 5i+4), and a query's scores are rows or columns
of the same product `images @ captions.T` in full float32, so a result here and a rank there
cannot disagree (tests/trainer/inference/test_retrieval.py checks it against the evaluator's ranks).
Results are ordered by descending score; equal scores keep gallery order.

A gallery is cached beside a run checkpoint (`RUN_DIR/checkpoint_<step>/gallery/`, named by the
split's manifest, the weights and the region order, holding the keys and captions too), so repeated
calls on one checkpoint encode a split once and then read no shard.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_shards.lookup import SplitIndex, manifest_digest
from data_shards.reader import ReaderConfig
from model.vocab import Vocabulary, pad_captions, tokenize
from model.vsrn import VSRN
from trainer.inference.encoding import encode_split
from trainer.evaluation import CAPTIONS_PER_IMAGE, full_float32_matmul
from trainer.inference.checkpoint import LoadedCheckpoint
from trainer.run.layout import GALLERY_DIR

__all__ = ["Gallery", "QueryError", "RetrievalHit", "encode_texts", "load_gallery", "rank_descending",
           "search_by_image", "search_by_text", "text_tokens"]

logger = logging.getLogger(__name__)


class QueryError(ValueError):
    """A query that cannot be answered (empty text, unknown key); the message names it."""


@dataclass(frozen=True)
class Gallery:
    """A split's images and captions embedded by one checkpoint, in source order."""

    index: SplitIndex
    images: np.ndarray  # (N, D) float32, l2-normalized
    captions: np.ndarray  # (5N, D) float32: captions 5i .. 5i+4 are image i's

    @property
    def caption_texts(self) -> list[str]:
        return [text for texts in self.index.captions for text in texts]

    def caption(self, row: int) -> tuple[str, int, str]:
        """(owning image key, index among its captions, text) of caption row `row`."""
        image, k = divmod(row, CAPTIONS_PER_IMAGE)
        return self.index.keys[image], k, self.index.captions[image][k]


@dataclass(frozen=True)
class RetrievalHit:
    rank: int  # 1-based
    row: int  # gallery row: an image position, or a caption row
    score: float
    key: str  # the image's key (for a caption, the key of its image)
    caption: str | None = None
    caption_index: int | None = None  # position of the caption among its image's captions


def _cache_name(manifest_sha256: str, weights_sha256: str, region_order: str) -> str:
    return f"{GALLERY_DIR}/{manifest_sha256[:16]}-{weights_sha256[:16]}-{region_order}.npz"


def _read_cache(loaded: LoadedCheckpoint, name: str, data: str, dim: int) -> Gallery | None:
    location = loaded.location
    try:
        payload = location.read_bytes(name)
    except FileNotFoundError:
        return None
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
            images, captions = archive["images"], archive["captions"]
            keys, texts = archive["keys"].tolist(), archive["caption_texts"].tolist()
    except (OSError, ValueError, KeyError) as error:
        logger.warning("%s: unreadable gallery cache (%s); encoding again", location.child_url(name), error)
        return None
    n = len(keys)
    if images.shape != (n, dim) or captions.shape != (CAPTIONS_PER_IMAGE * n, dim) or len(texts) != CAPTIONS_PER_IMAGE * n:
        logger.warning("%s: gallery cache has unexpected shapes; encoding again", location.child_url(name))
        return None
    logger.info("gallery of %s from %s", data, location.child_url(name))
    index = SplitIndex.from_listing(
        data, [(key, texts[CAPTIONS_PER_IMAGE * i:CAPTIONS_PER_IMAGE * (i + 1)]) for i, key in enumerate(keys)])
    return Gallery(index, images.astype(np.float32, copy=False), captions.astype(np.float32, copy=False))


def _write_cache(loaded: LoadedCheckpoint, name: str, gallery: Gallery) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, images=gallery.images, captions=gallery.captions, keys=np.asarray(gallery.index.keys),
             caption_texts=np.asarray(gallery.caption_texts))
    try:
        loaded.location.write_bytes_atomic(name, buffer.getvalue())
    except OSError as error:  # a read-only checkpoint: retrieval works, it is just not cached
        logger.warning("cannot cache the gallery at %s: %s", loaded.location.child_url(name), error)


def load_gallery(loaded: LoadedCheckpoint, data: str, storage_options: Mapping[str, Any] | None = None,
                 device: str | torch.device = "cpu", *, batch_size: int = 256, region_order: str = "stored",
                 cache: bool = True) -> Gallery:
    """The split at `data` embedded by the checkpoint (from its cache when there is one: then no
    shard is read). The cache is named by the split's manifest, the weights and the region order."""
    use_cache = cache and loaded.is_run_checkpoint
    name = ""
    if use_cache:
        name = _cache_name(manifest_digest(data, storage_options), loaded.weights_sha256, region_order)
        cached = _read_cache(loaded, name, data, loaded.model.config.embed_size)
        if cached is not None:
            return cached
    reader = ReaderConfig(location=data, batch_size=batch_size, num_workers=0,
                          storage_options=dict(storage_options) if storage_options is not None else None,
                          region_order=region_order, bad_data="strict", output_dtype="stored")  # type: ignore[arg-type]
    listing: list[tuple[str, tuple[str, ...]]] = []
    images, captions = encode_split(loaded.model, loaded.vocab, reader, batch_size, device, listing=listing)
    gallery = Gallery(SplitIndex.from_listing(data, listing), images, captions)
    if use_cache:
        _write_cache(loaded, name, gallery)
    return gallery


def text_tokens(vocab: Vocabulary, text: str) -> tuple[list[str], list[str]]:
    """(tokens as training tokenizes them, those the vocabulary does not know)."""
    tokens = tokenize(text)
    return tokens, [t for t in tokens if t not in vocab]


@torch.inference_mode()
def encode_texts(model: VSRN, vocab: Vocabulary, texts: Sequence[str],
                 device: str | torch.device = "cpu") -> np.ndarray:
    """(Q, D) float32 embeddings of free texts, tokenized exactly as training does."""
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            raise QueryError(f"text query {number} is empty")
    model.eval()
    tokens, lengths = pad_captions([vocab.encode(text) for text in texts])
    return model.encode_captions(tokens.to(device), lengths).float().cpu().numpy()


def rank_descending(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` highest scores, highest first; equal scores keep index order."""
    return np.argsort(-scores, kind="stable")[:k]


def _scores(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """queries @ candidates.T in full float32 (no TF32/bf16 products), as the evaluator scores."""
    with torch.inference_mode(), full_float32_matmul():
        return torch.mm(torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)),
                        torch.from_numpy(np.ascontiguousarray(candidates, dtype=np.float32)).T).numpy()


def search_by_text(gallery: Gallery, query_embeddings: np.ndarray, k: int) -> list[list[RetrievalHit]]:
    """The top-`k` images of each text query (rows of `query_embeddings`)."""
    scores = _scores(query_embeddings, gallery.images)
    return [[RetrievalHit(rank=r + 1, row=int(i), score=float(row[i]), key=gallery.index.keys[int(i)])
             for r, i in enumerate(rank_descending(row, k))] for row in scores]


def search_by_image(gallery: Gallery, keys: Sequence[str], k: int) -> list[list[RetrievalHit]]:
    """The top-`k` captions of each image of the gallery named by `keys`."""
    positions = gallery.index.positions(keys)
    scores = _scores(gallery.images[positions], gallery.captions)
    results = []
    for row in scores:
        hits = []
        for r, j in enumerate(rank_descending(row, k)):
            owner, caption_index, text = gallery.caption(int(j))
            hits.append(RetrievalHit(rank=r + 1, row=int(j), score=float(row[j]), key=owner, caption=text,
                                     caption_index=caption_index))
        results.append(hits)
    return results
