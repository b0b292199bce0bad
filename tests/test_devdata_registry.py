"""Real heads from package registries: a Debian package is read without dpkg and checked by sha256."""

import gzip
import hashlib
import io
import json
import tarfile

import nibabel as nib
import numpy as np
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
    def offline(spec):
        raise OSError("no route to deb.debian.org")

    monkeypatch.setattr(devdata, "registry_head", offline)
    lines = []
    assert devdata.registry_head_or_none(lines.append) is None
    assert lines == [f"{devdata.COLIN27['package']} left out: no route to deb.debian.org"]


def _brainbrowser_tgz(volumes: dict) -> bytes:
    """An npm-style tarball holding BrainBrowser volumes: name -> (header dict, uint8 array in its order)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, (header, data) in volumes.items():
            for suffix, blob in ((".header.gz", json.dumps(header).encode()), (".raw.gz", data.tobytes())):
                blob = gzip.compress(blob)
                info = tarfile.TarInfo(f"package/examples/models/{name}{suffix}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def test_a_brainbrowser_volume_becomes_nifti_with_minc_axes_and_affine(tmp_path):
    """MINC's order (x slowest, then z, then y) is undone and world = sum of (start + i step) cosines."""
    header = {"order": ["xspace", "zspace", "yspace"],
              "xspace": {"start": 10.0, "space_length": 2, "step": -1.0, "direction_cosines": [1, 0, 0]},
              "yspace": {"start": 20.0, "space_length": 4, "step": -1.0, "direction_cosines": [0, 1, 0]},
              "zspace": {"start": 30.0, "space_length": 3, "step": 2.0, "direction_cosines": [0, 0, 1]}}
    xzy = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    blob = _brainbrowser_tgz({"structural1.mnc": (header, xzy)})
    src = tmp_path / "brainbrowser-1.0.tgz"
    src.write_bytes(blob)
    spec = {"name": "bb", "package": "bb 1.0 (npm)", "url": src.as_uri(), "sha256": hashlib.sha256(blob).hexdigest(),
            "files": {"scan1_T1w": "package/examples/models/structural1.mnc"}}
    got = registry_head(spec, tmp_path / "cache")
    assert got["scan1_T1w"].name == "bb_scan1_T1w.nii.gz"
    img = nib.load(str(got["scan1_T1w"]))
    assert img.shape == (2, 4, 3)
    data = np.asarray(img.dataobj)
    assert data[1, 3, 2] == xzy[1, 2, 3] and data[0, 1, 2] == xzy[0, 2, 1]
    np.testing.assert_allclose(img.affine @ [1, 3, 2, 1], [9.0, 17.0, 34.0, 1.0])
    with pytest.raises(ValueError, match="not the header's"):
        devdata._brainbrowser_volume(gzip.compress(json.dumps(header).encode()), gzip.compress(b"\0" * 5))


def test_registry_t1w_labels_each_scan_and_leaves_out_what_cannot_be_fetched(monkeypatch, tmp_path):
    def fetch(spec):
        if spec is devdata.COLIN27:
            raise OSError("offline")
        return {k: tmp_path / f"{spec['name']}_{k}.nii.gz" for k in spec["files"]}

    monkeypatch.setattr(devdata, "registry_head", fetch)
    lines = []
    got = devdata.registry_t1w(lines.append)
    assert [label for label, _ in got] == ["brainbrowser1", "brainbrowser2"]
    assert got[1][1].name == "brainbrowser_scan2_T1w.nii.gz"
    assert lines == [f"{devdata.COLIN27['package']} left out: offline"]
    assert devdata.registry_repeats() == [("brainbrowser1", "brainbrowser2")]
