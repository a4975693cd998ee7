"""Retrieve images for texts or captions for images with a trained checkpoint (paper Figs. 3-4).

Usage (from the repository root)::

    python trainer/retrieve.py --checkpoint CKPT --data SHARDS --text "a dog on the beach" [--text ...] \\
        [--top-k 5] [--json]
    python trainer/retrieve.py --checkpoint CKPT --data SHARDS --image KEY [--image KEY ...] [--top-k 5] [--json]

One model load and one gallery encoding per call, whatever the number of queries: the gallery is
the split's images (text queries) or captions (image queries), embedded as the evaluator embeds
them and scored the way it scores (trainer/inference/retrieval.py), and cached beside a run checkpoint
(``checkpoint_<step>/gallery/``; ``--no-cache`` to skip). Text is tokenized exactly as training
tokenizes captions, with the checkpoint's vocabulary; words it does not know are reported on
stderr (they are read as ``<unk>``).

Output: a table per query, ground-truth matches marked ✓ as in the paper's Fig. 3 (an image
query's own captions; for a text query, the images that have exactly this caption). With
``--json``, one JSON list on stdout, one entry per query in order: ``{"query", "results":
[{"rank", "key", "score"}]}``, image queries' results also with ``"caption"`` and
``"caption_index"`` (the caption's position among its image's captions; ``key`` is its image).

Exit status: 0 on success; 2 on unusable inputs (unknown key, empty text, unreadable checkpoint or
split), with a one-line message naming it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from typing import Any

from data_shards.format import ShardFormatError
from data_shards.lookup import UnknownKeyError
from model.checkpoint import CheckpointError
from trainer.inference.encoding import EvaluationDataError
from trainer.inference.arguments import add_checkpoint_arguments, run_region_order, storage_options_of
from trainer.inference.checkpoint import load_checkpoint
from trainer.inference.retrieval import (
    Gallery,
    QueryError,
    RetrievalHit,
    encode_texts,
    load_gallery,
    search_by_image,
    search_by_text,
    text_tokens,
)

logger = logging.getLogger("trainer.retrieve")

EXIT_OK, EXIT_BAD_INPUT = 0, 2
MATCH_MARK = "✓"


def _normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def text_matches(gallery: Gallery, text: str) -> set[str]:
    """Keys of the images one of whose captions is `text` (case and spacing aside)."""
    wanted = _normalized(text)
    return {key for key, captions in zip(gallery.index.keys, gallery.index.captions)
            if any(_normalized(c) == wanted for c in captions)}


def results_json(query: str, hits: list[RetrievalHit]) -> dict[str, Any]:
    results = []
    for hit in hits:
        entry: dict[str, Any] = {"rank": hit.rank, "key": hit.key, "score": hit.score}
        if hit.caption is not None:
            entry["caption"] = hit.caption
            entry["caption_index"] = hit.caption_index
        results.append(entry)
    return {"query": query, "results": results}


def results_table(number: int, query: str, hits: list[RetrievalHit], matches: set[str], image_query: bool) -> str:
    kind = "image" if image_query else "text"
    lines = [f"query {number} ({kind}): {query}"]
    if image_query:
        lines.append(f"  {'rank':>4}  {'score':>7}  {'':1}  caption (image, caption index)")
        for hit in hits:
            mark = MATCH_MARK if hit.key in matches else " "
            lines.append(f"  {hit.rank:>4}  {hit.score:>7.4f}  {mark}  {hit.caption} ({hit.key}, {hit.caption_index})")
    else:
        lines.append(f"  {'rank':>4}  {'score':>7}  {'':1}  image")
        for hit in hits:
            mark = MATCH_MARK if hit.key in matches else " "
            lines.append(f"  {hit.rank:>4}  {hit.score:>7.4f}  {mark}  {hit.key}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrieve.py", description="Top-k images for texts, or captions for images, with a VSRN checkpoint.")
    add_checkpoint_arguments(parser)
    queries = parser.add_mutually_exclusive_group(required=True)
    queries.add_argument("--text", action="append", metavar="TEXT", help="a text query (repeat for several)")
    queries.add_argument("--image", action="append", metavar="KEY", help="an image of the split by key (repeat)")
    parser.add_argument("--top-k", type=int, default=5, metavar="K", help="results per query (default: 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of tables")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the cached gallery")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prog = parser.prog
    options = storage_options_of(args.endpoint_url)
    image_query = args.image is not None
    queries: list[str] = args.image if image_query else args.text
    try:
        if not image_query:
            for number, text in enumerate(queries, start=1):
                if not text.strip():
                    raise QueryError(f"--text query {number} is empty")
        loaded = load_checkpoint(args.checkpoint, options, device=args.device)
        gallery = load_gallery(loaded, args.data, options, args.device, batch_size=args.batch_size,
                               region_order=run_region_order(loaded, options), cache=not args.no_cache)
        if image_query:
            hits = search_by_image(gallery, queries, args.top_k)
            matches = [{key} for key in queries]
        else:
            for text in queries:
                _, unknown = text_tokens(loaded.vocab, text)
                if unknown:
                    print(f"{prog}: warning: {text!r}: not in the checkpoint's vocabulary (read as <unk>): "
                          f"{', '.join(unknown)}", file=sys.stderr)
            hits = search_by_text(gallery, encode_texts(loaded.model, loaded.vocab, queries, args.device), args.top_k)
            matches = [text_matches(gallery, text) for text in queries]
    except (CheckpointError, UnknownKeyError, QueryError, ShardFormatError, EvaluationDataError,
            FileNotFoundError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps([results_json(q, h) for q, h in zip(queries, hits)], ensure_ascii=False))
    else:
        print("\n\n".join(results_table(n, q, h, m, image_query)
                          for n, (q, h, m) in enumerate(zip(queries, hits, matches), start=1)))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
