"""Learned brain extraction: the shipped network, its sanity check and fallback, and its training."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bidsapp.metrics.overlap import dice
from bidsapp.models import brainmask as bm


@pytest.fixture(scope="module")
def head():
    """A deformed ICBM152 head (skull, scalp, fat) simulated as a 1.5T SPGR and a 3T FLAIR at 2 mm."""
    from bidsapp.physics.phantom import from_icbm152, make_subject
    from bidsapp.physics.protocols import get_protocol
    from bidsapp.physics.simulator import simulate

    rng = np.random.default_rng(7)
    ph = make_subject(from_icbm152(resolution=2), rng, resolution=2.0)
    out = {}
    for name, proto, vs in (("spgr", "mrainet-1.5T-spgr", 2.0), ("flair", "siemens-3T-flair", (2.0, 2.0, 5.0))):
        sim = simulate(ph, get_protocol(proto), rng, voxel_size=vs)
        out[name] = (sim.image, sim.truth.brain_mask)
    return out


def test_sanity_check_names_what_is_implausible():
    assert bm.sanity_check(1400.0, [1400.0, 3.0]) is None
    assert "outside the plausible" in bm.sanity_check(300.0, [300.0])
    assert "outside the plausible" in bm.sanity_check(2600.0, [2600.0])
    assert "2 large components" in bm.sanity_check(1400.0, [1200.0, 200.0])


def test_postprocess_keeps_the_largest_component_with_holes_filled():
    prob = np.zeros((20, 20, 20), np.float32)
    prob[2:12, 2:12, 2:12] = 0.9
    prob[6, 6, 6] = 0.1  # a hole
    prob[15:18, 15:18, 15:18] = 0.8  # a second, smaller blob
    mask, sizes = bm.postprocess(prob)
    assert mask[6, 6, 6] and not mask[16, 16, 16]
    assert mask.sum() == 1000 and sizes == [999, 27]


@pytest.mark.parametrize("name", ["spgr", "flair"])
def test_shipped_network_finds_the_brain_on_any_contrast_and_grid(head, name):
    img, truth = head[name]
    res = bm.extract(img, device="cpu")
    assert res.mask.shape == img.shape
    assert dice(res.mask, truth) >= 0.9
    assert res.problem is None and res.model["sha256"] == bm.load_model()[1]["sha256"]
    data = np.asarray(img.dataobj, np.float32)
    assert bm.contrast_problem(data, res.mask, 0.008) is None  # a brain has tissue contrast
    flat = np.where(res.mask, 100.0 + (data > np.median(data[res.mask])), 0.0)  # two "tissues" 1 % apart
    assert "no tissue contrast" in bm.contrast_problem(flat, res.mask, 0.008)


def test_mirrored_reading_is_symmetric_and_differs_from_one_reading(head):
    """Test-time mirroring: the mirror image of a head gets the mirror image of its probability (the
    padding of the odd-sized grid included), and the average is not the plain reading."""
    net, _ = bm.load_model()
    vol = np.asarray(head["spgr"][0].dataobj, np.float32)[:, :-3]  # sizes that need padding
    both = bm.predict_probability(net, vol, mirror=True)
    assert both.shape == vol.shape
    np.testing.assert_allclose(bm.predict_probability(net, vol[::-1].copy(), mirror=True)[::-1], both, atol=1e-5)
    assert np.abs(bm.predict_probability(net, vol, mirror=False) - both).max() > 1e-3


def test_mask_follows_the_image_whatever_its_voxel_order(head):
    img, _ = head["spgr"]
    ras = nib.as_closest_canonical(img)
    lps_data = np.asarray(ras.dataobj)[::-1, ::-1, :]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = (np.array(ras.shape) - 1) * [1, 1, 0]
    lps = nib.Nifti1Image(np.ascontiguousarray(lps_data), ras.affine @ flip)
    a = bm.extract(ras).mask
    b = bm.extract(lps).mask[::-1, ::-1, :]
    assert dice(a, b) >= 0.99


def test_mask_of_a_sagittally_stored_anisotropic_image_is_the_same_mask(head):
    """Axes cycled (a sagittal acquisition stored A-S-L) with 2 x 2 x 5 mm voxels: the network must see
    the same brain, which needs the voxel sizes permuted as the axes are (tissue.ras_zooms)."""
    from bidsapp.models.tissue import ras_zooms

    img, truth = head["flair"]
    data = np.asarray(img.dataobj, np.float32)
    cycled = np.ascontiguousarray(np.transpose(data, (1, 2, 0)))  # stored axis k is the original axis (1, 2, 0)[k]
    aff = img.affine[:, [1, 2, 0, 3]]
    res = bm.extract(nib.Nifti1Image(cycled, aff))
    back = np.transpose(res.mask, (2, 0, 1))
    assert dice(back, bm.extract(img).mask) >= 0.98 and dice(back, truth) >= 0.9
    ornt = nib.orientations.io_orientation(aff)
    assert list(ras_zooms(nib.Nifti1Image(cycled, aff).header.get_zooms(), ornt)) == \
        list(ras_zooms(img.header.get_zooms(), nib.orientations.io_orientation(img.affine)))


def test_a_field_of_view_that_cuts_through_the_brain_keeps_the_brain_to_its_edge(head, monkeypatch):
    """A 2D stack that misses the vertex: the brain reaches the image's last slice, and so must the mask.
    With the padding as zeros (as before) the network read them as a cut and stopped short of it."""
    ras = nib.as_closest_canonical(head["spgr"][0])
    truth = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(head["spgr"][1].astype(np.uint8),
                                                                head["spgr"][0].affine)).dataobj) > 0
    top = int(np.nonzero(truth.any((0, 1)))[0].max())
    keep = top - 9  # 20 mm of brain above the field of view
    if (keep + 1) % bm.PAD_MULTIPLE == 0:
        keep -= 1  # a size that needs padding
    cut = nib.Nifti1Image(np.asarray(ras.dataobj)[:, :, :keep + 1], ras.affine)
    want = truth[:, :, :keep + 1]
    mask = bm.extract(cut).mask
    assert mask[:, :, -1].sum() >= 0.7 * want[:, :, -1].sum()
    assert dice(mask, want) >= 0.9
    monkeypatch.setattr(bm, "PAD_MODE", "constant")
    assert bm.extract(cut).mask[:, :, -1].sum() < 0.5 * mask[:, :, -1].sum()


def test_already_stripped_image_keeps_the_whole_brain(head):
    img, truth = head["spgr"]
    stripped = nib.Nifti1Image(np.asarray(img.dataobj) * truth, img.affine)
    res = bm.extract(stripped)  # the network alone keeps 75 % of this brain (its outer CSF is lost)
    assert res.prestripped and res.problem is None
    assert dice(res.mask, truth) >= 0.97
    assert abs(res.mask.sum() / truth.sum() - 1) < 0.03
    assert not bm.extract(img).prestripped


def test_a_head_with_a_zeroed_background_is_not_taken_for_a_stripped_brain():
    g = np.indices((90, 90, 90)).astype(float) - 44.5
    r = np.sqrt((g ** 2).sum(0))  # 2 mm voxels
    head, brain = r <= 42, r <= 32  # about 2.5 l and 1.1 l
    zooms = (2.0, 2.0, 2.0)
    assert bm.prestripped_support(np.where(head, 1.0, 0.0), brain, zooms) is None
    stripped = r <= 33.5
    got = bm.prestripped_support(np.where(stripped, 1.0, 0.0), brain, zooms)
    assert got is not None and np.array_equal(got, stripped)
    far = r <= 37.8  # the other tool left 11.6 mm around the network's brain: what lies beyond 10 mm is dropped
    got = bm.prestripped_support(np.where(far, 1.0, 0.0), brain, zooms)
    assert got.sum() < far.sum() and got[r <= 36.5].all() and not got[r > 37.2].any()


# ---------------------------------------------------------------------------------- the node
def _fake_result(mask, volume_ml, components):
    return bm.BrainMaskResult(mask=mask, volume_ml=volume_ml, component_ml=components,
                              model={"name": "brainmask_unet", "sha256": "x"})


@pytest.fixture(scope="module")
def template():
    from bidsapp.templates import get_template

    return get_template(resolution=2, offline=True)["files"]


def test_node_keeps_a_plausible_learned_mask_and_starts_registration_at_its_centre(head, template, tmp_path):
    from workflows.interfaces.brainmask import brain_extraction

    img, truth = head["spgr"]
    src = tmp_path / "t1w.nii.gz"
    nib.save(nib.as_closest_canonical(img), src)
    meta = brain_extraction(src, template["T1w"], template["mask"], tmp_path / "m.nii.gz", tmp_path / "x.mat",
                            method="learned", device="cpu")
    assert meta["Method"].startswith("learned") and "BrainExtractionFallback" not in meta
    assert meta["Model"]["Name"] == "brainmask_unet" and len(meta["Model"]["Sha256"]) == 64
    assert 800 < meta["MaskVolumeML"] < 2200
    assert (tmp_path / "x.mat").is_file()
    mask = np.asarray(nib.load(tmp_path / "m.nii.gz").dataobj) > 0
    truth_ras = nib.as_closest_canonical(nib.Nifti1Image(truth.astype(np.uint8), img.affine))
    assert dice(mask, np.asarray(truth_ras.dataobj) > 0) >= 0.9


def test_node_falls_back_to_the_template_and_says_why(head, template, tmp_path, monkeypatch):
    from workflows.interfaces.brainmask import brain_extraction

    img, _ = head["spgr"]
    src = tmp_path / "t1w.nii.gz"
    nib.save(nib.as_closest_canonical(img), src)
    monkeypatch.setattr(bm, "extract", lambda *a, **k: _fake_result(np.zeros(img.shape, bool), 2900.0, [2900.0]))
    meta = brain_extraction(src, template["T1w"], template["mask"], tmp_path / "m.nii.gz", tmp_path / "x.mat",
                            method="learned", device="cpu")
    assert "2900 ml outside the plausible" in meta["BrainExtractionFallback"]
    assert meta["Method"].startswith("template-based") and meta["LearnedMaskVolumeML"] == 2900.0
    assert (tmp_path / "m.nii.gz").is_file()


@pytest.mark.parametrize("method", ["learned", "template"])
def test_a_scan_that_is_not_a_head_is_one_error_naming_the_input(template, tmp_path, method):
    from workflows.interfaces.brainmask import brain_extraction

    # a quality-control phantom: a water cylinder 190 mm across and 148 mm long (the ACR phantom's size)
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.arange(n) * 4.0 for n in (55, 55, 45)], indexing="ij")  # 4 mm: a quick test
    inside = ((x - 108) ** 2 + (y - 108) ** 2 <= 95 ** 2) & (np.abs(z - 88) <= 74)
    vol = (inside * 100 + np.abs(rng.normal(0, 3, inside.shape))).astype(np.float32)
    src = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([4.0, 4.0, 4.0, 1.0])), src)
    with pytest.raises(ValueError) as err:
        brain_extraction(src, template["T1w"], template["mask"], tmp_path / "m.nii.gz", tmp_path / "x.mat",
                         method=method, device="cpu", source_file="/bids/sub-01/anat/sub-01_T1w.nii.gz")
    msg = str(err.value)
    assert msg.startswith("/bids/sub-01/anat/sub-01_T1w.nii.gz: ") and "\n" not in msg
    assert "no tissue contrast" in msg and msg.endswith("is this a head image?")
    assert not (tmp_path / "m.nii.gz").exists()


def test_mask_sidecar_and_report_name_the_fallback(tmp_path):
    from bidsapp.reports.participant import session_section
    from bidsapp.bids.collect import SessionFiles

    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    data = np.zeros((20, 20, 20), np.float32)
    data[5:15, 5:15, 5:15] = 1
    nib.save(nib.Nifti1Image(data, np.eye(4)), anat / "sub-01_desc-preproc_T1w.nii.gz")
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.eye(4)), anat / "sub-01_desc-brain_mask.nii.gz")
    (anat / "sub-01_desc-brain_mask.json").write_text(json.dumps(
        {"Type": "Brain", "Method": "template-based: ...", "MaskVolumeML": 1.0,
         "BrainExtractionFallback": "the learned mask failed the sanity check (x); template-based mask used"}))
    f = SessionFiles(subject="01", session=None, prefix="sub-01", anat_dir=anat)
    f.preproc, f.mask = anat / "sub-01_desc-preproc_T1w.nii.gz", anat / "sub-01_desc-brain_mask.nii.gz"
    sec = session_section(f, [])
    assert any("learned mask failed the sanity check" in w for w in sec.warnings)
    assert "Method: template-based" in sec.body


# ---------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def icbm_heads():
    from bidsapp.training.brainmask import load_heads

    return load_heads(None, use_icbm=True)


def test_aged_copies_widen_the_outer_csf_and_keep_the_brain_target():
    from bidsapp.physics import phantom as P
    from bidsapp.training.brainmask import AGED_GM_LOSS, aged_copies, load_heads

    ph = P.load_anatomy(None, resolution=3.0).reorient("RAS")
    copies = aged_copies(ph, 2)
    gm = [float(p.fraction("GM").sum()) for p in [ph] + copies]
    csf = [float(p.fraction("CSF").sum()) for p in [ph] + copies]
    brain = [float(p.brain_fraction.sum()) for p in [ph] + copies]
    assert gm[0] > gm[1] > gm[2] and csf[0] < csf[1] < csf[2]
    assert brain == pytest.approx([brain[0]] * 3, rel=1e-3)  # the intracranial target does not move
    assert gm[2] < gm[0] * (1 - 0.8 * AGED_GM_LOSS)  # cortical GM is most of GM: about its loss
    heads = load_heads(None, use_icbm=True, aged=1)
    assert [h.name for h in heads] == ["icbm152", "icbm152-aged1"]
    assert float(heads[1].brain.sum()) == pytest.approx(float(heads[0].brain.sum()), rel=1e-3)


def test_transplanted_brain_fills_the_other_heads_cavity():
    from bidsapp.physics import phantom as P
    from bidsapp.training.brainmask import transplants

    head, donor = P.sphere_phantom((32, 32, 32), 4.0), P.sphere_phantom((26, 26, 26), 4.0)
    parenchyma = ("GM", "WM", "ventricles")

    def amount(ph, names):
        return sum(float(ph.fraction(c).sum()) for c in names) * ph.voxel_volume

    full, shrunk = P.transplant_brain(head, donor, 1.0), P.transplant_brain(head, donor, 0.96)
    for out in (full, shrunk):
        assert np.allclose(out.fractions.sum(0), 1.0, atol=1e-5)
        assert np.allclose(out.brain_fraction, head.brain_fraction, atol=1e-5)  # the target: the head's cavity
        assert np.array_equal(out.fraction("skull"), head.fraction("skull"))
    # the donor's brain, scaled to the new cavity: its share of the cavity is the donor's own
    share = amount(donor, parenchyma) / amount(donor, P._BRAIN)
    assert amount(full, parenchyma) / amount(full, P._BRAIN) == pytest.approx(share, rel=0.03)
    # shrunk: less brain, more CSF between it and the skull
    assert amount(shrunk, parenchyma) == pytest.approx(amount(full, parenchyma) * 0.96 ** 3, rel=0.03)
    assert amount(shrunk, ["CSF"]) > amount(full, ["CSF"])
    assert shrunk.meta["transplant"] == {"head": "spheres", "donor": "spheres", "shrink": 0.96}
    made = transplants([head, donor], ["a", "b"], 3, seed=1)
    assert [n for n, _ in made] == [n for n, _ in transplants([head, donor], ["a", "b"], 3, seed=1)]
    assert {n for n, _ in made} <= {"a+b", "b+a"} and len(made) == 3
    with pytest.raises(ValueError):
        P.transplant_brain(head, P.load_anatomy(None, resolution=6.0))  # other classes


@pytest.mark.parametrize("centre", ["brain", "head"])
def test_synthetic_heads_are_reproducible_and_target_the_brain(icbm_heads, centre):
    from bidsapp.training.brainmask import HeadSynth

    a = HeadSynth(icbm_heads, size=48, seed=3, centre=centre).batch(3)
    b = HeadSynth(icbm_heads, size=48, seed=3, centre=centre).batch(3)
    assert all(np.array_equal(x, y) for x, y in zip(a[:2], b[:2])) and a[2] == b[2]
    img, target, _ = a
    assert img.shape == target.shape == (3, 1, 48, 48, 48)
    assert 0 <= float(target.min()) and float(target.max()) <= 1 and float(target.sum()) > 0
    assert float(img.min()) >= 0 and float(img.max()) <= 1.5 ** 2  # normalised, then a gamma curve



def test_bfloat16_training_changes_only_the_forward_pass_rounding(icbm_heads, tmp_path):
    from bidsapp.training.brainmask import TrainConfig, train

    first = [train(TrainConfig(anatomy_dir=str(tmp_path / "none"), out=str(tmp_path / p), iterations=1, size=32,
                               seed=1, threads=1, precision=p), heads=icbm_heads, progress=lambda m: None)["loss"][0]
             for p in ("float32", "bfloat16")]
    assert first[1] != first[0] and first[1] == pytest.approx(first[0], rel=0.05)


def test_training_resumes_from_its_checkpoint_bit_for_bit(icbm_heads, tmp_path):
    import torch

    from bidsapp.training.brainmask import TrainConfig, save, train

    def cfg(out):
        return TrainConfig(anatomy_dir=str(tmp_path / "none"), out=str(out), iterations=4, size=32, seed=1,
                           threads=1, checkpoint_every=2)

    whole = train(cfg(tmp_path / "a"), heads=icbm_heads, progress=lambda m: None)
    first = train(cfg(tmp_path / "b"), heads=icbm_heads, progress=lambda m: None, stop_after=2)
    assert not first["finished"] and (tmp_path / "b" / "checkpoint.pt").is_file()
    rest = train(cfg(tmp_path / "b"), heads=icbm_heads, progress=lambda m: None)
    assert rest["finished"] and rest["loss"] == whole["loss"]
    for k, v in whole["net"].state_dict().items():
        assert torch.equal(v, rest["net"].state_dict()[k]), k
    card = save(rest["net"], cfg(tmp_path / "b"), rest, weights_dir=tmp_path / "w")
    assert card["training"]["seed"] == 1 and "--iterations 4" in card["training"]["command"]
    net, loaded = bm.load_model(weights_dir=tmp_path / "w")
    assert loaded["sha256"] == card["sha256"]

    # a second stage starts from the first one's checkpoint; its card lists both commands
    from bidsapp.training.brainmask import command_line

    stage2 = TrainConfig(anatomy_dir=str(tmp_path / "none"), out=str(tmp_path / "c"), iterations=1, size=32,
                         seed=2, threads=1, centre="head", init_from=str(tmp_path / "b" / "checkpoint.pt"))
    card2 = save(train(stage2, heads=icbm_heads, progress=lambda m: None)["net"], stage2,
                 {"loss": [0.5], "seconds": 1.0}, weights_dir=tmp_path / "w2")
    assert card2["training"]["stages"] == [command_line(cfg(tmp_path / "b")), command_line(stage2)]
    assert "--centre head --init-from" in card2["training"]["stages"][1]


def test_shipped_card_says_how_it_was_made():
    card = bm.load_model()[1]
    assert card["training"]["command"].startswith("scanbridge-train brainmask")
    assert "extra-cerebral CSF included" in card["target"]
    assert card["size_bytes"] < 8_000_000


def test_the_option_reaches_the_node(template, tmp_path):
    from bidsapp.cli import build_parser
    from workflows.anatomical import init_anat_preproc_wf

    tpl = {"name": "x", "files": template}
    for argv, method in (([], "learned"), (["--brain-extraction", "template"], "template"),
                         (["--brain_extraction", "learned"], "learned")):
        opts = build_parser().parse_args([str(tmp_path), str(tmp_path / "out"), "participant", *argv])
        assert opts.brain_extraction == method
        wf = init_anat_preproc_wf(template=tpl, brain_extraction=opts.brain_extraction, device="cpu")
        assert wf.get_node("brain_extraction").inputs.method == method


def test_benchmark_summary_gives_medians_per_family_and_the_two_scanner_difference():
    from benchmark_scripts import load

    run = load("brainmask", "run")
    rows = []
    for head, (a, b) in {"anat-10": (1500.0, 1515.0), "anat-11": (1400.0, 1400.0)}.items():
        for fam, vol, d in (("MPRAGE 3T 1mm", a, 0.98), ("SPGR 1.5T 1mm", b, 0.96)):
            rows.append({"set": "simulated", "head": head, "family": fam, "method": "learned", "dice": d,
                         "hd95_mm": 1.0, "volume_error_pct": -2.0 if d > 0.97 else 1.0, "volume_ml": vol,
                         "seconds": 3.0, "peak_mb": 700, "error": None})
    rows.append({"set": "simulated", "head": "anat-12", "family": "MPRAGE 3T 1mm", "method": "learned",
                 "error": "ValueError: x", "seconds": None, "peak_mb": None})
    lines, table = run.summarise(rows, ["learned"])
    mp = table["simulated"]["MPRAGE 3T 1mm"]["learned"]
    assert mp["n"] == 3 and mp["failed"] == 1 and mp["dice"] == pytest.approx(0.98)
    assert table["simulated"]["all"]["learned"]["abs_volume_error_pct"] == pytest.approx(1.5)
    assert table["two_scanners"]["learned"]["median_pct"] == pytest.approx(100 * 15 / 1507.5 / 2)
    assert any("3T MPRAGE vs 1.5T SPGR" in line for line in lines)


def test_benchmark_summary_gives_a_real_head_scanned_twice_its_volume_difference_outside_the_dice_table():
    from benchmark_scripts import load

    run = load("brainmask", "run")
    rows = [{"set": "registry", "head": "colin27", "family": "T1w 1mm (BET reference)", "method": "learned",
             "dice": 0.94, "hd95_mm": 2.0, "volume_error_pct": 12.0, "volume_ml": 1930.0, "seconds": 3.0,
             "peak_mb": 700, "error": None}]
    rows += [{"set": "registry", "head": h, "family": run.NO_REFERENCE, "method": "learned", "volume_ml": v,
              "seconds": 3.0, "peak_mb": 700, "error": None}
             for h, v in (("brainbrowser1", 1500.0), ("brainbrowser2", 1530.0))]
    lines, table = run.summarise(rows, ["learned"])
    assert list(table["registry"]) == ["T1w 1mm (BET reference)", "all"]
    assert table["registry"]["all"]["learned"]["n"] == 1 and table["registry"]["all"]["learned"]["failed"] == 0
    pair = table["real_repeats"]["brainbrowser1-brainbrowser2"]["learned"]
    assert pair["difference_pct"] == pytest.approx(100 * 30 / 1515)
    assert any("real head scanned twice" in line for line in lines)


def test_card_commands_parse_and_regenerate_from_the_one_config():
    """The options and the card's command come from TrainConfig alone: each shipped stage's command
    parses with the trainer's parser and regenerates to the same string."""
    import argparse
    import shlex

    from bidsapp.models import registry
    from bidsapp.training import brainmask as B
    from bidsapp.training.config import config_from_args

    card = registry.load_card("brainmask_unet")
    for cmd in card["training"].get("stages") or [card["training"]["command"]]:
        parser = argparse.ArgumentParser()
        B.add_arguments(parser)
        args = parser.parse_args(shlex.split(cmd)[2:])
        again = B.command_line(config_from_args(B.TrainConfig, args))
        assert again + (f" --stop-after {args.stop_after}" if args.stop_after else "") == cmd


def test_resuming_on_another_device_says_so_in_one_line(icbm_heads):
    """A checkpoint's generator state belongs to the device it was made on (CPU and GPU states differ
    in size); resuming elsewhere is refused with a line that names the fix, not a traceback."""
    import torch

    from bidsapp.training.brainmask import HeadSynth

    synth = HeadSynth(icbm_heads, size=32, seed=0)
    state = synth.state()
    synth.set_state(state)  # same device: fine
    with pytest.raises(SystemExit, match="--device it started on"):
        synth.set_state({"rng": state["rng"], "gen": torch.zeros(16, dtype=torch.uint8)})
