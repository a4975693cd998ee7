"""Test helper: checkpoints and vocabularies in the reference VSRN's exact layout, and an
independent re-implementation of the reference forward pass.

Nothing here imports the project's code: the embeddings computed here are the ground truth that
the converted models are compared with. They follow the reference (KunpengLi1994/VSRN
``model.py``, ``GCN_lib/Rs_GCN.py``) operation by operation, on its own (B, D, N) Conv1d layout,
in float64, with the GRU written out from its equations.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import pickle
import pickletools
import string
import struct
import subprocess
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
OFFICIAL_VOCAB_DIR = SHARED_DIR / "reference" / "vocab"
SPECIALS = ["<pad>", "<start>", "<end>", "<unk>"]
BN_EPS = 1e-5  # BatchNorm1d's default, used by every BN of the reference

CheckpointFormat = Literal["zip", "legacy", "py2-legacy"]


def official_vocab_path(data_name: str) -> Path:
    """``../shared/reference/vocab/{data_name}_vocab.pkl``, or skip the test if it is absent."""
    import pytest

    path = OFFICIAL_VOCAB_DIR / f"{data_name}_vocab.pkl"
    if not path.is_file():
        pytest.skip(f"official vocabulary {path} not found (expected the shared reference files beside the repo)")
    return path


def run_script(script: str, *args: str | os.PathLike[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python <script> args...`` from the repository root, as the README does."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------------------


def synthetic_words(count: int) -> list[str]:
    """``count`` distinct lowercase alphabetic words (tokenized as themselves)."""
    letters = string.ascii_lowercase
    words = ("".join(t) for t in itertools.product(letters, repeat=3))
    return list(itertools.islice(words, count))


def vocab_words(size: int) -> list[str]:
    """The special tokens then synthetic words: a vocabulary of ``size`` words in id order."""
    return SPECIALS + synthetic_words(size - len(SPECIALS))


def _py2_pickle_value(value: Any) -> bytes:
    """Protocol-2 opcodes for ints, bytes (a Python 2 ``str``), str (``unicode``) and dicts."""
    if isinstance(value, bool) or not isinstance(value, (int, bytes, str, dict)):
        raise TypeError(f"unsupported {type(value).__name__}")
    if isinstance(value, int):
        if 0 <= value < 256:
            return b"K" + bytes([value])  # BININT1
        if 0 <= value < 65536:
            return b"M" + struct.pack("<H", value)  # BININT2
        return b"J" + struct.pack("<i", value)  # BININT
    if isinstance(value, bytes):
        return b"U" + bytes([len(value)]) + value  # SHORT_BINSTRING
    if isinstance(value, str):
        data = value.encode("utf-8")
        return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE
    items = b"".join(_py2_pickle_value(k) + _py2_pickle_value(v) for k, v in value.items())
    return b"}(" + items + b"u"  # EMPTY_DICT MARK ... SETITEMS


def write_reference_vocab_pickle(path: Path, words: list[str], module: str = "__main__",
                                 py2_words: bool = False) -> None:
    """A pickle laid out like the official ``*_precomp_vocab.pkl``: protocol 2, a ``Vocabulary``
    object (``module.Vocabulary``) built by NEWOBJ whose state has Python 2 byte-string attribute
    names and the words as unicode (or as UTF-8 byte strings with ``py2_words``)."""
    encode = (lambda w: w.encode("utf-8")) if py2_words else (lambda w: w)
    state = {
        b"idx2word": {i: encode(w) for i, w in enumerate(words)},
        b"word2idx": {encode(w): i for i, w in enumerate(words)},
        b"idx": len(words),
    }
    data = (b"\x80\x02" + b"c" + module.encode() + b"\nVocabulary\n" + b")\x81"  # GLOBAL, EMPTY_TUPLE, NEWOBJ
            + _py2_pickle_value(state) + b"b.")  # BUILD, STOP
    path.write_bytes(data)


class RunsCommand:
    """Pickles to a call of ``function(argument)`` when unpickled, the classic pickle exploit."""

    def __init__(self, function: Any, argument: str) -> None:
        self.function, self.argument = function, argument

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return self.function, (self.argument,)


def touch_command(marker: Path) -> str:
    return f"touch {marker}"


def exec_source(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


# --------------------------------------------------------------------------------------------------
# Reference-layout state dicts and checkpoints
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    img_dim: int = 12
    embed_size: int = 16
    word_dim: int = 8
    vocab_size: int = 40
    num_gcn: int = 4


def _bn(prefix: str, dim: int, g: torch.Generator, state: OrderedDict, with_tracked: bool) -> None:
    # Away from the defaults (weight 1, bias 0, mean 0, var 1) so that a wrong mapping shows.
    state[prefix + "weight"] = torch.rand(dim, generator=g) + 0.5
    state[prefix + "bias"] = torch.randn(dim, generator=g) * 0.3
    state[prefix + "running_mean"] = torch.randn(dim, generator=g) * 0.2
    state[prefix + "running_var"] = torch.rand(dim, generator=g) + 0.5
    if with_tracked:
        state[prefix + "num_batches_tracked"] = torch.tensor(1234, dtype=torch.long)


def _gru(prefix: str, in_dim: int, hidden: int, g: torch.Generator, state: OrderedDict, scale: float) -> None:
    state[prefix + "weight_ih_l0"] = torch.randn(3 * hidden, in_dim, generator=g) * scale
    state[prefix + "weight_hh_l0"] = torch.randn(3 * hidden, hidden, generator=g) * scale
    state[prefix + "bias_ih_l0"] = torch.randn(3 * hidden, generator=g) * 0.1
    state[prefix + "bias_hh_l0"] = torch.randn(3 * hidden, generator=g) * 0.1


def reference_state(sizes: Sizes, f30k: bool, seed: int = 0, with_num_batches_tracked: bool = True
                    ) -> tuple[OrderedDict[str, Tensor], OrderedDict[str, Tensor]]:
    """Random (image encoder, text encoder) state dicts with the reference's keys and shapes:
    ``EncoderImagePrecompAttn`` (fc, Rs_GCN_1..K with Conv1d (D, D, 1) weights and W = Conv1d +
    BatchNorm1d, img_rnn, and bn for f30k_precomp) and ``EncoderText`` (embed, rnn)."""
    g = torch.Generator().manual_seed(seed)
    d = sizes.embed_size
    image: OrderedDict[str, Tensor] = OrderedDict()
    image["fc.weight"] = torch.randn(d, sizes.img_dim, generator=g) / sizes.img_dim ** 0.5
    image["fc.bias"] = torch.randn(d, generator=g) * 0.1
    _gru("img_rnn.", d, d, g, image, scale=0.5 / d ** 0.5)
    for k in range(1, sizes.num_gcn + 1):
        for name in ("g", "theta", "phi"):
            image[f"Rs_GCN_{k}.{name}.weight"] = torch.randn(d, d, 1, generator=g) / d ** 0.5
            image[f"Rs_GCN_{k}.{name}.bias"] = torch.randn(d, generator=g) * 0.1
        image[f"Rs_GCN_{k}.W.0.weight"] = torch.randn(d, d, 1, generator=g) / d ** 0.5
        image[f"Rs_GCN_{k}.W.0.bias"] = torch.randn(d, generator=g) * 0.1
        _bn(f"Rs_GCN_{k}.W.1.", d, g, image, with_num_batches_tracked)
    if f30k:
        _bn("bn.", d, g, image, with_num_batches_tracked)
    text: OrderedDict[str, Tensor] = OrderedDict()
    text["embed.weight"] = torch.rand(sizes.vocab_size, sizes.word_dim, generator=g) * 0.2 - 0.1
    _gru("rnn.", sizes.word_dim, d, g, text, scale=1.0 / d ** 0.5)
    # Module.state_dict() attaches per-module versions (BatchNorm 2 once it saved num_batches_tracked).
    bn_version = {"version": 2 if with_num_batches_tracked else 1}
    image._metadata = OrderedDict([("", {"version": 1}), *((f"Rs_GCN_{k}.W.1", bn_version)  # type: ignore[attr-defined]
                                                         for k in range(1, sizes.num_gcn + 1))])
    text._metadata = OrderedDict([("", {"version": 1}), ("rnn", {"version": 1})])  # type: ignore[attr-defined]
    return image, text


def reference_checkpoint(image_state: OrderedDict, text_state: OrderedDict, data_name: str,
                         **opt: Any) -> dict[str, Any]:
    """The dict the reference's train.py saves (``save_checkpoint``)."""
    options = dict(data_name=data_name, vocab_size=text_state["embed.weight"].shape[0],
                   img_dim=image_state["fc.weight"].shape[1], embed_size=image_state["fc.weight"].shape[0],
                   word_dim=text_state["embed.weight"].shape[1],
                   num_layers=1, margin=0.2, max_violation=True, use_abs=False, no_imgnorm=False, measure="cosine",
                   learning_rate=0.0002, logger_name="runs/test")
    options.update(opt)
    return {"epoch": 17, "model": [image_state, text_state], "best_rsum": 512.25,
            "opt": argparse.Namespace(**options), "Eiters": 98765}


def _py2_style(pickled: bytes) -> bytes:
    """Rewrite one protocol-2 pickle the way Python 2 + PyTorch 0.4 on a GPU wrote it: ASCII
    strings as byte strings (SHORT_BINSTRING), CUDA storage types, storages located on cuda:0."""
    out = bytearray()
    ops = list(pickletools.genops(pickled))
    for index, (op, arg, pos) in enumerate(ops):
        end = ops[index + 1][2] if index + 1 < len(ops) else len(pickled)
        if op.name == "BINUNICODE" and arg.isascii() and len(arg) < 256:
            text = "cuda:0" if arg == "cpu" else arg
            out += b"U" + bytes([len(text)]) + text.encode("ascii")
        elif op.name == "GLOBAL" and arg.startswith("torch ") and arg.endswith("Storage"):
            out += b"ctorch.cuda\n" + arg.split(" ")[1].encode() + b"\n"
        else:
            out += pickled[pos:end]
    return bytes(out)


class _Py2OrderedDictPickler(pickle.Pickler):
    """Pickles OrderedDicts as Python 2 did: ``OrderedDict([[key, value], ...])`` then the
    instance dict (a state dict's ``_metadata``) by BUILD, instead of Python 3's SETITEMS form."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is OrderedDict:
            state = dict(vars(obj)) or None
            return OrderedDict, ([[key, value] for key, value in obj.items()],), state
        return NotImplemented


_PY2_PICKLE_MODULE = types.ModuleType("py2_style_pickle")  # torch.save(pickle_module=...) wants a module
_PY2_PICKLE_MODULE.Pickler = _Py2OrderedDictPickler  # type: ignore[attr-defined]
_PY2_PICKLE_MODULE.dump = pickle.dump  # type: ignore[attr-defined]


def save_reference_checkpoint(checkpoint: dict[str, Any], path: Path, fmt: CheckpointFormat) -> None:
    """``torch.save`` in the zip format, the legacy format of PyTorch < 1.6, or the legacy format
    as Python 2 + PyTorch 0.4 on a GPU produced it (``py2-legacy``: Python 2's OrderedDict pickles,
    and see :func:`_py2_style`)."""
    buffer = io.BytesIO()
    if fmt == "py2-legacy":
        torch.save(checkpoint, buffer, pickle_module=_PY2_PICKLE_MODULE, _use_new_zipfile_serialization=False)
    else:
        torch.save(checkpoint, buffer, _use_new_zipfile_serialization=(fmt == "zip"))
    data = buffer.getvalue()
    if fmt == "py2-legacy":
        # The legacy format is five pickles (magic number, protocol, system info, the object,
        # the storage keys) followed by the raw storages.
        stream = io.BytesIO(data)
        pieces = []
        for _ in range(5):
            start = stream.tell()
            for _op in pickletools.genops(stream):
                pass
            pieces.append(_py2_style(data[start:stream.tell()]))
        data = b"".join(pieces) + data[stream.tell():]
    path.write_bytes(data)


# --------------------------------------------------------------------------------------------------
# The reference forward pass, re-implemented independently (float64)
# --------------------------------------------------------------------------------------------------


def reference_l2norm(x: Tensor) -> Tensor:
    """The reference's ``l2norm``: divide by the norm over dim 1 (the region axis of (B, N, D))."""
    return x / torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True))


def _batchnorm_eval(x: Tensor, state: dict[str, Tensor], prefix: str) -> Tensor:
    """BatchNorm1d in eval mode over dim 1 of (B, C) or (B, C, N)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean, var = state[prefix + "running_mean"].view(shape), state[prefix + "running_var"].view(shape)
    weight, bias = state[prefix + "weight"].view(shape), state[prefix + "bias"].view(shape)
    return (x - mean) / torch.sqrt(var + BN_EPS) * weight + bias


def _gru_final_state(x: Tensor, state: dict[str, Tensor], prefix: str) -> Tensor:
    """h_T of a one-layer GRU over (T, in_dim) from a zero state, from the GRU equations:
    r = s(W_ir x + b_ir + W_hr h + b_hr), z = s(W_iz x + b_iz + W_hz h + b_hz),
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h."""
    w_ih, w_hh = state[prefix + "weight_ih_l0"], state[prefix + "weight_hh_l0"]
    b_ih, b_hh = state[prefix + "bias_ih_l0"], state[prefix + "bias_hh_l0"]
    hidden = torch.zeros(w_hh.shape[1], dtype=x.dtype)
    for step in x:
        i_r, i_z, i_n = (w_ih @ step + b_ih).chunk(3)
        h_r, h_z, h_n = (w_hh @ hidden + b_hh).chunk(3)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        hidden = (1 - z) * n + z * hidden
    return hidden


def _rs_gcn(v: Tensor, state: dict[str, Tensor], prefix: str) -> Tensor:
    """``Rs_GCN.forward`` on v (B, D, N)."""
    g_v = F.conv1d(v, state[prefix + "g.weight"], state[prefix + "g.bias"]).permute(0, 2, 1)  # B, N, D
    theta_v = F.conv1d(v, state[prefix + "theta.weight"], state[prefix + "theta.bias"]).permute(0, 2, 1)
    phi_v = F.conv1d(v, state[prefix + "phi.weight"], state[prefix + "phi.bias"])  # B, D, N
    relation = torch.matmul(theta_v, phi_v)  # B, N, N
    relation = relation / relation.shape[-1]
    y = torch.matmul(relation, g_v).permute(0, 2, 1)  # B, D, N
    w_y = F.conv1d(y, state[prefix + "W.0.weight"], state[prefix + "W.0.bias"])
    return _batchnorm_eval(w_y, state, prefix + "W.1.") + v


def reference_image_embeddings(image_state: dict[str, Tensor], images: Any, data_name: str) -> Tensor:
    """``EncoderImagePrecompAttn.forward`` in eval mode: images (B, N, img_dim) -> (B, D)."""
    state = {k: v.double() for k, v in image_state.items()}
    x = torch.as_tensor(images).double()
    fc = torch.matmul(x, state["fc.weight"].t()) + state["fc.bias"]
    if data_name != "f30k_precomp":
        fc = reference_l2norm(fc)
    v = fc.permute(0, 2, 1)
    k = 1
    while f"Rs_GCN_{k}.g.weight" in state:
        v = _rs_gcn(v, state, f"Rs_GCN_{k}.")
        k += 1
    v = reference_l2norm(v.permute(0, 2, 1))
    features = torch.stack([_gru_final_state(regions, state, "img_rnn.") for regions in v])
    if data_name == "f30k_precomp":
        features = _batchnorm_eval(features, state, "bn.")
    return reference_l2norm(features)


def reference_caption_embeddings(text_state: dict[str, Tensor], captions: list[list[int]]) -> Tensor:
    """``EncoderText.forward``: the GRU output at each caption's last token (its final state for
    that caption's length), l2-normalized."""
    state = {k: v.double() for k, v in text_state.items()}
    embed = state["embed.weight"]
    features = torch.stack([_gru_final_state(embed[torch.tensor(ids)], state, "rnn.") for ids in captions])
    return reference_l2norm(features)


def reference_tokens(caption: str, words: list[str]) -> list[int]:
    """Ids of a caption made of vocabulary words separated by spaces (no punctuation): what the
    reference's tokenization gives for such text."""
    index = {w: i for i, w in enumerate(words)}
    return [1, *(index.get(w, 3) for w in caption.lower().split()), 2]
