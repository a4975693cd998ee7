"""VSRN: Visual Semantic Reasoning for Image-Text Matching (Li et al., ICCV 2019), in one file.

Image side (paper Sec. 3.1-3.3): bottom-up region features -> fc (Eq. 1) -> K region relationship
reasoning layers (a residual GCN over the fully connected region graph, Eq. 2-3) -> global semantic
reasoning (a GRU over the regions in order, Eq. 4-7; its final memory is the image vector) -> l2 norm.
Text side (Sec. 3.4): word embedding -> GRU, the state at each caption's last token -> l2 norm.
Generation branch (Eq. 9): an attention sequence-to-sequence captioner over the reasoned regions,
trained with teacher forcing, whose loss L_G is added to the matching loss (Eq. 10).

Defaults reproduce the reference implementation (KunpengLi1994/VSRN), including its quirks that
the official checkpoints depend on; each such quirk is a named option here.

Precision. The model runs in the dtype of its parameters: float32, or bfloat16/float16 when the
trainer's DeepSpeed engine has cast them (DeepSpeed keeps float32 master weights and Adam states
in its optimizer, so updates accumulate in float32; see trainer/training/engine.py). In a low-precision
model, what runs in it and what stays in float32 follows torch autocast's lists:
* bf16: the matrix products (fc, the RRR projections and affinities, the attention, the vocabulary
  projection, the GRUs' gate products on CUDA); the kernels accumulate in float32.
* float32: BatchNorm (`FP32BatchNorm1d`: batch statistics, running statistics and normalization,
  output cast back), as autocast runs batch_norm on float32 weights; the caption log-softmax and
  NLL; the joint-space embeddings and their l2 norm, so the similarities, hinges and the
  hardest-negative max of model/loss.py see float32 inputs.
* GRU recurrences: on CUDA, cuDNN's GRU in the parameters' dtype (float32 accumulation inside the
  kernel), as torch autocast runs it. On CPU there is no such kernel: torch's CPU GRU would round
  the hidden state to bf16 (8 bits of mantissa) after every one of the 36 region or up to 59 word
  steps, so there the recurrence runs in float32 (`gru_forward`, `run_gru`: the bf16 weights are
  upcast for the call, the state stays float32 across steps, outputs go back to the module's dtype).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

RegionNorm = Literal["region_axis", "per_region"]
Aggregation = Literal["gsr", "mean"]
RegionOrder = Literal["stored", "area", "random"]

# Special token ids shared with the reference vocabularies.
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3
# Caption widths are padded to multiples of this (caption_bucket): few distinct step shapes.
CAPTION_BUCKET = 8
# Label of a (caption, step) position that L_G does not count (F.cross_entropy's ignore_index).
IGNORED_TARGET = -100


@dataclass
class VSRNConfig:
    """Every size and switch of the model. The defaults are the paper's COCO configuration."""

    img_dim: int = 2048  # bottom-up region feature size
    embed_size: int = 2048  # D, the joint embedding space
    word_dim: int = 300
    vocab_size: int = 10006
    num_reasoning_layers: int = 4  # RRR layers (Table 4: 0, 1 or 4)
    aggregation: Aggregation = "gsr"  # "gsr" (GRU) or "mean" pooling (Table 4 baselines)
    region_order: RegionOrder = "stored"  # Table 5: stored = detector confidence, area, random
    # The reference's l2norm divides by the norm over dim 1, which on (B, regions, D) tensors
    # normalizes across regions; official checkpoints were trained that way.
    region_norm: RegionNorm = "region_axis"
    norm_after_fc: bool = True  # the reference skips this for Flickr30K
    final_batchnorm: bool = False  # the reference's Flickr30K variant: BatchNorm1d on the image vector
    # Caption generator (L_G). Weight 0 removes the branch entirely.
    caption_loss_weight: float = 1.0
    caption_hidden: int = 512
    caption_word_dim: int = 300
    caption_dropout: float = 0.2
    max_caption_len: int = 60  # tokens including <start> and <end>, as the reference's max_len
    # Training option, no effect on the math: the trainer compiles the model with torch.compile
    # (trainer/training/engine.py; one graph per caption bucket). Off until a GPU run shows it pays.
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("img_dim", "embed_size", "word_dim", "vocab_size", "caption_hidden",
                     "caption_word_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"VSRNConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_reasoning_layers < 0:
            raise ValueError(f"VSRNConfig.num_reasoning_layers must be >= 0, got {self.num_reasoning_layers}")
        if self.max_caption_len < 3:
            raise ValueError(f"VSRNConfig.max_caption_len must be >= 3, got {self.max_caption_len}")
        _check_choice("aggregation", self.aggregation, ("gsr", "mean"))
        _check_choice("region_order", self.region_order, ("stored", "area", "random"))
        _check_choice("region_norm", self.region_norm, ("region_axis", "per_region"))
        if self.caption_loss_weight < 0 or not math.isfinite(self.caption_loss_weight):
            raise ValueError(f"VSRNConfig.caption_loss_weight must be finite and >= 0, got {self.caption_loss_weight}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"VSRNConfig.caption_dropout must be in [0, 1), got {self.caption_dropout}")

    @classmethod
    def flickr30k(cls, **overrides: Any) -> "VSRNConfig":
        """The reference's Flickr30K variant: no norm after fc, BatchNorm on the image vector."""
        base = dict(vocab_size=8481, norm_after_fc=False, final_batchnorm=True)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "VSRNConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown VSRNConfig keys: {', '.join(unknown)}")
        return cls(**values)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"VSRNConfig.{name} must be one of {choices}, got {value!r}")


def at_least_float32(x: Tensor) -> Tensor:
    """`x` in float32 if it is bf16/fp16, else as it is (float64 stays float64; no copy)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def l2norm(x: Tensor, dim: int = -1) -> Tensor:
    """Divide by the l2 norm along `dim` (clamped away from zero so padding cannot make NaNs)."""
    return F.normalize(x, p=2.0, dim=dim, eps=1e-12)


def normalize_regions(x: Tensor, mode: RegionNorm) -> Tensor:
    """Normalize (B, regions, D) features the reference's way (across regions) or per region vector."""
    return l2norm(x, dim=1 if mode == "region_axis" else -1)


def order_regions(regions: Tensor, order: RegionOrder, boxes: Tensor | None = None) -> Tensor:
    """Reorder regions for the sequential global reasoning (paper Table 5).

    Only the GRU sees the order: the fc, the reasoning layers and both normalizations are
    permutation-equivariant over regions, so permuting the input is the same as permuting just
    before the GRU.
    """
    if order == "stored":  # bottom-up features are stored by descending detector confidence
        return regions
    if order == "area":
        if boxes is None:
            raise ValueError("region_order='area' needs boxes (x1, y1, x2, y2) for every region")
        if boxes.shape[:2] != regions.shape[:2] or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must have shape {tuple(regions.shape[:2]) + (4,)}, got {tuple(boxes.shape)}")
        area = (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
        index = torch.argsort(area, dim=1, descending=True, stable=True)
    else:
        index = torch.argsort(torch.rand(regions.shape[:2], device=regions.device), dim=1)
    return torch.gather(regions, 1, index.unsqueeze(-1).expand_as(regions))


class FP32BatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d computed in float32 whatever the dtype of its input and parameters.

    Under DeepSpeed's bf16 the affine weight and bias are bf16 copies (of float32 master weights)
    while the running statistics stay float32 buffers, a mix torch's batch_norm kernels reject.
    Batch statistics over thousands of (image, region) rows, and running averages updated by 10 %
    per step, need float32 anyway (bf16 resolves 1 part in 256). So the input and the affine
    parameters are upcast for the call and the output is cast back to the input's dtype. State
    dict keys, defaults and float32 behaviour are nn.BatchNorm1d's.
    """

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else at_least_float32(self.weight)
        bias = None if self.bias is None else at_least_float32(self.bias)
        x_wide = at_least_float32(x)
        if x_wide is x and weight is self.weight and bias is self.bias and (
                self.running_mean is None or self.running_mean.dtype == x.dtype):
            return super().forward(x)  # float32 (or float64) throughout: nn.BatchNorm1d itself
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm1d
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_running = not self.training or self.track_running_stats  # as nn.BatchNorm1d
        # A module cast wholesale (module.to(bfloat16)) has low-precision buffers: run on float32
        # copies and store the updated statistics back.
        running = [None if buf is None or not pass_running else buf.to(x_wide.dtype)
                   for buf in (self.running_mean, self.running_var)]
        out = F.batch_norm(x_wide, running[0], running[1], weight, bias, use_batch_stats, factor, self.eps)
        if self.training and pass_running:
            for buf, value in zip((self.running_mean, self.running_var), running):
                if buf is not None and value is not None and value is not buf:
                    buf.copy_(value)
        return out.to(x.dtype)


def _float32_recurrence(x: Tensor) -> bool:
    """Whether a GRU over `x` runs its recurrence in float32 although `x` is bf16/fp16 (CPU, no
    autocast: see the module docstring)."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
            and not torch.is_autocast_enabled("cpu"))


def gru_forward(gru: nn.GRU | GRU, x: Tensor | PackedSequence,
                hidden: Tensor | None = None) -> tuple[Tensor | PackedSequence, Tensor]:
    """`gru(x, hidden)`, with the precision policy of the module docstring.

    CPU with bf16/fp16 inputs: the recurrence in float32 (the module's parameters upcast for the
    call through torch.func.functional_call; gradients flow back to them); the outputs come back
    in the input's dtype, the final state stays float32 so that a caller stepping the GRU one token
    at a time never rounds it. Elsewhere: the module itself in its own dtype (cuDNN on CUDA).
    """
    data = x.data if isinstance(x, PackedSequence) else x
    if not _float32_recurrence(data):
        return gru(x, None if hidden is None else hidden.to(data.dtype))
    params = {name: p.float() for name, p in gru.named_parameters()}
    out, state = torch.func.functional_call(gru, params, (x.float(), None if hidden is None else hidden.float()))
    return out.to(data.dtype), state


class GRU(nn.Module):
    """A one-layer, unidirectional, batch-first GRU: nn.GRU's parameters (names, shapes,
    initialisation, so state dicts and seeded weights are the same) and math (`torch.gru`, the
    operator nn.GRU calls: cuDNN on CUDA). Its own class because torch.compile refuses to enter
    nn.GRU modules: under compilation the model runs its GRUs through `gru_scan`.

    On CUDA nn.GRU keeps its weights in one cuDNN buffer; here cuDNN compacts them at each call
    (a copy of the weights, microseconds on a GPU), without nn.GRU's warning about it.
    """

    num_layers = 1
    bidirectional = False
    batch_first = True
    bias = True

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih_l0 = nn.Parameter(torch.empty(3 * hidden_size, input_size))
        self.weight_hh_l0 = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.bias_ih_l0 = nn.Parameter(torch.empty(3 * hidden_size))
        self.bias_hh_l0 = nn.Parameter(torch.empty(3 * hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)  # nn.GRU's, in its parameter order
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def forward(self, x: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if hx is None:
            hx = x.new_zeros(1, x.shape[0], self.hidden_size)
        weights = [self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not part of single contiguous chunk of memory")
            output, hidden = torch.gru(x, hx, weights, True, 1, 0.0, self.training, False, True)
        return output, hidden

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, batch_first=True"


class _GRUSequence(torch.autograd.Function):
    """A one-layer GRU over a whole sequence with nn.GRU's math, and a backward pass that forms
    the weight gradients in one matrix product each (over all steps) instead of one per step.

    forward(x (B, T, I), h0 (B, H), w_ih, w_hh, b_ih, b_hh) -> outputs (T, B, H), time-major.
    Gates in nn.GRU's layout (r, z, n): r, z = sigmoid(W_i x + b_i + W_h h + b_h),
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
                b_hh: Tensor) -> Tensor:
        batch, steps, _ = x.shape
        h = w_hh.shape[1]
        # Input-to-hidden part of every step in one product.
        gi = torch.addmm(b_ih, x.reshape(batch * steps, -1), w_ih.t()).view(batch, steps, 3 * h)
        outputs = x.new_empty(steps, batch, h)
        rz = x.new_empty(steps, batch, 2 * h)
        n = x.new_empty(steps, batch, h)
        gh = x.new_empty(steps, batch, 3 * h)
        # Every step's views made up front (one operator per tensor), not sliced at every step.
        gi_rz, gi_n = (part.unbind(1) for part in gi.split([2 * h, h], dim=2))
        gh_rz, gh_n = (part.unbind(0) for part in gh.split([2 * h, h], dim=2))
        r_steps, z_steps = (part.unbind(0) for part in rz.split([h, h], dim=2))
        gh_steps, rz_steps, n_steps, out_steps = gh.unbind(0), rz.unbind(0), n.unbind(0), outputs.unbind(0)
        w_hh_t = w_hh.t()
        state = h0
        for t in range(steps):
            torch.addmm(b_hh, state, w_hh_t, out=gh_steps[t])
            torch.add(gi_rz[t], gh_rz[t], out=rz_steps[t]).sigmoid_()
            n_t = torch.addcmul(gi_n[t], r_steps[t], gh_n[t], out=n_steps[t]).tanh_()
            state = torch.addcmul(n_t, z_steps[t], state - n_t, out=out_steps[t])  # (1 - z) n + z h
        ctx.save_for_backward(x, h0, w_ih, w_hh, outputs, rz, n, gh[..., 2 * h:])
        return outputs

    @staticmethod
    def backward(ctx: Any, grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        x, h0, w_ih, w_hh, outputs, rz, n, gh_n = ctx.saved_tensors
        batch, steps, _ = x.shape
        h = w_hh.shape[1]
        r, z = rz[..., :h], rz[..., h:]
        prev = torch.cat([h0.unsqueeze(0), outputs[:-1]])
        # Local derivatives of h_t with respect to the gates' pre-activations, for all steps at once.
        coef_n = (1 - z) * (1 - n * n)  # d h / d n_pre
        coef_z = (prev - n) * z * (1 - z)  # d h / d z_pre
        coef_r = gh_n * r * (1 - r)  # d n_pre / d r_pre
        grad_gi = x.new_empty(batch, steps, 3 * h)  # d loss / d (W_i x + b_i), batch-major like x
        grad_gh = x.new_empty(steps, batch, 3 * h)  # d loss / d (W_h h + b_h)
        # Every step's views made up front (one operator per tensor), not sliced at every step.
        gi_r, gi_z, gi_n = (part.unbind(1) for part in grad_gi.split([h, h, h], dim=2))
        gi_rz = grad_gi[..., :2 * h].unbind(1)
        gh_rz, gh_n = (part.unbind(0) for part in grad_gh.split([2 * h, h], dim=2))
        gh_steps, grad_out_steps = grad_gh.unbind(0), grad_outputs.unbind(0)
        coef_n_steps, coef_z_steps, coef_r_steps = coef_n.unbind(0), coef_z.unbind(0), coef_r.unbind(0)
        r_steps, z_steps = r.unbind(0), z.unbind(0)
        grad_h = grad_out_steps[steps - 1]
        for t in reversed(range(steps)):
            if t < steps - 1:
                grad_h = grad_h + grad_out_steps[t]
            grad_n = torch.mul(grad_h, coef_n_steps[t], out=gi_n[t])
            torch.mul(grad_h, coef_z_steps[t], out=gi_z[t])
            torch.mul(grad_n, coef_r_steps[t], out=gi_r[t])
            gh_rz[t].copy_(gi_rz[t])
            torch.mul(grad_n, r_steps[t], out=gh_n[t])
            grad_h = torch.addmm(grad_h * z_steps[t], gh_steps[t], w_hh)  # to h_{t-1}, through z and W_hh
        flat_gi = grad_gi.view(batch * steps, 3 * h)
        grad_x = grad_w_ih = grad_w_hh = None
        if ctx.needs_input_grad[0]:
            grad_x = (flat_gi @ w_ih).view_as(x)
        if ctx.needs_input_grad[2]:
            grad_w_ih = flat_gi.t() @ x.reshape(batch * steps, -1)
        if ctx.needs_input_grad[3]:
            grad_w_hh = grad_gh.view(steps * batch, 3 * h).t() @ prev.view(steps * batch, h)
        grad_b_ih = flat_gi.sum(0) if ctx.needs_input_grad[4] else None
        grad_b_hh = grad_gh.sum((0, 1)) if ctx.needs_input_grad[5] else None
        grad_h0 = grad_h if ctx.needs_input_grad[1] else None
        return grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh


def gru_cell(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    """One GRU update with nn.GRU's math from the two pre-activation products:
    gi = W_i x + b_i and gh = W_h h + b_h, each (B, 3H) in the gate order (r, z, n).
    Split (not sliced) so that each product's gradient is one concatenation in the backward."""
    hidden = h.shape[-1]
    gi_rz, gi_n = gi.split([2 * hidden, hidden], dim=-1)
    gh_rz, gh_n = gh.split([2 * hidden, hidden], dim=-1)
    r, z = torch.sigmoid(gi_rz + gh_rz).chunk(2, dim=-1)
    n = torch.tanh(torch.addcmul(gi_n, r, gh_n))
    return torch.lerp(n, h, z)  # (1 - z) n + z h


def gru_scan(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """A one-layer GRU over (B, T, I) from h0 (B, H) in plain operators (autograd and
    torch.compile see through it): outputs (B, T, H). The input product of all steps is one."""
    h = h0
    outputs = []
    for gi in F.linear(x, w_ih, b_ih).unbind(1):
        h = gru_cell(gi, F.linear(h, w_hh, b_hh), h)
        outputs.append(h)
    return torch.stack(outputs, dim=1)


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling is not None and is_compiling())


def run_gru(gru: nn.GRU | GRU, x: Tensor, float32_outputs: bool = False) -> tuple[Tensor, Tensor]:
    """`gru(x)` from a zero state for a one-layer batch-first nn.GRU: (outputs (B, T, H), h_T (1, B, H)).

    On CPU (outside autocast) it runs `_GRUSequence`, whose backward is faster than autograd
    through torch's per-step CPU GRU, in float32 (bf16/fp16 inputs and weights are upcast, the
    outputs cast back, or left in float32 with `float32_outputs`, and the final state left in
    float32, as `gru_forward`); elsewhere (cuDNN) it calls the module itself. Under torch.compile
    it runs `gru_scan` (torch.compile does not trace nn.GRU), with the same precision policy.
    """
    simple = (gru.num_layers == 1 and not gru.bidirectional and gru.bias and gru.batch_first
              and x.shape[1] > 0)
    compiling = _compiling()
    if not simple or (not compiling and (x.device.type != "cpu" or torch.is_autocast_enabled("cpu"))):
        return gru_forward(gru, x)  # type: ignore[return-value]  # a Tensor in, a Tensor out
    wide = x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")  # the float32 recurrence
    weights = [at_least_float32(w) if wide else w
               for w in (gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)]
    x_rec = at_least_float32(x) if wide else x  # no copy in float32 or float64
    h0 = x_rec.new_zeros(x.shape[0], gru.hidden_size)
    if compiling:
        outputs = gru_scan(x_rec, h0, *weights)
        final = outputs[:, -1].unsqueeze(0)
    else:
        time_major = _GRUSequence.apply(x_rec, h0, *weights)
        outputs, final = time_major.transpose(0, 1), time_major[-1].unsqueeze(0)
    return (outputs if float32_outputs else outputs.to(x.dtype)), final


class RegionRelationReasoning(nn.Module):
    """One RRR layer (Eq. 2-3): V* = W_r(R V W_g) + V with R = theta(V) phi(V)^T / regions.

    The reference divides the affinity by the number of regions (no softmax, no sqrt(d)) and uses
    Conv1d(D, D, 1) projections; Linear layers over (B, regions, D) compute the same thing. The
    residual branch ends in a BatchNorm whose scale and shift start at zero, so each layer is the
    identity at initialisation.

    When batch x regions > D (the paper's batch of 128 x 36 regions against D = 2048), the layer
    is computed in an equivalent, cheaper order (see `_folded_residual`): 2 instead of 4 products
    of the (B x regions, D) features with D x D matrices, at the price of 2 D x D x D products
    of the weights. `folded` forces one order (None: choose by cost).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.theta = nn.Linear(dim, dim)
        self.phi = nn.Linear(dim, dim)
        self.g = nn.Linear(dim, dim)
        self.residual_proj = nn.Linear(dim, dim)
        self.residual_norm = FP32BatchNorm1d(dim)
        nn.init.zeros_(self.residual_norm.weight)
        nn.init.zeros_(self.residual_norm.bias)
        self.folded: bool | None = None

    def forward(self, v: Tensor) -> Tensor:
        batch, num_regions, dim = v.shape
        folded = self.folded if self.folded is not None else batch * num_regions > dim
        if folded:
            pre_norm = self._folded_residual(v)
        else:
            affinity = torch.bmm(self.theta(v), self.phi(v).transpose(1, 2)) / num_regions
            pre_norm = self.residual_proj(torch.bmm(affinity, self.g(v)))
        # BatchNorm over channels with statistics across batch and regions, as Conv1d + BN1d does.
        w_y = self.residual_norm(pre_norm.reshape(-1, dim)).reshape(v.shape)
        return w_y + v

    def _folded_residual(self, v: Tensor) -> Tensor:
        """W_r(R g(V)) + b_r with the products regrouped (associativity and distributivity only):

            theta(V) phi(V)^T = (V (W_theta^T W_phi) + b_theta^T W_phi) V^T + (V W_theta^T b_phi + b_theta . b_phi) 1^T
            W_r(R g(V)) + b_r = R (V (W_r W_g)^T + (W_r b_g)^T) + b_r

        so the features meet two D x D matrices instead of four. Gradients flow to the same
        parameters through the weight products.
        """
        batch, num_regions, dim = v.shape
        w_theta, b_theta = self.theta.weight, self.theta.bias
        w_phi, b_phi = self.phi.weight, self.phi.bias
        w_g, b_g = self.g.weight, self.g.bias
        w_r, b_r = self.residual_proj.weight, self.residual_proj.bias
        flat = v.reshape(-1, dim)
        keys = torch.addmm(b_theta @ w_phi, flat, w_theta.t() @ w_phi).view(v.shape)  # theta(V) W_phi
        values = torch.addmm(w_r @ b_g, flat, w_g.t() @ w_r.t()).view(v.shape)  # g(V) W_r^T
        # addmv is on no autocast list while the products feeding it are: under torch.autocast the
        # vector comes out bf16 and the scalar float32, so both are put in the features' dtype.
        row_term = torch.addmv(b_theta.dot(b_phi).to(flat.dtype), flat,
                               (w_theta.t() @ b_phi).to(flat.dtype)).view(batch, num_regions, 1)
        affinity = (torch.bmm(keys, v.transpose(1, 2)) + row_term) / num_regions  # theta(V) phi(V)^T / N
        return torch.baddbmm(b_r, affinity, values)


class ImageEncoder(nn.Module):
    """Region features (B, regions, img_dim) -> image embedding (B, D) and reasoned regions."""

    def __init__(self, config: VSRNConfig) -> None:
        super().__init__()
        self.config = config
        d = config.embed_size
        self.fc = nn.Linear(config.img_dim, d)
        # Xavier uniform with zero bias, as the reference initialises its fc.
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.reasoning = nn.ModuleList(RegionRelationReasoning(d) for _ in range(config.num_reasoning_layers))
        self.gsr = GRU(d, d) if config.aggregation == "gsr" else None
        self.final_norm = FP32BatchNorm1d(d) if config.final_batchnorm else None

    def reason(self, regions: Tensor) -> Tensor:
        """The reasoned region features V* (B, regions, D) as the global reasoning reads them: fc,
        the RRR layers and the normalization, in the order the regions are given.

        Every step is permutation-equivariant over regions, so V* of the stored order is V* of
        any order, permuted: model/interpret.py relies on this to report regions in stored order.
        """
        v = self.fc(regions.to(self.fc.weight.dtype))
        if self.config.norm_after_fc:
            v = normalize_regions(v, self.config.region_norm)
        for layer in self.reasoning:
            v = layer(v)
        return normalize_regions(v, self.config.region_norm)

    def forward(self, regions: Tensor, boxes: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns (image_emb (B, D), reasoned region features (B, regions, D) in the order the
        GRU read them: `config.region_order`)."""
        if regions.dim() != 3 or regions.shape[-1] != self.config.img_dim:
            raise ValueError(f"regions must be (batch, regions, {self.config.img_dim}), got {tuple(regions.shape)}")
        cfg = self.config
        v = self.reason(order_regions(regions, cfg.region_order, boxes))
        if self.gsr is not None:
            _, hidden = run_gru(self.gsr, v)  # zero initial memory; the final memory m_k is the image
            image = hidden[-1]
        else:
            image = v.mean(dim=1)
        image = at_least_float32(image)  # the joint space is float32 (module docstring)
        if self.final_norm is not None:
            image = self.final_norm(image)
        return l2norm(image), v


class TextEncoder(nn.Module):
    """Token ids (B, T) and lengths, or `CaptionInputs` -> caption embedding (B, D); any order of
    lengths is accepted.

    The GRU runs over the padded width and each caption's embedding is its output at its last
    token (<end>), gathered by position: for a unidirectional GRU from a zero state that is the
    packed sequence's final state (the reference packs), with no host round trip and no sort.
    """

    def __init__(self, config: VSRNConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.rnn = GRU(config.word_dim, config.embed_size)

    def forward(self, tokens: Tensor | CaptionInputs, lengths: Tensor | np.ndarray | Sequence[int] | None = None
                ) -> Tensor:
        if isinstance(tokens, CaptionInputs):
            tokens, last = tokens.tokens, tokens.last
        else:
            host = host_lengths(lengths, tokens.shape)
            last = torch.from_numpy(host - 1).to(tokens.device, non_blocking=True)
        outputs, _ = run_gru(self.rnn, self.embed(tokens), float32_outputs=True)
        index = last.view(-1, 1, 1).expand(-1, 1, outputs.shape[-1])
        return l2norm(at_least_float32(outputs.gather(1, index).squeeze(1)))


class AdditiveAttention(nn.Module):
    """score_i = w^T tanh(W [region_i; hidden] + b); context = softmax(score) . regions.

    W [region_i; hidden] = W_regions region_i + W_hidden hidden (the two column halves of the
    same weight), and the regions' half does not change while a caption is decoded, so decoders
    compute it once (`project_regions`) and pass it to `attend` at every step.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)
        self.score = nn.Linear(dim, 1, bias=False)

    def project_regions(self, encoded: Tensor) -> Tensor:
        """W_regions region_i + b for every region: (B, regions, dim)."""
        return F.linear(encoded, self.proj.weight[:, :encoded.shape[-1]], self.proj.bias)

    def attend(self, hidden: Tensor, encoded: Tensor, projected: Tensor) -> tuple[Tensor, Tensor]:
        """(context (B, dim), weights (B, regions)) given `projected = project_regions(encoded)`."""
        # A float32 decoder state (CPU, bf16 model: gru_forward) meets the projection in its dtype.
        query = F.linear(hidden.to(projected.dtype), self.proj.weight[:, hidden.shape[-1]:])
        scores = self.score(torch.tanh(projected + query.unsqueeze(1))).squeeze(2)
        weights = torch.softmax(scores, dim=1)
        return torch.bmm(weights.unsqueeze(1), encoded).squeeze(1), weights

    def forward(self, hidden: Tensor, encoded: Tensor) -> tuple[Tensor, Tensor]:
        return self.attend(hidden, encoded, self.project_regions(encoded))


class GeneratedCaptions(NamedTuple):
    tokens: Tensor  # (B, steps) greedy word ids, END_ID then PAD_ID after each caption's end
    attention: Tensor  # (B, steps, regions) attention over regions at each step


class CaptionGenerator(nn.Module):
    """The reference's S2VT-style attention captioner over the reasoned region features (Eq. 9)."""

    def __init__(self, config: VSRNConfig) -> None:
        super().__init__()
        self.config = config
        h = config.caption_hidden
        self.region_proj = nn.Linear(config.embed_size, h)
        nn.init.xavier_normal_(self.region_proj.weight)
        self.region_rnn = GRU(h, h)
        self.word_embed = nn.Embedding(config.vocab_size, config.caption_word_dim)
        self.attention = AdditiveAttention(h)
        self.decoder_rnn = GRU(config.caption_word_dim + h, h)
        self.output = nn.Linear(h, config.vocab_size)
        nn.init.xavier_normal_(self.output.weight)
        self.dropout = nn.Dropout(config.caption_dropout)

    def _encode(self, regions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(encoded regions (B, regions, h), their attention projection, initial state (1, B, h))."""
        encoded, hidden = run_gru(self.region_rnn, self.dropout(self.region_proj(regions)))
        encoded = encoded.contiguous()
        return encoded, self.attention.project_regions(encoded), hidden

    def _step(self, word_vectors: Tensor, hidden: Tensor, encoded: Tensor,
              projected: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One decoder step from the embedded input words (B, word_dim): (decoder output (B, h),
        new state (1, B, h), attention weights)."""
        context, weights = self.attention.attend(hidden[-1], encoded, projected)
        step_input = self.dropout(torch.cat([word_vectors, context], dim=1)).unsqueeze(1)
        out, hidden = gru_forward(self.decoder_rnn, step_input, hidden)
        return out.squeeze(1), hidden, weights  # type: ignore[union-attr]

    def _decode(self, word_vectors: Tensor, hidden: Tensor, encoded: Tensor, projected: Tensor) -> Tensor:
        """Teacher-forced decoder states (B, steps, h) from the embedded input words (B, steps, word_dim).

        `_step`'s math, with what does not depend on the step taken out of the loop: the words'
        half of the GRU's input product (and their dropout) for all steps in one product, the
        weights concatenated once so that the state meets the attention's query weights and
        W_hh in one product per step. Per step: that product, the attention (tanh, score,
        softmax, the context), the context's half of the input product, and the GRU's gates.
        """
        gru, attention = self.decoder_rnn, self.attention
        h_size = hidden.shape[-1]
        word_dim = word_vectors.shape[-1]
        state = hidden[-1]
        # The recurrence's dtype: float32 on CPU for a bf16/fp16 model (gru_forward's policy).
        rec = state.dtype
        w_ih = gru.weight_ih_l0.to(rec)
        w_state = torch.cat([attention.proj.weight[:, h_size:].to(rec), gru.weight_hh_l0.to(rec)])
        b_state = torch.cat([state.new_zeros(projected.shape[-1]), gru.bias_hh_l0.to(rec)])
        w_ih_words, w_ih_context = w_ih.split([word_dim, h_size], dim=1)
        w_ih_context_t = w_ih_context.t()
        # Dropout acts elementwise on [word; context]: the words' part can be drawn for all steps at once.
        gi_words = F.linear(self.dropout(word_vectors).to(rec), w_ih_words, gru.bias_ih_l0.to(rec))
        w_state_t = w_state.t()
        w_score = attention.score.weight.squeeze(0)  # (h,): the scores as one product with a vector
        states = []
        for gi_word in gi_words.unbind(1):
            query, gh = torch.addmm(b_state, state, w_state_t).split([projected.shape[-1], 3 * h_size], dim=1)
            if query.dtype != projected.dtype:
                query = query.to(projected.dtype)
            scores = torch.matmul(torch.tanh(projected + query.unsqueeze(1)), w_score)  # (B, regions)
            weights = torch.softmax(scores, dim=1)
            context = self.dropout(torch.bmm(weights.unsqueeze(1), encoded).squeeze(1))
            if context.dtype != rec:
                context = context.to(rec)
            state = gru_cell(torch.addmm(gi_word, context, w_ih_context_t), gh, state)
            states.append(state)
        return torch.stack(states, dim=1)

    def loss(self, regions: Tensor, tokens: Tensor | CaptionInputs,
             lengths: Tensor | np.ndarray | Sequence[int] | None = None) -> Tensor:
        """Teacher-forced negative log-likelihood, summed over tokens and averaged over the batch.

        `tokens` are the text encoder's (B, T) ids: <start> w1 .. wn <end>, padded with 0, and
        `lengths` count <start> and <end>; or `CaptionInputs` (caption_inputs) made from them on
        the host. As in the reference, the targets are every token after <start> up to and
        including the first pad after <end>, captions longer than max_caption_len are cut there
        and end in <end>, and at most max_caption_len - 1 steps are unrolled. Unlike the
        reference (always 59 steps), the decoder unrolls to the caption bucket of the batch
        (caption_bucket: the longest caption rounded up to a multiple of 8): the steps after a
        caption's targets are not counted (IGNORED_TARGET), so the loss is unchanged. The
        recurrence only needs the decoder states, so the vocabulary projection and the
        log-softmax + NLL run once after it, over every (caption, step) position, the ones not
        counted contributing exactly 0 as in the reference: no boolean gather, no host sync. In
        eager mode, given the counted positions (CaptionInputs.counted, made on the host), only
        those are projected (the same sum, less work).
        """
        captions = tokens if isinstance(tokens, CaptionInputs) else caption_inputs(
            tokens, lengths, self.config.max_caption_len)
        labels = captions.labels
        batch, steps = labels.shape
        encoded, projected, hidden = self._encode(regions)
        states = self._decode(self.word_embed(captions.tokens[:, :steps]), hidden, encoded, projected)
        states = states.to(encoded.dtype).reshape(batch * steps, -1)
        labels = labels.reshape(-1)
        if captions.counted is not None and not _compiling():
            # Eager: only the counted positions, whose indices the host sent (no sync).
            states, labels = states.index_select(0, captions.counted), labels.index_select(0, captions.counted)
        logits = self.output(states)  # (positions, vocab)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32
        nll = F.cross_entropy(logits, labels, ignore_index=IGNORED_TARGET, reduction="sum")
        return nll / batch

    @torch.no_grad()
    def generate(self, regions: Tensor, max_steps: int | None = None) -> GeneratedCaptions:
        """Greedy decoding from <start> until every caption has produced <end>."""
        steps = max_steps or self.config.max_caption_len - 1
        encoded, projected, hidden = self._encode(regions)
        batch = regions.shape[0]
        words = torch.full((batch,), START_ID, dtype=torch.long, device=regions.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=regions.device)
        out_tokens, out_weights = [], []
        for _ in range(steps):
            out, hidden, weights = self._step(self.word_embed(words), hidden, encoded, projected)
            # argmax of the logits = argmax of the log-softmax
            words = self.output(out).argmax(dim=1).masked_fill(finished, PAD_ID)
            out_tokens.append(words)
            out_weights.append(weights)
            finished |= words == END_ID
            if bool(finished.all()):
                break
        return GeneratedCaptions(torch.stack(out_tokens, 1), torch.stack(out_weights, 1))


class CaptionInputs(NamedTuple):
    """A batch of captions as the model's training forward reads it, with every shape fact
    (lengths, decoder steps, which targets count) computed on the host by `caption_inputs`: the
    device never has to report a value back, and the shapes depend on the caption bucket only."""

    tokens: Tensor  # (B, W) int64 ids padded with PAD_ID to the bucket width W (caption_bucket)
    last: Tensor  # (B,) int64: position of each caption's last token (<end>), length - 1
    # (B, S) int64 L_G targets of the S = min(W, max_caption_len) - 1 decoder steps; IGNORED_TARGET: not counted
    labels: Tensor
    # Eager only: the flat positions (b * S + t) of the counted targets, ascending, or None. Its
    # length varies from batch to batch (the compiled path never reads it: one shape per bucket).
    counted: Tensor | None = None


def caption_bucket(longest: int, max_caption_len: int, bucket: int = CAPTION_BUCKET) -> int:
    """The padded token width W of a batch whose longest caption has `longest` tokens.

    W holds the longest caption and the pad after it (L_G's last target): the next multiple of
    `bucket` from longest + 1, up to max_caption_len rounded up to a multiple of `bucket`, then
    powers of two (captions longer than max_caption_len are rare; the text encoder reads them
    whole). With max_caption_len 60: 8, 16, ..., 64, 128, 256 ...
    """
    need = longest + 1
    width = -(-need // bucket) * bucket
    top = -(-max_caption_len // bucket) * bucket
    if width > top:
        width = max(top, 1 << (need - 1).bit_length())
    return width


def host_lengths(lengths: Tensor | np.ndarray | Sequence[int] | None, shape: Sequence[int]) -> np.ndarray:
    """Caption lengths as a host int64 array, checked against the (B, T) token shape. A device
    tensor is copied to the host (a sync: callers that care pass host lengths)."""
    if lengths is None:
        raise ValueError("lengths are needed with a token tensor")
    if isinstance(lengths, Tensor):
        values = lengths.detach().to("cpu", torch.long).numpy()
    else:
        values = np.asarray(lengths, dtype=np.int64)
    if values.shape != (shape[0],) or (values.size and (values.min() < 1 or values.max() > shape[1])):
        raise ValueError(f"lengths must be in [1, {shape[1]}] for each of {shape[0]} captions")
    return values


def caption_inputs(tokens: Tensor, lengths: Tensor | np.ndarray | Sequence[int], max_caption_len: int,
                   device: torch.device | str | None = None, bucket: int = CAPTION_BUCKET,
                   counted_positions: bool = True) -> CaptionInputs:
    """`CaptionInputs` of (B, T) tokens (padded with PAD_ID) and their lengths, on `device`
    (default: the tokens' device).

    The lengths are read on the host (pass them as a CPU tensor or array: a device tensor costs
    a sync). Host tokens (the data reader's) are padded to the bucket width there and sent with
    the last positions and the labels in one non-blocking copy (from pinned memory to CUDA);
    device tokens are padded on the device. Labels follow the reference (caption_targets): the
    tokens after <start> up to and including the first pad after <end>, a caption longer than
    max_caption_len cut there and ending in <end>; the positions after that are IGNORED_TARGET.
    `counted_positions` (host tokens): also the flat positions of the counted targets, with which
    the eager L_G projects only those (a compiled model does not need them).
    """
    device = torch.device(device) if device is not None else tokens.device
    lengths_host = host_lengths(lengths, tokens.shape)
    batch = tokens.shape[0]
    width = caption_bucket(int(lengths_host.max()) if batch else 1, max_caption_len, bucket)
    steps = min(width, max_caption_len) - 1
    cut = np.minimum(lengths_host, max_caption_len)
    counted = np.arange(1, steps + 1)[None, :] <= cut[:, None]  # (B, S): target position t + 1 <= cut
    too_long = lengths_host > max_caption_len  # the reference cuts to max_len tokens ending in <end>
    last = lengths_host - 1
    if tokens.device.type == "cpu":
        host = np.zeros((batch, width), dtype=np.int64)
        keep = min(width, tokens.shape[1])
        host[:, :keep] = tokens[:, :keep].numpy()
        labels = host[:, 1:steps + 1].copy()
        if too_long.any():
            labels[too_long, max_caption_len - 2] = END_ID  # target position max_len - 1
        labels[~counted] = IGNORED_TARGET
        pieces = [host.reshape(-1), last, labels.reshape(-1)]
        if counted_positions:
            pieces.append(np.flatnonzero(counted.reshape(-1)).astype(np.int64))
        block = torch.from_numpy(np.concatenate(pieces))
        if device.type == "cuda":
            block = block.pin_memory()
        block = block.to(device, non_blocking=True)
        end = batch * (width + 1 + steps)
        return CaptionInputs(block[:batch * width].view(batch, width), block[batch * width:batch * (width + 1)],
                             block[batch * (width + 1):end].view(batch, steps),
                             block[end:] if counted_positions else None)
    return _device_caption_inputs(tokens, last, counted, too_long, width, steps, max_caption_len)


def _device_caption_inputs(tokens: Tensor, last: np.ndarray, counted: np.ndarray, too_long: np.ndarray,
                           width: int, steps: int, max_caption_len: int) -> CaptionInputs:
    """`caption_inputs` of tokens already on their device: padded there (one operator), the
    labels made there from the host's facts (which count, where a cut caption ends)."""
    batch = tokens.shape[0]
    if tokens.shape[1] < width:
        tokens = F.pad(tokens, (0, width - tokens.shape[1]), value=PAD_ID)
    tokens = tokens[:, :width]
    fix = np.where(counted, 0, 1).astype(np.int64)
    if too_long.any():
        fix[too_long, max_caption_len - 2] = 2
    side = torch.from_numpy(np.concatenate([last, fix.reshape(-1)]))
    side = (side.pin_memory() if tokens.device.type == "cuda" else side).to(tokens.device, non_blocking=True)
    fix_device = side[batch:].view(batch, steps)
    labels = tokens[:, 1:steps + 1].masked_fill(fix_device == 2, END_ID).masked_fill(fix_device == 1, IGNORED_TARGET)
    return CaptionInputs(tokens, side[:batch], labels)


def caption_targets(tokens: Tensor, lengths: Tensor, max_len: int) -> tuple[Tensor, Tensor, int]:
    """Teacher-forcing inputs/targets and the loss mask, the reference's way.

    Returns (ids (B, steps + 1), mask (B, steps), steps): step t reads ids[:, t] and predicts
    ids[:, t + 1]; the mask is 1 for targets up to and including the first pad after <end>.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=tokens.device)
    lengths_cut = lengths.clamp(max=max_len)
    steps = int(min(int(lengths_cut.max()), max_len - 1))
    ids = torch.zeros(tokens.shape[0], steps + 1, dtype=torch.long, device=tokens.device)
    width = min(tokens.shape[1], steps + 1)
    ids[:, :width] = tokens[:, :width]
    positions = torch.arange(steps + 1, device=tokens.device).unsqueeze(0)
    ids = ids.masked_fill(positions >= lengths_cut.unsqueeze(1), PAD_ID)
    too_long = lengths > max_len  # the reference cuts to max_len tokens and ends them with <end>
    if bool(too_long.any()) and steps >= max_len - 1:
        ids[too_long, max_len - 1] = END_ID
    target_pos = positions[:, 1:]
    mask = (target_pos <= lengths_cut.unsqueeze(1)).to(torch.float32)
    return ids, mask, steps


class VSRNOutput(NamedTuple):
    image_emb: Tensor  # (B, D), l2-normalized
    caption_emb: Tensor  # (B, D), l2-normalized
    caption_loss: Tensor | None  # L_G (unweighted), None when the branch is off or not asked for


class VSRN(nn.Module):
    """The whole model: both encoders and, when L_G is on, the caption generator."""

    def __init__(self, config: VSRNConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = TextEncoder(config)
        self.caption_generator = CaptionGenerator(config) if config.caption_loss_weight > 0 else None

    def forward(
        self,
        regions: Tensor,
        tokens: Tensor | CaptionInputs,
        lengths: Tensor | np.ndarray | Sequence[int] | None = None,
        boxes: Tensor | None = None,
        with_caption_loss: bool = True,
    ) -> VSRNOutput:
        """`tokens` (B, T) with their `lengths`, or `CaptionInputs` (caption_inputs, what the
        trainer passes: built on the host, so the forward never waits for the device)."""
        captions = tokens
        if not isinstance(captions, CaptionInputs):
            captions = caption_inputs(captions, lengths, self.config.max_caption_len)
        image_emb, reasoned = self.image_encoder(regions, boxes)
        caption_emb = self.text_encoder(captions)
        caption_loss = None
        if with_caption_loss and self.caption_generator is not None:
            caption_loss = self.caption_generator.loss(reasoned, captions)
        return VSRNOutput(image_emb, caption_emb, caption_loss)

    def encode_images(self, regions: Tensor, boxes: Tensor | None = None) -> Tensor:
        return self.image_encoder(regions, boxes)[0]

    def encode_captions(self, tokens: Tensor | CaptionInputs,
                        lengths: Tensor | np.ndarray | Sequence[int] | None = None) -> Tensor:
        return self.text_encoder(tokens, lengths)

    @torch.no_grad()
    def generate_captions(self, regions: Tensor, boxes: Tensor | None = None) -> GeneratedCaptions:
        if self.caption_generator is None:
            raise RuntimeError("this model has no caption generator (caption_loss_weight = 0)")
        _, reasoned = self.image_encoder(regions, boxes)
        return self.caption_generator.generate(reasoned)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
