"""Tests of trainer/encode.py: reference checkpoint -> convert -> encode -> evaluate, and errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from model.convert_reference import convert_reference_checkpoint
from reference_layout import (
    REPO_ROOT,
    Sizes,
    reference_caption_embeddings,
    reference_checkpoint,
    reference_image_embeddings,
    reference_state,
    reference_tokens,
    run_script,
    save_reference_checkpoint,
    vocab_words,
    write_reference_vocab_pickle,
)
from trainer.encode import main

SIZES = Sizes(img_dim=12, embed_size=16, word_dim=8, vocab_size=60, num_gcn=2)
REGIONS = 36
METRIC_KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr",
               "t2i_meanr", "rsum"}


def _reference_files(directory: Path, variant: str = "f30k_precomp") -> tuple[Path, Path, dict]:
    image, text = reference_state(SIZES, f30k=(variant == "f30k_precomp"), seed=11)
    checkpoint = reference_checkpoint(image, text, variant)
    checkpoint_path = directory / "model_best.pth.tar"
    save_reference_checkpoint(checkpoint, checkpoint_path, "py2-legacy")
    vocab_path = directory / f"{variant}_vocab.pkl"
    write_reference_vocab_pickle(vocab_path, vocab_words(SIZES.vocab_size))
    return checkpoint_path, vocab_path, checkpoint


def _captions(count: int, seed: int = 0) -> list[str]:
    """Captions of vocabulary words (and an unknown one), some capitalized, of varied lengths."""
    rng = random.Random(seed)
    words = vocab_words(SIZES.vocab_size)[4:] + ["zebra"]
    lines = []
    for _ in range(count):
        caption = " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
        lines.append(caption.capitalize() if rng.random() < 0.5 else caption)
    return lines


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("converted")
    checkpoint_path, vocab_path, _ = _reference_files(directory, "coco_precomp")
    return convert_reference_checkpoint(checkpoint_path, vocab_path, directory / "ckpt")


def test_full_chain_matches_the_reference_forward(tmp_path: Path) -> None:
    checkpoint_path, vocab_path, checkpoint = _reference_files(tmp_path)
    ckpt = tmp_path / "ckpt"
    result = run_script("model/convert_reference.py", "--checkpoint", checkpoint_path, "--vocab", vocab_path,
                        "--output", ckpt)
    assert result.returncode == 0, result.stderr

    num_images = 6
    images = np.random.default_rng(0).standard_normal((num_images, REGIONS, SIZES.img_dim)).astype(np.float32)
    np.save(tmp_path / "ims.npy", images)
    captions = _captions(5 * num_images)
    (tmp_path / "caps.txt").write_text("".join(c + "\n" for c in captions), encoding="utf-8")
    embeddings = tmp_path / "E.npz"
    result = run_script("trainer/encode.py", "--checkpoint", ckpt, "--images", tmp_path / "ims.npy",
                        "--captions", tmp_path / "caps.txt", "--output", embeddings, "--batch-size", "4",
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert f"wrote {embeddings}" in result.stdout

    with np.load(embeddings) as archive:
        assert sorted(archive.files) == ["captions", "images"]
        ours_images, ours_captions = archive["images"], archive["captions"]
    assert ours_images.dtype == np.float32 and ours_images.shape == (num_images, SIZES.embed_size)
    assert ours_captions.shape == (5 * num_images, SIZES.embed_size)
    image_state, text_state = checkpoint["model"]
    expected_images = reference_image_embeddings(image_state, images, "f30k_precomp").numpy()
    words = vocab_words(SIZES.vocab_size)
    expected_captions = reference_caption_embeddings(text_state, [reference_tokens(c, words) for c in captions]).numpy()
    np.testing.assert_allclose(ours_images, expected_images, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours_captions, expected_captions, atol=1e-5, rtol=0)

    if not (REPO_ROOT / "trainer" / "evaluate.py").is_file():
        pytest.fail("trainer/evaluate.py is missing: the chain cannot be evaluated")
    metrics = tmp_path / "m.json"
    result = run_script("trainer/evaluate.py", "--embeddings", embeddings, "--protocol", "all", "--output", metrics)
    assert result.returncode == 0, result.stderr
    results = json.loads(metrics.read_text())
    assert set(results) == {"all"} and METRIC_KEYS <= set(results["all"])
    recalls = [results["all"][k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")]
    assert all(0 <= r <= 100 for r in recalls) and results["all"]["rsum"] == pytest.approx(sum(recalls))


def test_one_input_and_batch_size(tmp_path: Path, converted: Path) -> None:
    images = np.random.default_rng(1).standard_normal((7, 5, SIZES.img_dim)).astype(np.float32)
    np.save(tmp_path / "ims.npy", images)
    outputs = {}
    for batch_size in (3, 128):
        out = tmp_path / f"E{batch_size}.npz"
        assert main(["--checkpoint", str(converted), "--images", str(tmp_path / "ims.npy"), "--output", str(out),
                     "--batch-size", str(batch_size), "--device", "cpu"]) == 0
        with np.load(out) as archive:
            assert archive.files == ["images"]
            outputs[batch_size] = archive["images"]
    np.testing.assert_allclose(outputs[3], outputs[128], atol=1e-6, rtol=0)

    # A BOM, CRLF line ends, padding spaces and no final newline.
    (tmp_path / "caps.txt").write_text("\ufeffA dog\r\n  Two cats  \nthe end", encoding="utf-8")
    out = tmp_path / "C.npz"
    assert main(["--checkpoint", str(converted), "--captions", str(tmp_path / "caps.txt"), "--output", str(out)]) == 0
    with np.load(out) as archive:
        assert archive.files == ["captions"] and archive["captions"].shape == (3, SIZES.embed_size)
        norms = np.linalg.norm(archive["captions"], axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def _run_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_errors(tmp_path: Path, converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "E.npz"
    base = ["--checkpoint", str(converted), "--output", str(out)]

    wrong = tmp_path / "wrong_dim_ims.npy"
    np.save(wrong, np.zeros((2, REGIONS, SIZES.img_dim + 1), dtype=np.float32))
    err = _run_error(base + ["--images", str(wrong)], capsys)
    assert f"{wrong}: region features have shape (2, 36, 13)" in err and "img_dim 12" in err

    flat = tmp_path / "flat_ims.npy"
    np.save(flat, np.zeros((2, SIZES.img_dim), dtype=np.float32))
    assert f"{flat}: region features have shape (2, 12)" in _run_error(base + ["--images", str(flat)], capsys)

    caps = tmp_path / "caps.txt"
    caps.write_text("a dog\nthe cat\n   \nlast one\n", encoding="utf-8")
    assert f"{caps}: line 3 is empty" in _run_error(base + ["--captions", str(caps)], capsys)

    caps.write_bytes(b"a dog\ncaf\xe9\n")
    assert f"{caps}: line 2 is not UTF-8" in _run_error(base + ["--captions", str(caps)], capsys)

    missing = tmp_path / "absent.txt"
    assert f"{missing}: no such file" in _run_error(base + ["--captions", str(missing)], capsys)
    caps.write_text("a dog\n", encoding="utf-8")
    err = _run_error(["--checkpoint", str(tmp_path / "no_ckpt"), "--captions", str(caps), "--output", str(out)], capsys)
    assert "no_ckpt: no such checkpoint directory" in err

    with pytest.raises(SystemExit) as exit_info:
        main(base)
    assert exit_info.value.code == 2 and "give --images and/or --captions" in capsys.readouterr().err
    assert not out.exists()


def test_existing_output_is_replaced_only_on_success(tmp_path: Path, converted: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "E.npz"
    out.write_bytes(b"previous")
    caps = tmp_path / "caps.txt"
    caps.write_text("a dog\n\n", encoding="utf-8")
    _run_error(["--checkpoint", str(converted), "--captions", str(caps), "--output", str(out)], capsys)
    assert out.read_bytes() == b"previous"
    caps.write_text("a dog\n", encoding="utf-8")
    assert main(["--checkpoint", str(converted), "--captions", str(caps), "--output", str(out)]) == 0
    with np.load(out) as archive:
        assert archive["captions"].shape == (1, SIZES.embed_size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["E.npz", "caps.txt"]


def test_encodings_match_in_process_model(tmp_path: Path, converted: Path) -> None:
    # The CLI's output equals the checkpoint's model applied directly (no hidden preprocessing).
    from model.checkpoint import load_inference_checkpoint
    from model.vocab import pad_captions

    model, vocab = load_inference_checkpoint(converted)
    captions = _captions(9, seed=5)
    (tmp_path / "caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    out = tmp_path / "E.npz"
    assert main(["--checkpoint", str(converted), "--captions", str(tmp_path / "caps.txt"), "--output", str(out),
                 "--batch-size", "2", "--device", "cpu"]) == 0
    tokens, lengths = pad_captions([vocab.encode(c) for c in captions])
    with torch.no_grad():
        direct = model.encode_captions(tokens, lengths).numpy()
    with np.load(out) as archive:
        np.testing.assert_allclose(archive["captions"], direct, atol=1e-6, rtol=0)
