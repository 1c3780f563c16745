"""The fast tar reader yields exactly what webdataset's tarfile-based iterator yields."""

from __future__ import annotations

import io
import tarfile

import pytest
from kdstore.store import tarstream
from kdstore.store.errors import InputError
from kdstore.store.shards import iter_samples
from webdataset import tariterators


def _tar(path, members, fmt, mode="w"):
    with tarfile.open(path, mode, format=fmt) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mtime = 1700000000.25 if fmt == tarfile.PAX_FORMAT else 1700000000
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return path


LONG = "sub" + "d" * 60 + "/" + "long" * 15
MEMBERS = [
    ("d", b"", tarfile.DIRTYPE),
    ("a.png", b"x" * 700, tarfile.REGTYPE),
    ("a.cls", b"3", tarfile.REGTYPE),
    ("__meta__.json", b"{}", tarfile.REGTYPE),
    (LONG + ".txt", b"long name", tarfile.REGTYPE),  # > 100 chars: GNU L / PAX path / ustar prefix
    ("b.png", b"", tarfile.REGTYPE),
    ("b.cls", b"512" + b"\0" * 509, tarfile.REGTYPE),  # exactly one block
    ("ln", b"", tarfile.SYMTYPE),
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_reader_equals_tarfile(tmp_path, fmt):
    path = _tar(tmp_path / "t.tar", MEMBERS, fmt)
    with open(path, "rb") as fh:
        expected = list(tariterators.tar_file_iterator(fh))
    with open(path, "rb") as fh:
        first = fh.read(512)
        assert tarstream.is_tar_header(first)
        got = list(tarstream.plain_tar_files(fh, first))
    assert got == expected and len(got) == 6
    assert [s["__key__"] for s in iter_samples(str(path))] == ["a", "__meta__", LONG, "b"]


def test_compressed_tar_falls_back_and_broken_tars_are_input_errors(tmp_path):
    gz = _tar(tmp_path / "t.tar.gz", MEMBERS, tarfile.PAX_FORMAT, mode="w:gz")
    plain = _tar(tmp_path / "t.tar", MEMBERS, tarfile.PAX_FORMAT)
    strip = lambda it: [{k: v for k, v in s.items() if k != "__url__"} for s in it]
    assert strip(iter_samples(str(gz))) == strip(iter_samples(str(plain)))
    raw = plain.read_bytes()
    short = tmp_path / "short.tar"
    short.write_bytes(raw[: 512 * 6 + 100])  # ends inside a member's data
    with pytest.raises(InputError, match="truncated tar"):
        list(iter_samples(str(short)))
    # cut right after a member: no end-of-archive block (tarfile and webdataset end quietly there);
    # precompute lists shards while it reads them, so the reader itself must refuse it
    ustar_raw = _tar(tmp_path / "v.tar", MEMBERS, tarfile.USTAR_FORMAT).read_bytes()
    with tarfile.open(tmp_path / "v.tar") as tar:
        last = tar.getmembers()[-1]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(ustar_raw[: last.offset_data + 512 * ((last.size + 511) // 512)])
    with pytest.raises(InputError, match="truncated tar"):
        list(iter_samples(str(cut)))
    for compressed in ("w:gz",):  # the tarfile path checks the same
        import gzip

        gz_cut = tmp_path / "cut.tar.gz"
        gz_cut.write_bytes(gzip.compress(cut.read_bytes()))
        with pytest.raises(InputError, match="truncated tar"):
            list(iter_samples(str(gz_cut)))
    ustar = _tar(tmp_path / "u.tar", MEMBERS, tarfile.USTAR_FORMAT).read_bytes()
    bad = tmp_path / "bad.tar"
    bad.write_bytes(ustar[:2048] + b"\x01" * 512 + ustar[2560:])  # a.cls's header corrupt (tarfile would stop quietly)
    with pytest.raises(InputError, match="unreadable tar"):
        list(iter_samples(str(bad)))
