"""Seeded, recorded, replayable augmentation views.

A view is fully described by five integers ``(top, left, height, width, flip)``. They are
drawn from an RNG seeded by ``(seed, key, view)`` alone, stored next to the teacher's
outputs, and :func:`apply_view` turns them into the same pixels in the precompute job and
in the trainer: the student sees exactly the input the teacher saw.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdstore.store.errors import InputError

PARAMS_PER_VIEW = 5  # top, left, height, width, flip


@dataclass(frozen=True, kw_only=True)
class AugmentSpec:
    """Which random transforms a view draws. ``rrc`` = random resized crop, ``hflip``."""

    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.0

    @classmethod
    def parse(cls, text: str | None) -> "AugmentSpec":
        """Parse ``"rrc:scale=0.08-1,ratio=0.75-1.333;hflip:p=0.5"`` (both parts optional)."""
        if not text:
            return cls()
        fields: dict = {}
        for part in filter(None, (p.strip() for p in text.split(";"))):
            name, _, args = part.partition(":")
            opts = dict(_kv(a, part) for a in args.split(",") if a.strip())
            if name == "rrc":
                fields["crop_scale"] = _range(opts.pop("scale", "0.08-1.0"), "rrc scale")
                fields["crop_ratio"] = _range(opts.pop("ratio", "0.75-1.3333333"), "rrc ratio")
            elif name == "hflip":
                fields["hflip_p"] = float(opts.pop("p", "0.5"))
                if not 0.0 <= fields["hflip_p"] <= 1.0:
                    raise InputError(f"augment {part!r}: p must be in [0, 1]")
            else:
                raise InputError(f"augment: unknown transform {name!r}; known: rrc, hflip")
            if opts:
                raise InputError(f"augment {part!r}: unknown option(s) {sorted(opts)}")
        spec = cls(**fields)
        if spec.crop_scale and not 0 < spec.crop_scale[0] <= spec.crop_scale[1] <= 1:
            raise InputError(f"augment: rrc scale must satisfy 0 < min <= max <= 1, got {spec.crop_scale}")
        return spec

    def to_text(self) -> str:
        parts = []
        if self.crop_scale:
            parts.append(f"rrc:scale={self.crop_scale[0]}-{self.crop_scale[1]},ratio={self.crop_ratio[0]}-{self.crop_ratio[1]}")
        if self.hflip_p:
            parts.append(f"hflip:p={self.hflip_p}")
        return ";".join(parts)


def _kv(arg: str, part: str) -> tuple[str, str]:
    key, sep, value = arg.partition("=")
    if not sep:
        raise InputError(f"augment {part!r}: expected name=value, got {arg!r}")
    return key.strip(), value.strip()


def _range(text: str, what: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split("-"))
    except ValueError:
        raise InputError(f"augment: {what} must look like 0.08-1.0, got {text!r}") from None
    if lo > hi:
        raise InputError(f"augment: {what} {text!r} has min > max")
    return lo, hi


def _rng(seed: int, key: str, view: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"{seed}\0{key}\0{view}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def view_params(spec: AugmentSpec, *, seed: int, key: str, view: int, height: int, width: int) -> np.ndarray:
    """Draw one view's ``(top, left, h, w, flip)`` as int32 ``[5]``.

    The crop follows torchvision's RandomResizedCrop sampling (10 tries, then a centre crop
    clamped to the ratio range). Depends only on its arguments.
    """
    rng = _rng(seed, key, view)
    top, left, h, w = 0, 0, height, width
    if spec.crop_scale:
        area = height * width
        log_ratio = (math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*spec.crop_scale)
            ratio = math.exp(rng.uniform(*log_ratio))
            cw = int(round(math.sqrt(target * ratio)))
            ch = int(round(math.sqrt(target / ratio)))
            if 0 < cw <= width and 0 < ch <= height:
                top = int(rng.integers(0, height - ch + 1))
                left = int(rng.integers(0, width - cw + 1))
                h, w = ch, cw
                break
        else:
            in_ratio = width / height
            if in_ratio < spec.crop_ratio[0]:
                w, h = width, int(round(width / spec.crop_ratio[0]))
            elif in_ratio > spec.crop_ratio[1]:
                h, w = height, int(round(height * spec.crop_ratio[1]))
            top, left = (height - h) // 2, (width - w) // 2
    flip = int(spec.hflip_p > 0 and rng.random() < spec.hflip_p)
    return np.array([top, left, h, w, flip], dtype=np.int32)


def apply_view(image: torch.Tensor, params: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Apply recorded view parameters to ``image [C, H, W]``; returns ``[C, H, W]`` float32.

    Crop ``(top, left, h, w)``, resize back to ``H x W`` (bilinear, no antialias), then
    flip horizontally when ``flip`` is 1. Deterministic: replay gives identical pixels.
    """
    top, left, h, w, flip = (int(v) for v in params)
    _, height, width = image.shape
    out = image[:, top : top + h, left : left + w]
    if (h, w) != (height, width):
        out = F.interpolate(out[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    if flip:
        out = out.flip(-1)
    return out.contiguous()
