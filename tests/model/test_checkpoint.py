"""Tests of model/checkpoint.py: the inference checkpoint directory format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import (
    CONFIG_FILE,
    VOCAB_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_inference_checkpoint,
    read_checkpoint_config,
    save_inference_checkpoint,
)
from model.vocab import Vocabulary, pad_captions
from model.vsrn import VSRN, VSRNConfig
from reference_layout import vocab_words

TINY = dict(img_dim=12, embed_size=16, word_dim=8, vocab_size=30, num_reasoning_layers=2, caption_hidden=12,
            caption_word_dim=6)


def _trained_like(config: VSRNConfig, seed: int = 0) -> VSRN:
    """A model whose every weight and buffer differs from its initialisation (incl. BN stats)."""
    torch.manual_seed(seed)
    model = VSRN(config)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if "running_var" in name else torch.randn_like(tensor) * 0.3)
            else:
                tensor.fill_(77)
    return model.eval()


def _inputs(config: VSRNConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    regions = torch.randn(3, 5, config.img_dim, generator=g)
    tokens, lengths = pad_captions([[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 10, 11, 2]])
    return regions, tokens, lengths


@pytest.mark.parametrize("variant", ["coco", "f30k", "no_caption"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, variant: str) -> None:
    config = {"coco": VSRNConfig(**TINY), "f30k": VSRNConfig.flickr30k(**TINY),
              "no_caption": VSRNConfig(**TINY, caption_loss_weight=0.0)}[variant]
    model = _trained_like(config)
    vocab = Vocabulary(vocab_words(config.vocab_size))
    out = save_inference_checkpoint(tmp_path / "ckpt", model, vocab, extra={"source": {"kind": "test", "epoch": 3}})
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging directory left behind

    loaded, loaded_vocab = load_inference_checkpoint(out)
    assert not loaded.training and loaded.config == config and loaded_vocab == vocab
    assert (loaded.caption_generator is None) == (variant == "no_caption")
    expected_state, state = model.state_dict(), loaded.state_dict()
    assert expected_state.keys() == state.keys()
    assert all(torch.equal(expected_state[k], state[k]) for k in state)
    regions, tokens, lengths = _inputs(config)
    with torch.no_grad():
        assert torch.equal(model.encode_images(regions), loaded.encode_images(regions))
        assert torch.equal(model.encode_captions(tokens, lengths), loaded.encode_captions(tokens, lengths))
        if variant != "no_caption":
            assert torch.equal(model.generate_captions(regions).tokens, loaded.generate_captions(regions).tokens)

    payload = read_checkpoint_config(out)
    assert payload["format"] == "vsrn-inference" and payload["format_version"] == 1
    assert payload["model"] == config.to_dict() and payload["source"] == {"kind": "test", "epoch": 3}
    if variant == "no_caption":
        assert not any(k.startswith("caption_generator") for k in load_file(str(out / WEIGHTS_FILE)))


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    config = VSRNConfig(**TINY)
    vocab = Vocabulary(vocab_words(config.vocab_size))
    first = _trained_like(config, seed=0)
    target = save_inference_checkpoint(tmp_path / "ckpt", first, vocab)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    # The extra value is not JSON: the save fails after the weights and vocabulary were written
    # into the staging directory, before config.json.
    with pytest.raises(CheckpointError, match="not JSON"):
        save_inference_checkpoint(target, _trained_like(config, seed=1), vocab, extra={"source": object()})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    loaded, _ = load_inference_checkpoint(target)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in first.state_dict().items())

    # A successful save replaces it.
    second = _trained_like(config, seed=2)
    save_inference_checkpoint(target, second, vocab)
    loaded, _ = load_inference_checkpoint(target)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in second.state_dict().items())
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_refuses_to_replace_other_things(tmp_path: Path) -> None:
    config = VSRNConfig(**TINY)
    model, vocab = _trained_like(config), Vocabulary(vocab_words(config.vocab_size))
    other = tmp_path / "results"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not an inference checkpoint"):
        save_inference_checkpoint(other, model, vocab)
    assert (other / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_inference_checkpoint(a_file, model, vocab)
    with pytest.raises(CheckpointError, match="vocabulary has 29 words but the model's vocab_size is 30"):
        save_inference_checkpoint(tmp_path / "c", model, Vocabulary(vocab_words(29)))
    with pytest.raises(CheckpointError, match="reserved"):
        save_inference_checkpoint(tmp_path / "c", model, vocab, extra={"model": {}})
    with pytest.raises(CheckpointError, match="s3:// checkpoint locations are not supported yet"):
        save_inference_checkpoint("s3://bucket/ckpt", model, vocab)


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    config = VSRNConfig(**TINY)
    vocab = Vocabulary(vocab_words(config.vocab_size))
    return save_inference_checkpoint(tmp_path / "ckpt", _trained_like(config), vocab)


def _edit_config(directory: Path, **changes: object) -> None:
    path = directory / CONFIG_FILE
    payload = json.loads(path.read_text())
    payload.update(changes)
    path.write_text(json.dumps(payload))


def test_load_errors_missing_files(tmp_path: Path, saved: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_inference_checkpoint(tmp_path / "absent")
    for name in (WEIGHTS_FILE, VOCAB_FILE, CONFIG_FILE):
        copy = tmp_path / f"without_{name}"
        copy.mkdir()
        for p in saved.iterdir():
            if p.name != name:
                (copy / p.name).write_bytes(p.read_bytes())
        with pytest.raises(CheckpointError) as error:
            load_inference_checkpoint(copy)
        assert str(copy / name) in str(error.value) and "missing" in str(error.value)


def test_load_errors_format_and_config(saved: Path) -> None:
    config_path = saved / CONFIG_FILE
    original = config_path.read_text()
    cases = [
        ({"format": "something-else"}, "'format' is 'something-else'"),
        ({"format_version": 2}, "unsupported 'format_version' 2"),
        ({"model": {**json.loads(original)["model"], "vocab_size": 31}}, "30 words, but"),
        ({"model": {**json.loads(original)["model"], "bogus": 1}}, "unknown VSRNConfig keys: bogus"),
        ({"model": {**json.loads(original)["model"], "embed_size": 0}}, "embed_size must be positive"),
    ]
    for changes, message in cases:
        config_path.write_text(original)
        _edit_config(saved, **changes)
        with pytest.raises(CheckpointError) as error:
            load_inference_checkpoint(saved)
        assert message in str(error.value) and str(saved) in str(error.value)
    config_path.write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_inference_checkpoint(saved)


def test_load_errors_name_missing_unexpected_and_misshaped_keys(saved: Path) -> None:
    weights = saved / WEIGHTS_FILE
    state = load_file(str(weights))
    del state["image_encoder.fc.bias"]
    state["image_encoder.extra.weight"] = torch.zeros(2)
    state["text_encoder.embed.weight"] = torch.zeros(30, 9)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError) as error:
        load_inference_checkpoint(saved)
    message = str(error.value)
    assert str(weights) in message
    assert "missing keys: image_encoder.fc.bias" in message
    assert "unexpected keys: image_encoder.extra.weight" in message
    assert "text_encoder.embed.weight (30, 9) (the config needs (30, 8))" in message

    weights.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_inference_checkpoint(saved)


def test_load_checks_the_vocabulary(saved: Path) -> None:
    Vocabulary(vocab_words(25)).save_json(saved / VOCAB_FILE)
    with pytest.raises(CheckpointError, match="25 words, but .* says vocab_size 30"):
        load_inference_checkpoint(saved)
    (saved / VOCAB_FILE).write_text('{"format": "vsrn-vocab"}')
    with pytest.raises(CheckpointError, match="vocab.json: unsupported 'format_version'"):
        load_inference_checkpoint(saved)
