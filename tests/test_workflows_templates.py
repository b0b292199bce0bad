"""Template source: TemplateFlow files when present, the offline ICBM152 2009a seed otherwise."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bidsapp import templates
from bidsapp.errors import UserError


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    """No TemplateFlow home, no network allowed; any connection attempt fails the test."""
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "no-templateflow"))
    monkeypatch.setenv("TEMPLATEFLOW_AUTOUPDATE", "0")

    def _no_network(*args, **kwargs):
        raise AssertionError("network access attempted while offline")

    monkeypatch.setattr(socket, "create_connection", _no_network)
    return tmp_path


def test_offline_fallback_is_icbm152_2009a_with_provenance(offline_env):
    cache = offline_env / "cache"
    tpl = templates.get_template(resolution=4, cache_dir=cache)
    assert tpl["name"] == "MNI152NLin2009aSym"
    assert tpl["requested"] == "MNI152NLin2009cAsym"
    assert tpl["source"] == "nilearn-icbm152-2009a"
    assert tpl["resolution"] == 4 and tpl["zooms"] == [4.0, 4.0, 4.0]
    assert any("not available offline" in w for w in tpl["warnings"])
    assert "CSF probability" in tpl["description"] and "Brain mask" in tpl["description"]
    assert set(tpl["files"]) == {"T1w", "mask", "CSF", "GM", "WM"}
    folder = cache / "templateflow" / "tpl-MNI152NLin2009aSym"
    assert (folder / "tpl-MNI152NLin2009aSym_res-1_T1w.nii.gz").is_file()
    assert (folder / "tpl-MNI152NLin2009aSym_res-4_desc-brain_mask.nii.gz").is_file()
    desc = json.loads((folder / "template_description.json").read_text())
    assert desc["Identifier"] == "MNI152NLin2009aSym" and {"1", "4"} <= set(desc["res"])
    assert not (offline_env / "no-templateflow").exists(), "TemplateFlow home must not be created offline"


def test_offline_files_are_consistent(offline_env):
    tpl = templates.get_template(resolution=2, cache_dir=offline_env / "cache")
    imgs = {k: nib.load(v) for k, v in tpl["files"].items()}
    shapes = {img.shape for img in imgs.values()}
    assert len(shapes) == 1
    for img in imgs.values():
        assert np.allclose(np.sqrt((img.affine[:3, :3] ** 2).sum(0)), 2.0)
        assert np.allclose(img.affine, imgs["T1w"].affine)
    mask = np.asarray(imgs["mask"].dataobj) > 0
    csf, gm, wm = (np.asarray(imgs[k].dataobj, dtype=np.float32) for k in ("CSF", "GM", "WM"))
    assert 1.5e6 < mask.sum() * 8 < 2.2e6  # an adult intracranial volume, in mm3
    assert csf.min() >= 0 and csf.max() <= 1 and gm.max() <= 1 and wm.max() <= 1
    total = (csf + gm + wm)[mask]
    assert np.median(total) == pytest.approx(1.0, abs=0.05)
    assert csf[~mask].max() < 0.5  # CSF lies inside the mask (block averages: partial volume)
    # MNI space: the brain's centre is near the origin
    centre = imgs["mask"].affine @ np.r_[np.argwhere(mask).mean(0), 1]
    assert np.abs(centre[:3]).max() < 25


def test_block_average_is_exact():
    arr = np.arange(4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = [-10, -20, -30]
    out, new = templates.block_average(arr, aff, 2)
    assert out.shape == (2, 2, 1)
    assert out[0, 0, 0] == pytest.approx(arr[:2, :2, :2].mean())
    assert np.allclose(np.diag(new)[:3], 2.0)
    assert np.allclose(new[:3, 3], [-9.5, -19.5, -29.5])  # centre of the first 2x2x2 block


def test_cache_is_reused(offline_env):
    cache = offline_env / "cache"
    first = templates.get_template(resolution=3, cache_dir=cache)
    mtimes = {k: Path(p).stat().st_mtime_ns for k, p in first["files"].items()}
    again = templates.get_template(resolution=3, cache_dir=cache)
    assert again["files"] == first["files"]
    assert {k: Path(p).stat().st_mtime_ns for k, p in again["files"].items()} == mtimes


def test_templateflow_home_is_used_when_populated(offline_env, monkeypatch):
    home = offline_env / "tf"
    folder = home / "tpl-MNI152NLin2009cAsym"
    folder.mkdir(parents=True)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    for key, ent in templates._TF_ENTITIES.items():
        data = np.ones((8, 8, 8), np.float32)
        nib.save(nib.Nifti1Image(data, aff), folder / f"tpl-MNI152NLin2009cAsym_res-02_{ent}.nii.gz")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    tpl = templates.get_template(resolution=2, cache_dir=offline_env / "cache")
    assert tpl["source"] == "templateflow" and tpl["name"] == "MNI152NLin2009cAsym"
    assert tpl["files"]["GM"].endswith("tpl-MNI152NLin2009cAsym_res-02_label-GM_probseg.nii.gz")
    assert tpl["warnings"] == []


def test_empty_templateflow_stubs_are_not_used(offline_env, monkeypatch):
    """TemplateFlow's skeleton has zero-byte placeholders: they are not templates."""
    home = offline_env / "tf"
    folder = home / "tpl-MNI152NLin2009cAsym"
    folder.mkdir(parents=True)
    for ent in templates._TF_ENTITIES.values():
        (folder / f"tpl-MNI152NLin2009cAsym_res-02_{ent}.nii.gz").write_bytes(b"")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    tpl = templates.get_template(resolution=2, cache_dir=offline_env / "cache")
    assert tpl["source"] == "nilearn-icbm152-2009a"


def test_unknown_template_offline_is_a_user_error(offline_env):
    with pytest.raises(UserError, match="MNI152NLin6Asym"):
        templates.get_template("MNI152NLin6Asym", resolution=2, cache_dir=offline_env / "cache")


@pytest.mark.parametrize("bad", [0, 2.5, "two", 9])
def test_bad_resolution(bad, offline_env):
    with pytest.raises(UserError, match="resolution"):
        templates.get_template(resolution=bad, cache_dir=offline_env / "cache")


def test_network_switches(monkeypatch):
    monkeypatch.delenv("SCANBRIDGE_OFFLINE", raising=False)
    monkeypatch.setenv("TEMPLATEFLOW_AUTOUPDATE", "0")
    assert not templates.network_allowed()
    monkeypatch.setenv("TEMPLATEFLOW_AUTOUPDATE", "1")
    assert templates.network_allowed()
    monkeypatch.setenv("SCANBRIDGE_OFFLINE", "1")
    assert not templates.network_allowed()
    assert templates.network_allowed(offline=False)


def test_unreachable_templateflow_fails_over_fast(monkeypatch, tmp_path):
    import time

    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "tf"))
    monkeypatch.setenv("TEMPLATEFLOW_AUTOUPDATE", "1")
    monkeypatch.delenv("SCANBRIDGE_OFFLINE", raising=False)

    def _unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", _unreachable)
    t0 = time.monotonic()
    tpl = templates.get_template(resolution=4, cache_dir=tmp_path / "cache")
    assert time.monotonic() - t0 < 30
    assert tpl["source"] == "nilearn-icbm152-2009a"
    assert any("not reachable" in w for w in tpl["warnings"])


def test_unwritable_cache_falls_back(monkeypatch, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        monkeypatch.delenv("SCANBRIDGE_CACHE_DIR", raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        got = templates.resolve_cache_dir(ro / "sub")
        if got == (ro / "sub"):  # running as root: permissions do not bind
            pytest.skip("permissions are not enforced for this user")
        assert got == (tmp_path / "xdg" / "scanbridge")
    finally:
        ro.chmod(0o700)
