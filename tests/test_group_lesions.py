"""Lesions at the group level: lesion columns of group_volumes.tsv, ComBat on the lesion volume, the lesion
section of group.html; and tables without lesions exactly as before."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from bids_support import MPRAGE, SPGR  # noqa: E402

from bidsapp.bids.acquisition import AcquisitionRecord  # noqa: E402
from bidsapp.bids.collect import collect_volumes  # noqa: E402
from bidsapp.bids.derivatives import atomic_write_tsv  # noqa: E402
from bidsapp.harmonize import combat, pipeline  # noqa: E402
from bidsapp.harmonize.combat import combat_lesions, combat_volumes  # noqa: E402
from bidsapp.reports.group import lesions_section, volumes_section, write_group_report  # noqa: E402
from bidsapp.reports.harmonization import render  # noqa: E402

RECORDED = Path(__file__).resolve().parents[1] / "benchmarks/demo/recorded"
FLAIR = {"Manufacturer": "Philips", "ManufacturersModelName": "Ingenia", "MagneticFieldStrength": 3,
         "RepetitionTime": 4.8, "EchoTime": 0.3, "InversionTime": 1.65, "FlipAngle": 90,
         "PulseSequenceType": "FLAIR"}
TISSUE_METHODS = ("unet-physics", "atropos")
INDEX = ["participant_id", "session_id", "method"]
TISSUES = ["CSF", "GM", "WM", "brain"]


def _session(out: Path, sub: str, ses: str, meta: dict, suffix: str, rows: list[tuple], count_column: bool):
    anat = out / f"sub-{sub}/ses-{ses}/anat"
    anat.mkdir(parents=True, exist_ok=True)
    prefix = f"sub-{sub}_ses-{ses}"
    (anat / f"{prefix}_desc-preproc_{suffix}.nii.gz").write_bytes(b"")  # never opened at the group level
    rec = AcquisitionRecord.from_metadata(meta, suffix=suffix)
    (anat / f"{prefix}_desc-preproc_{suffix}.json").write_text(json.dumps({"Acquisition": rec.to_dict()}))
    cols = ["method", "label", "volume_mm3"] + (["count"] if count_column else [])
    lines = ["\t".join(cols)] + ["\t".join(str(v) for v in r[:len(cols)]) for r in rows]
    (anat / f"{prefix}_desc-volumes_morph.tsv").write_text("\n".join(lines) + "\n")
    return rec.group_key


def make_study(tmp_path: Path, lesions: bool = True, flair_only: int = 2, n_subjects: int = 12,
               no_flair: tuple[str, ...] = ("03",), seed: int = 0, wmh: str | None = None) -> SimpleNamespace:
    """Two T1w groups (Siemens MPRAGE, GE SPGR), two sessions each, the GE group with 3x the lesion volume
    (a scanner effect on the log scale); sessions of ``no_flair`` subjects have no lesion row; ``flair_only``
    more subjects have a FLAIR and no T1w (lesion row only). ``wmh``: every session with lesions also has a
    row of the WMH method, other numbers: ``"after"`` the MS row (a baseline), ``"first_without_t1w"`` before
    it on the FLAIR-only sessions (their main answer). ``truth``: the main answer's (volume, count)."""
    rng, rng_lesion = np.random.default_rng(seed), np.random.default_rng(seed + 1)  # tissues as without lesions
    out, bids = tmp_path / "out", tmp_path / "bids"
    bids.mkdir(parents=True)
    parts, truth = [], {}
    for i in range(n_subjects + flair_only):
        sub = f"{i + 1:02d}"
        parts.append({"participant_id": f"sub-{sub}", "age": 30 + 3 * i, "sex": "MF"[(i // 2) % 2]})
        for ses in ("1", "2"):
            rows = []
            if i < n_subjects:
                meta, suffix = (MPRAGE if i % 2 == 0 else SPGR), "T1w"
                for m in TISSUE_METHODS:
                    csf, gm, wm = rng.normal(300e3, 15e3), rng.normal(650e3, 20e3), rng.normal(500e3, 20e3)
                    rows += [(m, "CSF", round(csf, 1), "n/a"), (m, "GM", round(gm, 1), "n/a"),
                             (m, "WM", round(wm, 1), "n/a"), (m, "brain", round(csf + gm + wm, 1), "n/a")]
            else:
                meta, suffix = FLAIR, "FLAIR"
            has_lesion = lesions and sub not in no_flair
            if has_lesion:
                vol = 0.0 if (i, ses) == (0, "1") else float(np.round(rng_lesion.lognormal(8.5, 0.6), 1))
                vol *= 3.0 if meta is SPGR else 1.0
                count = 0 if vol == 0 else int(rng_lesion.integers(1, 20))
                ms, other = ("lesion", "lesion", vol, count), ("wmh", "lesion", round(0.5 * vol + 7.0, 1), count + 1)
                wmh_main = wmh == "first_without_t1w" and i >= n_subjects
                rows += ([other, ms] if wmh_main else [ms, other]) if wmh else [ms]
                truth[(f"sub-{sub}", f"ses-{ses}")] = other[2:] if wmh_main else (vol, count)
            _session(out, sub, ses, meta, suffix, rows, count_column=has_lesion)
    pd.DataFrame(parts).to_csv(bids / "participants.tsv", sep="\t", index=False)
    opts = SimpleNamespace(output_dir=out, bids_dir=bids, work_dir=tmp_path / "work", participant_label=None,
                           labels_dir=None, target_labels_per_tissue=100, device="cpu", seed=0, nprocs=1)
    return SimpleNamespace(out=out, bids=bids, opts=opts, truth=truth, n_subjects=n_subjects)


def _context(study):
    ctx = pipeline.build_context(study.opts)
    ctx.logger = logging.getLogger("test.lesions")
    return ctx


def _imgs(html):
    return re.findall(r'<img[^>]*src="(data:image/png;base64,[^"]+)"', html)


def test_collect_volumes_keeps_the_count_column(tmp_path):
    study = make_study(tmp_path, n_subjects=2, flair_only=1, no_flair=("02",))
    long = collect_volumes(study.out)
    assert list(long.columns) == ["participant_id", "session_id", "acq", "run", "method", "label", "volume_mm3",
                                  "count", "path"]
    les = long[long.method == "lesion"]
    assert len(les) == 4 and les["count"].notna().all()  # sub-01 and the FLAIR-only sub-03, two sessions each
    assert les.set_index(["participant_id", "session_id"])["count"].to_dict() == {
        k: float(c) for k, (_, c) in study.truth.items()}
    assert long.loc[long.method != "lesion", "count"].isna().all()      # n/a on tissue rows, absent in 3-column tables


def test_group_volumes_lesion_columns_and_flair_only_rows(tmp_path):
    study = make_study(tmp_path, n_subjects=4, flair_only=1, no_flair=("03",))
    wide = pipeline.gather_volumes(study.out)
    assert list(wide.columns) == [*INDEX, *TISSUES, "lesion", "lesion_count"]
    assert str(wide["lesion_count"].dtype) == "Int64"
    t1w = wide[wide.method != "lesion"]
    assert len(t1w) == 4 * 2 * 2 and t1w[TISSUES].notna().all().all()
    for (pid, ses), (vol, count) in study.truth.items():
        rows = wide[(wide.participant_id == pid) & (wide.session_id == ses)]
        assert rows["lesion"].tolist() == [vol] * len(rows) and rows["lesion_count"].tolist() == [count] * len(rows)
    assert wide.loc[wide.participant_id == "sub-03", ["lesion", "lesion_count"]].isna().all().all()
    only = wide[wide.method == "lesion"]                                  # the FLAIR-only subject: one row per session
    assert only[["participant_id", "session_id"]].values.tolist() == [["sub-05", "ses-1"], ["sub-05", "ses-2"]]
    assert only[TISSUES].isna().all().all() and only["lesion"].notna().all()
    assert wide[INDEX].equals(wide.sort_values(INDEX)[INDEX])             # sorted as the tissue table is
    atomic_write_tsv(tmp_path / "group_volumes.tsv", wide)
    lines = (tmp_path / "group_volumes.tsv").read_text().splitlines()
    flair_row = next(line for line in lines if line.startswith("sub-05\tses-1\tlesion\t")).split("\t")
    assert flair_row[3:7] == ["n/a"] * 4 and flair_row[8] == str(study.truth[("sub-05", "ses-1")][1])
    assert next(line for line in lines if line.startswith("sub-03\t")).endswith("\tn/a\tn/a")
    # the tissue columns are those of the same study without lesions
    plain = pipeline.gather_volumes(make_study(tmp_path / "plain", lesions=False, n_subjects=4, flair_only=0).out)
    assert list(plain.columns) == [*INDEX, *TISSUES]
    pd.testing.assert_frame_equal(t1w[[*INDEX, *TISSUES]].reset_index(drop=True), plain)


def test_build_context_gives_flair_only_sessions_their_reference_group(tmp_path):
    study = make_study(tmp_path, n_subjects=4, flair_only=1)
    ctx = _context(study)
    flair_group = AcquisitionRecord.from_metadata(FLAIR, suffix="FLAIR").group_key
    only = ctx.volumes[ctx.volumes.method == "lesion"]
    assert set(only["acq_group"]) == {flair_group} and set(only["age"]) == {42.0}
    assert flair_group not in set(ctx.acquisitions["acq_group"])          # group_acquisitions.tsv: T1w images only
    assert ctx.volumes.loc[ctx.volumes.method != "lesion", "acq_group"].str.contains("MPRAGE|SPGR").all()


def test_tables_without_lesions_are_the_recorded_demo_tables(tmp_path, monkeypatch):
    """The demo's participant tables (no lesion rows) give, byte for byte, the recorded group tables."""
    out, bids = tmp_path / "out", tmp_path / "bids"
    for p in RECORDED.glob("sub-*/**/*_desc-volumes_morph.tsv"):
        dst = out / p.relative_to(RECORDED)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst)
    recorded = pd.read_csv(RECORDED / "group_volumes.tsv", sep="\t", dtype=str)
    bids.mkdir()
    recorded[["participant_id", "age", "sex"]].drop_duplicates().to_csv(bids / "participants.tsv", sep="\t",
                                                                         index=False)
    acq = pd.read_csv(RECORDED / "group_acquisitions.tsv", sep="\t", na_values=["n/a"], keep_default_na=False)
    monkeypatch.setattr(pipeline, "gather_acquisitions", lambda *a, **k: acq.copy())
    opts = SimpleNamespace(output_dir=out, bids_dir=bids, work_dir=tmp_path / "work", participant_label=None,
                           labels_dir=None, target_labels_per_tissue=100, device="cpu", seed=0, nprocs=1)
    ctx = pipeline.build_context(opts)
    assert not {"lesion", "lesion_count"} & set(ctx.volumes.columns)
    atomic_write_tsv(out / "group_volumes.tsv", ctx.volumes)
    sections = render(combat.run(ctx))
    assert "log(1 + volume" not in sections[0].body
    volumes_section(ctx.volumes, ctx.acquisitions, ctx.participants, output_dir=out)
    assert lesions_section(ctx.volumes, ctx.acquisitions, ctx.participants, output_dir=out) is None
    assert (out / "group_volumes.tsv").read_bytes() == (RECORDED / "group_volumes.tsv").read_bytes()
    for name in ("group_volumes_combat.tsv", "group_combat_stats.tsv", "group_combat_summary.tsv",
                 "group_volumes_summary.tsv"):
        _same_table(out / name, RECORDED / name)
    assert not (out / "group_lesions_summary.tsv").exists()


def _same_table(new: Path, old: Path):
    """Same header, rows and text, numbers equal to 1e-9 (ComBat's last digits may depend on the BLAS)."""
    a, b = new.read_text().splitlines(), old.read_text().splitlines()
    assert a[0] == b[0] and len(a) == len(b), new.name
    for line_a, line_b in zip(a[1:], b[1:]):
        for x, y in zip(line_a.split("\t"), line_b.split("\t"), strict=True):
            try:
                assert float(x) == pytest.approx(float(y), rel=1e-9, abs=1e-12), (new.name, line_a)
            except ValueError:
                assert x == y, (new.name, line_a)


def test_combat_harmonises_log_lesion_volume(tmp_path, caplog):
    study = make_study(tmp_path, n_subjects=16, flair_only=2, no_flair=("03",))
    plain = _context(make_study(tmp_path / "plain", lesions=False, n_subjects=16, flair_only=0))
    ctx = _context(study)
    with caplog.at_level(logging.WARNING):
        sections = render(combat.run(ctx))
    out = pd.read_csv(tmp_path / "out/group_volumes_combat.tsv", sep="\t", na_values=["n/a"], keep_default_na=False)
    assert len(out) == len(ctx.volumes) and list(out.columns[-2:]) == ["combat", "combat_lesion"]
    t1w = out[out.method != "lesion"]
    # tissue harmonisation is that of the same study without lesions
    combat.run(plain)
    ref = pd.read_csv(tmp_path / "plain/out/group_volumes_combat.tsv", sep="\t", na_values=["n/a"],
                      keep_default_na=False)
    np.testing.assert_allclose(t1w[TISSUES].to_numpy(float), ref[TISSUES].to_numpy(float), rtol=1e-9)
    assert (t1w["combat"] == ref["combat"].to_numpy()).all()
    # lesion: once per session, repeated on every row, >= 0; counts as measured
    sessions = out.dropna(subset=["lesion"]).drop_duplicates(["participant_id", "session_id"])
    assert (out.dropna(subset=["lesion"]).groupby(["participant_id", "session_id"])["lesion"].nunique() == 1).all()
    assert (sessions["combat_lesion"] == "harmonised").all() and (sessions["lesion"] >= 0).all()
    measured = ctx.volumes.drop_duplicates(["participant_id", "session_id"]).set_index(["participant_id", "session_id"])
    got = sessions.set_index(["participant_id", "session_id"])
    assert (got["lesion_count"] == measured.loc[got.index, "lesion_count"].astype(float)).all()
    assert not np.allclose(got["lesion"], measured.loc[got.index, "lesion"].astype(float))
    assert (out.loc[out.participant_id == "sub-03", "combat_lesion"] == "no lesion volume").all()
    assert out.loc[out.participant_id == "sub-03", "lesion"].isna().all()
    only = out[out.method == "lesion"]
    assert len(only) == 4 and (only["combat"] == "no tissue volumes").all()
    assert (only["combat_lesion"] == "harmonised").all()
    # the GE group's 3x lesion load is gone
    stats = pd.read_csv(tmp_path / "out/group_combat_stats.tsv", sep="\t")
    les = stats[stats.tissue == "lesion"]
    assert les["method"].tolist() == ["lesion"] and bool(les["harmonised"].iloc[0])
    assert les["eta2_after"].iloc[0] < 0.5 * les["eta2_before"].iloc[0]
    assert set(stats.method) == {"unet-physics", "atropos", "lesion"}
    summary = pd.read_csv(tmp_path / "out/group_combat_summary.tsv", sep="\t")
    ls = summary[summary.tissue == "lesion"]
    assert set(ls["when"]) == {"before", "after"} and len(ls) == 2 * 3       # three groups: MPRAGE, SPGR, FLAIR
    assert ls[ls.when == "before"]["n"].sum() == len(sessions)
    assert "2 session(s) have no lesion volume" in caplog.text
    body = sections[0].body
    assert "log(1 + volume in mm\u00b3)" in body and "Lesion counts are not harmonised" in body
    assert len(_imgs(body)) == 2 * 2 + 1                                   # tissue before/after per method + lesion


def test_combat_lesion_is_log_combat_transformed_back():
    rng = np.random.default_rng(1)
    n = 24
    vol = pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(n)], "session_id": "ses-1",
                        "method": "atropos", "acq_group": np.repeat(["A", "B", "C"], 8),
                        "age": rng.uniform(20, 80, n), "sex": rng.choice(["M", "F"], n),
                        "lesion": np.round(rng.lognormal(8, 1, n), 1)})
    vol.loc[:2, "lesion"] = 0.0
    out, res = combat_lesions(vol, vol.copy())
    direct = combat_volumes(vol.assign(lesion=np.log1p(vol["lesion"])), tissues=("lesion",))
    assert res.harmonized and direct.harmonized and res.covariates == direct.covariates == ["age", "sex"]
    np.testing.assert_allclose(out["lesion"], np.clip(np.expm1(direct.data["lesion"]), 0, None))
    np.testing.assert_allclose(res.data["lesion_before"], vol["lesion"])


def test_combat_lesion_with_too_few_sessions_is_left_as_measured(tmp_path, caplog):
    # lesions only in the two sessions of one subject, one acquisition group: lesion ComBat cannot run
    study = make_study(tmp_path, n_subjects=8, flair_only=0, no_flair=("02", "03", "04", "05", "06", "07", "08"))
    ctx = _context(study)
    with caplog.at_level(logging.WARNING):
        sections = render(combat.run(ctx))
    out = pd.read_csv(tmp_path / "out/group_volumes_combat.tsv", sep="\t", na_values=["n/a"], keep_default_na=False)
    assert (out.loc[out.method != "lesion", "combat"] == "harmonised").all()  # tissue ComBat unaffected
    sessions = out.dropna(subset=["lesion"]).drop_duplicates(["participant_id", "session_id"])
    assert len(sessions) == 2 and (sessions["combat_lesion"] == "not harmonised").all()
    measured = {k: v for k, (v, _) in study.truth.items()}
    assert {(r.participant_id, r.session_id): r.lesion for r in sessions.itertuples()} == measured
    assert any("ComBat (lesion)" in w and "lesion volumes are left as measured" in w for w in sections[0].warnings)
    assert "ComBat (lesion)" in caplog.text
    stats = pd.read_csv(tmp_path / "out/group_combat_stats.tsv", sep="\t")
    assert not bool(stats.loc[stats.tissue == "lesion", "harmonised"].iloc[0])


def test_group_report_has_the_lesion_section(tmp_path, monkeypatch):
    study = make_study(tmp_path, n_subjects=12, flair_only=2)
    run_steps = pipeline.run_steps
    monkeypatch.setattr(pipeline, "run_steps", lambda ctx, keys=None: run_steps(ctx, ["combat"]))
    assert pipeline._run_group(study.opts) == 0
    html = (study.out / "group.html").read_text()
    section = re.search(r'<section id="lesions">(.*?)</section>', html, re.S)
    assert section and "<h2>Lesion load by acquisition group</h2>" in section.group(1)
    assert len(_imgs(section.group(1))) == 1
    assert "1 session(s) have no lesion result" not in section.group(1)     # sub-03: 2 sessions
    assert "2 session(s) have no lesion result" in section.group(1)
    summary = pd.read_csv(study.out / "group_lesions_summary.tsv", sep="\t")
    assert list(summary.columns) == ["acquisition group", "sessions", "median volume (mL)", "median count"]
    assert summary["sessions"].sum() == len(study.truth) == 2 * (12 - 1 + 2)
    truth = pd.DataFrame([(k[0], k[1], v, c) for k, (v, c) in study.truth.items()],
                         columns=["participant_id", "session_id", "lesion", "lesion_count"])
    vols = pd.read_csv(study.out / "group_volumes.tsv", sep="\t", na_values=["n/a"], keep_default_na=False)
    groups = vols.drop_duplicates(["participant_id", "session_id"])[["participant_id", "session_id", "acq_group"]]
    truth = truth.merge(groups, on=["participant_id", "session_id"])
    for row in summary.itertuples():
        t = truth[truth.acq_group == row[1]]
        assert row[2] == len(t)
        assert row[3] == pytest.approx(t["lesion"].median() / 1000.0)
        assert row[4] == pytest.approx(t["lesion_count"].median())
    # the tissue section leaves the FLAIR-only rows out
    tissue = re.search(r'<section id="volumes">(.*?)</section>', html, re.S).group(1)
    assert "lesion: " not in tissue and "missing tissue volumes" not in tissue
    assert html.index('id="volumes"') < html.index('id="lesions"') < html.index('id="combat"')
    assert "could not be drawn" not in html and "could not run" not in html   # sites missing in one group


def test_lesion_section_only_with_lesion_data(tmp_path):
    ctx = _context(make_study(tmp_path, lesions=False, n_subjects=4, flair_only=0))
    assert lesions_section(ctx.volumes, ctx.acquisitions, ctx.participants) is None
    assert lesions_section(ctx.volumes.assign(lesion=np.nan), ctx.acquisitions) is None
    assert lesions_section(None) is None and lesions_section(pd.DataFrame()) is None
    report = write_group_report(tmp_path, [volumes_section(ctx.volumes, ctx.acquisitions, ctx.participants)],
                                command_line="scanbridge bids out group")
    assert "Lesion load" not in report.read_text()


def test_a_second_lesion_method_is_not_counted_twice(tmp_path):
    """The WMH baseline's rows change nothing in group_volumes.tsv; where it is a session's main answer (listed
    first) its numbers are the session's lesion columns and a FLAIR-only session's row is of method wmh."""
    plain = pipeline.gather_volumes(make_study(tmp_path / "plain", n_subjects=4, flair_only=2).out)
    beside = pipeline.gather_volumes(make_study(tmp_path / "beside", n_subjects=4, flair_only=2, wmh="after").out)
    pd.testing.assert_frame_equal(beside, plain)
    study = make_study(tmp_path / "main", n_subjects=4, flair_only=2, wmh="first_without_t1w")
    wide = pipeline.gather_volumes(study.out)
    assert list(wide.columns) == [*INDEX, *TISSUES, "lesion", "lesion_count"]
    assert wide.groupby(["participant_id", "session_id", "method"]).size().max() == 1
    only = wide[wide[TISSUES].isna().all(axis=1)]
    assert set(only.method) == {"wmh"} and set(only.participant_id) == {"sub-05", "sub-06"} and len(only) == 4
    assert set(wide.method) == {"unet-physics", "atropos", "wmh"}
    for (pid, ses), (vol, count) in study.truth.items():
        rows = wide[(wide.participant_id == pid) & (wide.session_id == ses)]
        assert rows["lesion"].tolist() == [vol] * len(rows) and rows["lesion_count"].tolist() == [count] * len(rows)
    # the group steps read the wmh rows as lesion-only rows, as they read those of method lesion
    ctx = _context(study)
    flair_group = AcquisitionRecord.from_metadata(FLAIR, suffix="FLAIR").group_key
    assert set(ctx.volumes.loc[ctx.volumes.method == "wmh", "acq_group"]) == {flair_group}
    render(combat.run(ctx))
    out = pd.read_csv(tmp_path / "main/out/group_volumes_combat.tsv", sep="\t", na_values=["n/a"],
                      keep_default_na=False)
    assert len(out) == len(ctx.volumes) and (out.loc[out.method == "wmh", "combat"] == "no tissue volumes").all()
    stats = pd.read_csv(tmp_path / "main/out/group_combat_stats.tsv", sep="\t")
    assert set(stats.method) == {"unet-physics", "atropos", "lesion"}  # lesion: the lesion column
    section = volumes_section(ctx.volumes, ctx.acquisitions, ctx.participants)
    assert "wmh:" not in section.body and "missing tissue volumes" not in " ".join(section.warnings)
    lesions = lesions_section(ctx.volumes, ctx.acquisitions, ctx.participants)
    assert f"{len(study.truth)} session(s) with a lesion segmentation" in lesions.body
