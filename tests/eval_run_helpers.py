"""Real inputs for the evaluation-worker tests: tiny sharded splits, tiny VSRN checkpoints, runs.

Shared by tests/trainer/test_eval_worker.py and tests/trainer/test_evaluate_cli.py (tests/ is on
sys.path, see tests/conftest.py). Everything is small enough for a 2-core machine: splits of a few
dozen images with 4 regions of 8 features, models with 16-dimensional embeddings.

Splits are written in the precomputed layout and converted with the project's converter
(data_shards/convert.py) with float32 features, so the shards hold exactly the arrays the tests
encode independently. Captions are distinct per image (they name the image's number) and the
features are Gaussian: no two similarities tie, so independently computed embeddings rank alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_shards.convert import convert, plan_precomp
from model.checkpoint import save_inference_checkpoint
from model.vocab import Vocabulary, build_vocab, pad_captions
from model.vsrn import VSRN, VSRNConfig
from trainer.config import TrainConfig, config_to_yaml

REGIONS, FEATURES = 4, 8
WORDS = ("dog", "cat", "red", "blue", "park", "street", "ball", "tree", "runs", "sits", "near", "under")


@dataclass(frozen=True)
class Split:
    """A converted split: its shard directory and the arrays it was made from."""

    shards: Path
    ims: np.ndarray  # (N, REGIONS, FEATURES) float32
    captions: list[str]  # 5N, image by image


@dataclass(frozen=True)
class EvalData:
    dev: Split
    test: Split
    vocab: Vocabulary


def write_split(root: Path, split: str, images: int, seed: int, shard_size: int = 16) -> Split:
    """Precomputed files for ``images`` images, converted into float32 shards under root/split."""
    rng = np.random.default_rng(seed)
    ims = rng.standard_normal((images, REGIONS, FEATURES)).astype(np.float32)
    captions = []
    for i in range(images):
        for k in range(5):
            words = " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), size=3))
            captions.append(f"a {words} number {i} variant {k}")
    precomp = root / f"{split}_precomp"
    precomp.mkdir(parents=True, exist_ok=True)
    np.save(precomp / f"{split}_ims.npy", ims)
    (precomp / f"{split}_caps.txt").write_text("".join(c + "\n" for c in captions), encoding="utf-8")
    shards = root / f"{split}_shards"
    convert(plan_precomp(str(precomp), split, shard_size, "float32"), str(shards), {}, "float32")
    return Split(shards=shards, ims=ims, captions=captions)


def build_eval_data(root: Path, dev_images: int = 30, test_images: int = 40) -> EvalData:
    dev = write_split(root, "dev", dev_images, seed=1)
    test = write_split(root, "test", test_images, seed=2)
    return EvalData(dev=dev, test=test, vocab=build_vocab(dev.captions + test.captions, threshold=1))


def make_model(vocab: Vocabulary, seed: int) -> VSRN:
    """A tiny VSRN with seeded random weights (no caption branch)."""
    torch.manual_seed(seed)
    config = VSRNConfig(img_dim=FEATURES, embed_size=16, word_dim=8, vocab_size=len(vocab), num_reasoning_layers=1,
                        caption_loss_weight=0.0)
    return VSRN(config).eval()


def write_checkpoint(run_dir: Path, name: str, model: VSRN, vocab: Vocabulary, step: int, epoch: int = 0,
                     complete: bool = True) -> Path:
    """RUN/name/inference (model/checkpoint.py format) and, if ``complete``, train_state.json."""
    directory = run_dir / name
    save_inference_checkpoint(directory / "inference", model, vocab)
    if complete:
        state = {"epoch": epoch, "step": step, "batch_in_epoch": 0, "epoch_complete": True, "world_size": 1,
                 "global_batch_size": 8, "best_rsum": 0.0, "format_version": 1}
        (directory / "train_state.json").write_text(json.dumps(state))
    return directory


def write_run_config(run_dir: Path, dev: str, test: str, protocols: list[str], dev_images: int = 20) -> None:
    """RUN/config.yaml as the launcher writes it (trainer/config.py format)."""
    config = TrainConfig()
    config.data.dev, config.data.test = dev, test
    config.eval.test_protocols = protocols
    config.eval.dev_images = dev_images
    config.eval.batch_size = 16
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(config))


@torch.inference_mode()
def embed(model: VSRN, vocab: Vocabulary, split: Split, images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings computed directly from the precomputed arrays (no shards, no reader)."""
    count = len(split.ims) if images is None else images
    image_emb = model.encode_images(torch.from_numpy(split.ims[:count])).numpy()
    tokens, lengths = pad_captions([vocab.encode(c) for c in split.captions[: 5 * count]])
    return image_emb, model.encode_captions(tokens, lengths).numpy()
