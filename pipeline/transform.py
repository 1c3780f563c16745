"""Deterministic image preprocessing before the teacher, recorded in the store and replayed
for the student: ``--transform 'resize:32;center_crop:28;mode:L;normalize:mean=0.5,std=0.25'``.

Steps run in a fixed order whatever order they are written in: ``mode`` (``L`` or ``RGB``),
``resize`` (``N`` = shorter side to N keeping the aspect ratio, ``HxW`` = exactly that size;
bilinear with antialiasing), ``center_crop`` (``N`` or ``HxW``), ``normalize`` (per-channel
``mean`` / ``std``, one value or one per channel, separated by ``/``). Input and output are
float32 ``[C, H, W]``; before ``normalize`` values stay in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdstore.store.errors import InputError

# The user-facing hint for images of different sizes in one batch (pipeline and trainer share it).
TRANSFORM_HINT = ("images of different sizes cannot share a batch; give them one size and mode with "
                  "--transform (e.g. --transform 'resize:32;center_crop:28;mode:L')")
MODES = ("L", "RGB")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, what PIL's convert("L") uses


def _size(text: str, part: str, *, allow_short: bool) -> tuple[int, int] | int:
    try:
        if "x" in text:
            h, w = (int(v) for v in text.split("x"))
            size: tuple[int, int] | int = (h, w)
            ok = h > 0 and w > 0
        else:
            size = int(text)
            ok = size > 0
    except ValueError:
        ok = False
    if not ok:
        raise InputError(f"transform {part!r}: size must be N or HxW with positive integers")
    if not allow_short and isinstance(size, int):
        return (size, size)
    return size


def _floats(text: str, part: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split("/"))
    except ValueError:
        raise InputError(f"transform {part!r}: give numbers separated by '/' (e.g. 0.485/0.456/0.406)") from None


@dataclass(frozen=True, kw_only=True)
class TransformSpec:
    """A parsed ``--transform``. The empty spec changes nothing (``bool(spec)`` is False)."""

    mode: str = ""
    resize: tuple[int, int] | int | None = None
    center_crop: tuple[int, int] | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> "TransformSpec":
        """Parse ``"resize:32;center_crop:28;mode:L;normalize:mean=0.5,std=0.25"`` (every part optional)."""
        if not text:
            return cls()
        fields: dict = {}
        for part in filter(None, (p.strip() for p in text.split(";"))):
            name, _, arg = part.partition(":")
            name, arg = name.strip(), arg.strip()
            if name in fields or (name == "normalize" and "mean" in fields):
                raise InputError(f"transform: {name} given twice")
            if name == "mode":
                if arg not in MODES:
                    raise InputError(f"transform {part!r}: mode must be one of {MODES}")
                fields["mode"] = arg
            elif name == "resize":
                fields["resize"] = _size(arg, part, allow_short=True)
            elif name == "center_crop":
                fields["center_crop"] = _size(arg, part, allow_short=False)
            elif name == "normalize":
                opts = {}
                for a in filter(None, (a.strip() for a in arg.split(","))):
                    k, eq, v = a.partition("=")
                    if not eq or k not in ("mean", "std"):
                        raise InputError(f"transform {part!r}: normalize takes mean=...,std=...")
                    opts[k] = _floats(v, part)
                if set(opts) != {"mean", "std"}:
                    raise InputError(f"transform {part!r}: normalize needs both mean= and std=")
                if any(s <= 0 for s in opts["std"]):
                    raise InputError(f"transform {part!r}: std must be > 0")
                fields["mean"], fields["std"] = opts["mean"], opts["std"]
            else:
                raise InputError(f"transform: unknown step {name!r}; known: mode, resize, center_crop, normalize")
        return cls(**fields)

    def __bool__(self) -> bool:
        return bool(self.mode or self.resize or self.center_crop or self.mean)

    def to_text(self) -> str:
        """The canonical text (fixed step order), as recorded in ``teacher.json``."""
        parts = []
        if self.mode:
            parts.append(f"mode:{self.mode}")
        if self.resize is not None:
            r = self.resize
            parts.append(f"resize:{r}" if isinstance(r, int) else f"resize:{r[0]}x{r[1]}")
        if self.center_crop is not None:
            parts.append(f"center_crop:{self.center_crop[0]}x{self.center_crop[1]}")
        if self.mean:
            fmt = lambda vs: "/".join(repr(float(v)) for v in vs)  # noqa: E731
            parts.append(f"normalize:mean={fmt(self.mean)},std={fmt(self.std)}")
        return ";".join(parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``[C, H, W]`` float → ``[C', H', W']`` float32 (C' from ``mode``, H'×W' from resize/crop)."""
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise InputError("--transform applies to images [C, H, W]; this input is not one")
        x = x.float()
        if self.mode == "L" and x.shape[0] == 3:
            x = (x * torch.tensor(_LUMA).view(3, 1, 1)).sum(0, keepdim=True)
        elif self.mode == "RGB" and x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        if self.resize is not None:
            h, w = x.shape[1:]
            if isinstance(self.resize, int):
                short = min(h, w)
                size = (max(1, round(h * self.resize / short)), max(1, round(w * self.resize / short)))
            else:
                size = self.resize
            if size != (h, w):
                x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
                x = x.clamp_(0.0, 1.0)
        if self.center_crop is not None:
            ch, cw = self.center_crop
            h, w = x.shape[1:]
            if ch > h or cw > w:
                raise InputError(f"transform center_crop:{ch}x{cw} is larger than the image ({h}x{w}); resize first")
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[:, top : top + ch, left : left + cw]
        if self.mean:
            c = x.shape[0]
            for name, vs in (("mean", self.mean), ("std", self.std)):
                if len(vs) not in (1, c):
                    raise InputError(f"transform normalize: {name} has {len(vs)} values for {c} channels")
            mean = torch.tensor(self.mean).view(-1, 1, 1)
            std = torch.tensor(self.std).view(-1, 1, 1)
            x = (x - mean) / std
        return x.contiguous()
