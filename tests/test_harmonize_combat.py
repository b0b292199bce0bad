"""ComBat on volumes and acquisition-group helpers."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from bidsapp.harmonize.combat import combat_volumes, group_effect, run
from bidsapp.harmonize.context import GroupContext
from bidsapp.bids.tables import normalize_ids
from bidsapp.harmonize.groups import choose_source_group, session_groups, summarize_groups
from bidsapp.reports.harmonization import render


def _volumes(n_per=10, groups=("A", "B", "C"), shift=80e3, seed=0):
    rng = np.random.default_rng(seed)
    n = n_per * len(groups)
    df = pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(n)], "session_id": "n/a",
                       "method": "atropos", "acq_group": np.repeat(groups, n_per), "site": np.repeat(groups, n_per),
                       "age": rng.uniform(20, 80, n), "sex": rng.choice(["M", "F"], n)})
    for t, m in (("CSF", 300e3), ("GM", 600e3), ("WM", 500e3)):
        df[t] = m + rng.normal(0, 20e3, n)
    df.loc[df.acq_group == groups[-1], "GM"] += shift            # the scanner effect
    df["brain"] = df.CSF + df.GM + df.WM
    return df


def test_combat_removes_added_batch_shift():
    df = _volumes()
    res = combat_volumes(df)
    assert res.harmonized and res.covariates == ["age", "sex"] and not res.messages
    assert group_effect(df, "GM")["eta2"] > 0.6
    assert group_effect(res.data, "GM")["eta2"] < 0.1
    gm = res.data.groupby("acq_group")["GM"].mean()
    assert gm.max() - gm.min() < 20e3                             # the 80 mL shift is gone
    assert (res.data["combat"] == "harmonised").all()


def test_combat_single_group_and_singletons():
    one = combat_volumes(_volumes(groups=("A",)))
    assert not one.harmonized and "only one acquisition group" in one.messages[0]
    df = _volumes()
    df.loc[0, "acq_group"] = "lonely"
    res = combat_volumes(df)
    assert res.harmonized and any("lonely have a single session" in m for m in res.messages)
    assert res.data.loc[0, "combat"] == "single session in group"
    assert res.data.loc[0, "GM"] == df.loc[0, "GM"]               # left as measured


def test_combat_covariate_problems():
    df = _volumes()
    df["sex"] = np.where(df.acq_group == "A", "M", "F")
    df.loc[df.acq_group == "B", "sex"] = "M"
    df.loc[:3, "age"] = np.nan                                   # 4 of 30 missing: imputed
    res = combat_volumes(df)
    assert res.harmonized and res.covariates == ["age"]
    assert any("imputed" in m for m in res.messages)
    df["age"] = np.nan
    df.loc[:5, "age"] = 30.0                                     # mostly missing: dropped
    res = combat_volumes(df.drop(columns="sex"))
    assert res.covariates == [] and any("age is missing" in m for m in res.messages)


def test_run_writes_tables_and_section(tmp_path):
    vol = pd.concat([_volumes(), _volumes().assign(method="unet-physics")], ignore_index=True)
    vol = vol.drop(columns=["age", "sex"])
    parts = pd.DataFrame({"participant_id": [f"{i:02d}" for i in range(30)], "age": np.linspace(20, 80, 30),
                          "sex": ["M", "F"] * 15})
    ctx = GroupContext(output_dir=tmp_path, work_dir=tmp_path, volumes=vol, acquisitions=pd.DataFrame(),
                       participants=parts, logger=logging.getLogger("test.combat"))
    sections = render(run(ctx))
    assert len(sections) == 1 and "data:image/png" in sections[0].body
    out = pd.read_csv(tmp_path / "group_volumes_combat.tsv", sep="\t")
    assert len(out) == 60 and set(out.method) == {"atropos", "unet-physics"}
    stats = pd.read_csv(tmp_path / "group_combat_stats.tsv", sep="\t")
    gm = stats[(stats.method == "atropos") & (stats.tissue == "GM")].iloc[0]
    assert gm.eta2_after < gm.eta2_before and gm.covariates == "age,sex"
    assert (tmp_path / "group_combat_summary.tsv").is_file()


def test_run_single_group_message(tmp_path, caplog):
    ctx = GroupContext(output_dir=tmp_path, work_dir=tmp_path, volumes=_volumes(groups=("A",)),
                       acquisitions=pd.DataFrame(), participants=pd.DataFrame(), logger=logging.getLogger("t.c"))
    with caplog.at_level(logging.WARNING):
        sections = render(run(ctx))
    assert "only one acquisition group" in sections[0].warnings[0] and "only one acquisition group" in caplog.text
    assert (tmp_path / "group_volumes_combat.tsv").is_file()


def test_groups_summary_and_source():
    acq = pd.DataFrame({"participant_id": ["01", "01", "02", "03"], "session_id": ["1", "2", "1", None],
                        "acq_group": ["g1", "g1", "g2", "g2"], "suffix": "T1w",
                        "manufacturer": ["Siemens", "Siemens", "GE", "GE"], "field_strength": [1.5, 1.5, 3.0, 3.0],
                        "repetition_time": [0.0138, 0.0138, 0.0079, 0.0079]})
    s = summarize_groups(acq)
    assert list(s.acq_group) == ["g1", "g2"] and list(s.n_sessions) == [2, 2] and list(s.n_subjects) == [1, 2]
    assert s.loc[0, "Manufacturer"] == "Siemens" and s.loc[1, "RepetitionTime"] == 0.0079
    sg = session_groups(acq)
    assert list(sg.participant_id) == ["sub-01", "sub-01", "sub-02", "sub-03"] and sg.session_id.iloc[3] == ""
    assert normalize_ids(pd.DataFrame({"participant_id": ["sub-1"], "session_id": ["n/a"]})).session_id[0] == ""
    assert choose_source_group({"a": 3, "b": 5}) == "b"
    assert choose_source_group({"a": 5, "b": 5}, {"a": 9, "b": 2}) == "a"
    assert choose_source_group({"a": 0}) is None
