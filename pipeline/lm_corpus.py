"""Language-model corpus: fixed held-out split, byte-level BPE tokenizer, packed token shards.

- Documents are the packaged text corpora of :mod:`kdstore.pipeline.text_corpus`
  (default ``20newsgroups+reuters-r52+bbc``, 30,146 documents, ~38 MB of text).
- The held-out split is a function of each document's key only (sha256 of the key), so it
  never changes when corpora are added or reordered and the teacher never sees a held-out
  document.
- Packing concatenates each document's tokens plus an end-of-text token into one stream,
  in split order, and cuts it into samples of exactly ``seq_len`` tokens (the last one
  padded with ``pad_id`` and document id ``-1``). Every token carries the index of its
  document (``doc``), so attention and losses can stop at document boundaries.

A shard member set is ``KEY.ids.npy`` (int32 ``[seq_len]``) and ``KEY.doc.npy`` (int32
``[seq_len]``, index into ``lm_corpus.json``'s ``documents`` list, ``-1`` = padding). Keys
are ``{split}-{sample:09d}``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdstore.store.errors import InputError, StoreMismatchError

DEFAULT_CORPUS = "20newsgroups+reuters-r52+bbc"
EOS = "<|endoftext|>"
SPLITS = ("train", "heldout")
MANIFEST = "lm_corpus.json"


def is_heldout(key: str, fraction: float = 0.05) -> bool:
    """Whether document ``key`` is held out: the first 8 bytes of sha256(key) below ``fraction`` of 2^64."""
    digest = hashlib.sha256(f"kdstore-lm-split:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2.0**64


@dataclass(frozen=True, kw_only=True)
class LMDocuments:
    """One split of the corpus: ``texts[i]`` is document ``keys[i]``, in corpus order."""

    corpus: str
    split: str
    keys: list[str]
    texts: list[str]


def load_documents(
    split: str, *, corpus: str = DEFAULT_CORPUS, heldout_fraction: float = 0.05, limit: int | None = None
) -> LMDocuments:
    """The ``train`` or ``heldout`` documents of ``corpus`` (first ``limit`` of them when given)."""
    from kdstore.pipeline.text_corpus import load_corpus

    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < heldout_fraction < 1.0:
        raise InputError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    data = load_corpus(corpus)
    want = split == "heldout"
    pairs = [(k, t) for k, t in zip(data.keys, data.texts) if is_heldout(k, heldout_fraction) == want and t.strip()]
    pairs = pairs[:limit]
    return LMDocuments(corpus=corpus, split=split, keys=[k for k, _ in pairs], texts=[t for _, t in pairs])


def train_tokenizer(texts: Sequence[str], *, vocab_size: int = 4096, max_chars: int = 12_000_000):
    """Byte-level BPE (``tokenizers``) trained on ``texts`` (their first ``max_chars`` characters in order).

    The vocabulary holds the 256 byte symbols, the merges, and ``<|endoftext|>`` (id 0).
    Returns a ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 512 <= vocab_size <= 65536:
        raise InputError(f"vocab_size must be in [512, 65536], got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def capped() -> Iterator[str]:
        used = 0
        for text in texts:
            if used >= max_chars:
                return
            yield text[: max_chars - used]
            used += len(text)

    tok.train_from_iterator(capped(), trainer=trainer)
    return tok


def load_tokenizer(path: str | os.PathLike[str]):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``; InputError when missing or without ``<|endoftext|>``."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise InputError(f"tokenizer {path} not found: train one with `kdstore lm-teacher OUT_DIR` (it writes OUT_DIR/tokenizer.json)")
    tok = Tokenizer.from_file(str(path))
    if tok.token_to_id(EOS) is None:
        raise InputError(f"tokenizer {path} has no {EOS} token")
    return tok


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def encode_documents(tokenizer, texts: Sequence[str], *, batch: int = 512) -> list[np.ndarray]:
    """Each text → int32 token ids followed by the ``<|endoftext|>`` id."""
    eos = tokenizer.token_to_id(EOS)
    out: list[np.ndarray] = []
    for start in range(0, len(texts), batch):
        for enc in tokenizer.encode_batch(list(texts[start : start + batch])):
            out.append(np.array([*enc.ids, eos], dtype=np.int32))
    return out


def pack(docs: Sequence[np.ndarray], seq_len: int, *, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate ``docs`` and cut into rows: ``(ids int32 [m, seq_len], doc int32 [m, seq_len])``.

    ``doc[r, t]`` is the index in ``docs`` of the token at ``ids[r, t]``; the tail of the last
    row is ``pad_id`` with ``doc = -1``. No token is dropped, none repeated.
    """
    if seq_len < 2:
        raise InputError(f"seq_len must be >= 2, got {seq_len}")
    if not docs:
        return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32)
    ids = np.concatenate(docs).astype(np.int32)
    doc = np.repeat(np.arange(len(docs), dtype=np.int32), [len(d) for d in docs])
    m = -(-len(ids) // seq_len)
    pad = m * seq_len - len(ids)
    ids = np.concatenate([ids, np.full(pad, pad_id, np.int32)]).reshape(m, seq_len)
    doc = np.concatenate([doc, np.full(pad, -1, np.int32)]).reshape(m, seq_len)
    return ids, doc


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def read_npy(data: bytes) -> np.ndarray:
    """Decode one ``.npy`` member (no pickles)."""
    return np.load(io.BytesIO(bytes(data)), allow_pickle=False)


def write_lm_shards(
    out_dir: str | os.PathLike[str],
    *,
    tokenizer_path: str | os.PathLike[str],
    seq_len: int,
    split: str = "train",
    corpus: str = DEFAULT_CORPUS,
    heldout_fraction: float = 0.05,
    samples_per_shard: int = 2000,
    limit: int | None = None,
) -> dict:
    """Write ``OUT/{split}-NNNNNN.tar`` (packed token samples) and, last, ``OUT/lm_corpus.json``.

    Resumable: ``OUT/lm_plan.{split}.json`` records the parameters and the tokenizer hash
    first; a rerun with the same plan skips finished shards (each tar is written to a
    temporary name and renamed), a rerun with another plan is refused. Returns the manifest.
    """
    import webdataset as wds

    if samples_per_shard < 1:
        raise InputError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    tokenizer = load_tokenizer(tokenizer_path)
    plan = {
        "corpus": corpus,
        "split": split,
        "heldout_fraction": heldout_fraction,
        "seq_len": int(seq_len),
        "samples_per_shard": int(samples_per_shard),
        "limit": limit,
        "tokenizer_sha256": file_sha256(tokenizer_path),
        "vocab_size": tokenizer.get_vocab_size(),
        "eos_id": tokenizer.token_to_id(EOS),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / f"lm_plan.{split}.json"
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        if old != plan:
            diff = sorted(k for k in plan if old.get(k) != plan[k])
            raise StoreMismatchError(f"{out} holds {split} shards written with other settings ({', '.join(diff)}): use a new OUT folder")
    else:
        plan_path.write_text(json.dumps(plan, indent=1))
    docs = load_documents(split, corpus=corpus, heldout_fraction=heldout_fraction, limit=limit)
    ids, doc = pack(encode_documents(tokenizer, docs.texts), seq_len, pad_id=plan["eos_id"])
    shards: list[str] = []
    for s, start in enumerate(range(0, len(ids), samples_per_shard)):
        path = out / f"{split}-{s:06d}.tar"
        shards.append(path.name)
        if path.is_file():
            continue
        tmp = path.with_name(path.name + ".tmp")
        with wds.TarWriter(str(tmp), mtime=0) as sink:  # fixed mtime: a rewritten shard is byte-identical
            for r in range(start, min(start + samples_per_shard, len(ids))):
                sink.write({"__key__": f"{split}-{r:09d}", "ids.npy": _npy(ids[r]), "doc.npy": _npy(doc[r])})
        os.replace(tmp, path)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest[split] = {
        **plan,
        "samples": int(len(ids)),
        "tokens": int((doc >= 0).sum()),
        "shards": shards,
        "documents": docs.keys,
    }
    tmp_manifest = out / (MANIFEST + ".tmp")
    tmp_manifest.write_text(json.dumps(manifest))
    os.replace(tmp_manifest, manifest_path)
    return manifest[split]
