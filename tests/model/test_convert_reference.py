"""Tests of model/convert_reference.py against checkpoints in the reference's exact layout.

The converted models' embeddings are compared with reference_layout's independent
re-implementation of the reference forward pass, never with numbers from the code under test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_inference_checkpoint, read_checkpoint_config
from model.convert_reference import ConversionError, convert_reference_checkpoint, load_reference_checkpoint, main
from model.vocab import UnsafePickleError, load_reference_vocab, pad_captions
from reference_layout import (
    RunsCommand,
    Sizes,
    exec_source,
    official_vocab_path,
    reference_caption_embeddings,
    reference_checkpoint,
    reference_image_embeddings,
    reference_state,
    reference_tokens,
    run_script,
    save_reference_checkpoint,
    touch_command,
    vocab_words,
    write_reference_vocab_pickle,
)

SIZES = Sizes(img_dim=12, embed_size=16, word_dim=8, vocab_size=40, num_gcn=4)
DATA_NAMES = {"coco": "coco_precomp", "f30k": "f30k_precomp"}
TOLERANCE = 1e-5


def _write_inputs(tmp_path: Path, variant: str, fmt: str, sizes: Sizes = SIZES, seed: int = 0,
                  with_num_batches_tracked: bool = True) -> tuple[Path, Path, dict]:
    image, text = reference_state(sizes, f30k=(variant == "f30k"), seed=seed,
                                  with_num_batches_tracked=with_num_batches_tracked)
    checkpoint = reference_checkpoint(image, text, DATA_NAMES[variant])
    checkpoint_path = tmp_path / f"model_best_{variant}_{fmt}.pth.tar"
    save_reference_checkpoint(checkpoint, checkpoint_path, fmt)  # type: ignore[arg-type]
    vocab_path = tmp_path / f"{DATA_NAMES[variant]}_vocab.pkl"
    write_reference_vocab_pickle(vocab_path, vocab_words(sizes.vocab_size))
    return checkpoint_path, vocab_path, checkpoint


def _check_against_reference(output: Path, checkpoint: dict, variant: str, sizes: Sizes = SIZES) -> None:
    model, vocab = load_inference_checkpoint(output)
    image_state, text_state = checkpoint["model"]
    g = torch.Generator().manual_seed(7)
    regions = torch.randn(4, 36, sizes.img_dim, generator=g)
    captions = [[1, *torch.randint(4, sizes.vocab_size, (n,), generator=g).tolist(), 2] for n in (5, 1, 9, 3, 7)]
    tokens, lengths = pad_captions(captions)  # unsorted lengths, as encode.py passes them
    with torch.no_grad():
        images = model.encode_images(regions)
        texts = model.encode_captions(tokens, lengths)
    expected_images = reference_image_embeddings(image_state, regions, DATA_NAMES[variant])
    expected_texts = reference_caption_embeddings(text_state, captions)
    torch.testing.assert_close(images.double(), expected_images, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(texts.double(), expected_texts, atol=TOLERANCE, rtol=0)
    assert vocab.idx2word == vocab_words(sizes.vocab_size)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "py2-legacy"])
@pytest.mark.parametrize("variant", ["coco", "f30k"])
def test_conversion_reproduces_the_reference_forward(tmp_path: Path, variant: str, fmt: str) -> None:
    # py2-legacy also leaves out num_batches_tracked, as PyTorch 0.4.0 did.
    checkpoint_path, vocab_path, checkpoint = _write_inputs(tmp_path, variant, fmt,
                                                            with_num_batches_tracked=(fmt != "py2-legacy"))
    output = tmp_path / "converted"
    assert main(["--checkpoint", str(checkpoint_path), "--vocab", str(vocab_path), "--output", str(output)]) == 0
    _check_against_reference(output, checkpoint, variant)

    payload = read_checkpoint_config(output)
    config = payload["model"]
    assert (config["img_dim"], config["embed_size"], config["word_dim"], config["vocab_size"]) == (12, 16, 8, 40)
    assert config["num_reasoning_layers"] == 4 and config["aggregation"] == "gsr"
    assert config["region_norm"] == "region_axis" and config["caption_loss_weight"] == 0.0
    assert config["norm_after_fc"] == (variant == "coco") and config["final_batchnorm"] == (variant == "f30k")
    source = payload["source"]
    assert source["checkpoint"] == checkpoint_path.name and source["vocab"] == vocab_path.name
    assert (source["epoch"], source["best_rsum"], source["Eiters"]) == (17, 512.25, 98765)
    assert source["data_name"] == DATA_NAMES[variant] and source["opt"]["margin"] == 0.2
    model, _ = load_inference_checkpoint(output)
    assert model.caption_generator is None
    tracked = model.image_encoder.reasoning[0].residual_norm.num_batches_tracked
    assert int(tracked) == (0 if fmt == "py2-legacy" else 1234)


def test_cli_subprocess(tmp_path: Path) -> None:
    checkpoint_path, vocab_path, checkpoint = _write_inputs(tmp_path, "coco", "py2-legacy")
    output = tmp_path / "out" / "ckpt"
    result = run_script("model/convert_reference.py", "--checkpoint", checkpoint_path, "--vocab", vocab_path,
                        "--output", output)
    assert result.returncode == 0, result.stderr
    assert f"wrote {output}" in result.stdout and "reasoning layers 4" in result.stdout
    # fc 208 + 4 reasoning layers x 1120 + GRU 1632; embedding 320 + GRU 1248
    assert "image encoder 6,320, text encoder 1,568, total 7,888" in result.stdout
    _check_against_reference(output, checkpoint, "coco")


def test_official_vocabulary(tmp_path: Path) -> None:
    vocab_path = official_vocab_path("coco_precomp")
    sizes = Sizes(img_dim=8, embed_size=8, word_dim=4, vocab_size=10006, num_gcn=1)
    image, text = reference_state(sizes, f30k=False, seed=3)
    checkpoint = reference_checkpoint(image, text, "coco_precomp")
    checkpoint_path = tmp_path / "model_best.pth.tar"
    save_reference_checkpoint(checkpoint, checkpoint_path, "legacy")
    output = tmp_path / "converted"
    assert main(["--checkpoint", str(checkpoint_path), "--vocab", str(vocab_path), "--output", str(output)]) == 0
    model, vocab = load_inference_checkpoint(output)
    assert len(vocab) == 10006 and vocab == load_reference_vocab(vocab_path)
    caption = "a man riding a horse on a beach"
    # The ids the reference gives this caption, from the pickle's own word list (independent path).
    expected_ids = reference_tokens(caption, vocab.idx2word)
    assert vocab.encode(caption) == expected_ids and 3 not in expected_ids
    tokens, lengths = pad_captions([expected_ids])
    with torch.no_grad():
        ours = model.encode_captions(tokens, lengths)
    expected = reference_caption_embeddings(text, [expected_ids])
    torch.testing.assert_close(ours.double(), expected, atol=TOLERANCE, rtol=0)


# --------------------------------------------------------------------------------------------------
# Malicious and broken inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
def test_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path: Path, fmt: str, payload: str) -> None:
    marker = tmp_path / "pwned"
    image, text = reference_state(SIZES, f30k=False)
    evil = (RunsCommand(os.system, touch_command(marker)) if payload == "os.system"
            else RunsCommand(exec, exec_source(marker)))
    checkpoint = {**reference_checkpoint(image, text, "coco_precomp"), "opt": evil}
    path = tmp_path / "evil.pth.tar"
    save_reference_checkpoint(checkpoint, path, fmt)  # type: ignore[arg-type]
    with pytest.raises(UnsafePickleError) as error:
        load_reference_checkpoint(path)
    message = str(error.value)
    expected = "posix.system" if payload == "os.system" else "builtins.exec"
    assert str(path) in message and expected in message and "refusing" in message
    assert not marker.exists()


def test_malicious_checkpoint_cli(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    image, text = reference_state(SIZES, f30k=False)
    checkpoint = reference_checkpoint(image, text, "coco_precomp")
    checkpoint["model"] = [image, RunsCommand(os.system, touch_command(marker))]
    path = tmp_path / "evil.pth.tar"
    save_reference_checkpoint(checkpoint, path, "legacy")
    vocab_path = tmp_path / "vocab.pkl"
    write_reference_vocab_pickle(vocab_path, vocab_words(SIZES.vocab_size))
    result = run_script("model/convert_reference.py", "--checkpoint", path, "--vocab", vocab_path,
                        "--output", tmp_path / "out")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"convert_reference.py: error: {path}: refusing to load" in result.stderr and "posix.system" in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_vocabulary_size_mismatch_cli(tmp_path: Path) -> None:
    checkpoint_path, _, _ = _write_inputs(tmp_path, "coco", "zip")
    vocab_path = tmp_path / "other_vocab.pkl"
    write_reference_vocab_pickle(vocab_path, vocab_words(35))
    result = run_script("model/convert_reference.py", "--checkpoint", checkpoint_path, "--vocab", vocab_path,
                        "--output", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{vocab_path}: the vocabulary has 35 words but the checkpoint" in result.stderr
    assert "embeds 40" in result.stderr
    assert not (tmp_path / "out").exists()


def _convert_error(tmp_path: Path, checkpoint: dict, fmt: str = "zip") -> str:
    path = tmp_path / "broken.pth.tar"
    save_reference_checkpoint(checkpoint, path, fmt)  # type: ignore[arg-type]
    vocab_path = tmp_path / "vocab.pkl"
    write_reference_vocab_pickle(vocab_path, vocab_words(SIZES.vocab_size))
    with pytest.raises(ConversionError) as error:
        convert_reference_checkpoint(path, vocab_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    return str(error.value)


def test_key_errors_name_the_keys(tmp_path: Path) -> None:
    image, text = reference_state(SIZES, f30k=False)
    del image["Rs_GCN_2.phi.bias"]
    text["rnn.weight_ih_l1"] = torch.zeros(48, 16)  # a second GRU layer (opt.num_layers 2)
    image["attention.weight"] = torch.zeros(3)
    message = _convert_error(tmp_path, reference_checkpoint(image, text, "coco_precomp"))
    assert "missing keys: image_encoder.reasoning.1.phi.bias" in message
    assert "image encoder attention.weight" in message and "text encoder rnn.weight_ih_l1" in message
    image, text = reference_state(SIZES, f30k=False)
    text["rnn.bias_hh_l0"] = text["rnn.bias_hh_l0"][:10]
    message = _convert_error(tmp_path, reference_checkpoint(image, text, "coco_precomp"))
    assert "wrong shapes: text encoder rnn.bias_hh_l0 (10,) (the model needs (48,))" in message


def test_variant_must_match_the_weights(tmp_path: Path) -> None:
    image, text = reference_state(SIZES, f30k=True)
    message = _convert_error(tmp_path, reference_checkpoint(image, text, "coco_precomp"))
    assert "opt.data_name is 'coco_precomp' but the image encoder has final BatchNorm weights (bn.*)" in message
    image, text = reference_state(SIZES, f30k=False)
    message = _convert_error(tmp_path, reference_checkpoint(image, text, "f30k_precomp"))
    assert "has no final BatchNorm weights" in message


def test_unsupported_options_and_shapes(tmp_path: Path) -> None:
    image, text = reference_state(SIZES, f30k=False)
    assert "opt.use_abs = True is not supported" in _convert_error(
        tmp_path, reference_checkpoint(image, text, "coco_precomp", use_abs=True))
    assert "only the precomputed-feature models" in _convert_error(tmp_path, reference_checkpoint(image, text, "coco"))
    image["Rs_GCN_1.g.weight"] = image["Rs_GCN_1.g.weight"][..., 0]
    assert "'Rs_GCN_1.g.weight' has shape (16, 16), expected a Conv1d kernel (D, D, 1)" in _convert_error(
        tmp_path, reference_checkpoint(image, text, "coco_precomp"))


def test_unreadable_files(tmp_path: Path) -> None:
    vocab_path = tmp_path / "vocab.pkl"
    write_reference_vocab_pickle(vocab_path, vocab_words(SIZES.vocab_size))
    with pytest.raises(ConversionError, match="no such file"):
        convert_reference_checkpoint(tmp_path / "absent.pth.tar", vocab_path, tmp_path / "out")
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"\x00\x01 definitely not a checkpoint")
    with pytest.raises(ConversionError, match="garbage.pth.tar: not a readable torch.save checkpoint"):
        load_reference_checkpoint(garbage)
    truncated = tmp_path / "truncated.pth.tar"
    image, text = reference_state(SIZES, f30k=False)
    save_reference_checkpoint(reference_checkpoint(image, text, "coco_precomp"), truncated, "legacy")
    truncated.write_bytes(truncated.read_bytes()[:600])
    with pytest.raises(ConversionError, match="truncated.pth.tar: not a readable torch.save checkpoint"):
        load_reference_checkpoint(truncated)
    plain = tmp_path / "plain.pth"
    torch.save([torch.zeros(2)], plain)
    with pytest.raises(ConversionError, match="expected a checkpoint dict, got list"):
        load_reference_checkpoint(plain)
