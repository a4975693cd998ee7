"""Training samples/s per worker: this project's VSRN against the reference's way, same inputs.

Paper configuration (img_dim 2048, D 2048, 4 RRR layers, GRU reasoning, word_dim 300, vocabulary
10006, caption generator with L_G), batch 128, 36 regions of random features, random captions of
COCO-like lengths (10-22 tokens with <start> and <end>), sorted by length as the reference's data
loader sorts them. One training step = forward (both encoders, L_G, hardest-negative L_M), then
backward, gradient clipping at 2.0 and an Adam update (lr 2e-4). Two loops run on the same batch
from the same initial weights:

* reference-style: `ReferenceStyleVSRN`, a plain single-process fp32 PyTorch re-creation of the
  reference code's training step (KunpengLi1994/VSRN `model.py`, `models/*.py`,
  `misc/utils.py`, `GCN_lib/Rs_GCN.py`): Conv1d(D, D, 1) reasoning layers on (B, D, regions),
  nn.GRU over the regions, a packed nn.GRU over the words, and the S2VT captioner unrolled
  max_len - 1 = 59 steps whatever the captions' lengths, with the attention's Linear(2h, h) on
  [regions; repeated hidden] and log_softmax over the vocabulary at every step, then a masked
  NLL. Its Adam gets the caption parameters twice (the reference lists decoder, encoder and
  caption_model = encoder + decoder), so they are updated twice per step, and clip_grad_norm
  sees them twice, as in the reference.
* ours: `model.vsrn.VSRN` + `model.loss.hardest_negative_loss`, Adam over each parameter once
  (torch's fused Adam kernel; --plain-adam for the default one).

Prints, per loop, seconds per step (forward, backward + optimizer and total of the fastest timed
step, and the mean total), samples/s (batch / fastest step), the step's floating-point operations
(counted on CPU with torch.utils.flop_counter.FlopCounterMode during the first warm-up step:
matrix products and convolutions, forward and backward; elementwise work and the optimizer are
not counted; on CUDA cuDNN's GRU is invisible to it, so nothing is counted there), the measured
fp32 matrix-multiply rate of the machine (best of a few large torch.mm, same thread count) and
the resulting lower bound on the step time. On CUDA (--device cuda) our model also runs under bf16
autocast (fp32 weights). --ablations also times our fp32 step with one optimization undone at a
time (plain Adam; RRR layers in the unfolded order; torch's nn.GRU instead of model.vsrn.run_gru).

    python bench/train_throughput.py [--batch-size 128] [--steps 3] [--warmup 1] [--device cpu|cuda]
                                     [--skip-reference] [--ablations] [--threads N] [--json OUT]
                                     [--plain-malloc]

The benchmark runs with the glibc malloc settings of the training workers (trainer/training/allocator.py:
large temporaries stay on the heap instead of being mapped and faulted in at every step); it
re-executes itself with them unless `--plain-malloc` (glibc's defaults, as the reference runs).

On 2 CPU cores one reference-style step takes 20-45 s, hence the few steps by default.
`--check` first compares the two implementations' losses on the batch (dropout off); the
equivalence of losses and gradients is also a test (tests/model/test_vsrn.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import resource
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model.vsrn as vsrn_module
from model.loss import hardest_negative_loss
from model.vsrn import END_ID, START_ID, VSRN, VSRNConfig
from trainer.training import allocator
from trainer.evaluation import set_tf32

LEARNING_RATE = 2e-4
GRAD_CLIP = 2.0
MARGIN = 0.2


# ----------------------------------------------------------------------------------------------
# Inputs


def make_batch(batch: int, regions: int, config: VSRNConfig, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Random region features and captions of 10-22 tokens (<start> w1..wn <end>, 0-padded),
    sorted by decreasing length (the reference's collate_fn sorts every batch so)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, regions, config.img_dim, generator=g)
    lengths = torch.randint(10, 23, (batch,), generator=g).sort(descending=True).values
    tokens = torch.randint(4, config.vocab_size, (batch, int(lengths.max())), generator=g)
    tokens[:, 0] = START_ID
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n - 1] = END_ID
        tokens[i, n:] = 0
    return feats, tokens, lengths


def reference_caption_labels(tokens: Tensor, lengths: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
    """The reference data loader's caption labels and masks, (B, max_len + 1) each: the caption
    cut to max_len tokens (ending in <end>) and zero-padded; the mask is 1 up to and including
    the first 0."""
    batch = tokens.shape[0]
    labels = torch.zeros(batch, max_len + 1, dtype=torch.long)
    masks = torch.zeros(batch, max_len + 1)
    for i, n in enumerate(lengths.tolist()):
        cap = tokens[i, :n].tolist()
        if len(cap) > max_len - 1:
            cap = cap[:max_len]
            cap[-1] = END_ID
        labels[i, :len(cap)] = torch.tensor(cap)
        first_zero = int((labels[i] == 0).nonzero()[0, 0])
        masks[i, :first_zero + 1] = 1
    return labels, masks


# ----------------------------------------------------------------------------------------------
# The reference's way (a re-creation of its modules and training step, not a copy)


def _ref_l2norm(x: Tensor) -> Tensor:
    """The reference's l2norm: divide by the norm over dim 1 (no epsilon)."""
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt()


class _RefRsGCN(nn.Module):
    """Rs_GCN: 1x1 Conv1d projections of (B, D, regions); R = theta^T phi / regions."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.g = nn.Conv1d(dim, dim, 1)
        self.theta = nn.Conv1d(dim, dim, 1)
        self.phi = nn.Conv1d(dim, dim, 1)
        self.W = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.BatchNorm1d(dim))

    def forward(self, v: Tensor) -> Tensor:
        g_v = self.g(v).permute(0, 2, 1)
        theta_v = self.theta(v).permute(0, 2, 1)
        phi_v = self.phi(v)
        r = torch.matmul(theta_v, phi_v) / phi_v.shape[-1]
        y = torch.matmul(r, g_v).permute(0, 2, 1).contiguous()
        return self.W(y) + v


class _RefImageEncoder(nn.Module):
    def __init__(self, config: VSRNConfig) -> None:
        super().__init__()
        d = config.embed_size
        self.fc = nn.Linear(config.img_dim, d)
        self.gcn = nn.ModuleList(_RefRsGCN(d) for _ in range(config.num_reasoning_layers))
        self.img_rnn = nn.GRU(d, d, batch_first=True)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        v = _ref_l2norm(self.fc(images)).permute(0, 2, 1)
        for layer in self.gcn:
            v = layer(v)
        reasoned = _ref_l2norm(v.permute(0, 2, 1))
        _, hidden = self.img_rnn(reasoned)
        return _ref_l2norm(hidden[0]), reasoned


class _RefTextEncoder(nn.Module):
    def __init__(self, config: VSRNConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.word_dim)
        self.rnn = nn.GRU(config.word_dim, config.embed_size, batch_first=True)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        packed = pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True)
        out, _ = self.rnn(packed)
        padded, _ = pad_packed_sequence(out, batch_first=True)
        index = (lengths.to(padded.device) - 1).view(-1, 1, 1).expand(-1, 1, padded.shape[2])
        return _ref_l2norm(torch.gather(padded, 1, index).squeeze(1))


class _RefCaptionEncoder(nn.Module):  # EncoderRNN
    def __init__(self, config: VSRNConfig) -> None:
        super().__init__()
        self.vid2hid = nn.Linear(config.embed_size, config.caption_hidden)
        self.input_dropout = nn.Dropout(config.caption_dropout)
        self.rnn = nn.GRU(config.caption_hidden, config.caption_hidden, batch_first=True)

    def forward(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        batch, regions, dim = feats.shape
        x = self.input_dropout(self.vid2hid(feats.reshape(-1, dim))).view(batch, regions, -1)
        return self.rnn(x)


class _RefAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(2 * dim, dim)
        self.linear2 = nn.Linear(dim, 1, bias=False)

    def forward(self, hidden: Tensor, encoder_outputs: Tensor) -> Tensor:
        batch, regions, dim = encoder_outputs.shape
        hidden = hidden.unsqueeze(1).repeat(1, regions, 1)
        inputs = torch.cat((encoder_outputs, hidden), 2).view(-1, 2 * dim)
        alpha = torch.softmax(self.linear2(torch.tanh(self.linear1(inputs))).view(batch, regions), dim=1)
        return torch.bmm(alpha.unsqueeze(1), encoder_outputs).squeeze(1)


class _RefDecoder(nn.Module):  # DecoderRNN, 'train' mode
    def __init__(self, config: VSRNConfig) -> None:
        super().__init__()
        h = config.caption_hidden
        self.max_length = config.max_caption_len
        self.input_dropout = nn.Dropout(config.caption_dropout)
        self.embedding = nn.Embedding(config.vocab_size, config.caption_word_dim)
        self.attention = _RefAttention(h)
        self.rnn = nn.GRU(h + config.caption_word_dim, h, batch_first=True)
        self.out = nn.Linear(h, config.vocab_size)

    def forward(self, encoder_outputs: Tensor, encoder_hidden: Tensor, targets: Tensor) -> Tensor:
        hidden = encoder_hidden
        targets_emb = self.embedding(targets)
        seq_logprobs = []
        for i in range(self.max_length - 1):
            context = self.attention(hidden.squeeze(0), encoder_outputs)
            step_in = self.input_dropout(torch.cat([targets_emb[:, i, :], context], dim=1)).unsqueeze(1)
            out, hidden = self.rnn(step_in, hidden)
            seq_logprobs.append(F.log_softmax(self.out(out.squeeze(1)), dim=1).unsqueeze(1))
        return torch.cat(seq_logprobs, 1)


class ReferenceStyleVSRN(nn.Module):
    """The reference's VSRN training step in plain PyTorch (fp32, one process)."""

    def __init__(self, config: VSRNConfig) -> None:
        super().__init__()
        self.config = config
        self.img_enc = _RefImageEncoder(config)
        self.txt_enc = _RefTextEncoder(config)
        self.encoder = _RefCaptionEncoder(config)
        self.decoder = _RefDecoder(config)

    def optimizer_params(self) -> list[nn.Parameter]:
        """The reference's parameter list: txt_enc, img_enc, decoder, encoder, then
        caption_model = S2VTAttModel(encoder, decoder) again: the caption parameters twice."""
        params = list(self.txt_enc.parameters()) + list(self.img_enc.parameters())
        params += list(self.decoder.parameters()) + list(self.encoder.parameters())
        params += list(self.encoder.parameters()) + list(self.decoder.parameters())
        return params

    def loss(self, images: Tensor, tokens: Tensor, lengths: Tensor, labels: Tensor, masks: Tensor) -> Tensor:
        cap_emb = self.txt_enc(tokens, lengths)
        img_emb, reasoned = self.img_enc(images)
        # LanguageModelCriterion on the 59 steps
        seq_logprobs = self.decoder(*self.encoder(reasoned), labels)
        steps = seq_logprobs.shape[1]
        target, mask = labels[:, 1:][:, :steps], masks[:, 1:][:, :steps]
        nll = F.nll_loss(seq_logprobs.reshape(-1, seq_logprobs.shape[2]), target.reshape(-1), reduction="none")
        caption_loss = (nll * mask.reshape(-1)).sum() / images.shape[0]
        return _ref_contrastive_loss(img_emb, cap_emb) + caption_loss

    def our_name(self, name: str) -> str:
        """The name in our VSRN's state dict of this model's parameter or buffer `name`."""
        mapping = {"img_enc.fc": "image_encoder.fc", "img_enc.img_rnn": "image_encoder.gsr",
                   "txt_enc.embed": "text_encoder.embed", "txt_enc.rnn": "text_encoder.rnn",
                   "encoder.vid2hid": "caption_generator.region_proj",
                   "encoder.rnn": "caption_generator.region_rnn",
                   "decoder.embedding": "caption_generator.word_embed",
                   "decoder.attention.linear1": "caption_generator.attention.proj",
                   "decoder.attention.linear2": "caption_generator.attention.score",
                   "decoder.rnn": "caption_generator.decoder_rnn", "decoder.out": "caption_generator.output"}
        for k in range(len(self.img_enc.gcn)):
            for a, b in (("g", "g"), ("theta", "theta"), ("phi", "phi"), ("W.0", "residual_proj"),
                         ("W.1", "residual_norm")):
                mapping[f"img_enc.gcn.{k}.{a}"] = f"image_encoder.reasoning.{k}.{b}"
        prefix = next(p for p in mapping if name.startswith(p + "."))
        return mapping[prefix] + name[len(prefix):]

    @torch.no_grad()
    def load_from(self, model: VSRN) -> ReferenceStyleVSRN:
        """Copy the weights of one of our models (Linear -> 1x1 Conv1d where the reference has it)."""
        ours = model.state_dict()
        self.load_state_dict({name: ours[self.our_name(name)].reshape(tensor.shape)
                              for name, tensor in self.state_dict().items()})
        return self


def _ref_contrastive_loss(im: Tensor, s: Tensor) -> Tensor:
    """ContrastiveLoss(margin=0.2, max_violation=True) of the reference."""
    scores = im.mm(s.t())
    diagonal = scores.diag().view(im.shape[0], 1)
    cost_s = (MARGIN + scores - diagonal.expand_as(scores)).clamp(min=0)
    cost_im = (MARGIN + scores - diagonal.t().expand_as(scores)).clamp(min=0)
    eye = torch.eye(scores.shape[0], device=scores.device) > 0.5
    cost_s = cost_s.masked_fill(eye, 0).max(1)[0]
    cost_im = cost_im.masked_fill(eye, 0).max(0)[0]
    return cost_s.sum() + cost_im.sum()


# ----------------------------------------------------------------------------------------------
# Training steps


class Loop:
    """One model, its optimizer and its step split into forward and backward + optimizer."""

    def __init__(self, name: str, forward: Callable[[], Tensor], params: list[nn.Parameter],
                 optimizer: torch.optim.Optimizer, autocast: Any = None) -> None:
        self.name, self.forward_fn, self.params, self.optimizer = name, forward, params, optimizer
        self.autocast = autocast

    def forward(self) -> Tensor:
        with self.autocast or contextlib.nullcontext():
            return self.forward_fn()

    def backward(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.optimizer.step()


def reference_loop(model: VSRN, feats: Tensor, tokens: Tensor, lengths: Tensor, device: str) -> Loop:
    ref = ReferenceStyleVSRN(model.config).load_from(model).to(device).train()
    labels, masks = reference_caption_labels(tokens, lengths, model.config.max_caption_len)
    labels, masks, tokens = labels.to(device), masks.to(device), tokens.to(device)
    params = ref.optimizer_params()
    with warnings.catch_warnings():  # "optimizer contains a parameter group with duplicate parameters"
        warnings.simplefilter("ignore", UserWarning)
        # foreach=False: one parameter after the other, as the reference's Adam of 2019 did, so a
        # parameter listed twice gets two complete updates.
        optimizer = torch.optim.Adam(params, lr=LEARNING_RATE, foreach=False)
    return Loop("reference-style fp32", lambda: ref.loss(feats, tokens, lengths, labels, masks), params, optimizer)


def our_loop(model: VSRN, feats: Tensor, tokens: Tensor, lengths: Tensor, device: str, precision: str,
             fused_adam: bool = True, folded: bool | None = None, torch_gru: bool = False) -> Loop:
    """Our training step. The switches undo one optimization each, for the ablations: the
    optimizer (fused Adam), the RRR layers' folded order (None: by cost, False: never) and the
    CPU GRU of model.vsrn.run_gru (torch_gru: nn.GRU's own)."""
    model = model.to(device).train()
    for layer in model.image_encoder.reasoning:
        layer.folded = folded
    tokens = tokens.to(device)
    weight = model.config.caption_loss_weight
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE, fused=fused_adam or None)

    def forward() -> Tensor:
        patch = (mock.patch.object(vsrn_module, "run_gru", lambda gru, x: gru(x)) if torch_gru
                 else contextlib.nullcontext())
        with patch:
            out = model(feats, tokens, lengths)
        return hardest_negative_loss(out.image_emb, out.caption_emb) + weight * out.caption_loss

    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if precision == "bf16" else None
    label = "ours " + precision + ("" if fused_adam else ", plain Adam") + (", RRR unfolded" if folded is False else "")
    return Loop(label + (", nn.GRU" if torch_gru else ""), forward, params, optimizer, autocast)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load() -> float:
    return os.getloadavg()[0]


def time_loop(loop: Loop, batch: int, steps: int, warmup: int, device: str, count_flops: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"name": loop.name, "batch": batch, "steps": steps, "warmup": warmup}
    for i in range(warmup):
        counter = FlopCounterMode(display=False) if count_flops and i == 0 else contextlib.nullcontext()
        with counter:
            loss = loop.forward()
            loop.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if isinstance(counter, FlopCounterMode):
            result["flops_per_step"] = counter.get_total_flops()
        torch.nn.utils.clip_grad_norm_(loop.params, GRAD_CLIP)
        loop.optimizer.step()
        result.setdefault("loss_first_step", float(loss.detach()))
    _sync(device)
    fwd, bwd, loads, faults = [], [], [load()], []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        loss = loop.forward()
        _sync(device)
        t1 = time.perf_counter()
        loop.backward(loss)
        _sync(device)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        loads.append(load())
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    total = [a + b for a, b in zip(fwd, bwd)]
    best = total.index(min(total))
    result.update(
        forward_s=fwd, backward_optimizer_s=bwd, total_s=total, load_average_1min=loads,
        min_total_s=total[best], mean_total_s=sum(total) / steps, best_step_forward_s=fwd[best],
        best_step_backward_optimizer_s=bwd[best], samples_per_s=batch / total[best],
        samples_per_s_mean=batch * steps / sum(total), loss_last_step=float(loss.detach()),
        page_faults_per_step=faults)  # minor faults of this process: fresh memory touched for the first time
    if device.startswith("cuda"):
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def matmul_rate(device: str, repeat: int = 5) -> dict[str, Any]:
    """Best fp32 GFLOP/s of torch.mm on two large shapes (n x n x n with n = 4096, and the model's
    main product 4608 x 2048 x 4096)."""
    best: dict[str, Any] = {"gflops": 0.0}
    for m, k, n in ((4096, 4096, 4096), (4608, 2048, 4096)):
        a = torch.randn(m, k, device=device)
        b = torch.randn(k, n, device=device)
        torch.mm(a, b)
        for _ in range(repeat):
            _sync(device)
            t = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            rate = 2 * m * k * n / (time.perf_counter() - t) / 1e9
            if rate > best["gflops"]:
                best = {"gflops": rate, "shape": [m, k, n]}
    return best


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {ram:.1f} GiB RAM, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


@torch.no_grad()
def check_equal_losses(model: VSRN, feats: Tensor, tokens: Tensor, lengths: Tensor) -> tuple[float, float]:
    """Both implementations' losses on the batch in eval mode (no dropout, BatchNorm running stats)."""
    ref = ReferenceStyleVSRN(model.config).load_from(model).eval()
    labels, masks = reference_caption_labels(tokens, lengths, model.config.max_caption_len)
    theirs = float(ref.loss(feats, tokens, lengths, labels, masks))
    del ref
    model.eval()
    out = model(feats, tokens, lengths)
    ours = float(hardest_negative_loss(out.image_emb, out.caption_emb) + out.caption_loss)
    model.train()
    return theirs, ours


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first counts FLOPs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"],
                        help="for our model (default: fp32, and bf16 too on CUDA)")
    parser.add_argument("--skip-reference", action="store_true", help="time our model only")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--plain-adam", action="store_true", help="our loop with torch's default Adam, not fused")
    parser.add_argument("--ablations", action="store_true",
                        help="also time our fp32 step with plain Adam, with unfolded RRR layers, with nn.GRU")
    parser.add_argument("--small", action="store_true", help="D=256 model for a quick run")
    parser.add_argument("--check", action="store_true", help="first compare both losses on the batch (eval mode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--plain-malloc", action="store_true",
                        help="glibc's default malloc settings, not the training workers' (trainer/training/allocator.py)")
    args = parser.parse_args(argv)
    if not args.plain_malloc:
        allocator.reexec_configured()  # both loops allocate as a training worker does
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    precisions = args.precision or (["fp32", "bf16"] if device.startswith("cuda") else ["fp32"])
    config = VSRNConfig(img_dim=256, embed_size=256, caption_hidden=128) if args.small else VSRNConfig()
    if device.startswith("cuda"):
        set_tf32(False)  # fp32 means fp32: the project's one TF32 switch
    fused_adam = not args.plain_adam

    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "machine": machine_description(device), "device": device,
        "threads": torch.get_num_threads(), "config": config.to_dict(), "batch": args.batch_size,
        "regions": args.regions, "fused_adam_ours": fused_adam, "load_average_start": os.getloadavg(),
        "malloc": allocator.describe(),
    }
    print(report["machine"], "| malloc:", report["malloc"], flush=True)
    feats, tokens, lengths = make_batch(args.batch_size, args.regions, config, args.seed)
    report["caption_lengths"] = {"min": int(lengths.min()), "max": int(lengths.max()),
                                 "mean": float(lengths.float().mean())}
    peak = matmul_rate(device)
    report["matmul_fp32"] = peak
    print(f"fp32 torch.mm: {peak['gflops']:.0f} GFLOP/s (best, shape {peak['shape']}), load {load():.2f}", flush=True)

    torch.manual_seed(args.seed)
    base = VSRN(config)
    initial = {k: v.clone() for k, v in base.state_dict().items()}
    if args.check:
        theirs, ours = check_equal_losses(base, feats, tokens, lengths)
        report["check"] = {"reference_style_loss": theirs, "our_loss": ours}
        print(f"check (eval mode): reference-style loss {theirs:.6f}, ours {ours:.6f}", flush=True)

    feats_dev = feats.to(device)
    results = []
    runs: list[dict[str, Any]] = [] if args.skip_reference else [{"kind": "reference", "precision": "fp32"}]
    runs += [{"kind": "ours", "precision": p, "fused_adam": fused_adam} for p in precisions]
    if args.ablations:  # our fp32 step with one optimization undone at a time
        runs += [{"kind": "ours", "precision": "fp32", "fused_adam": False},
                 {"kind": "ours", "precision": "fp32", "folded": False},
                 {"kind": "ours", "precision": "fp32", "torch_gru": True}]
    for run in runs:
        kind, precision = run.pop("kind"), run["precision"]
        model = VSRN(config)
        model.load_state_dict(initial)
        if kind == "reference":
            loop = reference_loop(model, feats_dev, tokens, lengths, device)
        else:
            loop = our_loop(model, feats_dev, tokens, lengths, device, **run)
        count_flops = precision == "fp32" and device == "cpu"
        r = time_loop(loop, args.batch_size, args.steps, args.warmup, device, count_flops)
        r["precision"] = precision
        if "flops_per_step" in r:
            r["flop_bound_s"] = r["flops_per_step"] / (peak["gflops"] * 1e9)
            r["fraction_of_matmul_peak"] = r["flop_bound_s"] / r["min_total_s"]
        results.append(r)
        del loop, model
        gc.collect()
        reference = results[0] if results[0]["name"] == "reference-style fp32" else None
        if reference is not None and r is not reference:
            r["speedup_vs_reference"] = reference["min_total_s"] / r["min_total_s"]
        flops = (f" | {r['flops_per_step'] / 1e12:.2f} TFLOP/step, bound {r['flop_bound_s']:.1f} s"
                 f" ({100 * r['fraction_of_matmul_peak']:.0f}% of peak)" if "flops_per_step" in r else "")
        mem = f" | peak {r['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in r else ""
        speedup = f" | {r['speedup_vs_reference']:.2f}x the reference-style loop" if "speedup_vs_reference" in r else ""
        print(f"{r['name']} | forward {r['best_step_forward_s']:.2f} s + backward/optimizer "
              f"{r['best_step_backward_optimizer_s']:.2f} s = {r['min_total_s']:.2f} s/step (fastest of {args.steps};"
              f" mean {r['mean_total_s']:.2f}) | {r['samples_per_s']:.1f} samples/s{flops}{mem}{speedup}"
              f" | {min(r['page_faults_per_step']) / 1e3:.0f}k-{max(r['page_faults_per_step']) / 1e3:.0f}k page faults/step"
              f" | load {r['load_average_1min'][0]:.2f}-{max(r['load_average_1min']):.2f}", flush=True)
        report["results"] = results
        report["load_average_end"] = os.getloadavg()
        if args.json:  # after every loop, so that an interrupted run leaves its figures
            Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
