"""The one error hierarchy of kdstore.

Every error a user can cause derives from :class:`KdStoreError`; the CLI turns one into a
single line and a non-zero exit. Anything else escaping is a bug.
"""

from __future__ import annotations


class KdStoreError(Exception):
    """Base class for errors caused by input, configuration or store state."""


class InputError(KdStoreError):
    """A shard, sample, image, flag or config value is missing or malformed."""


class StoreMismatchError(KdStoreError):
    """The store was written with another teacher fingerprint, shard list or output spec."""


class StoreLockedError(KdStoreError):
    """Another job holds the store's lock."""


class StoreCorruptError(KdStoreError):
    """Stored bytes do not match their checksums, or rows are missing."""


class TeacherOutputError(KdStoreError):
    """A teacher returned an output of the wrong shape, dtype, or with NaN/inf."""
