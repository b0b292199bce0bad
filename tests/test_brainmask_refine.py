"""The 1 mm refinement of the learned brain mask: its training samples, its inference and its card."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from bidsapp.models import brainmask as bm


@pytest.fixture(scope="module")
def anatomy(tmp_path_factory):
    """A 1 mm label-map head (WM, cortex, CSF, skull, scalp) named as the shared label maps are."""
    d = tmp_path_factory.mktemp("anatomy")
    n = 72
    r = np.linalg.norm(np.indices((n, n, n)) - (n - 1) / 2, axis=0)
    lab = np.zeros((n, n, n), np.int16)
    for radius, label in ((34, 511), (31, 515), (27, 24), (25, 3), (19, 2)):
        lab[r <= radius] = label
    lab[34:38, 34:38, 34:38] = 502  # a vessel inside the brain (label 502): a hole the target fills
    nib.save(nib.Nifti1Image(lab, np.diag([-1.0, 1.0, 1.0, 1.0])), d / "anat-01_dseg.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), d / "anat-10_dseg.nii.gz")  # held out: never loaded
    return d


@pytest.fixture(scope="module")
def heads(anatomy):
    from bidsapp.training.brainmask_refine import load_fine_heads

    return load_fine_heads(anatomy)


def test_heads_are_the_training_maps_with_their_brain_filled_and_its_distance(heads):
    assert [h.name for h in heads] == ["anat-01"]
    h = heads[0]
    brain = h.labels[0, 1].numpy() > 0.5
    assert brain[36, 36, 36]  # the vessel inside is brain, as the mask's filled holes are
    dist = h.distance[0, 0].numpy()
    assert (dist[brain] > 0).all() and (dist[~brain] <= 0).all()
    assert dist.max() == pytest.approx(27, abs=1.5)  # the brain's radius, in mm
    assert len(h.outline) > 0 and brain[tuple(h.outline.T)].all()


def test_samples_cross_the_outline_with_the_coarse_networks_probability_and_resume_exactly(heads):
    import torch

    from bidsapp.training.brainmask_refine import OutlineSynth

    a = OutlineSynth(heads, size=32, seed=5, patches_per_head=2, pool=2)
    b = OutlineSynth(heads, size=32, seed=5, patches_per_head=2, pool=2)
    first = a.batch(3)
    assert all(torch.equal(x, y) for x, y in zip(first[:2], b.batch(3)[:2]))
    x, y, tags = first
    assert x.shape == (3, 2, 32, 32, 32) and y.shape == (3, 1, 32, 32, 32) and tags[0].startswith("anat-01")
    assert float(x[:, 0].min()) >= 0 and float(x[:, 0].max()) <= 1.5 ** 2
    assert 0 <= float(x[:, 1].min()) and float(x[:, 1].max()) <= 1 + 1e-6
    assert 0.05 < float(y.mean()) < 0.95  # fields of view across the outline
    assert float(((x[:, 1] >= 0.5) == (y[:, 0] > 0.5)).float().mean()) > 0.7  # the coarse network found it
    # a run resumed from a checkpoint's state draws what the uninterrupted one draws
    state = a.state()
    c = OutlineSynth(heads, size=32, seed=0, patches_per_head=2, pool=2)
    c.set_state(state)
    assert all(torch.equal(p, q) for p, q in zip(a.batch(3)[:2], c.batch(3)[:2]))


def test_training_writes_a_card_and_the_network_refines_only_near_the_outline(heads, anatomy, tmp_path):
    from bidsapp.models import registry
    from bidsapp.training.brainmask_refine import TrainConfig, command_line, save, train

    cfg = TrainConfig(anatomy_dir=str(anatomy), out=str(tmp_path / "run"), iterations=2, batch=1, size=32,
                      threads=1, checkpoint_every=1)
    hist = train(cfg, heads=heads, progress=lambda m: None)
    w = tmp_path / "w"
    for f in registry.weights_path(bm.MODEL_NAME).parent.glob(f"{bm.MODEL_NAME}.*"):
        (w / f.name).parent.mkdir(exist_ok=True)
        (w / f.name).write_bytes(f.read_bytes())
    card = save(hist["net"], cfg, hist, weights_dir=w)
    assert card["training"]["command"] == command_line(cfg) and card["band_mm"] == bm.BAND_MM
    assert "anat-01" in card["training"]["data"] and "held out: anat-10" in card["training"]["data"]

    # inference: the coarse probability of a ball, refined by the (untrained) network
    n = 40
    r = np.linalg.norm(np.indices((n, n, n)) - (n - 1) / 2, axis=0)
    prob_low = (r <= 12).astype(np.float32)  # a 24 mm-radius brain on the 2 mm grid
    ras = np.ones((2 * n,) * 3, np.float32)
    out = bm.refine_probability(ras, (1.0, 1.0, 1.0), prob_low, weights_dir=w)
    assert out.shape == ras.shape
    rf = np.linalg.norm(np.indices(ras.shape) - (2 * n - 1) / 2, axis=0)
    assert (out[rf < 24 - bm.BAND_MM - 2.5] == 1).all() and (out[rf > 24 + bm.BAND_MM + 2.5] == 0).all()
    band = np.abs(rf - 24) < 1
    assert np.unique(out[band]).size > 2  # decided by the network there
    # a weights folder without a refinement gives the coarse mask alone
    only = tmp_path / "coarse"
    only.mkdir()
    for f in w.glob(f"{bm.MODEL_NAME}.*"):
        (only / f.name).write_bytes(f.read_bytes())
    assert bm.refine_probability(ras, (1.0, 1.0, 1.0), prob_low, weights_dir=only) is None
