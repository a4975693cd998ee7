"""The qualitative page of a checkpoint (paper Figs. 3-4): what it retrieves for fixed test queries,
and where its image representation looks.

For `eval.qualitative_queries` = N test images, evenly spaced over the split (so every checkpoint of
a run answers the same queries, and a run's pages can be compared side by side):

* image -> text: each image's top-3 captions, ground truth marked ✓, beside its attention map;
* text -> image: the first caption of each of these images, its top-3 images (✓ the caption's own
  image), each with its attention map;

written beside metrics.json as `qualitative.md` and `qualitative/<key>.png` (trainer/run/layout.py
names them). Rankings come from the evaluator's embeddings (retrieval.py), attention
maps from model/interpret.py, figures from figures.py. The PNGs are written
first and the page last, so a page that exists is complete.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from data_shards.format import ImageRecord
from data_shards.lookup import read_records
from data_shards.storage import Location
from model.interpret import PAPER_LAMBDA
from model.vsrn import VSRN
from trainer.inference.figures import attention_png
from trainer.inference.attention import records_attention
from trainer.inference.retrieval import Gallery, RetrievalHit, search_by_image, search_by_text
from trainer.run.layout import QUALITATIVE_DIR, QUALITATIVE_FILE

__all__ = ["QualitativePage", "build_page", "query_positions", "write_page"]

logger = logging.getLogger(__name__)

TOP_K = 3
FIGURE_DPI = 60  # thumbnails: a page holds up to 4 N of them
MATCH_MARK = "✓"


def query_positions(num_images: int, count: int) -> list[int]:
    """`count` image positions evenly spaced over a split of `num_images` (fewer if it is smaller)."""
    if count <= 0 or num_images <= 0:
        return []
    count = min(count, num_images)
    return sorted({int(p) for p in np.linspace(0, num_images - 1, num=count).round()})


@dataclass
class QualitativePage:
    markdown: str
    figures: dict[str, bytes] = field(default_factory=dict)  # file name under QUALITATIVE_DIR -> PNG


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("*", "\\*").replace("_", "\\_")


def _figure_link(key: str) -> str:
    return f"![attention of {key}]({QUALITATIVE_DIR}/{key}.png)"


def build_page(model: VSRN, gallery: Gallery, positions: Sequence[int], *, title: str, split_location: str,
               storage_options: dict | None = None, region_order: str = "stored",
               device: str | torch.device = "cpu", lam: float = PAPER_LAMBDA) -> QualitativePage:
    """The page for the images at `positions` of the gallery (nothing is written)."""
    keys = [gallery.index.keys[p] for p in positions]
    i2t = search_by_image(gallery, keys, TOP_K)
    first_captions = [gallery.captions[5 * p] for p in positions]
    t2i = search_by_text(gallery, np.stack(first_captions), TOP_K) if positions else []
    shown = list(dict.fromkeys(keys + [hit.key for hits in t2i for hit in hits]))
    records: dict[str, ImageRecord] = {r.key: r for r in read_records(split_location, shown, storage_options)}
    attentions = dict(zip(shown, records_attention(model, [records[k] for k in shown], lam, region_order, device)))
    figures = {f"{key}.png": attention_png(attentions[key], key=key, captions=records[key].captions,
                                           boxes=records[key].boxes, size=records[key].size, lam=lam,
                                           dpi=FIGURE_DPI)
               for key in shown}

    lines = [f"# Qualitative results: {title}", "",
             (f"{len(keys)} fixed test queries from `{split_location}` (images evenly spaced over its "
             f"{len(gallery.index)} images; the same for every checkpoint of the run). {MATCH_MARK}: ground truth. "
             f"Attention maps: the correlation of each reasoned region with the image representation, "
             f"ranked and scored s = λ (k − r)², λ = {lam:g} (paper Sec. 4.5)."), "",
             "## Image → text: top-3 captions", ""]
    for number, (key, hits) in enumerate(zip(keys, i2t), start=1):
        lines += [f"### {number}. {key}", "", _figure_link(key), ""]
        lines += [_caption_line(hit, key) for hit in hits] + [""]
    lines += ["## Text → image: top-3 images", ""]
    for number, (key, hits) in enumerate(zip(keys, t2i), start=1):
        text = gallery.index.captions[gallery.index.position(key)][0]
        lines += [f"### {number}. “{_escape(text)}” (caption 1 of {key})", "",
                  "| rank | image | score | attention |", "|---|---|---|---|"]
        for hit in hits:
            mark = f" {MATCH_MARK}" if hit.key == key else ""
            lines.append(f"| {hit.rank} | {hit.key}{mark} | {hit.score:.4f} | {_figure_link(hit.key)} |")
        lines.append("")
    return QualitativePage(markdown="\n".join(lines), figures=figures)


def _caption_line(hit: RetrievalHit, query_key: str) -> str:
    mark = f"{MATCH_MARK} " if hit.key == query_key else ""
    return f"{hit.rank}. {mark}{_escape(hit.caption or '')} — {hit.key}, caption {(hit.caption_index or 0) + 1} " \
           f"(score {hit.score:.4f})"


def write_page(checkpoint: Location, page: QualitativePage) -> str:
    """Write the figures, then the page, beside the checkpoint's metrics.json; returns the page's URL."""
    for name, png in page.figures.items():
        checkpoint.write_bytes_atomic(f"{QUALITATIVE_DIR}/{name}", png)
    checkpoint.write_bytes_atomic(QUALITATIVE_FILE, page.markdown.encode("utf-8"))
    return checkpoint.child_url(QUALITATIVE_FILE)
