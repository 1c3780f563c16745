"""What every kdstore command shares: turning user errors into one line; the store argument type."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click
from kdstore.store.errors import KdStoreError


class StoreLocationType(click.ParamType):
    """A store: a URL (``s3://bucket/prefix``, ``file://...``) is passed on as text; a local
    folder is checked like ``click.Path(file_okay=False, exists=...)`` and becomes a ``Path``."""

    name = "store"

    def __init__(self, *, exists: bool) -> None:
        self.local = click.Path(exists=exists, file_okay=False, path_type=Path)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and "://" in value:
            return value
        return self.local.convert(value, param, ctx)


def user_errors(fn):
    """Turn a KdStoreError into one clear line on stderr and exit code 2 (a traceback means a bug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KdStoreError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper
