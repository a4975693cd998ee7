"""Tests of trainer/inference/qualitative.py: the qualitative page the evaluation writes beside metrics.json,
and its link in the run report."""

from __future__ import annotations

import json
import re
from pathlib import Path

from eval_run_helpers import (
    PictureSplit,
    eval_config,
    make_model,
    write_checkpoint,
    write_run_config,
)

from trainer.evaluator.checkpoint_eval import evaluate_checkpoint, evaluate_run
from trainer.inference.checkpoint import load_checkpoint
from trainer.inference.qualitative import query_positions
from trainer.report import make_report
from trainer.inference.retrieval import load_gallery, search_by_image, search_by_text
from trainer.run.layout import BEST_FILE, METRICS_FILE, QUALITATIVE_DIR, QUALITATIVE_FILE


def test_query_positions_are_evenly_spaced_and_fixed() -> None:
    assert query_positions(100, 8) == [0, 14, 28, 42, 57, 71, 85, 99]
    assert query_positions(3, 8) == [0, 1, 2] and query_positions(10, 0) == [] and query_positions(1, 1) == [0]


def test_the_page_shows_the_top3_of_fixed_queries_with_attention_maps(pictures: PictureSplit, tmp_path: Path) -> None:
    run = tmp_path / "run"
    checkpoints = [write_checkpoint(run, f"checkpoint_00000{n}", make_model(pictures.vocab, seed=n), pictures.vocab,
                                    step=n) for n in (1, 2)]
    pages = []
    for checkpoint in checkpoints:
        payload = evaluate_checkpoint(str(checkpoint), None, str(pictures.shards),
                                      eval_config(test_protocols=["all"], qualitative_queries=3))
        assert payload["qualitative"] == QUALITATIVE_FILE
        page = (checkpoint / QUALITATIVE_FILE).read_text(encoding="utf-8")
        pages.append(page)
        loaded = load_checkpoint(str(checkpoint))
        gallery = load_gallery(loaded, str(pictures.shards), cache=False)
        keys = [gallery.index.keys[p] for p in query_positions(15, 3)]
        assert keys == ["test-0000000", "test-0000007", "test-0000014"]
        # Image -> text: each query's top-3 captions as retrieval ranks them, ✓ on its own captions.
        for key, hits in zip(keys, search_by_image(gallery, keys, 3)):
            section = page.split(f"### {keys.index(key) + 1}. {key}\n", 1)[1].split("###", 1)[0]
            lines = [line for line in section.splitlines() if re.match(r"^\d\. ", line)]
            assert len(lines) == 3
            for line, hit in zip(lines, hits):
                assert f"— {hit.key}, caption {hit.caption_index + 1} (score {hit.score:.4f})" in line
                assert ("✓" in line) == (hit.key == key)
        # Text -> image: the first caption of each query image, its top-3 images with their maps.
        t2i = search_by_text(gallery, gallery.captions[[5 * p for p in query_positions(15, 3)]], 3)
        shown = set(keys) | {hit.key for hits in t2i for hit in hits}
        for hits in t2i:
            for hit in hits:
                assert f"| {hit.rank} | {hit.key}" in page and f"| {hit.score:.4f} |" in page
        figures = {p.stem for p in (checkpoint / QUALITATIVE_DIR).glob("*.png")}
        assert figures == shown
        for key in shown:
            assert f"]({QUALITATIVE_DIR}/{key}.png)" in page
    # The same queries for every checkpoint of the run, so pages compare side by side.
    headings = [[line for line in page.splitlines() if line.startswith("### ")] for page in pages]
    assert [h.split(" (")[0] for h in headings[0]] == [h.split(" (")[0] for h in headings[1]]

    off = evaluate_checkpoint(str(checkpoints[0]), None, str(pictures.shards),
                              eval_config(test_protocols=["all"], qualitative_queries=0))
    assert "qualitative" not in off


def test_a_page_that_cannot_be_written_does_not_lose_the_metrics(pictures: PictureSplit, tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "run", "checkpoint_000001", make_model(pictures.vocab, 1),
                                  pictures.vocab, step=1)
    (checkpoint / QUALITATIVE_DIR).write_text("a file where the figures' directory should be")
    payload = evaluate_checkpoint(str(checkpoint), None, str(pictures.shards),
                                  eval_config(test_protocols=["all"], qualitative_queries=2))
    assert payload["qualitative"] is None and payload["test"]["all"]["rsum"] >= 0
    assert not (checkpoint / QUALITATIVE_FILE).exists()


def test_the_report_links_the_best_checkpoints_page(pictures: PictureSplit, tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run_config(run, str(pictures.shards), str(pictures.shards), ["all"], dev_images=15)
    for n in (1, 2):
        write_checkpoint(run, f"checkpoint_00000{n}", make_model(pictures.vocab, seed=n), pictures.vocab, step=n)
    evaluate_run(str(run), eval_config=eval_config(test_protocols=["all"], dev_images=15, qualitative_queries=2))
    best_name = Path(json.loads((run / BEST_FILE).read_text())["checkpoint"]).name
    out = tmp_path / "report"
    written = make_report(str(run), out)
    assert out / QUALITATIVE_FILE in written
    summary = (out / "summary.md").read_text()
    assert f"[{QUALITATIVE_FILE}]({QUALITATIVE_FILE}), copied from `{run / best_name / QUALITATIVE_FILE}`" in summary
    assert (out / QUALITATIVE_FILE).read_bytes() == (run / best_name / QUALITATIVE_FILE).read_bytes()
    assert sorted(p.name for p in (out / QUALITATIVE_DIR).iterdir()) == \
        sorted(p.name for p in (run / best_name / QUALITATIVE_DIR).iterdir())
    assert (run / best_name / METRICS_FILE).is_file()
