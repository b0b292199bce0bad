"""Tissue training pipeline on a tiny simulated brain (seconds, never a real training run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bidsapp.models import registry, tissue
from bidsapp.training import cli
from bidsapp.training import losses as L
from bidsapp.training import tissue as T
from bidsapp.training import tissue_data as D
from synthetic import tiny_tissue_subject


def test_sample_parameters_cover_the_paper_ranges_and_drop_optionals():
    ps = D.sample_parameters(np.random.default_rng(0), 400, paper_only=True)
    mp = [p for p in ps if p["family"] == "MPRAGE"]
    sp = [p for p in ps if p["family"] == "SPGR"]
    assert mp and sp
    assert all(0.6 <= p["TI"] <= 1.2 and p["td"] == D.MPRAGE_TD for p in mp)
    assert all(0.015 <= p["TR"] <= 0.1 and 0.004 <= p["TE"] <= 0.01 and 15 <= p["FA"] <= 75 for p in sp)
    assert any(p["B0"] is None for p in ps) and any(p["B0"] is not None for p in ps)
    v = D.parameter_vectors(ps)
    assert v.shape == (400, tissue.N_PARAMS) and np.isfinite(v).all()
    wide = D.sample_parameters(np.random.default_rng(1), 400)
    assert all(p["TE"] < p["TR"] for p in wide if p["family"] == "SPGR")
    assert all(tissue.parameter_vector({"sequence_family": p["family"], "InversionTime": p.get("TI"),
                                        "RepetitionTime": p.get("TR") or p.get("TRinv"), "EchoTime": p.get("TE"),
                                        "FlipAngle": p.get("FA")}).values is not None for p in wide)


def test_low_contrast_sampling_draws_hard_spgr_settings_from_the_same_ranges():
    plain = D.sample_parameters(np.random.default_rng(2), 300, families=("SPGR",), paper_only=True)
    hard = D.sample_parameters(np.random.default_rng(2), 300, families=("SPGR",), paper_only=True, low_contrast=1.0)
    plain_c = np.abs([D.wm_gm_contrast(p) for p in plain])
    hard_c = np.abs([D.wm_gm_contrast(p) for p in hard])
    assert (plain_c < D.LOW_CONTRAST).mean() < 0.5  # a minority of uniform draws (mostly at 1.5 T)...
    assert (hard_c < D.LOW_CONTRAST).all()  # ...and every draw with low_contrast=1
    assert all(0.015 <= p["TR"] <= 0.1 and 0.004 <= p["TE"] <= 0.01 and 15 <= p["FA"] <= 75 for p in hard)
    # the contrast is the simulator's own: PD-weighted long-TR, low-flip SPGR has GM brighter than WM
    assert D.wm_gm_contrast({"family": "SPGR", "TR": 0.095, "TE": 0.006, "FA": 15, "field": 3.0}) < 0.02
    assert D.wm_gm_contrast({"family": "SPGR", "TR": 0.016, "TE": 0.005, "FA": 70, "field": 3.0}) > 0.2
    # at 0 the stream is untouched, so earlier stages' commands still reproduce
    a = D.sample_parameters(np.random.default_rng(3), 50)
    b = D.sample_parameters(np.random.default_rng(3), 50, low_contrast=0.0)
    assert a == b
    with pytest.raises(ValueError, match="low-contrast"):
        T.TrainConfig(out="x", low_contrast=1.5)


def test_gold_standard_follows_r1_not_the_image():
    s = tiny_tissue_subject()
    lab = s.target.astype(np.float32).argmax(0)
    m = s.mask
    assert {0, 1, 2} <= set(np.unique(lab[m]))
    np.testing.assert_allclose(s.target[:, m].astype(np.float32).sum(0), 1, atol=1e-2)
    assert not s.target[:, ~m].any()


def test_simulated_contrast_depends_on_the_parameters():
    s = tiny_tissue_subject()
    rng = np.random.default_rng(0)
    lab = s.target.astype(np.float32).argmax(0)
    def wm_gm(acq):
        x, m, _ = D.normalised_sample(s, acq, rng)
        return x[m & (lab == 2)].mean() - x[m & (lab == 1)].mean()
    a = wm_gm({"family": "MPRAGE", "TI": 0.6, "td": 0.6, "tau": 0.01, "field": 3.0})
    b = wm_gm({"family": "MPRAGE", "TI": 1.2, "td": 0.6, "tau": 0.01, "field": 3.0})
    assert a > 0 and b > 0 and abs(a - b) > 0.05


def test_twenty_iterations_reduce_the_loss(tmp_path):
    subjects = [tiny_tissue_subject(seed=k) for k in range(2)]
    cfg = T.TrainConfig(out=str(tmp_path), seed=0, physics="both", patch=16, batch=2, iterations=20, lr=1e-2,
                        features=(4, 8), checkpoint_every=0, log_every=5, weights_dir=str(tmp_path))
    runs = T.train(cfg, subjects)
    assert [r["physics"] for r in runs] == [True, False]
    for r in runs:
        assert r["iterations"] == 20 and len(r["loss"]) == 4
        assert r["loss"][-1] < r["loss"][0]
        card = T.save(r.pop("model"), cfg, r)
        assert card["training"]["command"].startswith("scanbridge-train tissue")
        assert "--both" in card["training"]["command"] and card["training"]["seed"] == 0
        assert card["inference_mirror_axes"] == list(D.FLIP_AXES)  # inference mirrors what training flipped
    assert registry.available("tissue", tmp_path) == ["tissue_unet", "tissue_unet_physics"]
    # the saved models load through the registry and segment
    img = subjects[0].fractions32()[[1, 2, 3]].argmax(0).astype(np.float32) + 1
    res = tissue.segment(img * subjects[0].mask, subjects[0].mask, (2, 2, 2),
                         {"sequence_family": "MPRAGE", "InversionTime": 0.9}, device="cpu", weights_dir=tmp_path)
    assert res.method == "unet-physics" and res.dseg.shape == img.shape



def test_bfloat16_training_changes_only_the_forward_pass_rounding(tmp_path):
    subjects = [tiny_tissue_subject()]
    kw = dict(seed=3, physics=True, patch=16, batch=1, iterations=1, features=(4, 8), checkpoint_every=0, log_every=1)
    first = [T.train(T.TrainConfig(out=str(tmp_path / p), precision=p, **kw), subjects)[0]["loss"][0]
             for p in ("float32", "bfloat16")]
    assert first[1] != first[0] and first[1] == pytest.approx(first[0], rel=0.05)


def test_training_is_reproducible_from_the_seed(tmp_path):
    subjects = [tiny_tissue_subject()]
    kw = dict(seed=3, physics=True, patch=16, batch=1, iterations=3, features=(4, 8), checkpoint_every=0, log_every=1)
    a = T.train(T.TrainConfig(out=str(tmp_path / "a"), **kw), subjects)[0]
    b = T.train(T.TrainConfig(out=str(tmp_path / "b"), **kw), subjects)[0]  # a new folder: not a resumption
    assert a["loss"] == b["loss"]
    for (k, v), (_, w) in zip(a["model"].state_dict().items(), b["model"].state_dict().items()):
        torch.testing.assert_close(v, w)


@pytest.mark.parametrize("alone, index, extra", [
    (False, 1, {}),
    (True, 0, dict(volume_consistency=1.0, low_contrast=0.25, physics_injection="norm_shift")),
], ids=["ablation", "physics"])
def test_each_network_trains_alone_exactly_as_beside_the_other(tmp_path, alone, index, extra):
    """Each network of a --both run sees the same batches as when it trains alone and ends bit for bit
    the same. Why scripts/train-tissue.sh trains stages 1-3 with --no-physics (the physics model starts
    from the stage-3 ablation), and why its --no-ablation retrains the shipped physics model in half the
    time."""
    subjects = [tiny_tissue_subject()]
    kw = dict(seed=4, patch=16, batch=4, iterations=3, features=(4, 8), checkpoint_every=0,
              log_every=1, consistency=1.0, **extra)
    both = T.train(T.TrainConfig(out=str(tmp_path / "both"), **kw, physics="both"), subjects)[index]
    one = T.train(T.TrainConfig(out=str(tmp_path / "one"), **kw, physics=alone), subjects)[0]
    assert both["physics"] is one["physics"] is alone and both["loss"] == one["loss"]
    for (k, v), (_, w) in zip(both["model"].state_dict().items(), one["model"].state_dict().items()):
        assert torch.equal(v, w), k


def test_cli_dispatches_and_reports_unknown(capsys):
    assert cli.main(["--help"]) == 0
    assert "tissue" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["tissue", "--help"])
    assert "--no-physics" in capsys.readouterr().out
    assert cli.main([]) == 2


def test_paired_batches_share_the_patch_and_consistency_loss_trains(tmp_path):
    subjects = [tiny_tissue_subject(seed=k) for k in range(2)]
    sampler = D.PatchSampler(subjects, 16, seed=0)
    x, m, y, p = sampler.batch(4, pairs=True)
    assert x.shape == (4, 1, 16, 16, 16)
    torch.testing.assert_close(y[0], y[1])
    torch.testing.assert_close(m[2], m[3])
    assert p[0, 0] == p[1, 0] and p[2, 1] == p[3, 1]  # same family within a pair
    assert not torch.equal(p[0], p[1])  # different acquisitions
    logits = torch.randn(4, 3, 16, 16, 16)
    assert L.consistency_loss(logits, m) > 0
    same = logits.clone()
    same[1], same[3] = same[0], same[2]
    assert L.consistency_loss(same, m) == 0
    cfg = T.TrainConfig(out=str(tmp_path), seed=0, physics=True, patch=16, batch=4, iterations=3, features=(4, 8),
                        checkpoint_every=0, log_every=1, consistency=1.0)
    run = T.train(cfg, subjects)[0]
    assert run["iterations"] == 3 and "--consistency 1" in T.command_line(cfg)


def test_norm_shift_physics_network_starts_as_its_ablation():
    """Zero-initialised injection: loaded with the ablation's weights, the physics network gives the
    ablation's output whatever the parameters; once the injection is non-zero the parameters matter."""
    from bidsapp.models.unet import UNet3D

    torch.manual_seed(0)
    base = UNet3D(1, 3, (4, 8), n_params=0).eval()
    phys = UNet3D(1, 3, (4, 8), n_params=tissue.N_PARAMS, physics_injection="norm_shift").eval()
    phys.load_ablation(base.state_dict())
    x = torch.randn(2, 1, 16, 16, 16)
    pa, pb = torch.randn(2, tissue.N_PARAMS), torch.randn(2, tissue.N_PARAMS)
    with torch.no_grad():
        torch.testing.assert_close(phys(x, pa), base(x))
        torch.testing.assert_close(phys(x, pb), base(x))
        torch.nn.init.normal_(phys.decoders[-1].inject.weight)
        assert not torch.allclose(phys(x, pa), phys(x, pb))
    assert phys.config["physics_injection"] == "norm_shift" and "physics_injection" not in base.config
    with pytest.raises(ValueError, match="ablation"):
        phys.load_ablation(UNet3D(1, 3, (4, 8, 16)).state_dict())
    with pytest.raises(ValueError):
        UNet3D(1, 3, (4, 8), n_params=3, physics_injection="film")


def _first_stage(tmp_path, subjects, **kw) -> None:
    """Both networks trained 2 iterations from scratch and saved to ``tmp_path/w1`` (a stage to continue from)."""
    first = T.TrainConfig(out=str(tmp_path / "stage1"), seed=0, physics="both", patch=16, batch=2, iterations=2,
                          features=(4, 8), checkpoint_every=0, log_every=1, weights_dir=str(tmp_path / "w1"), **kw)
    for r in T.train(first, subjects):
        T.save(r.pop("model"), first, r)


def test_physics_model_can_start_from_the_trained_ablation(tmp_path):
    subjects = [tiny_tissue_subject(seed=k) for k in range(2)]
    _first_stage(tmp_path, subjects)
    cfg = T.TrainConfig(out=str(tmp_path), seed=1, physics="both", patch=16, batch=2, iterations=2,
                        features=(4, 8), checkpoint_every=0, log_every=1, weights_dir=str(tmp_path / "w2"),
                        init_from=str(tmp_path / "w1"), physics_injection="norm_shift", physics_from_base=True)
    runs = T.train(cfg, subjects)
    phys, base = runs
    assert phys["init"]["name"] == "tissue_unet" and "zero" in phys["init"]["as"]
    assert base["init"]["name"] == "tissue_unet" and base["init"]["as"] == "same model"
    card = T.save(phys.pop("model"), cfg, phys)
    assert card["architecture"]["kwargs"]["physics_injection"] == "norm_shift"
    assert "--physics-from-base" in card["training"]["command"]
    T.save(base.pop("model"), cfg, base)
    res = tissue.segment(subjects[0].fractions32()[3] * 100, subjects[0].mask, (2, 2, 2),
                         {"sequence_family": "SPGR", "RepetitionTime": 0.02, "EchoTime": 0.005, "FlipAngle": 30},
                         device="cpu", weights_dir=tmp_path / "w2")
    assert res.method == "unet-physics"
    vols = tissue.sweep_volumes(subjects[0].fractions32()[3] * 100, subjects[0].mask, (2, 2, 2),
                                {"sequence_family": "SPGR", "RepetitionTime": 0.02, "EchoTime": 0.005, "FlipAngle": 30},
                                "FlipAngle", [20, 40], device="cpu", weights_dir=tmp_path / "w2")
    assert vols.shape == (2, 3) and np.isfinite(vols).all()
    # the CLI refuses the flag without an ablation to start from
    assert cli.main(["tissue", "--out", str(tmp_path / "x"), "--physics-from-base"]) == 2


def test_volume_consistency_is_the_relative_volume_difference_between_two_acquisitions():
    first = torch.zeros(1, 3, 4, 4, 4)
    first[:, 0, :1] = 1  # CSF: 16 voxels
    first[:, 1, 1:2] = 1  # GM: 16
    first[:, 2, 2:] = 1  # WM: 32
    mask = torch.ones(2, 1, 4, 4, 4)
    same = torch.cat([first, first])
    assert float(L.volume_consistency_loss(100 * same, mask)) == pytest.approx(0, abs=1e-6)
    # the second acquisition labels the GM as WM: GM 16 vs 0 (|d| / mean = 2), WM 32 vs 48 (0.4), CSF equal
    second = first.clone()
    second[:, 1, 1:2], second[:, 2, 1:2] = 0, 1
    pair = torch.cat([first, second])
    assert float(L.volume_consistency_loss(100 * pair, mask)) == pytest.approx((2 + 0.4) / 3, rel=1e-4)
    # moving GM voxels to where WM was and back keeps every volume: the voxel-wise term punishes it, this does not
    moved = first.clone()
    moved[:, 1, 1:2, :2], moved[:, 2, 1:2, :2] = 0, 1
    moved[:, 2, 2:3, :2], moved[:, 1, 2:3, :2] = 0, 1
    pair = torch.cat([first, moved])
    assert float(L.volume_consistency_loss(100 * pair, mask)) == pytest.approx(0, abs=1e-6)
    assert float(L.consistency_loss(100 * pair, mask)) > 0.1


def test_stop_after_then_rerun_continues_exactly_as_one_run(tmp_path):
    """--stop-after N saves the weights at iteration N of the schedule (a stage of the shipped chain) and
    leaves a checkpoint; the same command without it continues from there (as does a rerun after a time
    limit or a killed job) and ends bit for bit as an uninterrupted run."""
    subjects = [tiny_tissue_subject()]
    kw = dict(seed=2, physics=True, patch=16, batch=1, iterations=4, features=(4, 8), log_every=1, checkpoint_every=1)
    whole = T.train(T.TrainConfig(out=str(tmp_path / "whole"), **kw), subjects)[0]
    part_cfg = T.TrainConfig(out=str(tmp_path / "split"), **kw, stop_after=2)
    part = T.train(part_cfg, subjects)[0]
    assert part["iterations"] == 2 and not part["finished"] and "--stop-after 2" in T.command_line(part_cfg)
    rest = T.train(T.TrainConfig(out=str(tmp_path / "split"), **kw), subjects)[0]
    assert rest["iterations"] == 4 and rest["finished"] and rest["loss"] == whole["loss"]
    for k, v in whole["model"].state_dict().items():
        assert torch.equal(v, rest["model"].state_dict()[k]), k
    with pytest.raises(SystemExit, match="another recipe"):  # a different recipe is not mixed into the run
        T.train(T.TrainConfig(out=str(tmp_path / "split"), **{**kw, "seed": 3}), subjects)


def test_command_line_reproduces_the_config():
    """The card's command, parsed by the command's own options, is the run's recipe again."""
    import argparse

    cfg = T.TrainConfig(out="runs/x", seed=5, physics="both", features=(4, 8), lr=3e-4, consistency=1.0,
                        physics_injection="norm_shift", randomise=0.7, orientation="RAS", target="fractions",
                        threads=4, anatomy_dir="anat")
    cmd = T.command_line(cfg)
    assert cmd.startswith("scanbridge-train tissue --out runs/x --seed 5 --both") and "--threads" not in cmd
    p = argparse.ArgumentParser()
    T.add_arguments(p)
    again = T.config_from_args(p.parse_args(cmd.split()[2:]))
    assert again == T.TrainConfig(**{**cfg.__dict__, "threads": 1, "cache": "runs/x/cache"})


def test_retraining_script_reproduces_the_shipped_chain(tmp_path):
    """scripts/train-tissue.sh runs valid scanbridge-train commands whose last stage is the shipped
    models' recorded command (same seed, schedule, loss and initialisation mode)."""
    import argparse
    import os
    import shlex
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    log = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "scanbridge-train"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}")

    def parse(argv):
        p = argparse.ArgumentParser()
        T.add_arguments(p)
        return p.parse_args(argv)

    def chain(*flags, out="out"):
        log.unlink(missing_ok=True)
        subprocess.run(["bash", str(root / "scripts" / "train-tissue.sh"), str(tmp_path / "anat"),
                        str(tmp_path / out), *flags], env=env, check=True, capture_output=True)
        return [parse(shlex.split(c)[1:]) for c in log.read_text().splitlines()] if log.exists() else []

    short = chain("--short", "--no-ablation", out="short")
    assert [(s.physics, s.seed, s.iterations) for s in short] == [(False, 10, 4000), (True, 11, 6000)]
    assert short[1].physics_from_base and short[1].init_from == str(tmp_path / "short" / "short1" / "weights")
    physics_only = chain("--no-ablation", "--threads", "2", out="physics")
    assert [s.physics for s in physics_only] == [False] * 3 + [True] * 8
    assert {s.threads for s in physics_only} == {2}
    stages = chain()
    assert len(stages) == 11
    assert [s.physics for s in stages] == [False] * 3 + ["both"] * 8  # the ablation alone until stage 4
    assert [s.seed for s in stages] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 13]
    assert [s.init_from for s in stages[1:]] == [str(tmp_path / "out" / f"stage{k}" / "weights") for k in range(1, 11)]
    assert [s.orientation for s in stages] == ["native"] * 9 + ["RAS"] * 2  # the label maps' order until stage 10
    assert [s.target for s in stages] == ["gold-standard"] * 10 + ["fractions"]
    shipped = parse(shlex.split(registry.load_card(tissue.PHYSICS_MODEL)["training"]["command"])[2:])
    for key in ("seed", "physics", "iterations", "lr", "patch", "batch", "features", "consistency",
                "physics_injection", "physics_from_base", "stop_after", "deformations", "resolution",
                "low_contrast", "volume_consistency", "randomise", "orientation", "target", "dice_weight"):
        assert getattr(stages[-1], key) == getattr(shipped, key), key
    # a rerun into the same OUT_DIR resumes after the last finished stage
    assert chain() == []
    (tmp_path / "out" / "stage8" / "done").unlink()
    assert [s.seed for s in chain()] == [7]
    assert chain("--threads", "4") == []  # where it runs is not part of the recipe
    # other flags into the same OUT_DIR: stopped before any stage, instead of mixing two recipes
    with pytest.raises(subprocess.CalledProcessError) as err:
        chain("--sampling", "patch")
    assert err.value.returncode == 2 and b"stage1 was trained with other flags" in err.value.stderr
    assert not log.exists()


def test_patch_sampling_simulates_the_same_image_as_the_whole_brain():
    """--sampling patch forms only the patch, normalised by a sparse sample of the brain: with the same
    draws it gives the whole-brain image's patch up to the noise realisation (means within 0.02 SD),
    and not what normalising the patch by itself would give."""
    from bidsapp.models.tissue import normalise

    s = tiny_tissue_subject(n=40)
    region = (slice(4, 20), slice(10, 26), slice(12, 28))
    m = s.mask[region]
    rng = np.random.default_rng(0)
    for k, acq in enumerate(D.sample_parameters(rng, 10)):
        whole = D.normalised_sample(s, acq, np.random.default_rng(k))[0][region][m]
        patch = D.normalised_patch(s, acq, np.random.default_rng(k), region)[m]
        assert abs(patch.mean() - whole.mean()) < 0.02 and abs(patch.std() / whole.std() - 1) < 0.02
        alone = normalise(D.simulate(s, acq, np.random.default_rng(k))[region] * m, m)[m]
        assert abs(alone.mean() - whole.mean()) > 0.1


def test_patch_sampler_aligns_image_mask_and_target_and_pads_small_brains(tmp_path):
    subjects = [tiny_tissue_subject(seed=k) for k in range(2)]  # 24^3 brains
    a = D.PatchSampler(subjects, 16, seed=0, sampling="patch").batch(8, pairs=True)
    b = D.PatchSampler(subjects, 16, seed=0, sampling="patch").batch(8, pairs=True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)  # reproducible from the seed
    x, m, y, p = a
    assert x.shape == (8, 1, 16, 16, 16) and y.shape == (8, 3, 16, 16, 16)
    assert torch.equal(m[0], m[1]) and torch.equal(y[2], y[3]) and not torch.equal(x[0], x[1])
    # off-centre crops of the shells, some flipped: image, mask and target cover the same voxels
    for k in range(8):
        assert torch.equal(x[k, 0] != 0, m[k, 0] > 0) and torch.equal(y[k].sum(0) > 0.5, m[k, 0] > 0)
    # a brain smaller than the patch is padded around, as the whole-brain path's SpatialPadd does
    x, m, y, p = D.PatchSampler(subjects, 32, seed=0, sampling="patch").batch(2)
    assert x.shape == (2, 1, 32, 32, 32) and not m[:, :, :4].any() and not m[:, :, -4:].any()
    assert {int(m[k].sum()) for k in range(2)} <= {int(s.mask.sum()) for s in subjects}
    cfg = T.TrainConfig(out=str(tmp_path), seed=0, physics=True, patch=16, batch=4, iterations=3, features=(4, 8),
                        checkpoint_every=0, log_every=1, consistency=1.0, sampling="patch")
    assert T.train(cfg, subjects)[0]["iterations"] == 3 and "--sampling patch" in T.command_line(cfg)
    with pytest.raises(ValueError, match="--sampling"):
        T.TrainConfig(out=str(tmp_path), sampling="slices")


def test_randomised_samples_vary_what_real_scans_vary_and_keep_the_labels(tmp_path):
    """--randomise: contrast, slices, noise and bias vary sample to sample; image, mask and target stay
    aligned; the physics model is never shown a contrast its parameter vector does not describe; at 0
    the sampler's stream is the unrandomised one (earlier stages' commands still reproduce)."""
    s = tiny_tissue_subject(n=40)
    acq = {"family": "MPRAGE", "field": 3.0, "B0": 3.0, "TI": 0.9, "td": D.MPRAGE_TD, "tau": D.MPRAGE_TAU, "TRinv": None}
    imgs = [D.randomised_sample(s, acq, np.random.default_rng(k)) for k in range(12)]
    for img in imgs:
        assert np.isfinite(img).all() and not img[~s.mask].any() and img[s.mask].std() > 0.5
    lab = s.target.astype(np.float32).argmax(0)
    wm_minus_gm = [img[s.mask & (lab == 2)].mean() - img[s.mask & (lab == 1)].mean() for img in imgs]
    assert max(wm_minus_gm) > 0.5 and min(wm_minus_gm) < 0.2  # from strong to weak or reversed GM/WM contrast
    # the physics model's samples keep the told sequence (no random or spin-echo contrasts): an MPRAGE's
    # CSF is always the darkest, its GM/WM contrast varies with the scattered tissue properties
    phys = [D.randomised_sample(s, acq, np.random.default_rng(k), physics=True) for k in range(12)]
    means = np.array([[img[s.mask & (lab == j)].mean() for j in range(3)] for img in phys])
    assert (means[:, 0] < means[:, 1:].min(1) - 0.5).all()
    subjects = [tiny_tissue_subject(seed=k) for k in range(2)]
    x, m, y, _ = D.PatchSampler(subjects, 16, seed=0, sampling="patch", randomise=1.0, physics=False).batch(4)
    for k in range(4):
        assert torch.equal(x[k, 0] != 0, m[k, 0] > 0) and torch.equal(y[k].sum(0) > 0.5, m[k, 0] > 0)
    plain = D.PatchSampler(subjects, 16, seed=0, sampling="patch").batch(4)
    zero = D.PatchSampler(subjects, 16, seed=0, sampling="patch", randomise=0.0).batch(4)
    assert all(torch.equal(u, v) for u, v in zip(plain, zero)) and not torch.equal(plain[0], x)
    cfg = T.TrainConfig(out=str(tmp_path), seed=0, physics=False, patch=16, batch=2, iterations=2, features=(4, 8),
                        checkpoint_every=0, log_every=1, randomise=0.5)
    assert T.train(cfg, subjects)[0]["iterations"] == 2 and "--randomise 0.5" in T.command_line(cfg)
    sig = np.array([0.0, 0.05, 0.15, 0.25])  # background, CSF, GM, WM
    assert np.allclose(D.squeeze_gm_wm(sig, s.classes, 1.0), sig)
    half = D.squeeze_gm_wm(sig, s.classes, 0.5)
    assert np.allclose(half, [0.0, 0.05, 0.175, 0.225])  # CSF where it was, GM/WM contrast halved
    with pytest.raises(ValueError, match="--randomise"):
        T.TrainConfig(out=str(tmp_path), randomise=1.5)


def test_training_brains_can_be_given_in_the_order_the_workflow_gives_the_model():
    """--orientation RAS: an LIA label map becomes an RAS brain (the participant workflow hands the model
    RAS images); native keeps the label map's order, as the earlier stages trained."""
    from bidsapp.physics.phantom import Phantom

    s = tiny_tissue_subject(n=20)
    frac = s.fractions32().copy()
    frac[:, :6] = 0  # an asymmetric brain, so the reorientation shows
    frac[0, :6] = 1
    lia = np.array([[-2.0, 0, 0, 0], [0, 0, 2.0, 0], [0, -2.0, 0, 0], [0, 0, 0, 1]])
    ph = Phantom(frac, lia, s.classes, s.multipliers)
    ras = D.make_subjects(ph, "x", np.random.default_rng(0), 0, 2.0, orientation="RAS")[0]
    native = D.make_subjects(ph, "x", np.random.default_rng(0), 0, 2.0)[0]
    import nibabel as nib

    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S") and nib.aff2axcodes(native.affine) == ("L", "I", "A")
    to_ras = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("LIA"), nib.orientations.axcodes2ornt("RAS"))
    assert np.array_equal(ras.mask, nib.orientations.apply_orientation(native.mask, to_ras))
    assert not np.array_equal(ras.mask, native.mask)
    cfg = T.TrainConfig(out="x", orientation="RAS")
    assert "--orientation RAS" in T.command_line(cfg) and "--orientation" not in T.command_line(T.TrainConfig(out="x"))
    with pytest.raises(ValueError, match="--orientation"):
        T.TrainConfig(out="x", orientation="LPS")


def test_fraction_targets_count_partial_volume_as_it_is_and_cross_entropy_alone_is_calibrated(tmp_path):
    """--target fractions labels each voxel with its tissue fractions: the targets sum to the brain's true
    volumes, where the R1 gold standard calls mixed voxels grey; --dice-weight 0 leaves cross-entropy,
    which the targets themselves minimise."""
    s = tiny_tissue_subject()
    ft = s.fraction_target().astype(np.float64)
    true = s.phantom().volumes()
    vox = 8.0
    for k, name in enumerate(("CSF", "GM", "WM")):
        assert ft[k].sum() * vox == pytest.approx(true[name], rel=1e-3)
    gold = s.target.astype(np.float64)
    assert gold[1][s.mask].sum() > 1.05 * ft[1][s.mask].sum()  # the gold standard's GM takes in the mixtures
    sampler = D.PatchSampler([s], 16, seed=0, target="fractions")
    x, m, y, p = sampler.batch(2)
    total = y.sum(1)[m[:, 0] > 0]  # the rest of an edge voxel is outside the brain
    assert (total <= 1.01).all() and (total > 0.98).float().mean() > 0.5
    a = D.PatchSampler([s], 16, seed=0).batch(2)[2]
    assert not torch.equal(a, y)
    # cross-entropy alone: the soft target is its minimiser (probabilities equal to fractions)
    target = torch.tensor([[0.3, 0.5, 0.2]]).reshape(1, 3, 1, 1, 1)
    mask = torch.ones(1, 1, 1, 1, 1)
    ce = L.MaskedDiceCE(dice_weight=0.0)
    at_target = ce(target.log(), target, mask)
    for other in ([0.2, 0.6, 0.2], [0.05, 0.9, 0.05]):
        assert ce(torch.tensor(other).reshape(1, 3, 1, 1, 1).log(), target, mask) > at_target
    cfg = T.TrainConfig(out=str(tmp_path), seed=0, physics=False, patch=16, batch=2, iterations=2, features=(4, 8),
                        checkpoint_every=0, log_every=1, target="fractions", dice_weight=0.0)
    assert T.train(cfg, [s])[0]["iterations"] == 2
    assert "--target fractions --dice-weight 0" in T.command_line(cfg)
    assert "--target" not in T.command_line(T.TrainConfig(out="x"))
    with pytest.raises(ValueError, match="--target"):
        T.TrainConfig(out="x", target="labels")
    with pytest.raises(ValueError, match="--dice-weight"):
        T.TrainConfig(out="x", dice_weight=-1)


@pytest.mark.parametrize("injection", ["concat", "norm_shift"])
def test_forward_each_is_one_forward_pass_per_vector(injection):
    """A sweep shares the trunk and, after the last skip connection, whatever the parameters do not
    reach (the last block's first convolution): every vector still gets exactly its own logits."""
    from bidsapp.models.unet import UNet3D

    torch.manual_seed(1)
    net = UNet3D(1, 3, (4, 8), n_params=tissue.N_PARAMS, physics_injection=injection).eval()
    for name, prm in net.named_parameters():
        if name.rsplit(".", 2)[-2] == "inject":
            torch.nn.init.normal_(prm)  # zero-initialised: make the parameters matter
    x, p = torch.randn(2, 1, 16, 16, 16), torch.randn(3, tissue.N_PARAMS)
    with torch.no_grad():
        each = net.forward_each(x, p)
        one_by_one = torch.cat([net(x, p[k:k + 1]) for k in range(3)], 1)
    torch.testing.assert_close(each, one_by_one)
    assert not torch.allclose(each[:, :3], each[:, 3:6])


def test_command_trains_saves_and_continues_after_a_time_limit(tmp_path, monkeypatch, capsys, caplog):
    """``scanbridge-train tissue`` as a user runs it: a run cut by --time-limit-min leaves a checkpoint
    and no weights, and the same command without the limit finishes it and writes weights and card."""
    subjects = [tiny_tissue_subject()]
    monkeypatch.setattr(T, "load_or_build_subjects", lambda cfg: subjects)
    args = ["tissue", "--out", str(tmp_path / "run"), "--iterations", "3", "--patch", "16", "--batch", "1",
            "--features", "4,8", "--no-icbm", "--weights-dir", str(tmp_path / "w"), "--checkpoint-every", "1"]
    assert cli.main(args + ["--time-limit-min", "1e-9"]) == 0
    assert "stopped at iteration 1 of 3" in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and not (tmp_path / "w").exists()
    caplog.set_level("INFO", logger="scanbridge.train.tissue")
    assert cli.main(args) == 0
    assert "resuming at iteration 1" in caplog.text
    card = registry.load_card(tissue.PHYSICS_MODEL, tmp_path / "w")
    assert card["training"]["iterations_run"] == 3
    assert card["training"]["command"].startswith(f"scanbridge-train tissue --out {tmp_path / 'run'} --seed 0 --physics")
    assert "--features 4,8" in card["training"]["command"] and "--time-limit-min" not in card["training"]["command"]
