"""Embedding a raw query (text, image bytes) with a store's teacher, for ``kdstore query``.

A store is data, never code: ``teacher.json`` records which factory made the outputs, but
rebuilding that teacher runs the factory, so it happens only when the user names the same
factory (``teacher_factory``, checked against the record) or says ``trust_store=True``.
The recorded factory arguments are then passed to it, and the rebuilt teacher's fingerprint
must equal the store's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kdstore.pipeline.reduce import reduce_outputs
from kdstore.pipeline.teacher import TeacherLoad
from kdstore.pipeline.transform import TransformSpec
from kdstore.store.errors import InputError, StoreMismatchError
from kdstore.store.reader import Store, open_store
from kdstore.store.retrieval import QueryHit
from kdstore.store.retrieval import query as query_vectors
from kdstore.store.schema import EMBEDDING, TeacherSpec


def store_teacher_load(
    spec: TeacherSpec, *, teacher_factory: str | None = None, trust_store: bool = False, device: str = "cpu"
) -> TeacherLoad:
    """How to rebuild the teacher ``spec`` records, once the user has vouched for its factory.

    Refuses (:class:`InputError`) when neither ``teacher_factory`` nor ``trust_store`` is
    given, and (:class:`StoreMismatchError`) when ``teacher_factory`` is not the recorded one.
    """
    if not spec.factory:
        raise InputError(f"teacher {spec.name} records no factory: embed the query yourself and pass a vector")
    if teacher_factory is None and not trust_store:
        raise InputError(
            f"embedding the query runs teacher {spec.name}'s factory, which the store names as {spec.factory!r}; "
            f"a store is data, not code: pass --teacher-factory {spec.factory} if you trust that function, "
            "or --trust-store"
        )
    if teacher_factory is not None and teacher_factory != spec.factory:
        raise StoreMismatchError(
            f"--teacher-factory {teacher_factory} is not the factory the store recorded for teacher "
            f"{spec.name} ({spec.factory}); name that one, or embed the query yourself and pass --vector"
        )
    return TeacherLoad(
        factory=spec.factory,
        name=spec.name,
        input_key=spec.input_key or None,
        layers=spec.layers,
        kwargs=tuple(spec.factory_args.items()),
        device=device,
    )


def embed_samples(
    store: Store,
    teacher: str,
    field: str,
    samples: Sequence[dict[str, bytes]],
    *,
    teacher_factory: str | None = None,
    trust_store: bool = False,
    device: str = "cpu",
) -> np.ndarray:
    """Run the store's teacher on raw samples → ``[n, dim]``, reduced and typed as stored.

    Each sample goes through what precompute did before the teacher: the teacher's
    ``preprocess``, then the store's recorded ``--transform`` (``teacher.json`` ``transform``:
    resize, crop, mode, normalisation), so an image of any size or mode embeds as it would have
    in the store. Raises StoreMismatchError when the rebuilt teacher's fingerprint differs from the store's.
    """
    spec = store.teacher(teacher).spec
    outputs = [o for o in spec.outputs if field in o.fields()]
    if not outputs:
        raise InputError(f"field {field!r} is not an output of teacher {teacher} ({spec.fields()})")
    load = store_teacher_load(spec, teacher_factory=teacher_factory, trust_store=trust_store, device=device)
    model = load.build()
    if model.fingerprint != spec.fingerprint:
        raise StoreMismatchError(
            f"{spec.factory} now has fingerprint {model.fingerprint[:16]}, the store was written with "
            f"{spec.fingerprint[:16]}: its embeddings are not comparable"
        )
    transform = TransformSpec.parse(spec.transform)
    inputs = []
    for sample in samples:
        x = model.preprocess(sample)
        inputs.append(transform(x) if transform else x)
    raw = model.forward(inputs)
    fields = reduce_outputs(raw, outputs, batch_size=len(samples), temperature=spec.temperature, dtype=np.dtype(spec.dtype))
    return fields[field]


def query_sample(store: Store, teacher: str, *, text: str | None = None, image: bytes | str | os.PathLike[str] | None = None) -> dict:
    """A raw sample ``{input_key: bytes}`` for the teacher from text or an image (bytes or a path)."""
    key = store.teacher(teacher).spec.input_key
    if text is not None:
        return {key or "txt": text.encode("utf-8")}
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return {key or Path(str(image)).suffix.lstrip(".") or "png": data}


def query(
    store: Store | str | os.PathLike[str],
    teacher: str,
    field: str = EMBEDDING,
    *,
    key: str | None = None,
    row: int | None = None,
    vector: np.ndarray | str | os.PathLike[str] | None = None,
    text: str | None = None,
    image: bytes | str | os.PathLike[str] | None = None,
    k: int = 10,
    include_self: bool = False,
    teacher_factory: str | None = None,
    trust_store: bool = False,
    device: str = "cpu",
) -> list[QueryHit]:
    """:func:`kdstore.store.retrieval.query`, plus ``text`` / ``image`` queries embedded with the
    store's teacher (see :func:`store_teacher_load` for ``teacher_factory`` / ``trust_store``)."""
    s = store if isinstance(store, Store) else open_store(store)
    given = [n for n, v in (("key", key), ("row", row), ("vector", vector), ("text", text), ("image", image)) if v is not None]
    if len(given) != 1:
        raise InputError(f"give exactly one of key, row, vector, text, image (got {given or 'none'})")
    if text is not None or image is not None:
        sample = query_sample(s, teacher, text=text, image=image)
        vector = embed_samples(s, teacher, field, [sample], teacher_factory=teacher_factory,
                               trust_store=trust_store, device=device)[0]
    return query_vectors(s, teacher, field, key=key, row=row, vector=vector, k=k, include_self=include_self)
