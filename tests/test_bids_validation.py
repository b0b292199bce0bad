"""Image checks before processing and BIDS validation; every message names the file."""

from __future__ import annotations

import gzip
import json
import os
import stat

import nibabel as nib
import numpy as np
import pytest
from bids_support import image, make_dataset, write_image

from bidsapp.bids import validation as v
from bidsapp.bids.errors import BIDSInputError
from bidsapp.errors import UserError


def _only_error(path, **kw):
    check = v.inspect_image(path, **kw)
    assert len(check.errors) == 1, check.errors
    msg = check.errors[0]
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    assert v.check_image(path, **kw) == msg
    return msg


def test_good_image_passes(tmp_path):
    p = write_image(tmp_path / "sub-01_T1w.nii.gz")
    check = v.inspect_image(p)
    assert check.ok and check.errors == [] and check.warnings == []
    assert check.shape == (32, 32, 32) and check.zooms == (2.0, 2.0, 2.0)
    assert v.check_image(p) is None


def test_integer_image_passes(tmp_path):
    data = np.arange(512, dtype=np.int16).reshape(8, 8, 8)
    p = write_image(tmp_path / "i.nii", nib.Nifti1Image(data, np.diag([8.0, 8.0, 8.0, 1.0])))
    assert v.check_image(p) is None


def test_missing_and_broken_link(tmp_path):
    assert "file does not exist" in _only_error(tmp_path / "nope.nii.gz")
    link = tmp_path / "annexed.nii.gz"
    link.symlink_to(tmp_path / ".git/annex/objects/missing")
    assert "broken link" in _only_error(link)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "sub-01_T1w.nii.gz"
    p.touch()
    assert "empty file (0 bytes)" in _only_error(p)


def test_truncated_gzip(tmp_path):
    good = write_image(tmp_path / "good.nii.gz", image())
    p = tmp_path / "sub-01_T1w.nii.gz"
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "truncated or corrupt" in _only_error(p)


def test_truncated_uncompressed(tmp_path):
    good = write_image(tmp_path / "good.nii")
    p = tmp_path / "sub-01_T1w.nii"
    p.write_bytes(good.read_bytes()[:1000])
    assert "truncated file (1000 bytes" in _only_error(p)


def test_header_only_check_still_sees_truncation(tmp_path):
    good = write_image(tmp_path / "good.nii")
    p = tmp_path / "sub-01_T1w.nii"
    p.write_bytes(good.read_bytes()[:1000])
    assert "truncated" in _only_error(p, check_values=False)


def test_not_gzip_and_not_nifti(tmp_path):
    p = tmp_path / "sub-01_T1w.nii.gz"
    p.write_text("this is a text file")
    assert "not gzip data" in _only_error(p)
    q = tmp_path / "sub-02_T1w.nii.gz"
    q.write_bytes(gzip.compress(b"<html>not an image</html>" * 40))
    assert "not a NIfTI image" in _only_error(q)


def test_4d_images(tmp_path):
    p = write_image(tmp_path / "sub-01_T1w.nii.gz", image(shape=(32, 32, 32, 3), zooms=(2, 2, 2)))
    assert "4D image with 3 volumes" in _only_error(p)
    assert v.inspect_image(p, expect_3d=False).ok
    one = write_image(tmp_path / "sub-02_T1w.nii.gz", image(shape=(32, 32, 32, 1), zooms=(2, 2, 2)))
    check = v.inspect_image(one)
    assert check.ok and check.warnings == [f"{one}: 4D image with a single volume (shape (32, 32, 32, 1)); it is used as 3D"]
    img, warnings = v.load_3d(one)
    assert img.shape == (32, 32, 32) and img.get_data_dtype() == np.float32 and warnings == check.warnings
    np.testing.assert_allclose(img.affine, nib.load(str(one)).affine)


def test_an_image_too_small_to_hold_a_head(tmp_path):
    p = write_image(tmp_path / "sub-01_T1w.nii.gz", image(shape=(5, 5, 5), zooms=(3, 3, 3)))
    assert _only_error(p) == (f"{p}: field of view 15x15x15 mm (5x5x5 voxels) cannot hold a head "
                              "(at least 60 mm and 8 voxels along every axis)")
    thin = write_image(tmp_path / "sub-02_T1w.nii.gz", image(shape=(64, 64, 4), zooms=(1, 1, 20)))
    assert "(64x64x4 voxels) cannot hold a head" in _only_error(thin)


def test_2d_image(tmp_path):
    p = write_image(tmp_path / "sub-01_T1w.nii.gz", image(shape=(8, 8, 1)))
    assert "not a 3D volume" in _only_error(p)


def test_all_zero_constant_and_nan(tmp_path):
    assert "all voxels are zero" in _only_error(write_image(tmp_path / "z.nii.gz", image(fill=0)))
    assert "constant image" in _only_error(write_image(tmp_path / "c.nii.gz", image(fill=5)))
    assert "no finite values" in _only_error(write_image(tmp_path / "n.nii.gz", image(fill=np.nan)))
    data = image().get_fdata().astype(np.float32)
    data[0, 0, :2] = [np.nan, np.inf]
    p = write_image(tmp_path / "some.nii.gz", nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])))
    check = v.inspect_image(p)
    assert check.ok and check.warnings == [f"{p}: 2 voxels are NaN/inf; they are set to 0"]
    img, _ = v.load_3d(p)
    assert np.isfinite(img.get_fdata()).all() and img.get_fdata()[0, 0, 0] == 0


def test_a_negative_background_is_shifted_and_ringing_is_not(tmp_path):
    """An offset below zero (an MP2RAGE UNI image, a scaled integer image) is named in the plan and
    shifted to 0 by the first step; a few negative voxels of ringing are neither."""
    from workflows.interfaces.ants import reorient_to_ras

    rng = np.random.default_rng(0)
    head = np.zeros((20, 22, 18), np.float32)
    head[4:16, 4:18, 3:15] = rng.uniform(50, 400, (12, 14, 12))
    offset = write_image(tmp_path / "offset.nii.gz", nib.Nifti1Image(head - 100, np.diag([4.0, 4.0, 4.0, 1.0])))
    check = v.inspect_image(offset)
    assert check.ok and any("of voxels are negative (minimum -100); intensities are shifted by 100" in w
                            for w in check.warnings), check.warnings
    out = np.asarray(nib.load(reorient_to_ras(offset, tmp_path / "ras.nii.gz")).dataobj)
    np.testing.assert_allclose(out, head, atol=1e-3)
    ringing = head.copy()
    ringing[0, 0, :3] = -7.0  # under 1 % of the voxels
    assert v.negative_offset(ringing) == 0
    ring = write_image(tmp_path / "ring.nii.gz", nib.Nifti1Image(ringing, np.diag([4.0, 4.0, 4.0, 1.0])))
    assert not [w for w in v.inspect_image(ring).warnings if "negative" in w]
    assert np.asarray(nib.load(reorient_to_ras(ring, tmp_path / "ring_ras.nii.gz")).dataobj).min() == -7.0


def _patched(tmp_path, **fields):
    """An uncompressed NIfTI whose raw header fields are overwritten (nibabel would not save them)."""
    p = write_image(tmp_path / "sub-01_T1w.nii")
    raw = p.read_bytes()
    hdr = nib.Nifti1Header.from_fileobj(open(p, "rb"))
    for key, value in fields.items():
        hdr[key] = value
    p.write_bytes(hdr.binaryblock + raw[len(hdr.binaryblock):])
    return p


@pytest.mark.parametrize("pixdim, expect", [((0.0, 1, 1), "invalid voxel size"), ((1, 1, 45.0), "absurd voxel size"),
                                            ((0.001, 1, 1), "absurd voxel size"), ((np.nan, 1, 1), "invalid voxel size")])
def test_absurd_voxel_sizes(tmp_path, pixdim, expect):
    p = _patched(tmp_path, pixdim=[1.0, *pixdim, 1, 1, 1, 1])
    assert expect in _only_error(p)


def test_singular_affine(tmp_path):
    p = _patched(tmp_path, qform_code=0, sform_code=1, srow_z=[0, 0, 0, 0])
    assert "invalid orientation matrix" in _only_error(p)


def test_thick_slices_are_a_warning(tmp_path):
    p = write_image(tmp_path / "sub-01_T1w.nii.gz", image(shape=(64, 64, 16), zooms=(1, 1, 7)))
    check = v.inspect_image(p)
    assert check.ok and check.warnings == [f"{p}: thick voxels 1x1x7 mm; results will be coarse"]


def test_load_3d_raises_a_user_error_naming_the_file(tmp_path):
    p = tmp_path / "sub-01_T1w.nii.gz"
    p.touch()
    with pytest.raises(v.ImageError, match="empty file") as info:
        v.load_3d(p)
    assert isinstance(info.value, BIDSInputError) and isinstance(info.value, UserError)
    assert str(p) in str(info.value)


# ---------------------------------------------------------------- dataset validation
def test_python_validator_reports_non_bids_names(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nobin"))
    root = make_dataset(tmp_path / "ds")
    assert v.validate_dataset(root).ok
    write_image(root / "sub-01/ses-1/anat/sub-01_T1w_copy.nii.gz")
    write_image(root / "sub-01/ses-1/anat/sub-01_T1w.nii.gz")  # session entity missing from the name
    (root / "derivatives/x").mkdir(parents=True)
    (root / "derivatives/x/junk.txt").write_text("ignored")
    (root / "sourcedata").mkdir()
    (root / "sourcedata/raw.dcm").write_text("ignored")
    (root / "sub-02/notes.txt").write_text("listed in .bidsignore")
    (root / ".bidsignore").write_text("# comment\nnotes.txt\n")
    report = v.validate_dataset(root)
    assert report.tool.startswith("bids_validator")
    assert report.errors == [
        f"{root / 'sub-01/ses-1/anat/sub-01_T1w.nii.gz'}: file name is not valid BIDS",
        f"{root / 'sub-01/ses-1/anat/sub-01_T1w_copy.nii.gz'}: file name is not valid BIDS",
    ]
    assert list(report) == report.errors and not report.ok


def _fake_validator(tmp_path, doc, code=0):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "bids-validator"
    exe.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo 1.14.0; exit 0; fi\n'
        f"cat <<'EOF'\n{json.dumps(doc)}\nEOF\nexit {code}\n"
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def test_official_validator_is_preferred_when_on_path(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "ds")
    legacy = {"issues": {"errors": [{"key": "NOT_INCLUDED", "reason": "Files with such naming scheme are not part of BIDS.",
                                     "files": [{"file": {"relativePath": "/sub-01/x.nii.gz"}},
                                               {"file": {"relativePath": "/sub-02/y.nii.gz"}}]}],
                         "warnings": [{"key": "README_FILE_MISSING", "reason": "no README", "files": []}]}}
    monkeypatch.setenv("PATH", str(_fake_validator(tmp_path, legacy, code=1)) + os.pathsep + os.environ["PATH"])
    report = v.validate_dataset(root)
    assert report.tool == "bids-validator 1.14.0"
    assert report.errors == [f"{root / 'sub-01/x.nii.gz'}: NOT_INCLUDED: Files with such naming scheme are not part of BIDS. "
                             "(and 1 more files)"]
    assert report.warnings == [f"{root}: README_FILE_MISSING: no README"]
    assert v.validate_dataset(root, use_node=False).ok  # forced Python rules: names are fine


def test_schema_validator_output_is_understood(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "ds")
    schema = {"issues": {"issues": [{"code": "SIDECAR_KEY_RECOMMENDED", "severity": "warning", "location": "/sub-01/ses-1/anat/sub-01_ses-1_T1w.json"},
                                    {"code": "EMPTY_FILE", "severity": "error", "location": "/sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz"}],
                         "codeMessages": {"EMPTY_FILE": "Empty files not allowed."}}}
    monkeypatch.setenv("PATH", str(_fake_validator(tmp_path, schema, code=16)) + os.pathsep + os.environ["PATH"])
    report = v.validate_dataset(root)
    assert report.errors == [f"{root / 'sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz'}: EMPTY_FILE: Empty files not allowed."]
    assert report.warnings == [f"{root / 'sub-01/ses-1/anat/sub-01_ses-1_T1w.json'}: SIDECAR_KEY_RECOMMENDED"]


def test_broken_official_validator_falls_back(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "ds")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "bids-validator"
    exe.write_text("#!/bin/sh\necho 'node: not found' >&2\nexit 127\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ["PATH"])
    report = v.validate_dataset(root)
    assert report.ok and report.tool.startswith("bids_validator")
    assert report.warnings[0].startswith(f"{exe}: could not run the BIDS validator")
