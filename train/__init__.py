"""kdstore.train"""

from __future__ import annotations


def load_student(out_dir, *, checkpoint=None, factory=None):
    """The trained student of a run in ``out_dir`` (see :func:`kdstore.train.student.load_student`)."""
    from kdstore.train.student import load_student as _load

    return _load(out_dir, checkpoint=checkpoint, factory=factory)


__all__ = ["load_student"]
