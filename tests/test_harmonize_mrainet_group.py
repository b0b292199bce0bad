"""Group-level MRAI-NET and ComBat steps on a tiny fake derivatives folder (two scanners, small volumes)."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from bidsapp.harmonize.context import GroupContext
from bidsapp.reports.harmonization import render

# per-group tissue intensities (CSF, GM, WM): the second scanner has an inverted contrast and another gain
CONTRAST = {"siemens-a-1.5T-SPGR": (0.25, 0.55, 0.8), "ge-b-3T-SPGR": (1.4, 0.75, 0.4)}


def _phantom(shape, rng):
    """Nested ellipsoids: WM core, GM shell, CSF rim and a ventricle, randomly scaled per subject."""
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    s = 1 + 0.08 * rng.standard_normal(3)
    r = np.sqrt(((g / s[:, None, None, None] / np.array([0.9, 0.95, 1.4])[:, None, None, None]) ** 2).sum(0))
    lab = np.zeros(shape, np.int16)
    lab[r < 0.85] = 1
    lab[r < 0.75] = 2
    lab[r < 0.5] = 3
    vent = np.sqrt(((g - np.array([0.0, 0.1, 0.0])[:, None, None, None]) ** 2 / 0.03).sum(0)) < 1
    lab[vent & (lab > 0)] = 1
    return lab


def write_session(root: Path, sub: str, ses: str, group: str, rng, shape=(28, 28, 10), probseg=True):
    d = root / f"sub-{sub}" / f"ses-{ses}" / "anat"
    d.mkdir(parents=True, exist_ok=True)
    lab = _phantom(shape, rng)
    vals = np.r_[0.0, CONTRAST[group]]
    img = vals[lab] * (1 + 0.05 * rng.standard_normal(shape)) * 800
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    stem = f"sub-{sub}_ses-{ses}"
    nib.save(nib.Nifti1Image(img.astype(np.float32), aff), d / f"{stem}_desc-preproc_T1w.nii.gz")
    nib.save(nib.Nifti1Image((lab > 0).astype(np.uint8), aff), d / f"{stem}_desc-brain_mask.nii.gz")
    nib.save(nib.Nifti1Image(lab.astype(np.uint8), aff), d / f"{stem}_dseg.nii.gz")
    if probseg:
        for k, name in ((1, "CSF"), (2, "GM"), (3, "WM")):
            p = (lab == k).astype(np.float32) * 0.98
            nib.save(nib.Nifti1Image(p, aff), d / f"{stem}_label-{name}_probseg.nii.gz")
    return lab


def make_dataset(root: Path, n_per_group=3, groups=tuple(CONTRAST), seed=0, probseg=True):
    rng = np.random.default_rng(seed)
    rows, vols = [], []
    i = 0
    for g in groups:
        for _ in range(n_per_group):
            i += 1
            sub = f"{i:02d}"
            lab = write_session(root, sub, "1", g, rng, probseg=probseg)
            rows.append({"participant_id": f"sub-{sub}", "session_id": "ses-1", "acq_group": g,
                         "Manufacturer": g.split("-")[0], "MagneticFieldStrength": float(g.split("-")[2][:-1]),
                         "SequenceFamily": "SPGR", "RepetitionTime": 0.0138, "EchoTime": 0.0028, "FlipAngle": 20.0,
                         "site": g})
            v = {n: float((lab == k).sum() * 27.0) for k, n in ((1, "CSF"), (2, "GM"), (3, "WM"))}
            vols.append({"participant_id": f"sub-{sub}", "session_id": "ses-1", "method": "atropos", **v,
                         "brain": sum(v.values()), "acq_group": g, "site": g, "age": 40.0 + i, "sex": "MF"[i % 2]})
    return pd.DataFrame(rows), pd.DataFrame(vols)


def _ctx(tmp_path, acq, vol, **opts):
    options = {"target_labels_per_tissue": 5, "seed": 0, "mrainet_steps": 100, "mrainet_batch_size": 64,
               "mrainet_pad_patches": 200, "mrainet_source_patches_per_tissue": 200, **opts}
    return GroupContext(output_dir=tmp_path, work_dir=tmp_path / "work", volumes=vol, acquisitions=acq,
                        participants=pd.DataFrame(), options=options, logger=logging.getLogger("test.mrainet"))


def test_group_run_writes_tables_maps_and_sections(tmp_path):
    from bidsapp.harmonize import mrainet_group
    from bidsapp.reports.html import write_report

    acq, vol = make_dataset(tmp_path)
    sections = render(mrainet_group.run(_ctx(tmp_path, acq, vol)))
    titles = [s.title for s in sections]
    assert "MRAI-NET source and target groups" in titles and "Scanner effect: proxy A-distance" in titles
    for name in ("group_pad.tsv", "group_mrainet_labels.tsv",
                 "group_mrainet_embedding.tsv", "group_mrainet_sessions.tsv", "group_mrainet_volumes.tsv"):
        assert (tmp_path / name).is_file(), name
    pad = pd.read_csv(tmp_path / "group_pad.tsv", sep="\t")
    assert len(pad) == 1 and -2 <= pad.pad_before.iloc[0] <= 2
    assert -2 <= pad.pad_after.iloc[0] <= 2
    labels = pd.read_csv(tmp_path / "group_mrainet_labels.tsv", sep="\t")
    tgt = labels[labels.role == "target"]
    assert (tgt.n_patches == 5).all()                             # target budget honoured per tissue
    sess = pd.read_csv(tmp_path / "group_mrainet_sessions.tsv", sep="\t")
    assert len(sess) == 6 and sess.dice_mean.median() > 0.5
    dseg = tmp_path / "sub-04/ses-1/anat/sub-04_ses-1_desc-mrainet_dseg.nii.gz"
    assert dseg.is_file() and (tmp_path / "sub-04/ses-1/anat/sub-04_ses-1_label-GM_desc-mrainet_probseg.nii.gz").is_file()
    assert set(np.unique(np.asarray(nib.load(dseg).dataobj))) <= {0, 1, 2, 3}
    model, card = mrainet_group.load_group_model(tmp_path)
    assert card["training"]["data"]["source_group"] in CONTRAST and len(card["classifier"]["coef"]) == 3
    # the reference design: each group's id is an input, in the card's group order
    assert model.config.pool == 2 and model.config.n_domains == len(card["training"]["data"]["groups"]) == 2
    html = write_report(tmp_path / "group.html", "t", sections).read_text()
    assert "data:image/png;base64" in html


def test_shipped_weights_start_a_dataset_with_more_groups():
    """The shipped network saw two scanners; a dataset with four groups starts from every weight but the
    per-scanner offsets, which start at zero."""
    import torch

    from bidsapp.harmonize.mrainet_group import _initial_model
    from bidsapp.models import registry
    from bidsapp.models.mrainet import MRAINetConfig

    state, card = registry.load_state_dict("mrainet")
    warnings = []
    m = _initial_model("shipped", MRAINetConfig(pool=2, n_domains=4), lambda *a: warnings.append(a))
    assert not warnings and m is not None
    assert torch.equal(m.net[0].weight, state["net.0.weight"])
    assert m.domain_offset.weight.shape == (4, 16) and not m.domain_offset.weight.any()
    # another architecture is refused with a warning, not an error
    assert _initial_model("shipped", MRAINetConfig(), lambda *a: warnings.append(a)) is None and warnings


def test_single_group_gives_message_and_groups_section(tmp_path):
    from bidsapp.harmonize import mrainet_group

    acq, vol = make_dataset(tmp_path, groups=("siemens-a-1.5T-SPGR",))
    sections = render(mrainet_group.run(_ctx(tmp_path, acq, vol)))
    assert len(sections) == 1 and "single acquisition group" in sections[0].warnings[0]
    assert not (tmp_path / "group_pad.tsv").exists()


def test_group_without_usable_labels_and_short_patches(tmp_path, caplog):
    from bidsapp.harmonize import mrainet_group

    acq, vol = make_dataset(tmp_path, n_per_group=3)
    # the target scanner's segmentation has no confident voxel: probsegs all 0.5
    for p in tmp_path.glob("sub-0[456]/ses-1/anat/*_probseg.nii.gz"):
        img = nib.load(p)
        nib.save(nib.Nifti1Image(np.full(img.shape, 0.5, np.float32), img.affine), p)
    with caplog.at_level(logging.WARNING):
        sections = render(mrainet_group.run(_ctx(tmp_path, acq, vol)))
    text = " ".join(w for s in sections for w in s.warnings)
    assert "has no usable labels" in text
    assert "fewer than the" in text                               # fewer patches than asked for
    assert "has no usable labels" in caplog.text
    assert (tmp_path / "group_pad.tsv").is_file()                 # the rest is still produced


def test_missing_derivatives_skip_session(tmp_path):
    from bidsapp.harmonize import mrainet_group

    acq, vol = make_dataset(tmp_path)
    (tmp_path / "sub-02/ses-1/anat/sub-02_ses-1_desc-brain_mask.nii.gz").unlink()
    (tmp_path / "sub-03/ses-1/anat/sub-03_ses-1_desc-preproc_T1w.nii.gz").write_bytes(b"not a nifti")
    sections = render(mrainet_group.run(_ctx(tmp_path, acq, vol)))
    text = " ".join(w for s in sections for w in s.warnings)
    assert "sub-02_ses-1: no desc-brain_mask" in text and "sub-03_ses-1: could not be read" in text
    assert len(pd.read_csv(tmp_path / "group_mrainet_sessions.tsv", sep="\t")) == 4


def test_manual_labels_dir(tmp_path):
    from bidsapp.harmonize import mrainet_group

    out, labels = tmp_path / "out", tmp_path / "labels"
    acq, vol = make_dataset(out)
    # manual labels for two sessions of the second group only: it becomes the source
    for sub in ("04", "05"):
        src = out / f"sub-{sub}/ses-1/anat/sub-{sub}_ses-1_dseg.nii.gz"
        d = labels / f"sub-{sub}/ses-1/anat"
        d.mkdir(parents=True)
        (d / f"sub-{sub}_ses-1_desc-manual_dseg.nii.gz").write_bytes(src.read_bytes())
    mrainet_group.run(_ctx(out, acq, vol, labels_dir=str(labels)))
    card = mrainet_group.load_group_model(out)[1]
    assert card["training"]["data"]["source_group"] == "ge-b-3T-SPGR"


def test_target_tissue_without_confident_voxels_takes_its_most_probable():
    """A target whose GM never passes probseg 0.95 still gives GM labels: its most probable GM voxels,
    counted for the report; a tissue with enough confident voxels is left as sampled."""
    from bidsapp.harmonize.mrainet_group import _Collected, _fill_below_confidence

    dseg = np.zeros((6, 6, 1), np.int16)
    dseg[:3] = 2                                         # 18 GM voxels
    dseg[3:] = 3                                         # 18 WM voxels
    prob = {k: np.zeros(dseg.shape, np.float32) for k in (1, 2, 3)}
    prob[2][:3] = np.linspace(0.5, 0.9, 18).reshape(3, 6, 1)    # GM never above 0.95
    prob[3][3:] = 0.99
    picked = {1: np.zeros((0, 3), np.int64), 2: np.zeros((0, 3), np.int64),
              3: np.argwhere(dseg == 3)[:4]}
    col = _Collected()
    candidates = ~(prob[3] > 0.95)
    _fill_below_confidence(picked, 4, dseg, candidates, prob, domain=1, col=col)
    assert len(picked[2]) == 4 and len(picked[3]) == 4 and len(picked[1]) == 0
    got = sorted(float(prob[2][tuple(c)]) for c in picked[2])
    assert got == sorted(np.sort(prob[2][:3].ravel())[-4:].tolist())     # the four most probable
    assert col.below_confidence == {(1, 2): 4}
