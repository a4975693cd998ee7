"""Drawing the Sec. 4.5 attention of one image (model/interpret.py) as a PNG with matplotlib.

Three forms, by what is known of the image:
* a picture (a COCO jpg, a rendered synthetic image): the attention map over it;
* boxes and the stored image size: the map over a blank canvas of that size, boxes outlined;
* neither: a bar chart of the region scores.
A colour bar and the image's captions are part of the figure.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede the pyplot import

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from PIL import Image

from model.interpret import RegionAttention, attention_map

__all__ = ["attention_png", "load_picture"]

MAX_CAPTION_LINES = 5
OUTLINED_BOXES = 5  # the top-ranked regions' boxes are outlined on a canvas


def load_picture(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file; OSError/ValueError name the file."""
    try:
        with Image.open(path) as picture:
            return np.asarray(picture.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from None


def _captions_text(captions: Sequence[str]) -> str:
    lines = [textwrap.shorten(c, 90) for c in captions[:MAX_CAPTION_LINES]]
    return "\n".join(f"{i + 1}. {c}" for i, c in enumerate(lines))


def attention_png(attention: RegionAttention, *, key: str, captions: Sequence[str],
                  boxes: np.ndarray | None, size: tuple[int, int] | None, picture: np.ndarray | None = None,
                  lam: float, dpi: int = 100) -> bytes:
    """The figure as PNG bytes. `boxes` (k, 4) and `size` (width, height) are the stored ones; a
    `picture` of another size gets the boxes scaled to it."""
    caption_block = _captions_text(captions)
    figure, ax = plt.subplots(figsize=(7.0, 5.0))
    if boxes is not None and (size is not None or picture is not None):
        if picture is not None:
            height, width = picture.shape[:2]
            sx, sy = (width / size[0], height / size[1]) if size is not None else (1.0, 1.0)
        else:
            width, height = size  # type: ignore[misc]
            sx = sy = 1.0
        scaled = np.asarray(boxes, dtype=np.float64) * np.array([sx, sy, sx, sy])
        heat = attention_map(scaled, attention.score, width, height)
        if picture is not None:
            ax.imshow(picture)
            shown = ax.imshow(heat, cmap="jet", alpha=0.5, extent=(0, width, height, 0))
        else:
            ax.imshow(np.full((height, width), 1.0), cmap="gray", vmin=0, vmax=1, extent=(0, width, height, 0))
            shown = ax.imshow(heat, cmap="jet", alpha=0.6, extent=(0, width, height, 0))
            # The top regions' boxes, one outline per distinct box (an object's regions share one).
            labels: dict[tuple[float, ...], list[str]] = {}
            for region in np.argsort(attention.rank, kind="stable")[:OUTLINED_BOXES]:
                labels.setdefault(tuple(scaled[region].tolist()), []).append(f"#{attention.rank[region]}")
            for (x1, y1, x2, y2), ranks in labels.items():
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", linewidth=1.2))
                ax.text(x1 + 3, y1 + 3, " ".join(ranks), color="white", fontsize=8, va="top")
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        title = f"{key}: attention of the image representation (Sec. 4.5, λ = {lam:g})"
    else:
        shown = None
        order = np.arange(attention.regions)
        bars = ax.bar(order, attention.score, color=plt.get_cmap("jet")(attention.score / max(attention.score.max(), 1e-12)))
        del bars
        ax.set_xlabel("region (stored order)")
        ax.set_ylabel("score s_i = λ (k − r_i)²")
        title = f"{key}: region scores (no boxes stored; λ = {lam:g})"
    ax.set_title(title, fontsize=10)
    if shown is not None:
        figure.colorbar(shown, ax=ax, label="summed region scores", fraction=0.04, pad=0.02)
    if caption_block:
        # Just below the axes, whatever their aspect; bbox_inches="tight" keeps it in the file.
        ax.text(0.0, -0.03, caption_block, transform=ax.transAxes, fontsize=8, va="top", ha="left")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()
