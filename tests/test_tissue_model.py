"""Tissue U-Net, physics-parameter vector, weights registry and sliding-window inference (tiny tensors)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bidsapp.models import registry, tissue
from bidsapp.models.unet import UNet3D, count_parameters


def _net(n_params=tissue.N_PARAMS, seed=0, injection="concat"):
    torch.manual_seed(seed)
    net = UNet3D(in_channels=1, out_channels=3, features=(4, 8, 16), n_params=n_params, physics_injection=injection)
    with torch.no_grad():
        for prm in net.physics_parameters():  # a "trained" injection: the parameters change the output
            if not prm.any():
                torch.nn.init.normal_(prm, std=0.5)
    return net


def test_unet_shapes_and_divisor():
    net = _net(n_params=0)
    x = torch.randn(2, 1, 16, 24, 32)
    assert net(x).shape == (2, 3, 16, 24, 32)
    assert net.divisor == 4
    assert not net.uses_physics


def test_physics_branch_changes_output_and_gets_gradients():
    net = _net()
    # make the physics branch matter at initialisation: non-trivial weights
    x = torch.randn(1, 1, 16, 16, 16)
    p1 = torch.from_numpy(tissue.encode("MPRAGE", TI=0.6, B0=3.0))[None]
    p2 = torch.from_numpy(tissue.encode("MPRAGE", TI=1.2, B0=3.0))[None]
    y1, y2 = net(x, p1), net(x, p2)
    assert y1.shape == (1, 3, 16, 16, 16)
    assert (y1 - y2).abs().max().item() > 1e-4
    y1.sum().backward()
    assert net.physics.fc[0].weight.grad.abs().sum().item() > 0
    with pytest.raises(ValueError):
        net(x)


def test_physics_branch_broadcasts_one_vector_over_a_batch():
    net = _net()
    x = torch.randn(3, 1, 8, 8, 8)
    p = torch.from_numpy(tissue.encode("SPGR", TR=0.03, TE=0.005, FA=30))[None]
    assert net(x, p).shape == (3, 3, 8, 8, 8)


def test_no_physics_net_is_smaller_by_exactly_the_branch():
    a, b = _net(n_params=0), _net()
    branch = tissue.N_PARAMS * 10 + 10 + 10 * 10 + 10
    # the top decoder conv sees 10 extra channels and has no instance norm before its activation
    extra_conv = 10 * 4 * 27 - 2 * 4
    assert count_parameters(b) - count_parameters(a) == branch + extra_conv


def test_encode_units_and_layout():
    v = tissue.encode("MPRAGE", TI=0.9, B0=1.5)
    d = dict(zip(tissue.PARAMETER_LAYOUT, v))
    assert d["family_MPRAGE"] == 1 and d["family_SPGR"] == 0
    assert d["TI_s"] == pytest.approx(0.9) and d["exp_neg_TI"] == pytest.approx(math.exp(-0.9))
    assert d["has_TR"] == 0 and d["TR_s"] == 0
    assert d["B0_over_3T"] == pytest.approx(0.5) and d["has_B0"] == 1
    s = dict(zip(tissue.PARAMETER_LAYOUT, tissue.encode("SPGR", TR=0.05, TE=0.005, FA=30)))
    assert s["TE_over_50ms"] == pytest.approx(0.1) and s["exp_neg_TE_over_50ms"] == pytest.approx(math.exp(-0.1))
    assert s["sin_FA"] == pytest.approx(0.5) and s["has_B0"] == 0


def test_encode_batch_matches_encode_with_nan_as_missing():
    fam = np.array(["MPRAGE", "SPGR"])
    batch = tissue.encode_batch(fam, TI=[0.8, np.nan], TRinv=[2.0, None], TR=[np.nan, 0.02], TE=[np.nan, 0.006],
                                FA=[np.nan, 20.0], B0=[3.0, np.nan])
    np.testing.assert_allclose(batch[0], tissue.encode("MPRAGE", TI=0.8, TRinv=2.0, B0=3.0), rtol=1e-6)
    np.testing.assert_allclose(batch[1], tissue.encode("SPGR", TR=0.02, TE=0.006, FA=20.0), rtol=1e-6)


def test_parameter_vector_from_bids_and_record_names():
    pv = tissue.parameter_vector({"sequence_family": "MPRAGE", "InversionTime": 0.9, "RepetitionTime": 2.3,
                                  "MagneticFieldStrength": 3.0})
    assert pv.fallback_reason is None and pv.values is not None
    assert pv.used == {"InversionTime": 0.9, "InversionRepetitionTime": 2.3, "MagneticFieldStrength": 3.0}
    d = dict(zip(tissue.PARAMETER_LAYOUT, pv.values))
    assert d["TRinv_s"] == pytest.approx(2.3) and d["has_TR"] == 0
    # an MPRAGE "RepetitionTime" shorter than TI is the excitation TR (GE IR-SPGR): not used
    ge = tissue.parameter_vector({"sequence_family": "MPRAGE", "InversionTime": 0.9, "RepetitionTime": 0.008})
    assert ge.values is not None and "RepetitionTime" in ge.ignored and "InversionRepetitionTime" in ge.missing
    rec = tissue.parameter_vector({"sequence_family": "SPGR", "repetition_time": 0.02, "echo_time": 0.005,
                                   "flip_angle": 25.0})
    assert rec.values is not None and rec.missing == ["MagneticFieldStrength"]
    assert rec.values[tissue.PARAMETER_LAYOUT.index("has_B0")] == 0


@pytest.mark.parametrize("acq, needle", [
    ({"sequence_family": "SPGR", "RepetitionTime": 0.02, "EchoTime": 0.005}, "lacks FlipAngle"),
    ({"sequence_family": "MPRAGE"}, "lacks InversionTime"),
    ({"sequence_family": "TSE", "RepetitionTime": 3.0, "EchoTime": 0.1}, "not one the physics model"),
    ({"RepetitionTime": 0.02}, "UNKNOWN"),
    ({"sequence_family": "MPRAGE", "InversionTime": 0.3}, "outside the physics model's training range"),
    ({"sequence_family": "SPGR", "RepetitionTime": "n/a", "EchoTime": 0.005, "FlipAngle": 20}, "lacks RepetitionTime"),
    (None, "UNKNOWN"),
])
def test_parameter_vector_falls_back_with_a_reason(acq, needle):
    pv = tissue.parameter_vector(acq)
    assert pv.values is None
    assert needle in pv.fallback_reason


def test_out_of_range_field_strength_is_treated_as_missing():
    pv = tissue.parameter_vector({"sequence_family": "MPRAGE", "InversionTime": 0.9, "MagneticFieldStrength": 11.7})
    assert pv.values is not None and "MagneticFieldStrength" in pv.ignored
    assert pv.values[tissue.PARAMETER_LAYOUT.index("has_B0")] == 0


def test_parameter_vector_reports_the_expected_gm_wm_contrast():
    # TR 95 ms, flip 15 deg at 3 T is proton-density weighted: GM brighter than WM (the benchmark's worst setting)
    pd_like = tissue.parameter_vector({"sequence_family": "SPGR", "RepetitionTime": 0.095, "EchoTime": 0.0067,
                                       "FlipAngle": 15, "MagneticFieldStrength": 3.0})
    t1_like = tissue.parameter_vector({"sequence_family": "SPGR", "RepetitionTime": 0.02, "EchoTime": 0.005,
                                       "FlipAngle": 25, "MagneticFieldStrength": 3.0})
    assert pd_like.wm_gm_ratio < 1.0 < 1.06 < t1_like.wm_gm_ratio
    mprage = tissue.parameter_vector({"sequence_family": "MPRAGE", "InversionTime": 0.9, "RepetitionTime": 2.3,
                                      "MagneticFieldStrength": 3.0})
    assert mprage.wm_gm_ratio > 1.5
    # the ratio does not depend on the physics model being usable...
    long_tr = tissue.parameter_vector({"sequence_family": "SPGR", "RepetitionTime": 0.5, "EchoTime": 0.0067,
                                       "FlipAngle": 15, "MagneticFieldStrength": 3.0})
    assert long_tr.values is None and 0.8 < long_tr.wm_gm_ratio < 0.94
    # ...but it is not guessed: no field strength (or one outside the tissue tables) or no inversion TR, no ratio
    assert tissue.parameter_vector({"sequence_family": "SPGR", "RepetitionTime": 0.095, "EchoTime": 0.0067,
                                    "FlipAngle": 15, "MagneticFieldStrength": 0.2}).wm_gm_ratio is None
    assert tissue.parameter_vector({"sequence_family": "SPGR", "RepetitionTime": 0.095, "EchoTime": 0.0067,
                                    "FlipAngle": 15}).wm_gm_ratio is None
    assert tissue.parameter_vector({"sequence_family": "MPRAGE", "InversionTime": 0.9,
                                    "MagneticFieldStrength": 3.0}).wm_gm_ratio is None


# ------------------------------------------------------------------------------------ registry
def _save_tiny(tmp_path, name, n_params, injection="concat", **card_fields):
    net = _net(n_params=n_params, injection=injection)
    card = {"version": "test", "architecture": {"class": "UNet3D", "kwargs": net.config},
            "training": {"command": "none", "seed": 0, "data": "random"}, "metrics": {},
            "resolution_mm": 2.0, "inference_roi": 16, **card_fields}
    return net, registry.save_model(name, net.state_dict(), card, weights_dir=tmp_path)


def test_registry_roundtrip_and_sha256(tmp_path):
    net, card = _save_tiny(tmp_path, "tissue_unet_physics", tissue.N_PARAMS)
    assert registry.available("tissue", tmp_path) == ["tissue_unet_physics"]
    assert card["sha256"] == registry.sha256_file(tmp_path / "tissue_unet_physics.pt")
    state, card2 = registry.load_state_dict("tissue_unet_physics", tmp_path)
    assert card2["sha256"] == card["sha256"]
    loaded = tissue.build_model(card2)
    loaded.load_state_dict(state)
    x = torch.randn(1, 1, 8, 8, 8)
    p = torch.from_numpy(tissue.encode("MPRAGE", TI=0.9))[None]
    torch.testing.assert_close(loaded(x, p), net(x, p))


def test_registry_rejects_a_corrupted_weights_file(tmp_path):
    _save_tiny(tmp_path, "tissue_unet", 0)
    path = tmp_path / "tissue_unet.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(registry.WeightsIntegrityError, match="corrupted or was modified"):
        registry.load_state_dict("tissue_unet", tmp_path)


def test_registry_missing_model_and_incomplete_card(tmp_path):
    with pytest.raises(registry.ModelNotFoundError):
        registry.load_card("nothing", tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"name": "bad"}))
    with pytest.raises(registry.WeightsIntegrityError, match="lacks"):
        registry.load_card("bad", tmp_path)


def test_shipped_tissue_cards_match_their_weights():
    names = registry.available("tissue")
    if not names:
        pytest.skip("no tissue weights shipped in this checkout")
    for name in names:
        _, card = registry.verify(name)
        assert card["architecture"]["kwargs"]["n_params"] in (0, tissue.N_PARAMS)
        assert card["training"]["seed"] is not None and card["training"]["command"].startswith("scanbridge-train")


# ------------------------------------------------------------------------------------ inference
def _blob_volume(shape=(40, 36, 32)):
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(zz ** 2 + yy ** 2 + xx ** 2)
    mask = r < 0.9
    img = np.where(r < 0.4, 1.0, np.where(r < 0.7, 0.7, 0.3)).astype(np.float32) * mask
    return img, mask


def test_sliding_window_probabilities_on_a_small_volume():
    net = _net().eval()
    img, mask = _blob_volume()
    x = tissue.normalise(img, mask)
    probs = tissue.predict_probs(net, x, mask, tissue.encode("MPRAGE", TI=0.9), "cpu", roi=16, overlap=0.25)
    assert probs.shape == (3,) + img.shape
    inside = probs[:, mask]
    np.testing.assert_allclose(inside.sum(0), 1.0, atol=1e-4)


def test_card_mirror_axes_make_a_symmetric_input_give_symmetric_probabilities(tmp_path):
    img, mask = _blob_volume((24, 20, 20))  # symmetric under a flip of axis 0
    acq = {"sequence_family": "MPRAGE", "InversionTime": 0.9}
    plain, mirror = tmp_path / "plain", tmp_path / "mirror"
    _save_tiny(plain, "tissue_unet_physics", tissue.N_PARAMS)
    _save_tiny(mirror, "tissue_unet_physics", tissue.N_PARAMS, inference_mirror_axes=[0])
    p0 = tissue.segment(img, mask, (2, 2, 2), acq, device="cpu", weights_dir=plain, refine=False).probs
    p1 = tissue.segment(img, mask, (2, 2, 2), acq, device="cpu", weights_dir=mirror, refine=False).probs
    assert not np.allclose(p0, p0[:, ::-1], atol=1e-3)  # the random network is not symmetric by itself
    np.testing.assert_allclose(p1, p1[:, ::-1], atol=1e-5)


def test_segment_end_to_end_with_fallback_and_resampling(tmp_path, monkeypatch):
    _save_tiny(tmp_path, "tissue_unet_physics", tissue.N_PARAMS)
    _save_tiny(tmp_path, "tissue_unet", 0)
    img, mask = _blob_volume((30, 28, 26))
    res = tissue.segment(img, mask, (1.0, 1.0, 1.0), {"sequence_family": "MPRAGE", "InversionTime": 0.9},
                         device="cpu", weights_dir=tmp_path)
    assert res.method == "unet-physics" and res.fallback_reason is None
    assert res.probs.shape == (3,) + img.shape and res.dseg.shape == img.shape
    assert set(np.unique(res.dseg[mask])) <= {1, 2, 3} and not res.dseg[~mask].any()
    assert res.volumes_mm3["brain"] == pytest.approx(mask.sum())
    assert sum(res.volumes_mm3[c] for c in tissue.CLASSES) == pytest.approx(mask.sum())
    assert res.volumes_mm3["GM"] == pytest.approx(float(res.probs[1][mask].sum()), rel=1e-5)
    fb = tissue.segment(img, mask, (1.0, 1.0, 1.0), {"sequence_family": "FLAIR"}, device="cpu", weights_dir=tmp_path)
    assert fb.method == "unet" and "FLAIR" in fb.fallback_reason and fb.warnings
    assert fb.model["sha256"] != res.model["sha256"]
    assert not res.warnings  # no field strength: no contrast estimate, no warning
    flat = tissue.segment(img, mask, (1.0, 1.0, 1.0), {"sequence_family": "SPGR", "RepetitionTime": 0.095,
                                                       "EchoTime": 0.0067, "FlipAngle": 15,
                                                       "MagneticFieldStrength": 3.0},
                          device="cpu", weights_dir=tmp_path)
    assert flat.method == "unet-physics"
    assert [w for w in flat.warnings if "0.969 times the signal of pure GM" in w]


def test_segment_refines_by_default_and_says_so(tmp_path):
    from workflows.interfaces.tissue_model import sidecar_metadata

    _save_tiny(tmp_path, "tissue_unet", 0)
    img, mask = _blob_volume((30, 28, 26))
    refined = tissue.segment(img, mask, (1.0, 1.0, 1.0), None, device="cpu", weights_dir=tmp_path)
    raw = tissue.segment(img, mask, (1.0, 1.0, 1.0), None, device="cpu", weights_dir=tmp_path, refine=False)
    assert refined.refinement and raw.refinement is None
    # voxels finer than the model's: the maps are summed, refined or not
    assert raw.volumes_mm3["GM"] == pytest.approx(float(raw.probs[1][mask > 0].sum()), rel=1e-5)
    assert raw.volumes_mm3["GM"] != pytest.approx(float((raw.dseg == 2).sum()), rel=1e-3)
    assert refined.volumes_mm3["GM"] == pytest.approx(float(refined.probs[1][mask > 0].sum()), rel=1e-5)
    assert not np.array_equal(refined.probs, raw.probs)
    meta = sidecar_metadata(refined)
    assert meta["IntensityRefinement"]["iterations"] >= 1 and "refined" in meta["Resampling"]
    assert meta["VolumesFromFractions"] and sidecar_metadata(raw)["VolumesFromFractions"]
    assert sidecar_metadata(raw)["IntensityRefinement"] is None
    on_grid = tissue.segment(img, mask, (2.0, 2.0, 2.0), None, device="cpu", weights_dir=tmp_path)
    assert on_grid.refinement is None  # at the model's own resolution the network sees every voxel
    # ... and its labels are counted
    assert on_grid.volumes_mm3["GM"] == pytest.approx(8.0 * float(((on_grid.dseg == 2) & (mask > 0)).sum()))
    assert not sidecar_metadata(on_grid)["VolumesFromFractions"]
    assert not [w for w in refined.warnings + raw.warnings if "too coarse" in w]  # refined, or not asked for
    assert [w for w in on_grid.warnings if "8.0 mm3 are too coarse" in w and "labels counted" in w]
    thick = tissue.segment(img, mask, (1.0, 1.0, 5.0), None, device="cpu", weights_dir=tmp_path)
    assert thick.refinement is None and thick.volumes_summed
    assert [w for w in thick.warnings if "5.0 mm3 are too coarse" in w and "probabilities summed" in w]
    assert "probabilities summed" in sidecar_metadata(thick)["VolumesWarning"]
    assert sidecar_metadata(refined)["VolumesWarning"] is None


@pytest.mark.parametrize("zooms, refined, summed", [
    ((1.0, 1.0, 1.0), True, True), ((1.0, 1.0, 5.0), False, True), ((0.9, 0.9, 6.0), False, True),
    ((2.0, 2.0, 2.0), False, False), ((1.0, 1.0, 8.0), False, False), ((3.0, 3.0, 3.0), False, False)])
def test_volumes_sum_the_maps_on_voxels_finer_than_the_model(zooms, refined, summed):
    """Thick slices beyond the refinement's reach sum the network's probabilities (its training targets
    were 2 mm tissue fractions); on the model's own grid or coarser the labels are counted."""
    assert tissue.volumes_from_fractions(zooms, 2.0, refined) is summed


def test_resample_roundtrip_keeps_field_of_view():
    img, _ = _blob_volume((20, 20, 20))
    low = tissue.resample_to(img, (1, 1, 1), 2.0)
    assert low.shape == (10, 10, 10)
    back = tissue.resample_shape(low, img.shape)
    assert back.shape == img.shape
    assert abs(back.mean() - img.mean()) < 0.05


def test_resolve_device_has_one_behaviour(caplog, monkeypatch):
    import logging

    from bidsapp import devices

    assert devices.resolve_device("cpu").type == "cpu"
    assert devices.resolve_device(torch.device("cpu")).type == "cpu"
    with pytest.raises(ValueError):
        devices.resolve_device("tpu")
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    monkeypatch.setattr(devices, "_SAID", set())
    with pytest.raises(devices.DeviceUnavailableError, match="no CUDA"):
        devices.resolve_device("cuda")
    with caplog.at_level(logging.INFO, logger="scanbridge"):
        assert devices.resolve_device("auto").type == "cpu"
    assert "running on the CPU" in caplog.text
    # the trainers and the group level use the same function
    from bidsapp.training import mrainet

    assert mrainet.resolve_device is devices.resolve_device


# ------------------------------------------------------------------------------------ nipype node
def test_nipype_node_writes_probseg_dseg_volumes_and_metadata(tmp_path):
    import nibabel as nib

    from workflows.interfaces.tissue_model import TissueModel

    wdir = tmp_path / "weights"
    _save_tiny(wdir, "tissue_unet_physics", tissue.N_PARAMS)
    _save_tiny(wdir, "tissue_unet", 0)
    img, mask = _blob_volume((24, 22, 20))
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    nib.save(nib.Nifti1Image(img, aff), tmp_path / "t1.nii.gz")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), aff), tmp_path / "mask.nii.gz")
    node = TissueModel(in_file=str(tmp_path / "t1.nii.gz"), mask_file=str(tmp_path / "mask.nii.gz"),
                       acquisition={"sequence_family": "SPGR", "repetition_time": 0.02, "echo_time": 0.005,
                                    "flip_angle": 20.0, "field_strength": 3.0},
                       device="cpu", weights_dir=str(wdir))
    work = tmp_path / "work"
    work.mkdir()
    import os
    cwd = os.getcwd()
    os.chdir(work)
    try:
        res = node.run()
    finally:
        os.chdir(cwd)
    out = res.outputs
    assert out.method == "unet-physics"
    assert len(out.probseg) == 3 and nib.load(out.probseg[1]).shape == img.shape
    assert nib.load(out.dseg).get_data_dtype() == np.uint8
    vols = open(out.volumes_tsv).read().splitlines()
    assert vols[0] == "method\tlabel\tvolume_mm3" and len(vols) == 5 and vols[1].startswith("unet-physics\tCSF")
    md = out.metadata
    assert md["Model"]["Sha256"] == registry.load_card("tissue_unet_physics", wdir)["sha256"]
    assert md["SequenceParametersUsed"]["FlipAngle"] == 20.0 and md["PhysicsFallback"] is None
    assert md["ExpectedWMGMSignalRatio"] > 1.06 and not out.warnings


@pytest.mark.parametrize("mirror_axes, injection", [([], "concat"), ([0], "concat"), ([0], "norm_shift")])
def test_sweep_volumes_matches_segment_soft_volumes(tmp_path, mirror_axes, injection):
    _save_tiny(tmp_path, "tissue_unet_physics", tissue.N_PARAMS, injection=injection, inference_mirror_axes=mirror_axes)
    img, mask = _blob_volume((20, 20, 20))
    acq = {"sequence_family": "MPRAGE", "InversionTime": 0.9}
    tis = [0.7, 0.9, 1.1]
    vols = tissue.sweep_volumes(img, mask, (2, 2, 2), acq, "InversionTime", tis, device="cpu", weights_dir=tmp_path,
                                chunk=2)
    assert vols.shape == (3, 3)
    np.testing.assert_allclose(vols.sum(1), mask.sum() * 8, rtol=1e-4)
    one = tissue.segment(img, mask, (2, 2, 2), acq, device="cpu", weights_dir=tmp_path, refine=False)
    np.testing.assert_allclose(vols[1], one.probs.sum(axis=(1, 2, 3)) * 8, rtol=1e-3)
    assert np.abs(vols[0] - vols[2]).max() > 1.0  # the swept parameter moves the volumes
    with pytest.raises(ValueError, match="cannot bridge"):
        tissue.sweep_volumes(img, mask, (2, 2, 2), acq, "InversionTime", [3.0], device="cpu", weights_dir=tmp_path)


def test_volumes_sum_fractions_and_count_labels_of_probabilities():
    from bidsapp.labels import tissue_volumes_mm3

    probs = np.zeros((3, 3, 1, 1), np.float32)
    probs[:, 0, 0, 0] = (0.3, 0.6, 0.1)  # a border voxel: as fractions, some of each tissue
    probs[:, 2, 0, 0] = (0.0, 1.0, 0.0)  # outside the mask: not counted
    mask = np.array([True, True, False]).reshape(3, 1, 1)  # voxel 1 has no probability: CSF, as in the dseg
    soft = tissue_volumes_mm3(probs, mask, 2.0, fractions=True)
    assert soft == pytest.approx({"CSF": 2.6, "GM": 1.2, "WM": 0.2, "brain": 4.0})
    counted = tissue_volumes_mm3(probs, mask, 2.0, fractions=False)
    assert counted == pytest.approx({"CSF": 2.0, "GM": 2.0, "WM": 0.0, "brain": 4.0})
