"""kdstore.store: the on-disk format (schema, writer, reader, verify), FAISS indexes and mining."""

from kdstore.store.errors import (
    InputError,
    KdStoreError,
    StoreCorruptError,
    StoreLockedError,
    StoreMismatchError,
    TeacherOutputError,
)
from kdstore.store.lock import store_lock
from kdstore.store.reader import Store, TeacherData, open_store

__all__ = [
    "InputError",
    "KdStoreError",
    "Store",
    "StoreCorruptError",
    "StoreLockedError",
    "StoreMismatchError",
    "TeacherData",
    "TeacherOutputError",
    "open_store",
    "store_lock",
]
