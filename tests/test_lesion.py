"""The lesion method: model, trainer, location classes, lesion filling and the method wiring."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch")


def tiny_label_map(path, n=72):
    """A 1 mm label map with FreeSurfer labels: ventricles (4) in cerebral WM (2), cortex (3), CSF (24),
    brainstem (16) below, background outside."""
    g = np.arange(n) - n / 2
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + (z - 6) ** 2)
    lab = np.zeros((n, n, n), np.int16)
    lab[r < 31] = 24
    lab[r < 29] = 3
    lab[r < 25] = 2
    lab[(np.abs(x) < 9) & (np.abs(y) < 4) & (np.abs(z - 8) < 8)] = 4
    lab[(np.abs(x) < 5) & (np.abs(y) < 5) & (z < -12) & (z > -30)] = 16
    nib.save(nib.Nifti1Image(lab, np.eye(4)), path)
    return path


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    from bidsapp.training import lesion as T

    return T.load_head(tiny_label_map(tmp_path_factory.mktemp("anat") / "anat-01_dseg.nii.gz"))


# ------------------------------------------------------------------------------------------ losses
def test_domain_losses_follow_the_paper():
    from bidsapp.training.losses import domain_loss

    d = torch.tensor([0, 2])
    sure = torch.tensor([[20.0, 0, 0], [0, 0, 20.0]])
    assert domain_loss("pc", sure, d).item() == pytest.approx(1.0, abs=1e-3)  # eq. 3: correlated = 1
    assert domain_loss("pc", -sure, d).item() < 0
    flat = torch.zeros(2, 3)
    assert domain_loss("du", flat, d).item() == pytest.approx(math.log(3), abs=1e-5)  # minimum at uniform
    assert domain_loss("du", sure, d).item() > math.log(3)
    g = torch.Generator().manual_seed(0)
    assert domain_loss("rand", flat, d, generator=g).item() == pytest.approx(math.log(3), abs=1e-5)
    with pytest.raises(ValueError, match="unknown domain loss"):
        domain_loss("xx", flat, d)


def test_cross_entropy_term_penalises_a_confident_rim_that_dice_alone_tolerates():
    from bidsapp.training.losses import lesion_loss

    target = torch.zeros(1, 4, 8, 8, 8)
    target[:, 0, 2:6, 2:6, 2:6] = 1.0
    sharp = torch.where(target > 0, 12.0, -12.0)
    rim = sharp.clone()
    rim[:, 0, 1:7, 1:7, 1:7] = torch.where(target[:, 0, 1:7, 1:7, 1:7] > 0, 12.0, 0.5)  # p = 0.62 next to it
    dice, both = lesion_loss(), lesion_loss(bce=True)
    added = both(rim, target) - dice(rim, target)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(rim[:, :1], target[:, :1])
    assert added.item() == pytest.approx(bce.item(), rel=1e-5)
    # the rim costs Dice + BCE more than it costs Dice alone
    assert both(rim, target) - both(sharp, target) > dice(rim, target) - dice(sharp, target) + 0.1


def test_an_unknown_lesion_loss_is_refused_not_trained_as_dice(tmp_path):
    from bidsapp.training.lesion import TrainConfig, train

    cfg = TrainConfig(anatomy_dir=str(tmp_path), out=str(tmp_path / "run"), lesion_loss="focal")
    with pytest.raises(ValueError, match="unknown lesion loss 'focal'"):
        train(cfg, heads=[])


# ------------------------------------------------------------------------------------------ model
def test_network_has_a_domain_head_only_for_training():
    from bidsapp.models.lesion import ARCHITECTURE, CHANNELS, OUTPUTS, build_network
    from bidsapp.models.registry import shipped_state

    arch = {"class": ARCHITECTURE["class"], "kwargs": dict(ARCHITECTURE["kwargs"], features=[4, 4, 4, 4, 8, 4])}
    net = build_network(arch, n_domains=5)
    x = torch.rand(2, len(CHANNELS), 32, 32, 32)
    logits, dom = net(x, with_domain=True)
    assert logits.shape == (2, len(OUTPUTS), 32, 32, 32) and dom.shape == (2, 5)
    state = shipped_state(net)
    assert not any(k.startswith("domain_head") for k in state)
    plain = build_network(arch)
    plain.load_state_dict(state)  # the shipped weights load without the head
    net.eval(), plain.eval()
    assert torch.allclose(plain(x), net(x))


def test_lesion_table_locations_and_sizes():
    from bidsapp.metrics.lesions import label_lesions
    from bidsapp.models.lesion import MIN_LESION_MM3, lesion_table

    shape = (40, 40, 40)
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    vent = np.zeros(shape, np.float32)
    vent[18:22, 18:22, 18:22] = 1
    cortex = np.zeros(shape, np.float32)
    cortex[:, :, 36:] = 1
    infra = np.zeros(shape, np.float32)
    infra[:, :, :6] = 1
    mask = np.zeros(shape, bool)
    mask[22:24, 19:21, 19:21] = True      # touches the ventricles
    mask[5:8, 5:8, 34:36] = True          # next to the cortex
    mask[30:33, 30:33, 25:27] = True      # deep
    mask[10:12, 30:32, 2:4] = True        # infratentorial
    mask[2, 2, 20] = True                 # 2 mm^3: below the minimum
    cleaned = label_lesions(mask, (1.0, 1.0, 2.0), MIN_LESION_MM3)[0] > 0
    assert not cleaned[2, 2, 20] and cleaned[30, 30, 25]
    rows = lesion_table(cleaned, aff, {"ventricles": vent, "cortex": cortex, "infratentorial": infra})
    by_x = {r["centroid_x_mm"]: r for r in rows}
    assert len(rows) == 4
    assert by_x[22.5]["location"] == "periventricular" and by_x[22.5]["volume_mm3"] == 16.0
    assert by_x[6.0]["location"] == "juxtacortical"
    assert by_x[31.0]["location"] == "deep white matter"
    assert by_x[10.5]["location"] == "infratentorial"
    assert by_x[31.0]["centroid_z_mm"] == pytest.approx(51.0)  # voxel 25.5 at 2 mm
    assert lesion_table(np.zeros(shape, bool), aff, {}) == []


# ------------------------------------------------------------------------------------------ training
def test_scanners_are_reproducible_and_flair_nulls_csf():
    from bidsapp.physics import equations
    from bidsapp.physics.tissues import properties
    from bidsapp.training import lesion as T

    a = T.make_scanners(5, np.random.default_rng(3))
    b = T.make_scanners(5, np.random.default_rng(3))
    assert [s.describe() for s in a] == [s.describe() for s in b]
    csf = properties("CSF", 3.0)
    ti = T.flair_null_ti(9.0, csf.t1)
    s = equations.signal("FLAIR", csf.pd, csf.t1, csf.t2, csf.t2s, {"tr": 9.0, "te": 0.1, "ti": ti})
    wm = properties("WM", 3.0)
    s_wm = equations.signal("FLAIR", wm.pd, wm.t1, wm.t2, wm.t2s, {"tr": 9.0, "te": 0.1, "ti": ti})
    assert abs(float(s)) < 0.02 * float(s_wm)


def test_head_pools_cover_every_lesion_kind(head):
    assert set(head.pools) == {"periventricular", "deep", "juxtacortical", "infratentorial"}
    assert head.class_volume.sum() > 0


def test_synthetic_patches_show_lesions_bright_on_flair(head):
    from bidsapp.models.lesion import CHANNELS, NEEDS
    from bidsapp.training import lesion as T

    synth = T.LesionSynth([head], T.make_scanners(3, np.random.default_rng(0)), size=24, seed=1,
                          dropout_contrasts=False)
    brighter = []
    for _ in range(6):
        x, y, d, present = synth.sample()
        assert x.shape == (4, 24, 24, 24) and y.shape == (4, 24, 24, 24) and 0 <= d < 3
        assert float(y.min()) >= 0 and float(y.max()) <= 1
        lesion = y[0] > 0.9
        wm_like = (y[0] == 0) & (y[1] == 0) & (y[2] == 0) & (x[0] > 0)
        if lesion.sum() > 5 and wm_like.sum() > 5:
            brighter.append(float(x[0][lesion].mean()) > float(x[0][wm_like].median()))
    assert brighter and np.mean(brighter) >= 0.8
    synth = T.LesionSynth([head], T.make_scanners(3, np.random.default_rng(0)), size=16, seed=2)
    for _ in range(8):
        x, _, _, present = synth.sample()
        assert any(c in NEEDS for c in present)
        for i, c in enumerate(CHANNELS):
            assert (c in present) == bool(x[i].abs().sum() > 0)


def test_graded_lesions_keep_the_target_and_show_part_of_the_contrast(head, monkeypatch):
    """``graded``: the target is the whole lesion whatever share of its contrast the image shows."""
    from bidsapp.physics import lesions as P
    from bidsapp.training import lesion as T

    def sample(mode, share=None):
        if share is not None:  # a fixed share, drawing nothing: the random stream stays that of ``full``
            monkeypatch.setattr(P, "draw_contrast", lambda specs, rng: [(share, share)] * len(specs))
        synth = T.LesionSynth([head], T.make_scanners(2, np.random.default_rng(0)), size=24, seed=4,
                              dropout_contrasts=False, lesion_contrast=mode)
        return [synth.sample()[:2] for _ in range(3)]

    full = sample("full")
    same = sample("graded", 1.0)
    hidden = sample("graded", 0.0)
    lesion_seen = False
    for (xf, yf), (xs, ys), (xh, yh) in zip(full, same, hidden):
        assert torch.equal(xf, xs) and torch.equal(yf, ys) and torch.equal(yf, yh)
        lesion = yf[0] > 0.9
        if lesion.sum() > 5:  # with no contrast shown the lesions are white matter on every contrast
            lesion_seen = True
            assert float((xh[0][lesion] - xf[0][lesion]).abs().mean()) > 0.05
    assert lesion_seen
    with pytest.raises(ValueError, match="lesion_contrast"):
        T.LesionSynth([head], [], lesion_contrast="bright")


def test_wide_lesion_load_puts_more_lesion_in_the_patches(head):
    from bidsapp.training import lesion as T

    def lesion_voxels(load):
        synth = T.LesionSynth([head], T.make_scanners(2, np.random.default_rng(0)), size=24, seed=5,
                              lesion_load=load)
        return [float((synth.sample()[1][0] >= 0.5).sum()) for _ in range(12)]

    assert np.mean(lesion_voxels("wide")) > 1.3 * np.mean(lesion_voxels("typical"))
    with pytest.raises(ValueError, match="lesion_load"):
        T.LesionSynth([head], [], lesion_load="heavy")


def test_contrast_map_fades_from_core_to_edge():
    from bidsapp.physics.lesions import LesionSpec, contrast_map, draw_contrast

    spec = LesionSpec("deep", (16.0, 16.0, 16.0), (6.0, 6.0, 6.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0, 0.0))
    share = contrast_map((32, 32, 32), np.eye(4), [spec], [(0.8, 0.2)])
    assert share[16, 16, 16] == pytest.approx(0.8)
    assert share[16, 16, 21] == pytest.approx(0.8 - 0.6 * (5 / 6) ** 2, abs=1e-5)
    assert share[16, 16, 22] == pytest.approx(0.2, abs=1e-5) and share[0, 0, 0] == 1.0
    drawn = draw_contrast([spec] * 50, np.random.default_rng(0))
    assert all(0.3 <= c <= 1.0 and 0.5 * c <= e <= c for c, e in drawn)


def test_training_resumes_exactly(head, tmp_path):
    from bidsapp.training import lesion as T

    kw = dict(anatomy_dir=str(tmp_path), iterations=3, batch=1, size=32, scanners=3, features="4,4,4,4,8,4",
              checkpoint_every=1, threads=1)
    whole = T.train(T.TrainConfig(out=str(tmp_path / "a"), **kw), heads=[head], progress=lambda m: None)
    part = T.train(T.TrainConfig(out=str(tmp_path / "b"), **kw), heads=[head], progress=lambda m: None,
                   stop_after=2)
    assert not part["finished"]
    rest = T.train(T.TrainConfig(out=str(tmp_path / "b"), **kw), heads=[head], progress=lambda m: None)
    assert rest["finished"] and rest["loss"] == pytest.approx(whole["loss"])
    card = T.save(rest["net"], T.TrainConfig(out=str(tmp_path / "b"), heads="anat-01", **kw), rest,
                  weights_dir=tmp_path / "w")
    assert card["training"]["command"].startswith("scanbridge-train lesion --anatomy-dir")
    assert "--domain-loss" not in card["training"]["command"]  # the default: rand
    assert "--lesion-loss" not in card["training"]["command"]  # the default: the paper's soft Dice
    stage = T.TrainConfig(out=str(tmp_path / "c"), init_from=str(tmp_path / "a" / "checkpoint.pt"),
                          **dict(kw, iterations=1, lr=1e-4))
    hist = T.train(stage, heads=[head], progress=lambda m: None)
    card = T.save(hist["net"], stage, hist, weights_dir=tmp_path / "w2")
    assert len(card["training"]["stages"]) == 2 and "--init-from" in card["training"]["stages"][1]
    with pytest.raises(SystemExit, match="another recipe"):
        T.train(T.TrainConfig(out=str(tmp_path / "b"), **dict(kw, scanners=4)), heads=[head], progress=lambda m: None)



def test_bfloat16_training_runs_the_forward_pass_in_bfloat16_and_says_so_in_the_card(head, tmp_path):
    from bidsapp.training import lesion as T

    kw = dict(anatomy_dir=str(tmp_path), iterations=2, batch=1, size=32, scanners=3, features="4,4,4,4,8,4",
              checkpoint_every=1, threads=1)
    fp32 = T.train(T.TrainConfig(out=str(tmp_path / "a"), **kw), heads=[head], progress=lambda m: None)
    said = []
    bf16 = T.train(T.TrainConfig(out=str(tmp_path / "b"), precision="bfloat16", **kw), heads=[head],
                   progress=said.append)
    assert any("bfloat16 mixed precision" in m for m in said)
    # the same batch and weights: the first loss differs only by the forward pass's rounding
    assert bf16["loss"][0] != fp32["loss"][0] and bf16["loss"][0] == pytest.approx(fp32["loss"][0], rel=0.05)
    card = T.save(bf16["net"], T.TrainConfig(out=str(tmp_path / "b"), precision="bfloat16", heads="anat-01", **kw),
                  bf16, weights_dir=tmp_path / "w")
    assert card["training"]["precision"] == "bfloat16" and "--precision bfloat16" in card["training"]["command"]
    with pytest.raises(SystemExit, match="another recipe"):  # a float32 run does not resume in bfloat16
        T.train(T.TrainConfig(out=str(tmp_path / "a"), precision="bfloat16", **kw), heads=[head],
                progress=lambda m: None)


# ------------------------------------------------------------------------------------------ filling
def test_fill_lesions_moves_lesion_voxels_to_white_matter():
    from workflows.interfaces.lesion import fill_lesions

    dseg = np.array([[[0, 1, 2, 3, 2]]], np.uint8)
    probs = np.zeros((3, 1, 1, 5), np.float32)
    for i, v in enumerate(dseg.ravel()):
        if v:
            probs[v - 1, 0, 0, i] = 1.0
    lesion = np.array([[[True, True, True, False, False]]])
    out, p = fill_lesions(dseg, probs, lesion)
    assert out.ravel().tolist() == [0, 3, 3, 3, 2]
    assert p[:, 0, 0, 1].tolist() == [0, 0, 1] and p[:, 0, 0, 4].tolist() == [0, 1, 0]
    assert np.allclose(p.sum(0), probs.sum(0))


def test_merge_volume_tables_keeps_lesion_counts(tmp_path):
    from workflows.interfaces.ants import merge_volume_tables

    (tmp_path / "a.tsv").write_text("method\tlabel\tvolume_mm3\nunet\tGM\t10.0\n")
    (tmp_path / "b.tsv").write_text("method\tlabel\tvolume_mm3\tcount\nlesion\tlesion\t5.0\t2\n")
    out = merge_volume_tables([tmp_path / "a.tsv", tmp_path / "b.tsv"], tmp_path / "m.tsv")
    assert open(out).read().splitlines() == ["method\tlabel\tvolume_mm3\tcount", "unet\tGM\t10.0\tn/a",
                                              "lesion\tlesion\t5.0\t2"]
    out = merge_volume_tables([tmp_path / "a.tsv"], tmp_path / "n.tsv")
    assert open(out).read().splitlines()[0] == "method\tlabel\tvolume_mm3"


# ------------------------------------------------------------------------------------------ method
def test_lesion_method_runs_on_sessions_with_a_hyperintense_contrast():
    from bidsapp import methods as M

    m = M.get("lesion")
    assert m.contrasts_used(["T1w", "FLAIR", "T2w"]) == ("FLAIR", "T1w", "T2w")
    assert m.contrasts_used(["T2w"]) == ("T2w",)
    plan = M.plan_session(M.select(), ["T1w"])
    assert "lesion" not in plan.run and any(s.startswith("lesion skipped: needs FLAIR or T2w or PDw") for s in plan.skipped)
    assert M.plan_session(M.select(), ["FLAIR"]).run == ["lesion", "wmh"]  # and the FLAIR-only WMH model


def test_session_methods_fill_lesions_into_tissue_outputs():
    from workflows.methods import init_session_methods_wf

    wf = init_session_methods_wf(("atropos", "lesion"), ["T1w", "FLAIR"], options={"omp_nthreads": 1})
    fill = wf.get_node("fill_atropos")
    assert fill is not None
    seg = wf.get_node("seg_lesion")
    assert seg.inputs.in_contrast == "FLAIR"
    edges = {(u.name, v.name) for u, v in wf._graph.edges()}
    assert ("seg_lesion", "fill_atropos") in edges and ("fill_atropos", "outputnode") in edges
    direct = {dst for u, v, d in wf._graph.edges(data=True) if u.name == "seg_atropos" and v.name == "outputnode"
              for _, dst in d["connect"]}
    assert direct == {"atropos_warnings"}  # its images, volumes and sidecar reach the outputs only filled
    plain = init_session_methods_wf(("atropos",), ["T1w"], options={"omp_nthreads": 1})
    assert plain.get_node("fill_atropos") is None


def _tiny_session(head):
    """A simulated session of the tiny head (all contrasts, 1 mm) and its truth."""
    from bidsapp.training import lesion as T

    sc = T.make_scanners(1, np.random.default_rng(5))[0]
    return T.simulate_session(head, sc, np.random.default_rng(1), torch.Generator().manual_seed(1),
                              n_lesions={"periventricular": 3, "deep": 3})


def test_segment_does_not_depend_on_orientation_or_dtype(head):
    """The same session stored as RAS float and as LPS-permuted uint16 gives the same lesions."""
    from bidsapp.models.lesion import segment

    ses = _tiny_session(head)
    images = {c: ses["images"][c] for c in ("FLAIR", "T1w")}
    ras = segment(images, ses["brain"], np.eye(4), (1.0, 1.0, 1.0))
    assert ras.contrasts == ("FLAIR", "T1w")
    assert ras.probability.shape == ses["brain"].shape and 0 <= ras.probability.min() <= ras.probability.max() <= 1
    # LPS with the axes permuted (z, x, y): a different voxel order of the same world
    perm = (2, 0, 1)
    n = ses["brain"].shape
    aff = np.zeros((4, 4))
    aff[3, 3] = 1
    aff[2, 0], aff[0, 1], aff[1, 2] = 1.0, -1.0, -1.0
    aff[:3, 3] = [n[0] - 1, n[1] - 1, 0]

    def store(a):
        return np.flip(np.flip(np.transpose(a, perm), 1), 2)

    scale = 4000 / max(float(v.max()) for v in images.values())
    lps = segment({c: np.round(store(v) * scale).astype(np.uint16) for c, v in images.items()},
                  store(ses["brain"]), aff, (1.0, 1.0, 1.0))
    assert (store(ras.mask) != lps.mask).sum() <= 0.02 * max(int(ras.mask.sum()), 50)  # uint16 rounding at 0.5
    assert np.allclose(store(ras.probability), lps.probability, atol=0.02)


def test_segment_refuses_sessions_without_a_hyperintense_contrast(head):
    from bidsapp.models.lesion import segment

    ses = _tiny_session(head)
    with pytest.raises(ValueError, match="needs one of FLAIR, T2w, PDw"):
        segment({"T1w": ses["images"]["T1w"]}, ses["brain"], np.eye(4), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="brain mask is empty"):
        segment({"FLAIR": ses["images"]["FLAIR"]}, np.zeros_like(ses["brain"]), np.eye(4), (1.0, 1.0, 1.0))


def test_mirrored_reading_is_exactly_left_right_symmetric():
    """Averaging each window with its left-right mirror makes the output of a mirrored input the mirrored
    output (a network alone is not: its weights are not symmetric)."""
    import torch

    from bidsapp.models import lesion as L

    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 3, 3, padding=1).eval()
    x = np.random.default_rng(0).random((2, 24, 20, 16)).astype(np.float32)
    flipped = np.ascontiguousarray(x[:, ::-1])
    one = L.predict(net, x, mirror=False)
    assert not np.allclose(L.predict(net, flipped, mirror=False), one[:, ::-1], atol=1e-4)
    both = L.predict(net, x, mirror=True)
    assert np.allclose(L.predict(net, flipped, mirror=True), both[:, ::-1], atol=1e-5)
    assert both.shape == (3, 24, 20, 16) and 0 <= both.min() and both.max() <= 1


# ------------------------------------------------------------------------------------------ mask threshold
def test_segment_cuts_the_mask_at_the_threshold_asked_for(head):
    from bidsapp.models import lesion as L

    ses = _tiny_session(head)
    images = {c: ses["images"][c] for c in ("FLAIR", "T1w")}
    default = L.segment(images, ses["brain"], np.eye(4), (1.0, 1.0, 1.0))
    assert default.threshold == L.THRESHOLD == 0.5
    low = L.segment(images, ses["brain"], np.eye(4), (1.0, 1.0, 1.0), threshold=0.05)
    high = L.segment(images, ses["brain"], np.eye(4), (1.0, 1.0, 1.0), threshold=0.95)
    assert low.threshold == 0.05 and high.threshold == 0.95
    assert np.allclose(low.probability, high.probability)  # the probability map does not depend on the cut
    assert high.mask.sum() < default.mask.sum() < low.mask.sum()
    assert not (high.mask & ~default.mask).any() and not (default.mask & ~low.mask).any()
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            L.segment(images, ses["brain"], np.eye(4), (1.0, 1.0, 1.0), threshold=bad)


def test_mixed_lesion_contrast_shows_each_patch_full_or_graded(monkeypatch):
    """``mixed``: a patch shows every lesion whole or graded, about half each; the target is untouched."""
    from bidsapp.physics import lesions as P
    from bidsapp.physics.tissues import CLASSES
    from bidsapp.training import lesion as T

    monkeypatch.setattr(P, "draw_contrast", lambda specs, rng: [(0.0, 0.0)] * len(specs))
    monkeypatch.setattr(P, "contrast_map", lambda shape, affine, specs, contrast: np.zeros(shape, np.float32))
    frac = np.zeros((len(CLASSES), 4, 4, 4), np.float32)
    frac[CLASSES.index("lesion")] = 1.0
    rng = np.random.default_rng(0)
    graded = [float(T.shown(frac, np.eye(4), ["a lesion"], "mixed", rng)[CLASSES.index("lesion")].sum()) == 0
              for _ in range(40)]
    assert 10 <= sum(graded) <= 30
    assert frac[CLASSES.index("lesion")].min() == 1.0
