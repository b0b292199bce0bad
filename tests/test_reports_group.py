"""Group report: acquisition groups, volumes by group, and the assembled self-contained HTML."""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from bidsapp.reports import figures  # noqa: E402
from bidsapp.reports.group import (  # noqa: E402
    acquisition_groups_table,
    acquisitions_section,
    volume_summary,
    volumes_section,
    write_group_report,
)
from bidsapp.reports.html import Section, text_html  # noqa: E402

GROUPS = {
    "siemens-prisma-3T-MPRAGE": ("Siemens", "Prisma", 3.0, "MPRAGE", 2.3, 0.00298, 0.9, 9.0),
    "ge-signa-1.5T-SPGR": ("GE", "Signa", 1.5, "SPGR", 0.0138, 0.0028, None, 20.0),
}


def make_tables(n_subjects=8, sessions=("1", "2"), groups=GROUPS, age=True, methods=("unet-physics", "atropos")):
    rng = np.random.default_rng(0)
    vols, acqs, parts = [], [], []
    keys = list(groups)
    for i in range(n_subjects):
        sub = f"sub-{i:02d}"
        g = keys[i % len(keys)]
        vendor, model, field, fam, tr, te, ti, fa = groups[g]
        parts.append({"participant_id": sub, "age": 30 + 4 * i, "sex": "MF"[i % 2], "site": f"site{i % 3}"})
        for ses in sessions:
            rec = {"participant_id": sub, "session_id": f"ses-{ses}", "acq_group": g, "site": f"site{i % 3}",
                   "Manufacturer": vendor, "ManufacturersModelName": model, "MagneticFieldStrength": field,
                   "SequenceFamily": fam, "RepetitionTime": tr, "EchoTime": te, "InversionTime": ti,
                   "FlipAngle": fa}
            acqs.append(dict(rec, source=f"{sub}/ses-{ses}/anat/{sub}_ses-{ses}_T1w.nii.gz"))
            for m in methods:
                shift = 40e3 if g.startswith("ge") else 0.0
                gm, wm, csf = rng.normal(650e3 + shift, 20e3), rng.normal(500e3, 20e3), rng.normal(300e3, 15e3)
                vols.append(dict(rec, method=m, CSF=csf, GM=gm, WM=wm, brain=csf + gm + wm,
                                 **({"age": 30 + 4 * i, "sex": "MF"[i % 2]} if age else {})))
    return pd.DataFrame(vols), pd.DataFrame(acqs), pd.DataFrame(parts)


def _imgs(html):
    return re.findall(r'<img[^>]*src="(data:image/png;base64,[^"]+)"', html)


def test_acquisition_groups_table_counts_and_units():
    _, acq, _ = make_tables()
    t = acquisition_groups_table(acq).set_index("acquisition group")
    row = t.loc["siemens-prisma-3T-MPRAGE"]
    assert row["TR (ms)"] == "2300" and row["TI (ms)"] == "900" and row["vendor"] == "Siemens"
    assert row["subjects"] == 4 and row["sessions"] == 8 and row["images"] == 8
    assert t.loc["ge-signa-1.5T-SPGR", "TI (ms)"] == "n/a"
    # WM/GM signal of pure tissues: a T1-weighted MPRAGE, and an SPGR at 1.5 T with little contrast
    assert row["WM/GM signal"] == "2.339" and t.loc["ge-signa-1.5T-SPGR", "WM/GM signal"] == "1.055"
    sec = acquisitions_section(acq)
    assert "ge-signa-1.5T-SPGR" in sec.body and "Prisma" in sec.body
    assert sec.warnings == [next(w for w in sec.warnings if w.startswith("little GM/WM contrast expected in "
                                                                          "ge-signa-1.5T-SPGR (WM/GM"))]
    acq.loc[acq["acq_group"] == "ge-signa-1.5T-SPGR", "FlipAngle"] = 40.0  # a T1-weighted SPGR: no warning
    assert not acquisitions_section(acq).warnings


def test_acquisitions_section_accepts_record_columns_and_flags_one_group():
    df = pd.DataFrame([{"participant_id": "01", "session_id": "n/a", "group_key": "siemens-prisma-3T-MPRAGE",
                        "manufacturer": "Siemens", "repetition_time": 2.3}])
    sec = acquisitions_section(df)
    assert "2300" in sec.body
    assert any("only one acquisition group" in w for w in sec.warnings)
    assert "acquisition groups unknown" in acquisitions_section(pd.DataFrame()).warnings


def test_volume_summary_statistics():
    vol, _, _ = make_tables(methods=("atropos",))
    s = volume_summary(vol)
    gm = s[(s["tissue"] == "GM") & (s["acquisition group"] == "ge-signa-1.5T-SPGR")].iloc[0]
    v = vol.loc[(vol["acq_group"] == "ge-signa-1.5T-SPGR"), "GM"]
    assert gm["mean (mL)"] == pytest.approx(v.mean() / 1000)
    assert gm["CoV (%)"] == pytest.approx(100 * v.std(ddof=0) / v.mean())
    assert gm["subjects"] == 4 and gm["sessions"] == 8
    assert gm["vs all (%)"] > 0  # the GE group was simulated with more GM


def test_volumes_section_has_per_group_plots_and_age(tmp_path):
    vol, acq, parts = make_tables()
    sec = volumes_section(vol, acq, parts, output_dir=tmp_path)
    # 2 methods x (group plot + age plot)
    assert len(_imgs(sec.body)) == 4
    assert "unet-physics" in sec.body and "atropos" in sec.body and "CoV" in sec.body
    tsv = pd.read_csv(tmp_path / "group_volumes_summary.tsv", sep="\t")
    assert set(tsv["acquisition group"]) == set(GROUPS) and len(tsv) == 2 * 2 * 4
    assert sec.body.index("unet-physics") < sec.body.index("atropos: tissue volumes")


def test_volumes_section_merges_groups_and_age_from_other_tables():
    vol, acq, parts = make_tables(age=False, methods=("atropos",))
    bare = vol[["participant_id", "session_id", "method", "CSF", "GM", "WM", "brain"]]
    sec = volumes_section(bare, acq, parts)
    assert "ge-signa-1.5T-SPGR" in sec.body
    assert len(_imgs(sec.body)) == 2  # group plot + age plot (age from participants.tsv)
    assert not any("no acquisition group" in w for w in sec.warnings)


def test_volumes_section_copes_with_thin_data():
    vol, _, _ = make_tables(n_subjects=1, sessions=("1",), age=False, methods=("atropos",))
    vol = vol.drop(columns=["acq_group", "site"])
    sec = volumes_section(vol, None, None)
    assert any("no acquisition group" in w for w in sec.warnings)
    assert any("only one acquisition group" in w for w in sec.warnings)
    assert "No age" in sec.body and len(_imgs(sec.body)) == 1
    empty = volumes_section(pd.DataFrame(), None, None)
    assert "No participant volumes" in empty.body
    novals = volumes_section(pd.DataFrame({"participant_id": ["sub-01"], "GM": [np.nan]}))
    assert "no tissue volumes" in novals.warnings


def test_group_figure_colours_points_by_site():
    vol, _, _ = make_tables(methods=("atropos",))
    fig = figures.volumes_by_group_figure(vol, ("GM", "WM"), color_col="site")
    assert len(fig.axes) == 2
    legend = fig.legends[0]
    assert sorted(t.get_text() for t in legend.get_texts()) == ["site0", "site1", "site2"]
    # one point per session in each panel
    n_points = sum(len(c.get_offsets()) for c in fig.axes[0].collections)
    assert n_points == len(vol)


def test_write_group_report_is_self_contained_and_accepts_extra_sections(tmp_path):
    vol, acq, parts = make_tables(methods=("atropos",))
    extra = Section("Harmonization", text_html("ComBat went here"), ["a warning from a step"], anchor="combat")
    path = write_group_report(tmp_path, [acquisitions_section(acq), volumes_section(vol, acq, parts), extra],
                              command_line="scanbridge bids out group")
    assert path == tmp_path / "group.html"
    html = path.read_text()
    for attr, value in re.findall(r'\b(src|href)="([^"]*)"', html):
        assert value.startswith(("data:", "#")), value[:50]
    assert len(_imgs(html)) >= 2
    for text in ("Acquisition groups", "Volumes by acquisition group", "ComBat went here", "a warning from a step",
                 "scanbridge bids out group", "About"):
        assert text in html
