"""Decoding raw sample bytes into tensors."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from kdstore.store.errors import InputError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm")


def decode_image(data: bytes) -> torch.Tensor:
    """Decode an encoded image to ``[C, H, W]`` float32 in [0, 1].

    Grayscale stays one channel; palette and alpha images become RGB.
    Raises ``InputError`` when the bytes are not a readable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode not in ("L", "RGB"):
                img = img.convert("RGB")
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"undecodable image ({exc})") from None
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy() if not array.flags.writeable else array).float().div_(255.0)


def decode_text(data: bytes) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"text is not utf-8 ({exc})") from None


def decode_field(sample: dict, input_key: str) -> torch.Tensor | str:
    """Decode ``sample[input_key]`` by its extension: images to tensors, txt to str."""
    if input_key not in sample:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise InputError(f"sample has no {input_key!r} field (it has {present})")
    ext = input_key.rsplit(".", 1)[-1].lower()
    if ext in IMAGE_EXTENSIONS:
        return decode_image(sample[input_key])
    if ext in ("txt", "text"):
        return decode_text(sample[input_key])
    raise InputError(f"don't know how to decode field {input_key!r}; use an image extension or txt")
