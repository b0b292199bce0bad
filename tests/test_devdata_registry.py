"""Real heads from package registries: a Debian package is read without dpkg and checked by sha256."""

import hashlib
import io
import tarfile

import pytest

from bidsapp import devdata
from bidsapp.devdata import _deb_members, registry_head


def _deb(files: dict) -> bytes:
    """A minimal .deb: ar archive with debian-binary, control.tar.gz and data.tar.xz."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for path, blob in files.items():
            info = tarfile.TarInfo("./" + path)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", b"x" * 7), ("data.tar.xz", buf.getvalue())]
    out = b"!<arch>\n"
    for name, blob in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode() + blob
        out += b"\n" if len(blob) % 2 else b""
    return out


def test_deb_members_reads_the_data_archive_after_odd_sized_members():
    deb = _deb({"usr/share/a.nii.gz": b"AAA", "usr/share/b.txt": b"bb"})
    assert _deb_members(deb, {"T1w": "usr/share/a.nii.gz"}) == {"T1w": b"AAA"}
    with pytest.raises(ValueError, match="lacks usr/share/c"):
        _deb_members(deb, {"x": "usr/share/c"})
    with pytest.raises(ValueError, match="not a Debian package"):
        _deb_members(b"<html>", {"x": "a"})


def test_registry_head_downloads_once_and_refuses_a_wrong_checksum(tmp_path):
    deb = _deb({"usr/share/t/head.nii.gz": b"HEAD", "usr/share/t/bet.nii.gz": b"BET"})
    src = tmp_path / "pkg.deb"
    src.write_bytes(deb)
    spec = {"name": "head", "url": src.as_uri(), "sha256": hashlib.sha256(deb).hexdigest(),
            "files": {"T1w": "usr/share/t/head.nii.gz", "bet": "usr/share/t/bet.nii.gz"}}
    got = registry_head(spec, tmp_path / "cache")
    assert got["T1w"].name == "head_T1w.nii.gz" and got["T1w"].read_bytes() == b"HEAD"
    assert got["bet"].read_bytes() == b"BET"
    src.unlink()  # cached: no second download
    assert registry_head(spec, tmp_path / "cache") == got
    bad = dict(spec, sha256="0" * 64)
    src.write_bytes(deb)
    with pytest.raises(ValueError, match="sha256"):
        registry_head(bad, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_registry_head_or_none_says_why_it_is_left_out(monkeypatch):
    def offline():
        raise OSError("no route to deb.debian.org")

    monkeypatch.setattr(devdata, "registry_head", offline)
    lines = []
    assert devdata.registry_head_or_none(lines.append) is None
    assert lines == ["Colin 27 left out: no route to deb.debian.org"]
