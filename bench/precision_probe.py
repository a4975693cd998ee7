"""Precision probe: the model's GRUs, and the whole model, with bf16 / fp16 weights against a
float32 copy of the same weights, forward and backward, on one device.

Why: the trainer's bf16 (and fp16) runs cast the module's parameters to the low precision, as
DeepSpeed does (parameters only, buffers stay float32), and on CUDA the model's three GRUs then run
in cuDNN's bf16/fp16 kernels: the image encoder's global semantic reasoning GRU over 36 regions,
the text encoder's GRU over the padded captions, and the caption decoder's GRU stepped one token at a
time. Timing runs under torch.autocast (float32 weights) never exercise those kernels. This probe
runs each GRU and the whole model both ways on the same inputs and reports relative errors:

* per GRU (the model's own call: `run_gru` for the image GRU and for the text GRU over the padded
  captions, whose last-token outputs are gathered, `gru_forward` of one step with a carried state
  for the decoder):
  outputs, final state, input gradient and weight-gradient norm, and how many cuDNN RNN calls
  the low-precision forward made (torch.profiler events named `aten::_cudnn_rnn`; 0 on CPU,
  where the model keeps the recurrence in float32 by design, model/vsrn.py);
* the whole model and its training loss (L_M with hardest negatives over the batch + L_G):
  image and caption embeddings, both losses, and the gradient norm of every top-level part.

relative error = ||low - float32|| / ||float32|| over the tensor (norms in float64).
A case fails when any value is not finite or a relative error exceeds its limit
(--limits, defaults: bf16 0.08, fp16 0.01 for values; twice that for gradient norms): bf16 keeps
8 bits of mantissa (2^-8 = 0.4 % per rounding), fp16 11 bits, and the errors compound over 36
region steps or a caption's tokens.

    python bench/precision_probe.py [--device cuda] [--batch-size 64] [--small] \
        [--precision bf16 fp16] [--json OUT]

Exit status 0 when every case passes, 1 when one fails, 2 for bad arguments. On CPU it runs too
(the CPU simulation of bench/gpu_check.py), with CPU kernels: not a cuDNN figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

if __name__ == "__main__" and __package__ in (None, ""):  # `python bench/precision_probe.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.loss import hardest_negative_loss  # noqa: E402
from model.vsrn import END_ID, START_ID, VSRN, VSRNConfig, gru_forward, run_gru  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_LIMITS = {"bf16": 0.08, "fp16": 0.01}
CUDNN_RNN_EVENT = "aten::_cudnn_rnn"


def relative_error(low: Tensor, reference: Tensor) -> float:
    """||low - reference|| / ||reference||, in float64; inf when low holds a non-finite value."""
    low64, ref64 = low.detach().double(), reference.detach().double()
    if not torch.isfinite(low64).all():
        return math.inf
    denominator = ref64.norm().item()
    return (low64 - ref64).norm().item() / max(denominator, 1e-30)


def cast_parameters(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `module` with its parameters in `dtype` and its buffers as they were: what
    DeepSpeed's bf16/fp16 engines do to the client model (BatchNorm statistics stay float32)."""
    low = copy.deepcopy(module)
    for parameter in low.parameters():
        parameter.data = parameter.data.to(dtype)
    return low


def make_batch(config: VSRNConfig, batch: int, regions: int, device: torch.device,
               seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Region features, caption ids <start> w.. <end> 0.. and lengths of COCO-like captions (10-22 tokens)."""
    generator = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, regions, config.img_dim, generator=generator)
    lengths = torch.randint(10, 23, (batch,), generator=generator)
    tokens = torch.randint(4, config.vocab_size, (batch, int(lengths.max())), generator=generator)
    tokens[:, 0] = START_ID
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)
    tokens = tokens.masked_fill(positions >= lengths.unsqueeze(1), 0)
    tokens[torch.arange(batch), lengths - 1] = END_ID
    return feats.to(device), tokens.to(device), lengths


class Case:
    """One comparison: named relative errors and the cuDNN calls of its low-precision forward."""

    def __init__(self, name: str, precision: str, limit: float) -> None:
        self.name, self.precision, self.limit = name, precision, limit
        self.values: dict[str, float] = {}
        self.gradients: dict[str, float] = {}
        self.cudnn_rnn_calls: int | None = None

    def value(self, key: str, low: Tensor, reference: Tensor) -> None:
        self.values[key] = relative_error(low, reference)

    def gradient_norm(self, key: str, low: list[Tensor | None], reference: list[Tensor | None]) -> None:
        """Relative error of the norm of a group of gradients (one part of the model)."""
        low_norm = _norm([g for g in low if g is not None])
        ref_norm = _norm([g for g in reference if g is not None])
        self.gradients[key] = (math.inf if not math.isfinite(low_norm)
                               else abs(low_norm - ref_norm) / max(ref_norm, 1e-30))

    def failures(self) -> list[str]:
        bad = [f"{k} {v:.3g} > {self.limit:g}" for k, v in self.values.items() if not v <= self.limit]
        bad += [f"grad norm {k} {v:.3g} > {2 * self.limit:g}" for k, v in self.gradients.items()
                if not v <= 2 * self.limit]
        return bad

    def as_dict(self) -> dict[str, Any]:
        failures = self.failures()
        return {"case": self.name, "precision": self.precision, "status": "ok" if not failures else "failed",
                "failures": failures, "limit": self.limit, "relative_error": self.values,
                "grad_norm_relative_error": self.gradients, "cudnn_rnn_calls": self.cudnn_rnn_calls}


def _norm(tensors: list[Tensor]) -> float:
    if not tensors:
        return 0.0
    total = sum(float(t.detach().double().pow(2).sum()) for t in tensors)
    return math.sqrt(total) if math.isfinite(total) else math.inf


def _count_cudnn_rnn(function: Any) -> tuple[Any, int]:
    """Run `function()` under torch.profiler (CPU activity: the ATen calls) and count cuDNN RNN calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = function()
    return result, sum(1 for event in prof.events() if event.name == CUDNN_RNN_EVENT)


# --------------------------------------------------------------------------------------------------
# The three GRUs
# --------------------------------------------------------------------------------------------------


def _probe_gru(name: str, precision: str, limit: float, reference_gru: nn.Module, dtype: torch.dtype,
               inputs: Tensor, run: Any, state: str = "final_state") -> Case:
    """One GRU run by `run(gru, x) -> (outputs, state)` on `inputs`, float32 against `dtype`
    weights and inputs: forward values, the cuDNN calls of the low-precision forward, backward."""
    case = Case(name, precision, limit)
    low_gru = cast_parameters(reference_gru, dtype)
    x32 = inputs.detach().clone().requires_grad_(True)
    x_low = inputs.detach().to(dtype).requires_grad_(True)
    out32, h32 = run(reference_gru, x32)
    (out_low, h_low), case.cudnn_rnn_calls = _count_cudnn_rnn(lambda: run(low_gru, x_low))
    case.value("outputs", out_low, out32)
    case.value(state, h_low, h32)
    _backward_both(case, (out32, h32), (out_low, h_low), x32, x_low, reference_gru, low_gru)
    return case


def probe_image_gru(model: VSRN, dtype: torch.dtype, precision: str, limit: float, regions: Tensor) -> Case:
    """The global semantic reasoning GRU over reasoned regions (B, 36, D), from a zero state."""
    assert model.image_encoder.gsr is not None
    return _probe_gru("gru_image_gsr", precision, limit, model.image_encoder.gsr, dtype, regions, run_gru)


def probe_text_gru(model: VSRN, dtype: torch.dtype, precision: str, limit: float, tokens: Tensor,
                   lengths: Tensor) -> Case:
    """The text encoder's GRU as the model calls it: over the padded captions (unsorted lengths),
    each caption's output at its last token gathered by position (model/vsrn.py, TextEncoder)."""
    last = (lengths - 1).to(tokens.device).view(-1, 1, 1)

    def run(gru: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        outputs, _ = run_gru(gru, x, float32_outputs=True)
        return outputs, outputs.gather(1, last.expand(-1, 1, outputs.shape[-1])).squeeze(1)

    return _probe_gru("gru_text_padded", precision, limit, model.text_encoder.rnn, dtype,
                      model.text_encoder.embed(tokens), run, state="last_token_state")


def probe_decoder_gru(model: VSRN, dtype: torch.dtype, precision: str, limit: float, batch: int,
                      steps: int, device: torch.device) -> Case:
    """The caption decoder's GRU stepped one token at a time with the carried state, as in teacher forcing."""
    assert model.caption_generator is not None
    gru = model.caption_generator.decoder_rnn
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(batch, steps, gru.input_size, generator=generator).to(device)
    h0 = (0.5 * torch.randn(1, batch, gru.hidden_size, generator=generator)).to(device)

    def run(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden, outputs = h0, []
        for t in range(steps):
            out, hidden = gru_forward(module, x[:, t:t + 1], hidden)
            outputs.append(out)
        return torch.cat(outputs, dim=1), hidden

    return _probe_gru("gru_decoder_steps", precision, limit, gru, dtype, inputs, run)


def _backward_both(case: Case, reference: tuple[Tensor, Tensor], low: tuple[Tensor, Tensor], x32: Tensor,
                   x_low: Tensor, reference_gru: nn.Module, low_gru: nn.Module) -> None:
    """Backward of the same scalar (a fixed random projection of outputs and state) both ways."""
    generator = torch.Generator().manual_seed(2)
    weights = [torch.randn(t.shape, generator=generator).to(t.device) for t in reference]

    def objective(outputs: tuple[Tensor, Tensor]) -> Tensor:
        return sum((o.float() * w).sum() for o, w in zip(outputs, weights))  # type: ignore[return-value]

    objective(reference).backward()
    objective(low).backward()
    case.value("input_grad", x_low.grad, x32.grad)  # type: ignore[arg-type]
    case.gradient_norm("weights", [p.grad for p in low_gru.parameters()], [p.grad for p in reference_gru.parameters()])


# --------------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------------


def probe_model(model: VSRN, dtype: torch.dtype, precision: str, limit: float, feats: Tensor, tokens: Tensor,
                lengths: Tensor) -> Case:
    """The training forward (both encoders, L_G) and L_M with hardest negatives, then backward,
    float32 against the parameters cast to `dtype`; dropout off so both see the same network."""
    case = Case("model", precision, limit)
    low_model = cast_parameters(model, dtype)
    results = []
    for net in (model, low_model):
        net.train()
        for module in net.modules():
            if isinstance(module, nn.Dropout):
                module.eval()
        net.zero_grad(set_to_none=True)
        # Batch statistics of the RRR layers' BatchNorm run in training mode; the running ones
        # move, so each copy starts from the same buffers.
        if net is low_model:
            out, case.cudnn_rnn_calls = _count_cudnn_rnn(lambda: low_model(feats, tokens, lengths))
        else:
            out = net(feats, tokens, lengths)
        matching = hardest_negative_loss(out.image_emb, out.caption_emb)
        assert out.caption_loss is not None
        (matching + out.caption_loss.float()).backward()
        results.append((out, matching))
    (out32, matching32), (out_low, matching_low) = results
    case.value("image_emb", out_low.image_emb, out32.image_emb)
    case.value("caption_emb", out_low.caption_emb, out32.caption_emb)
    case.value("loss_matching", matching_low, matching32)
    case.value("loss_caption", out_low.caption_loss, out32.caption_loss)  # type: ignore[arg-type]
    for part in ("image_encoder", "text_encoder", "caption_generator"):
        case.gradient_norm(part, [p.grad for p in getattr(low_model, part).parameters()],
                           [p.grad for p in getattr(model, part).parameters()])
    return case


def run_probe(device: torch.device, precisions: list[str], batch: int, small: bool,
              limits: dict[str, float]) -> dict[str, Any]:
    config = VSRNConfig(embed_size=256, caption_hidden=128) if small else VSRNConfig()
    torch.manual_seed(0)
    model = VSRN(config).to(device)
    for layer in model.image_encoder.reasoning:
        # The RRR layers start as the identity (zero BatchNorm scale); give them a non-trivial
        # residual so that the reasoned features the GRU reads are not the fc output alone.
        nn.init.uniform_(layer.residual_norm.weight, 0.5, 1.5)
    regions = 36
    feats, tokens, lengths = make_batch(config, batch, regions, device)
    with torch.no_grad():
        _, reasoned = model.image_encoder(feats)
    cases: list[dict[str, Any]] = []
    for precision in precisions:
        dtype, limit = DTYPES[precision], limits[precision]
        probes = {
            "gru_image_gsr": lambda: probe_image_gru(model, dtype, precision, limit, reasoned.float()),
            "gru_text_padded": lambda: probe_text_gru(model, dtype, precision, limit, tokens, lengths),
            "gru_decoder_steps": lambda: probe_decoder_gru(model, dtype, precision, limit, batch,
                                                           int(lengths.max()) - 1, device),
            "model": lambda: probe_model(model, dtype, precision, limit, feats, tokens, lengths),
        }
        for name, probe in probes.items():
            started = time.perf_counter()
            try:
                case = probe().as_dict()
            except Exception as error:  # noqa: BLE001 - a kernel that refuses a dtype is a finding, not a crash
                case = {"case": name, "precision": precision, "status": "failed",
                        "failures": [f"{type(error).__name__}: {error}"]}
            case["seconds"] = round(time.perf_counter() - started, 2)
            cases.append(case)
            model.zero_grad(set_to_none=True)
    return {"device": str(device), "batch": batch, "regions": regions, "small": small,
            "model": {"embed_size": config.embed_size, "caption_hidden": config.caption_hidden},
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "cases": cases, "status": "ok" if all(c["status"] == "ok" for c in cases) else "failed"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16"])
    parser.add_argument("--small", action="store_true", help="D 256 instead of the paper's 2048 (CPU runs)")
    parser.add_argument("--limits", nargs="*", default=[], metavar="PRECISION=VALUE",
                        help="relative error limits, e.g. bf16=0.08 fp16=0.01")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    args = parser.parse_args(argv)
    limits = dict(DEFAULT_LIMITS)
    for item in args.limits:
        key, _, value = item.partition("=")
        if key not in DTYPES or not value:
            parser.error(f"--limits: expected PRECISION=VALUE with PRECISION in {sorted(DTYPES)}, got {item!r}")
        limits[key] = float(value)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    result = run_probe(device, args.precision, args.batch_size, args.small, limits)
    for case in result["cases"]:
        errors = ", ".join(f"{k} {v:.2e}" for k, v in case.get("relative_error", {}).items())
        grads = ", ".join(f"{k} {v:.2e}" for k, v in case.get("grad_norm_relative_error", {}).items())
        print(f"{case['precision']} {case['case']}: {case['status']}  {errors}  grad norms: {grads}"
              f"  cuDNN RNN calls: {case.get('cudnn_rnn_calls')}" + (f"  {case['failures']}" if case["failures"] else ""))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
