"""benchmarks/lesion/run.py: one probability map scored at several mask thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark_scripts import load


def test_thresholds_cut_one_probability_and_the_summary_keeps_them_apart(monkeypatch):
    from bidsapp.models import lesion as L

    run = load("lesion", "run")
    g = np.arange(32) - 16
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    truth = r < 5
    prob = np.where(truth, 0.8, np.where(r < 7, 0.55, 0.0)).astype(np.float32)  # a 2 mm rim at 0.55
    calls = []

    def fake_segment(images, brain, affine, zooms, device="cpu", weights_dir=None, threshold=None):
        calls.append(1)
        return L.LesionResult(probability=prob, mask=prob >= 0.5, context={}, contrasts=("FLAIR",))

    monkeypatch.setattr(L, "segment", fake_segment)
    sessions = [{"head": "anat-10", "scanner": 0, "subset": "all", "images": {}, "brain": truth, "lesion": truth}]
    rows = run.evaluate(None, sessions, [0.5, 0.6])
    assert len(calls) == 1 and [r["threshold"] for r in rows] == [0.5, 0.6]
    at_05, at_06 = run.summary(rows, "all", 0.5), run.summary(rows, "all", 0.6)
    assert at_06["dice"] == pytest.approx(1.0) and at_05["dice"] < 0.8
    assert at_05["volume_ratio_median"] > 2 and at_06["volume_ratio_median"] == pytest.approx(1.0)
    assert run.summary(rows, "all") == at_05  # the app's threshold by default
    result = {"ours": {"BM": {"sessions": [dict(rows[1])]}}, "shipped": {"sessions": rows}}
    paired = run.paired_vs(result)
    assert paired["shipped"]["dice"]["n"] == 1  # only the app's threshold is paired with BM


def test_clinical_check_cuts_the_written_probability_at_each_threshold(tmp_path):
    import ants
    import nibabel as nib

    clin = load("lesion", "clinical")
    anat = tmp_path / "sub-ms01" / "ses-2" / "anat"
    anat.mkdir(parents=True)
    main = anat / "sub-ms01_ses-2_desc-lesion_mask.nii.gz"
    assert clin.probseg_of(main).name == "sub-ms01_ses-2_label-lesion_probseg.nii.gz"
    assert clin.probseg_of(anat / "sub-ms01_ses-2_desc-wmh_mask.nii.gz").name == \
        "sub-ms01_ses-2_label-lesion_desc-wmh_probseg.nii.gz"
    g = np.arange(24) - 12
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    prob = np.where(r < 4, 0.8, np.where(r < 6, 0.45, 0.0)).astype(np.float32)
    nib.save(nib.Nifti1Image(prob, np.eye(4)), clin.probseg_of(main))
    nib.save(nib.Nifti1Image((prob >= 0.5).astype(np.uint8), np.eye(4)), main)
    change = tmp_path / "change.nii.gz"
    nib.save(nib.Nifti1Image((r < 6).astype(np.uint8), np.eye(4)), change)
    xfm = tmp_path / "identity.mat"
    ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3), str(xfm))
    case = {"mask": main, "chain": [(change, xfm)], "change": change}
    low, high = clin.at_thresholds(case, [0.4, 0.5])
    inner, outer = (r < 4).sum(), (r < 6).sum()
    assert low["threshold"] == 0.4 and low["change_covered"] == pytest.approx(1.0)
    assert high["change_covered"] == pytest.approx(inner / outer, abs=0.01)
    assert low["lesion_ml"] == pytest.approx(outer / 1000, abs=0.01) and high["lesion_ml"] == pytest.approx(inner / 1000, abs=0.01)
    assert clin.at_thresholds({**case, "mask": anat / "sub-ms01_ses-2_desc-wmh_mask.nii.gz"}, [0.5]) == []
