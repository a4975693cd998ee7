"""Convert an official VSRN checkpoint (KunpengLi1994/VSRN ``model_best.pth.tar``) into this
project's inference checkpoint (model/checkpoint.py).

Usage (from the repository root)::

    python model/convert_reference.py --checkpoint model_best.pth.tar --vocab coco_precomp_vocab.pkl --output DIR

The reference checkpoint is a ``torch.save``d dict ``{"epoch", "model": [image encoder state,
text encoder state], "best_rsum", "opt": argparse.Namespace, "Eiters"}``, written by PyTorch 0.4
under Python 2 in the legacy (pre-zip) serialization; files in the zip format of newer PyTorch
are read too. The caption model is not in it, so the converted model has no caption generator
(``caption_loss_weight = 0``).

Loading never runs code from the file. A pickle names the classes and functions it needs; the
file is first scanned for those names (without unpickling) and refused, naming them, unless each
is on a short allow-list (tensor rebuilding, storage types, ``collections.OrderedDict``,
``argparse.Namespace``); then ``torch.load(weights_only=True)``, whose restricted unpickler has
its own allow-list, reads it. Both layers must agree.

Sizes come from the weights (fc, embedding, number of ``Rs_GCN_k`` modules); the Flickr30K
variant (no l2norm after fc, BatchNorm on the image vector) from ``opt.data_name``, checked
against the presence of the ``bn.*`` weights. Keys are mapped one to one (Conv1d (D, D, 1) kernels
become Linear (D, D) weights); any key left over or missing is an error naming it.

Exit status: 0 on success; 2 on unusable inputs (with a one-line message on stderr naming the
file); 1 if the output cannot be written.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import math
import os
import pickle
import pickletools
import re
import struct
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.checkpoint import (
    CheckpointError,
    load_inference_checkpoint,
    read_checkpoint_config,
    save_inference_checkpoint,
)
from model.vocab import UnsafePickleError, VocabularyError, _global_name, load_reference_vocab
from model.vsrn import VSRN, VSRNConfig, count_parameters

__all__ = [
    "ConversionError",
    "convert_reference_checkpoint",
    "convert_reference_state",
    "load_reference_checkpoint",
    "main",
    "reference_config",
]

logger = logging.getLogger("model.convert_reference")

EXIT_OK = 0
EXIT_WRITE_FAILED = 1
EXIT_BAD_INPUT = 2

# Globals a reference checkpoint legitimately needs: building tensors from storages, the storage
# types (CPU and CUDA; the official files were saved from a GPU), OrderedDict state dicts and the
# argparse options. Everything else is refused before unpickling.
_ALLOWED_GLOBALS = frozenset({
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "argparse.Namespace",
})
_STORAGE_GLOBAL = re.compile(r"torch(\.cuda)?\.[A-Za-z0-9]+Storage")
_LEGACY_PICKLES = 5  # magic number, protocol version, system info, the object, the storage keys
_MAX_LISTED = 10

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class ConversionError(ValueError):
    """The reference checkpoint or vocabulary cannot be converted; the message names the file."""


# --------------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------------


def _pickle_globals(stream: io.BufferedIOBase | io.BytesIO) -> list[str]:
    """The globals one pickle in ``stream`` names, read from its opcodes without unpickling.

    Stops after the pickle's STOP, leaving ``stream`` at the next byte.
    """
    found: list[str] = []
    for opcode, argument, position in pickletools.genops(stream):
        if opcode.name in ("GLOBAL", "INST"):
            # Python 2 names (``__builtin__.eval``) mean what Python 3 resolves them to.
            found.append(_global_name(*str(argument).split(" ", 1)))
        elif opcode.name == "STACK_GLOBAL":
            # Its name comes from the stack (or the memo); torch.save never writes it (protocol 2),
            # so it is refused whatever it names.
            found.append(f"<a STACK_GLOBAL at byte {position}>")
    return found


def _checkpoint_globals(path: Path) -> list[str]:
    """Every global named by the pickles of a ``torch.save`` file (zip or legacy format)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if len(names) != 1:
                raise ConversionError(f"{path}: a zip file without exactly one data.pkl is not a torch.save checkpoint")
            with archive.open(names[0]) as member:
                return _pickle_globals(io.BytesIO(member.read()))
    found: list[str] = []
    with open(path, "rb") as stream:
        for _ in range(_LEGACY_PICKLES):
            found += _pickle_globals(stream)
    return found


def _is_allowed(name: str) -> bool:
    return name in _ALLOWED_GLOBALS or _STORAGE_GLOBAL.fullmatch(name) is not None


def load_reference_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The dict stored in a reference checkpoint, loaded without running code from the file.

    Raises :class:`~model.vocab.UnsafePickleError` naming the globals outside the allow-list, and
    :class:`ConversionError` for a file that is not a readable ``torch.save`` checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        names = _checkpoint_globals(path)
    except (ValueError, EOFError, zipfile.BadZipFile, OSError, IndexError, struct.error) as error:
        if isinstance(error, ConversionError):
            raise
        raise ConversionError(
            f"{path}: not a readable torch.save checkpoint ({type(error).__name__}: {error})") from None
    refused = sorted({n for n in names if not _is_allowed(n)})
    if refused:
        raise UnsafePickleError(
            f"{path}: refusing to load: the file's pickle asks for {', '.join(refused)}, which a checkpoint "
            f"does not need (allowed: tensors and storages, collections.OrderedDict, argparse.Namespace); "
            f"nothing from the file was run"
        )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # The scan passed, so torch's own restricted unpickler found something else it refuses.
        lines = str(error).splitlines() or [type(error).__name__]
        detail = next((line.strip() for line in lines if "GLOBAL" in line or "nsupported" in line), lines[0])
        raise UnsafePickleError(f"{path}: refusing to load: {detail}; nothing from the file was run") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, TypeError, AttributeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(f"{path}: not a readable torch.save checkpoint ({first_line})") from None
    if not isinstance(loaded, dict):
        raise ConversionError(f"{path}: expected a checkpoint dict, got {type(loaded).__name__}")
    return loaded


# --------------------------------------------------------------------------------------------------
# Config and key mapping
# --------------------------------------------------------------------------------------------------


def _state_dicts(checkpoint: Mapping[str, Any], source: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    model = checkpoint.get("model")
    if not isinstance(model, (list, tuple)) or len(model) != 2:
        found = f"{len(model)} items" if isinstance(model, (list, tuple)) else type(model).__name__
        raise ConversionError(f"{source}: 'model' must be [image encoder state, text encoder state], got {found}")
    states = []
    for part, state in zip(("image encoder", "text encoder"), model):
        if not isinstance(state, Mapping):
            raise ConversionError(f"{source}: the {part} state is a {type(state).__name__}, not a dict")
        bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
        if bad:
            raise ConversionError(f"{source}: the {part} state has non-tensor entries: {', '.join(bad[:_MAX_LISTED])}")
        states.append(dict(state))
    return states[0], states[1]


def _shape(state: Mapping[str, Tensor], key: str, ndim: int, part: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"{source}: the {part} state has no {key!r}; is this a VSRN checkpoint?")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise ConversionError(f"{source}: {part} {key!r} has shape {shape}, expected {ndim} dimensions")
    return shape


def _option(opt: Any, name: str, default: Any) -> Any:
    return opt.get(name, default) if isinstance(opt, Mapping) else getattr(opt, name, default)


def reference_config(checkpoint: Mapping[str, Any], source: str = "checkpoint") -> VSRNConfig:
    """The :class:`VSRNConfig` that reproduces a reference checkpoint (sizes from its weights)."""
    image, text = _state_dicts(checkpoint, source)
    opt = checkpoint.get("opt")
    if opt is None:
        raise ConversionError(f"{source}: no 'opt' (the training options), so the dataset variant is unknown")
    data_name = _option(opt, "data_name", None)
    if not isinstance(data_name, str) or not data_name.endswith("_precomp"):
        raise ConversionError(f"{source}: opt.data_name is {data_name!r}; only the precomputed-feature models "
                              f"('*_precomp', EncoderImagePrecompAttn) can be converted")
    # Options of the reference that change the forward pass and that this model does not have.
    for name, neutral in (("use_abs", False), ("no_imgnorm", False), ("measure", "cosine")):
        value = _option(opt, name, neutral)
        if value != neutral:
            raise ConversionError(f"{source}: opt.{name} = {value!r} is not supported (only {neutral!r})")

    embed_size, img_dim = _shape(image, "fc.weight", 2, "image encoder", source)
    vocab_size, word_dim = _shape(text, "embed.weight", 2, "text encoder", source)
    layers = sorted({int(m.group(1)) for k in image if (m := re.match(r"Rs_GCN_(\d+)\.", k))})
    if layers != list(range(1, len(layers) + 1)):
        raise ConversionError(f"{source}: reasoning modules Rs_GCN_{layers} are not numbered 1..K")
    f30k = data_name == "f30k_precomp"
    has_bn = any(k.startswith("bn.") for k in image)
    if f30k != has_bn:
        raise ConversionError(
            f"{source}: opt.data_name is {data_name!r} but the image encoder "
            f"{'has' if has_bn else 'has no'} final BatchNorm weights (bn.*); the reference adds them exactly "
            f"for f30k_precomp"
        )
    if "img_rnn.weight_ih_l0" not in image:
        raise ConversionError(f"{source}: the image encoder has no img_rnn (the GRU global reasoning); "
                              f"only the reference's EncoderImagePrecompAttn can be converted")
    opt_vocab = _option(opt, "vocab_size", vocab_size)
    if opt_vocab != vocab_size:
        logger.warning("%s: opt.vocab_size is %s but the embedding has %d rows; using the embedding",
                       source, opt_vocab, vocab_size)
    sizes = dict(img_dim=img_dim, embed_size=embed_size, word_dim=word_dim, vocab_size=vocab_size,
                 num_reasoning_layers=len(layers), aggregation="gsr", region_order="stored",
                 region_norm="region_axis", caption_loss_weight=0.0)
    return VSRNConfig.flickr30k(**sizes) if f30k else VSRNConfig(**sizes)


# (reference key pattern, our key template, whether the tensor is a Conv1d kernel to squeeze)
_IMAGE_KEYS: list[tuple[re.Pattern[str], str, bool]] = [
    (re.compile(r"fc\.(weight|bias)"), "image_encoder.fc.{0}", False),
    (re.compile(r"Rs_GCN_(\d+)\.(g|theta|phi)\.(weight|bias)"), "image_encoder.reasoning.{k}.{1}.{2}", True),
    (re.compile(r"Rs_GCN_(\d+)\.W\.0\.(weight|bias)"), "image_encoder.reasoning.{k}.residual_proj.{1}", True),
    (re.compile(r"Rs_GCN_(\d+)\.W\.1\.(" + "|".join(_BN_FIELDS) + ")"),
     "image_encoder.reasoning.{k}.residual_norm.{1}", False),
    (re.compile(r"img_rnn\.(.+)"), "image_encoder.gsr.{0}", False),
    (re.compile(r"bn\.(" + "|".join(_BN_FIELDS) + ")"), "image_encoder.final_norm.{0}", False),
]
_TEXT_KEYS: list[tuple[re.Pattern[str], str, bool]] = [
    (re.compile(r"embed\.weight"), "text_encoder.embed.weight", False),
    (re.compile(r"rnn\.(.+)"), "text_encoder.rnn.{0}", False),
]


def _map_part(state: Mapping[str, Tensor], table: list[tuple[re.Pattern[str], str, bool]], part: str, source: str,
              origin: dict[str, str]) -> tuple[dict[str, Tensor], list[str]]:
    """Map one encoder's keys; ``origin`` records each new key's reference name for messages."""
    mapped: dict[str, Tensor] = {}
    unmatched: list[str] = []
    for key, value in state.items():
        for pattern, template, is_kernel in table:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            groups = match.groups()
            # Rs_GCN_k is 1-based in the reference, reasoning.{k-1} here.
            new_key = template.format(*groups, k=int(groups[0]) - 1 if template.count("{k}") else 0)
            if is_kernel and key.endswith("weight"):
                if value.dim() != 3 or value.shape[-1] != 1:
                    raise ConversionError(f"{source}: {part} {key!r} has shape {tuple(value.shape)}, "
                                          f"expected a Conv1d kernel (D, D, 1)")
                value = value[..., 0]
            mapped[new_key] = value
            origin[new_key] = f"{part} {key}"
            break
        else:
            unmatched.append(key)
    return mapped, unmatched


def convert_reference_state(image_state: Mapping[str, Tensor], text_state: Mapping[str, Tensor], config: VSRNConfig,
                            source: str = "checkpoint") -> dict[str, Tensor]:
    """The reference encoders' state dicts as this project's ``VSRN(config).state_dict()``.

    Every key must map (no leftovers) and every key of the model must be filled, with the same
    shapes, else :class:`ConversionError` names the keys. ``num_batches_tracked``, which
    PyTorch 0.4.0 did not save, is filled with 0 (it only matters for training with momentum None).
    """
    origin: dict[str, str] = {}
    image, image_left = _map_part(image_state, _IMAGE_KEYS, "image encoder", source, origin)
    text, text_left = _map_part(text_state, _TEXT_KEYS, "text encoder", source, origin)
    state = {**image, **text}
    with torch.device("meta"):  # only the names and shapes are needed: no memory, no initialisation
        expected = VSRN(config).state_dict()
    for key in expected:
        stats = key.replace("num_batches_tracked", "running_mean")
        if key.endswith(".num_batches_tracked") and key not in state and stats in state:
            state[key] = torch.zeros((), dtype=torch.long)
    unexpected = [f"image encoder {k}" for k in image_left] + [f"text encoder {k}" for k in text_left]
    unexpected += [f"{origin[k]} (-> {k})" for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    problems = []
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    shapes = [f"{origin.get(k, k)} {tuple(state[k].shape)} (the model needs {tuple(v.shape)})"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if shapes:
        problems.append(f"wrong shapes: {_listed(shapes)}")
    if problems:
        raise ConversionError(f"{source}: the weights do not match a reference VSRN: " + "; ".join(problems))
    return state


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown if len(names) <= _MAX_LISTED else f"{shown} ... and {len(names) - _MAX_LISTED} more"


# --------------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_value(value: Any) -> Any:
    """A JSON-safe copy of an option or provenance value (unknown types become strings)."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)


def convert_reference_checkpoint(checkpoint_path: str | os.PathLike[str], vocab_path: str | os.PathLike[str],
                                 output_dir: str | os.PathLike[str]) -> Path:
    """Convert a reference checkpoint and its vocabulary pickle into an inference checkpoint at
    ``output_dir`` (written atomically). Returns the output directory."""
    checkpoint_path, vocab_path = Path(checkpoint_path), Path(vocab_path)
    source = str(checkpoint_path)
    checkpoint = load_reference_checkpoint(checkpoint_path)
    config = reference_config(checkpoint, source)
    if not vocab_path.is_file():
        raise ConversionError(f"{vocab_path}: no such file" if not vocab_path.exists() else f"{vocab_path}: not a file")
    vocab = load_reference_vocab(vocab_path)
    if len(vocab) != config.vocab_size:
        raise ConversionError(f"{vocab_path}: the vocabulary has {len(vocab)} words but the checkpoint {source} "
                              f"embeds {config.vocab_size} (embed.weight rows); they must come from the same dataset")
    image_state, text_state = _state_dicts(checkpoint, source)
    state = convert_reference_state(image_state, text_state, config, source)
    model = VSRN(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    opt = checkpoint.get("opt")
    options = vars(opt) if isinstance(opt, argparse.Namespace) else dict(opt) if isinstance(opt, Mapping) else {}
    provenance = {
        "source": {
            "kind": "reference-vsrn",
            "checkpoint": checkpoint_path.name,
            "checkpoint_sha256": _sha256(checkpoint_path),
            "vocab": vocab_path.name,
            "vocab_sha256": _sha256(vocab_path),
            "epoch": _json_value(checkpoint.get("epoch")),
            "best_rsum": _json_value(checkpoint.get("best_rsum")),
            "Eiters": _json_value(checkpoint.get("Eiters")),
            "data_name": _json_value(_option(opt, "data_name", None)),
            "opt": _json_value(options),
        },
        "converted_by": "model/convert_reference.py",
    }
    return save_inference_checkpoint(output_dir, model, vocab, extra=provenance)


def _summary(output: Path, checkpoint_path: Path) -> str:
    model, vocab = load_inference_checkpoint(output)
    source = read_checkpoint_config(output)["source"]
    cfg = model.config
    lines = [
        f"converted {checkpoint_path} ({source['data_name']}, epoch {source['epoch']}, "
        f"best_rsum {source['best_rsum']}, Eiters {source['Eiters']})",
        f"config: img_dim {cfg.img_dim}, embed_size {cfg.embed_size}, word_dim {cfg.word_dim}, "
        f"vocab_size {cfg.vocab_size}, reasoning layers {cfg.num_reasoning_layers}, norm_after_fc {cfg.norm_after_fc}, "
        f"final_batchnorm {cfg.final_batchnorm}, region_norm {cfg.region_norm}",
        f"parameters: image encoder {count_parameters(model.image_encoder):,}, text encoder "
        f"{count_parameters(model.text_encoder):,}, total {count_parameters(model):,}",
        f"vocabulary: {len(vocab)} words",
        f"wrote {output}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_reference.py",
        description="Convert an official VSRN checkpoint (model_best.pth.tar + vocabulary pickle) into this "
        "project's inference checkpoint directory (safetensors + JSON). Nothing in the input files is executed.",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="model_best.pth.tar",
                        help="the reference checkpoint (torch.save, legacy or zip format)")
    parser.add_argument("--vocab", type=Path, required=True, metavar="VOCAB.pkl",
                        help="the reference vocabulary pickle the model was trained with, e.g. coco_precomp_vocab.pkl")
    parser.add_argument("--output", type=Path, required=True, metavar="DIR", help="the checkpoint directory to write")
    parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="verbosity of the log on stderr (default: WARNING)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (argparse itself exits 2 on usage errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        output = convert_reference_checkpoint(args.checkpoint, args.vocab, args.output)
    except (ConversionError, VocabularyError, UnsafePickleError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FileNotFoundError as error:
        print(f"{parser.prog}: error: {error.filename}: no such file", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (CheckpointError, OSError) as error:
        print(f"{parser.prog}: error: cannot write {args.output}: {error}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    print(_summary(output, args.checkpoint))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
