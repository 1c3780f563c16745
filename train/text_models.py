"""Text students: ``model.arch = "bag"`` (mean of token embeddings) and ``"text_transformer"``
(a small transformer encoder, masked mean pooling).

Both take ``x [b, L]`` int64 token ids + 1 with 0 = padding (:mod:`kdstore.train.inputs`) and are
a :class:`~kdstore.train.models.Classifier`: ``{"logits": [b, k], "embedding": [b, hidden]}``, so
every loss kind (``embedding``/``contrastive`` through a projector to the teacher's width, ``kd``,
``ce``, ``dho``) applies unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdstore.store.errors import InputError

TEXT_ARCHS = ("bag", "text_transformer")


def _masked_mean(h: Tensor, mask: Tensor) -> Tensor:
    """``h [b, L, d]``, ``mask [b, L]`` bool → ``[b, d]`` (an all-padding row gives zeros)."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class BagOfEmbeddings(nn.Module):
    """``ids [b, L]`` → mean of token embeddings → Linear → ReLU: ``[b, dim]``; layers ``embed``, ``fc``."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size + 1, dim, padding_idx=0)
        self.fc = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())

    def forward(self, ids: Tensor) -> Tensor:
        ids = ids.long()
        return self.fc(_masked_mean(self.embed(ids), ids != 0))


class TextTransformer(nn.Module):
    """``ids [b, L]`` → token + position embeddings → ``layers`` pre-norm encoder layers → masked mean: ``[b, dim]``."""

    def __init__(self, vocab_size: int, dim: int, max_length: int, *, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise InputError(f"model.arch text_transformer: model.hidden ({dim}) must be a multiple of {heads} heads")
        self.embed = nn.Embedding(vocab_size + 1, dim, padding_idx=0)
        self.position = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.1, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor) -> Tensor:
        ids = ids.long()[:, : self.position.num_embeddings]
        mask = ids != 0
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.embed(ids) + self.position(pos)[None]
        ignore = ~mask
        ignore[:, 0] = False  # a row of padding only (a pad item) still attends to something
        h = self.encoder(h, src_key_padding_mask=ignore)
        return self.norm(_masked_mean(h, mask))


def build_text_student(arch: str, input_shape: Sequence[int], num_classes: int, *, hidden: int, dual_head: bool):
    """``input_shape`` is a :class:`~kdstore.train.inputs.TextShape` ``(max_length,)`` with ``vocab_size``."""
    from kdstore.train.models import Classifier

    vocab = getattr(input_shape, "vocab_size", None)
    if vocab is None or len(input_shape) != 1:
        raise InputError(f"model.arch {arch} needs text inputs (data.input_key ending in .txt), got {tuple(input_shape)}")
    if arch == "bag":
        body: nn.Module = BagOfEmbeddings(vocab, hidden)
    else:
        body = TextTransformer(vocab, hidden, int(input_shape[0]))
    return Classifier(body, hidden, num_classes, dual_head)
