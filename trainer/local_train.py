"""A single-process training loop of VSRN on the built-in synthetic data.

This is the embedded default job until the Ray/DeepSpeed trainer lands: it trains a tiny VSRN on
CPU for a few hundred steps, logs both loss terms and prints the recall table of a held-out split.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from data_shards.synthetic import make_synthetic_split
from model.loss import hardest_negative_loss
from model.vocab import Vocabulary, build_vocab, pad_captions
from model.vsrn import VSRN, VSRNConfig
from trainer.evaluation import evaluate_embeddings

log = logging.getLogger(__name__)


@dataclass
class LocalTrainConfig:
    train_images: int = 256
    test_images: int = 100
    regions: int = 12
    feature_dim: int = 64
    epochs: int = 8
    batch_size: int = 32
    learning_rate: float = 5e-4
    margin: float = 0.2
    grad_clip: float = 2.0
    warmup_epochs: int = 3  # all negatives first, then hardest negatives (max violation)
    seed: int = 0
    log_every: int = 20
    model: VSRNConfig = field(default_factory=lambda: VSRNConfig(
        img_dim=64, embed_size=128, word_dim=32, num_reasoning_layers=2,
        caption_hidden=64, caption_word_dim=32))


def _encode_split(model: VSRN, vocab: Vocabulary, images: np.ndarray, captions: list[str],
                  batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        img = torch.cat([model.encode_images(torch.from_numpy(images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])
        caps = []
        for i in range(0, len(captions), batch_size):
            tokens, lengths = pad_captions([vocab.encode(c) for c in captions[i:i + batch_size]])
            caps.append(model.encode_captions(tokens, lengths))
    model.train()
    return img, torch.cat(caps)


def train(cfg: LocalTrainConfig) -> dict:
    """Train, evaluate on the held-out split, return {'losses': [...], 'metrics': {...}}."""
    torch.manual_seed(cfg.seed)
    train_split = make_synthetic_split(cfg.train_images, cfg.regions, cfg.feature_dim, seed=cfg.seed)
    test_split = make_synthetic_split(cfg.test_images, cfg.regions, cfg.feature_dim, seed=cfg.seed + 1)
    vocab = build_vocab(train_split.captions, threshold=1)
    model_cfg = VSRNConfig.from_dict({**cfg.model.to_dict(), "img_dim": cfg.feature_dim, "vocab_size": len(vocab)})
    model = VSRN(model_cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    encoded = [vocab.encode(c) for c in train_split.captions]
    num_pairs = len(encoded)  # a caption-level epoch: every caption once, as the reference does
    rng = np.random.default_rng(cfg.seed)
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(cfg.epochs):
        order = rng.permutation(num_pairs)
        max_violation = epoch >= cfg.warmup_epochs
        for start in range(0, num_pairs - cfg.batch_size + 1, cfg.batch_size):
            t0 = time.perf_counter()
            pairs = order[start:start + cfg.batch_size]
            image_ids = torch.from_numpy(pairs // 5)
            regions = torch.from_numpy(train_split.images[pairs // 5])
            tokens, lengths = pad_captions([encoded[p] for p in pairs])
            out = model(regions, tokens, lengths)
            matching = hardest_negative_loss(out.image_emb, out.caption_emb, image_ids,
                                             margin=cfg.margin, max_violation=max_violation)
            loss = matching
            if out.caption_loss is not None:
                loss = loss + model_cfg.caption_loss_weight * out.caption_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            record = {"epoch": epoch, "step": step, "loss_matching": float(matching.detach()),
                      "loss_caption": float(out.caption_loss.detach()) if out.caption_loss is not None else 0.0}
            if not math.isfinite(float(loss)):
                raise FloatingPointError(f"loss became {float(loss)} at epoch {epoch} step {step}")
            history.append(record)
            if step % cfg.log_every == 0:
                log.info("epoch %d step %d  L_M %.4f  L_G %.4f  %s  %.0f pairs/s", epoch, step,
                         record["loss_matching"], record["loss_caption"],
                         "hardest" if max_violation else "all-negatives",
                         cfg.batch_size / (time.perf_counter() - t0))
    img, caps = _encode_split(model, vocab, test_split.images, test_split.captions)
    metrics = {"all": evaluate_embeddings([(img, caps)], protocol="all")}
    return {"losses": history, "metrics": metrics, "model": model, "vocab": vocab}
