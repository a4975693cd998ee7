"""Real inputs for the evaluation-worker tests: tiny sharded splits, tiny VSRN checkpoints, runs.

Shared by tests/trainer/evaluator/ (test_checkpoint_eval.py, test_actor.py),
test_evaluate_cli.py, run/test_records.py and test_report.py (tests/ is on sys.path, see
tests/conftest.py). Everything is small enough for a 2-core machine: splits of a few
dozen images with 4 regions of 8 features, models with 16-dimensional embeddings.

Splits are written in the precomputed layout and converted with the project's converter
(data_shards/convert.py) with float32 features, so the shards hold exactly the arrays the tests
encode independently. Captions are distinct per image (they name the image's number) and the
features are Gaussian: no two similarities tie, so independently computed embeddings rank alike.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_shards.convert import convert, plan_precomp
from model.checkpoint import save_inference_checkpoint
from model.vocab import Vocabulary, build_vocab, pad_captions
from model.vsrn import VSRN, VSRNConfig
from trainer.config import EvalConfig, TrainConfig, config_to_yaml
from trainer.evaluation import evaluate_embeddings

ROOT = Path(__file__).resolve().parents[1]
REGIONS, FEATURES = 4, 8
DEV_IMAGES = 20  # of the 30 dev images of build_eval_data: the subset ends inside the second shard of 16
PINNED_KEYS = ["i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
               "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum"]
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
    config.eval.qualitative_queries = 0  # see eval_config
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(config))


@torch.inference_mode()
def embed(model: VSRN, vocab: Vocabulary, split: Split, images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings computed directly from the precomputed arrays (no shards, no reader)."""
    count = len(split.ims) if images is None else images
    image_emb = model.encode_images(torch.from_numpy(split.ims[:count])).numpy()
    tokens, lengths = pad_captions([vocab.encode(c) for c in split.captions[: 5 * count]])
    return image_emb, model.encode_captions(tokens, lengths).numpy()


def dev_metrics(model: VSRN, data: EvalData) -> dict[str, Any]:
    """The dev metrics an evaluator must find: protocol "all" on the first DEV_IMAGES dev images."""
    return evaluate_embeddings([embed(model, data.vocab, data.dev, DEV_IMAGES)], "all")


def expected_test_metrics(model: VSRN, data: EvalData) -> dict[str, Any]:
    return evaluate_embeddings([embed(model, data.vocab, data.test)], "all")


def ranked_models(data: EvalData) -> list[VSRN]:
    """Two different models, the one with the higher dev rsum first (it must stay the best when
    the later checkpoint, with a lower rsum, is evaluated)."""
    candidates = [make_model(data.vocab, seed) for seed in (1, 2)]
    rsums = [dev_metrics(m, data)["rsum"] for m in candidates]
    assert rsums[0] != rsums[1]
    return sorted(candidates, key=lambda m: -dev_metrics(m, data)["rsum"])


def eval_config(**changes: Any) -> EvalConfig:
    # No qualitative pages unless a test asks (tests/trainer/inference/test_qualitative.py): they cost figures.
    base = {"test_protocols": ["1k-5fold", "all"], "dev_images": DEV_IMAGES, "batch_size": 16,
            "qualitative_queries": 0}
    return EvalConfig(**{**base, **changes})


def truncate(path: Path) -> None:
    """Cut a file in half (a damaged model.safetensors)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_run(root: Path, data: EvalData, models: list[VSRN], corrupt: int | None = None) -> Path:
    """RUN_DIR with config.yaml and checkpoint_000001.. (steps 10, 20, ...) of ``models``;
    ``corrupt``: index of a checkpoint whose model.safetensors is truncated."""
    run = root / "run"
    write_run_config(run, str(data.dev.shards), str(data.test.shards), ["1k-5fold", "all"], DEV_IMAGES)
    for index, model in enumerate(models):
        directory = write_checkpoint(run, f"checkpoint_{index + 1:06d}", model, data.vocab, step=10 * (index + 1),
                                     epoch=index)
        if index == corrupt:
            truncate(directory / "inference" / "model.safetensors")
    return run


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@dataclass(frozen=True)
class PictureSplit:
    """A split of the synthetic world with boxes, sizes and drawn images (data_shards/synthetic.py)."""

    shards: Path
    images: Path  # <key>.png per image
    captions: list[str]
    vocab: Vocabulary


def write_picture_split(root: Path, images: int = 12, seed: int = 2) -> PictureSplit:
    """``images`` synthetic test images of REGIONS regions x FEATURES features, converted with their
    boxes and sizes, and drawn; a vocabulary of their captions."""
    from data_shards.format import sample_key
    from data_shards.synthetic import (
        scene_layout,
        write_precomp_split,
        write_scene_images,
    )

    precomp = root / "picture_precomp"
    write_precomp_split(precomp, "test", images, regions=REGIONS, feature_dim=FEATURES, seed=seed)
    shards = root / "picture_shards"
    convert(plan_precomp(str(precomp), "test", 5, "float32"), str(shards), {}, "float32")
    pictures = root / "pictures"
    write_scene_images(pictures, scene_layout(images, seed=seed), (sample_key("test", i) for i in range(images)))
    captions = (precomp / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    return PictureSplit(shards=shards, images=pictures, captions=captions, vocab=build_vocab(captions, threshold=1))


def make_caption_model(vocab: Vocabulary, seed: int) -> VSRN:
    """A tiny VSRN with the caption generator (L_G) and seeded random weights."""
    torch.manual_seed(seed)
    config = VSRNConfig(img_dim=FEATURES, embed_size=16, word_dim=8, vocab_size=len(vocab), num_reasoning_layers=1,
                        caption_hidden=12, caption_word_dim=6, max_caption_len=12)
    return VSRN(config).eval()


def run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python trainer/<script> args...`` from the repository root, as users run the CLIs."""
    return subprocess.run([sys.executable, f"trainer/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=300)
