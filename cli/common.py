"""What every kdstore command shares: turning user errors into one line."""

from __future__ import annotations

import functools
import sys

import click

from kdstore.store.errors import KdStoreError


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
