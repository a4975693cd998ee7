"""Encoding a sharded split with a checkpoint's model: every image and its five captions in source
order (image i owns captions 5i .. 5i+4), the layout the evaluation ranks (trainer/evaluation/) and
retrieval queries (retrieval.py), with the COCO ids and the keys and captions of the rows when asked.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter

import numpy as np
import torch

from data_shards.reader import EvalReader, ReaderConfig
from model.vocab import Vocabulary
from model.vsrn import VSRN
from trainer.evaluation import CAPTIONS_PER_IMAGE, EvaluationInputError, GalleryIds

__all__ = ["EvaluationDataError", "encode_split"]

logger = logging.getLogger(__name__)


class EvaluationDataError(ValueError):
    """The evaluation data cannot be ranked (an image without exactly five captions, no images ...)."""


def _prefix_shards(reader: EvalReader, max_images: int) -> list[str]:
    """Names of the first shards of the selection that hold at least ``max_images`` images, so a
    dev subset reads only the shards it needs (manifest order is source order)."""
    names, total = [], 0
    for shard in reader.spec.shards:
        names.append(shard.name)
        total += shard.samples
        if total >= max_images:
            break
    return names


@torch.inference_mode()
def encode_split(
    model: VSRN,
    vocab: Vocabulary,
    reader_config: ReaderConfig,
    batch_size: int,
    device: str | torch.device,
    max_images: int | None = None,
    *,
    ids: list[GalleryIds | None] | None = None,
    listing: list[tuple[str, tuple[str, ...]]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed the images and captions of a sharded split in source order.

    Args:
        model: the VSRN to encode with (put in eval mode here).
        vocab: its vocabulary; ``vocab.encode`` tokenizes the captions.
        reader_config: where the split is and how to read it; its ``batch_size`` is replaced by
            ``batch_size`` (images per forward pass, with their captions).
        batch_size: images per forward pass.
        device: where the model runs.
        max_images: encode only the first ``max_images`` images (and their captions).
        ids: if given, a list to which the encoded rows' source ids are appended, as
            :class:`trainer.evaluation.GalleryIds` from the shards' ``source_id`` (and
            ``caption_ids``), or None when the shards carry none (what ``eccv`` / ``cxc`` rank by).
        listing: if given, a list to which ``(key, its five captions)`` of every encoded image is
            appended, in row order (what retrieval shows; data_shards.lookup.SplitIndex).

    Returns:
        ``images`` (N, D) and ``captions`` (5N, D), float32: image i owns captions 5i..5i+4, the
        layout :func:`trainer.evaluation.evaluate_embeddings` ranks.

    Raises:
        EvaluationDataError: an image has other than five captions (ranking pairs caption j with
            image j // 5), or there is nothing to encode.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    config = dataclasses.replace(reader_config, batch_size=batch_size)
    reader = EvalReader(config, vocab.encode)
    if max_images is not None and max_images < reader.images:
        reader = EvalReader(dataclasses.replace(config, shards=_prefix_shards(reader, max_images)), vocab.encode)
    wanted = reader.images if max_images is None else min(max_images, reader.images)
    model.eval()
    device = torch.device(device)
    dim = model.config.embed_size
    images = np.empty((wanted, dim), dtype=np.float32)
    captions = np.empty((CAPTIONS_PER_IMAGE * wanted, dim), dtype=np.float32)
    done = 0
    source_ids: list[str | None] = []
    caption_source_ids: list[str | None] = []
    started = time.perf_counter()
    batches = iter(reader)
    try:
        for batch in batches:
            take = min(len(batch.keys), wanted - done)
            counts = Counter(batch.caption_image_ids.tolist())
            for row, image_id in enumerate(batch.image_ids[:take].tolist()):
                # Ranking pairs caption j with image j // 5: every image needs exactly five.
                if counts[image_id] != CAPTIONS_PER_IMAGE:
                    raise EvaluationDataError(
                        f"{reader.spec.location}: image {batch.keys[row]} (index {image_id}) has {counts[image_id]} "
                        f"captions; recall ranking needs exactly {CAPTIONS_PER_IMAGE} per image")
            regions = batch.regions[:take].to(device=device, dtype=torch.float32)
            boxes = batch.boxes[:take].to(device) if batch.boxes is not None else None
            images[done:done + take] = model.encode_images(regions, boxes).float().cpu().numpy()
            caption_count = CAPTIONS_PER_IMAGE * take
            tokens = batch.tokens[:caption_count].to(device)
            lengths = batch.lengths[:caption_count]
            # Trim the padding to the longest caption kept (the text encoder packs by length anyway).
            tokens = tokens[:, : int(lengths.max())]
            start = CAPTIONS_PER_IMAGE * done
            captions[start:start + caption_count] = model.encode_captions(tokens, lengths).float().cpu().numpy()
            if listing is not None:
                listing += [(key, tuple(batch.captions[CAPTIONS_PER_IMAGE * row:CAPTIONS_PER_IMAGE * (row + 1)]))
                            for row, key in enumerate(batch.keys[:take])]
            if ids is not None:
                source_ids += batch.source_ids[:take] or [None] * take
                caption_source_ids += batch.caption_source_ids[:caption_count] or [None] * caption_count
            done += take
            if done >= wanted:
                break
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # stops the loader's workers when a prefix was enough
    if done == 0:
        raise EvaluationDataError(f"{reader.spec.location}: no images to evaluate")
    if done < wanted:  # bad_data="skip" dropped some samples
        logger.warning("%s: read %d of the %d images the manifest lists", reader.spec.location, done, wanted)
        images, captions = images[:done], captions[:CAPTIONS_PER_IMAGE * done]
    logger.info("encoded %d images and %d captions of %s in %.1f s", done, CAPTIONS_PER_IMAGE * done,
                reader.spec.location, time.perf_counter() - started)
    if ids is not None:
        ids.append(_gallery_ids(source_ids[:done], caption_source_ids[:CAPTIONS_PER_IMAGE * done], reader.spec.location))
    return images, captions


def _gallery_ids(image_ids: list[str | None], caption_ids: list[str | None], where: str) -> GalleryIds | None:
    """The source ids of the encoded rows: None if the shards carry none, an error if only some do."""
    if all(i is None for i in image_ids):
        return None
    if any(i is None for i in image_ids):
        missing = sum(i is None for i in image_ids)
        raise EvaluationDataError(f"{where}: {missing} of {len(image_ids)} images have no source_id; the ids "
                                  "that eccv / cxc rank by must be given for all or none")
    # Without caption ids each image's captions are its five of the standard COCO 5K order.
    captions = caption_ids if all(c is not None for c in caption_ids) else None
    try:
        return GalleryIds.from_arrays(np.asarray(image_ids), None if captions is None else np.asarray(captions),
                                      where=str(where))
    except EvaluationInputError as error:
        raise EvaluationDataError(str(error)) from None
