"""An unbiased within-subject space (mid-space) and template from all of a subject's sessions.

Every session is rigidly registered to the first one and the first to it (the two estimates are
averaged, so that neither image of a pair is the fixed one), and every session is then moved by the
*mean* of the transforms (the log-Euclidean mean, as FreeSurfer's ``mri_robust_template`` does), so no
session is the reference: each is resampled exactly once into the mid-space, with the same
interpolation. (Re-registering every session to the average of the first pass, as template builders
do, made the rotation worse on a test head: an average that holds the session itself pulls it back.)

Transforms are 4x4 matrices in ITK physical coordinates (LPS, mm): ``to_session[i]`` maps a point of
the mid-space to the same anatomical point in session ``i``; it is written as an ITK affine text file
that ``ants.apply_transforms(fixed=<mid-space image>, moving=<session image>, transformlist=[file])``
uses to bring a session's image into the mid-space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import linalg
from scipy import ndimage as ndi

MARGIN_MM = 6.0
"""Space kept around the union of the brain masks in the template grid."""
SPACING_MM = (1.0, 2.0)
"""Range of the template's voxel size: the finest voxel edge of the sessions, within these bounds (thick
clinical slices with 0.5 mm pixels get 1 mm; 2 mm images are not upsampled for nothing)."""


IMAGE_INTERPOLATOR = "lanczosWindowedSinc"
"""How a session's image is resampled into the mid-space (masks and tissue maps: linearly). Linear
interpolation blurs by an amount that depends on where the grid's points fall between the session's
voxels, and a reading of change across a scanner change (different voxel sizes, CSF inverted in one
session) moved with it: shifting the grid by half a voxel moved a simulated 1.5 T -> 3 T pair from
-0.75 to +0.64 %. Windowed sinc keeps the edges' profile wherever the points fall (same pair: -0.25 to
+0.15 %; ``benchmarks/longitudinal/readings.py --phase``)."""

RIGID_SAMPLING = 0.2
"""Share of the voxels the rigid registrations' metric samples. Their time grows with it (two demo
sessions: 17 s at 0.5, 7 s at 0.2, 4 s at 0.1) and the transform barely moves: at 0.2 every point of
the brain's box moved by at most 0.05 mm from its place at 0.5 (0.12 mm at 0.1)."""
RIGID_CONVERGENCE = "[100x50,1e-5,5]"
"""Iterations per level and when to stop early (ANTs' ``--convergence``). ANTs' default threshold,
1e-6 over 10 iterations, is never met under the random sampling's jitter, so every level ran all its
iterations; 1e-5 over 5 stops a level once the metric is flat. On three demo subjects (one without and
two with a scanner change) the registration took 2.2 s instead of 7.1 s (median) and moved the brain
box's corners by at most 0.036 mm, less than another random seed moves them (0.027-0.059 mm)."""


@dataclass
class MidSpace:
    grid: "object"
    """The template grid (an ants image): axes of the first session, covering every brain."""
    to_session: list
    """Per session, the 4x4 matrix mapping mid-space points to session points (ITK physical space)."""
    template: "object"
    """Average of the sessions' intensity-normalised images in the mid-space (ants image)."""


# ------------------------------------------------------------------------------------ matrices
def ants_to_matrix(tx) -> np.ndarray:
    """4x4 homogeneous matrix of an ANTs affine/rigid transform (maps fixed points to moving points)."""
    p = np.asarray(tx.parameters, float)
    c = np.asarray(tx.fixed_parameters, float)
    a, t = p[:9].reshape(3, 3), p[9:12]
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = t + c - a @ c
    return m


def matrix_to_ants(m: np.ndarray):
    import ants

    return ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                      matrix=np.asarray(m[:3, :3], float), translation=np.asarray(m[:3, 3], float))


def write_transform(m: np.ndarray, path) -> str:
    import ants

    ants.write_transform(matrix_to_ants(m), str(path))
    return str(path)


def read_transform(path) -> np.ndarray:
    import ants

    return ants_to_matrix(ants.read_transform(str(path)))


def mean_rigid(ms) -> np.ndarray:
    """Log-Euclidean mean of rigid 4x4 matrices (exact for commuting ones; rigid motions of a head
    between sessions are small, where it is an excellent approximation of the Karcher mean)."""
    logs = [np.real(linalg.logm(m)) for m in ms]
    return np.real(linalg.expm(np.mean(logs, axis=0)))


def recentre(ms) -> list:
    """The transforms re-expressed from the mean space: ``m_i @ inv(mean)``, so their mean is identity."""
    inv = np.linalg.inv(mean_rigid(ms))
    return [m @ inv for m in ms]


# ------------------------------------------------------------------------------------ images
def normalise(img, mask):
    """Image divided by its median inside the mask, zero outside a 3-voxel dilation of the mask: what
    registration sees (the skull of one session must not pull the other's brain)."""
    data = img.numpy().astype(np.float32)
    m = mask.numpy() > 0.5
    med = float(np.median(data[m])) if m.any() else 1.0
    keep = ndi.binary_dilation(m, iterations=3)
    return img.new_image_like(np.where(keep, data / max(med, 1e-6), 0.0).astype(np.float32))


def template_spacing(images) -> float:
    finest = min(float(min(img.spacing)) for img in images)
    return float(np.clip(finest, *SPACING_MM))


def _grid(images, masks, to_session):
    """Grid with the first session's axes covering every session's brain in the mid-space
    (:func:`template_spacing`)."""
    import ants

    step = template_spacing(images)

    corners = []
    for img, mask, m in zip(images, masks, to_session):
        idx = np.argwhere(mask.numpy() > 0.5)
        if not len(idx):
            idx = np.argwhere(np.ones(mask.shape, bool))
        lo, hi = idx.min(0), idx.max(0)
        box = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])], float)
        pts = np.array([ants.transform_index_to_physical_point(mask, [int(v) for v in p]) for p in box])
        inv = np.linalg.inv(m)
        corners.append((inv[:3, :3] @ pts.T).T + inv[:3, 3])
    pts = np.concatenate(corners)
    direction = np.asarray(images[0].direction, float)
    local = pts @ direction  # coordinates along the first session's axes
    lo = local.min(0) - MARGIN_MM
    hi = local.max(0) + MARGIN_MM
    shape = tuple(int(np.ceil((h - l) / step)) + 1 for l, h in zip(lo, hi))
    origin = direction @ lo
    return ants.make_image(shape, 0.0, spacing=(step,) * 3, origin=tuple(origin), direction=direction,
                           pixeltype="float")


def resample(img, grid, m: np.ndarray, interpolator: str = "linear", work_dir=None, name: str = "xfm"):
    """``img`` (in its session's space) resampled on ``grid`` through the mid-space->session matrix ``m``."""
    import ants
    import tempfile

    folder = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="midspace_"))
    folder.mkdir(parents=True, exist_ok=True)
    path = write_transform(m, folder / f"{name}.mat")
    return ants.apply_transforms(fixed=grid, moving=img, transformlist=[path], interpolator=interpolator)


def _rigid(fixed, moving, init: np.ndarray | None, seed: int, work_dir: Path, name: str) -> np.ndarray:
    """Rigid ANTs registration of ``moving`` to ``fixed`` (mutual information: contrasts may differ);
    returns the fixed->moving matrix."""
    import ants

    # antsRegistration's own arguments (ants.registration's list form): its keyword form cannot set the
    # convergence threshold
    f, m = str(work_dir / f"{name}_fixed.nii.gz"), str(work_dir / f"{name}_moving.nii.gz")
    ants.image_write(_coarse(fixed), f)
    ants.image_write(_coarse(moving), m)
    init_arg = str(write_transform(init, work_dir / f"{name}_init.mat")) if init is not None else f"[{f},{m},1]"
    prefix = str(work_dir / f"{name}_")
    ants.registration([
        "--dimensionality", "3", "--float", "1", "--random-seed", str(int(seed) + 1),
        "--initial-moving-transform", init_arg,
        "--metric", f"Mattes[{f},{m},1,32,Regular,{RIGID_SAMPLING}]", "--transform", "Rigid[0.25]",
        "--convergence", RIGID_CONVERGENCE, "--smoothing-sigmas", "1x0", "--shrink-factors", "2x1",
        "--use-histogram-matching", "0", "--collapse-output-transforms", "1", "--output", prefix,
    ], None)
    # the result includes the initial transform: ANTs composes it into the written matrix
    return ants_to_matrix(ants.read_transform(prefix + "0GenericAffine.mat"))


def _coarse(img):
    """The brain box of an image from :func:`normalise`, at 2 mm: rigid alignment of two brains is
    sub-millimetric at this sampling and 10-20 times cheaper than on the whole 1 mm field of view."""
    import ants

    data = img.numpy()
    idx = np.argwhere(data > 0)
    if len(idx):
        img = ants.crop_indices(img, [int(v) for v in idx.min(0)], [int(v) + 1 for v in idx.max(0)])
    return ants.resample_image(img, (2.0, 2.0, 2.0), use_voxels=False, interp_type=0)


def build_midspace(images, masks, *, seed: int = 0, work_dir=None) -> MidSpace:
    """The mid-space of sessions ``images`` (ants images, one per session) with brain ``masks``."""
    import tempfile

    if len(images) < 2:
        raise ValueError("a within-subject template needs at least two sessions")
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="midspace_"))
    work.mkdir(parents=True, exist_ok=True)
    norm = [normalise(i, m) for i, m in zip(images, masks)]
    # every session to the first and the first to every session: the two estimates, averaged, are
    # inverse-consistent (neither image of a pair is the fixed one)
    to_first = [np.eye(4)]
    for i in range(1, len(norm)):
        forward = _rigid(norm[0], norm[i], None, seed, work, f"to_first_{i}")
        backward = _rigid(norm[i], norm[0], np.linalg.inv(forward), seed, work, f"from_first_{i}")
        to_first.append(mean_rigid([forward, np.linalg.inv(backward)]))
    to_session = recentre(to_first)
    grid = _grid(images, masks, to_session)
    template = _average(norm, grid, to_session, work)
    return MidSpace(grid=grid, to_session=to_session, template=template)


def _average(norm, grid, to_session, work):
    acc = None
    for i, (img, m) in enumerate(zip(norm, to_session)):
        r = resample(img, grid, m, work_dir=work, name=f"avg_{i}").numpy()
        acc = r if acc is None else acc + r
    return grid.new_image_like((acc / len(norm)).astype(np.float32))
