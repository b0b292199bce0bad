"""Brain extraction of a tilted head: does the learned mask follow the anatomy or the scanner's axes?

Heads lie in the scanner at whatever pitch the patient's neck allows (clinical scans are rarely aligned
to a standard plane), so the same brain reaches the network at different angles. Each head is rotated
in its voxel grid (a tilted head on an axis-aligned scan, cubic resampling about the grid's centre; the
0-degree reading is resampled too, shifted by 0.3 voxel, so every reading is interpolated once), the
learned mask (:func:`bidsapp.models.brainmask.extract`) is made on the rotated image and rotated back,
and it is compared, inside the field of view every rotation keeps, with the 0-degree mask (volume
change, Dice) and, on simulated heads, with the truth rotated the same way (Dice, volume error).
``--methods`` adds the peers of ``run.py`` (``template``, ``deepbet``), each run as there (in this
process: the times are not this benchmark's measure).

Heads: the held-out label maps (``anat-10``..``anat-12``) simulated as a 3 T MPRAGE at 1 mm, and Colin 27
(a real 1 mm head from Debian's archive; ``--no-registry`` leaves it out). The simulated images and the
N4 step are shared with ``run.py``'s cache (``--work``, the same default).

    python benchmarks/brainmask/tilt.py
    python benchmarks/brainmask/tilt.py --angles 0,0,0 15,0,0 30,10,0 --no-registry
    python benchmarks/brainmask/tilt.py --methods learned deepbet
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

ANGLES = ((0, 0, 0), (10, 0, 0), (-10, 0, 0), (20, 0, 0), (-20, 0, 0), (30, 10, 0), (0, 15, 0), (0, 0, 20))
"""Rotations (degrees about the left-right, anterior-posterior and inferior-superior axes of the RAS
grid): pitch (nodding) both ways, roll, yaw, and a pitch beyond the network's training range (20)."""
SHIFT = 0.3
"""Voxels every reading is shifted by, so that the 0-degree image is interpolated like the others."""
FAMILY = "MPRAGE 3T 1mm"


@functools.lru_cache(maxsize=1)
def _run_module():
    """``run.py`` as a module (the benchmark folders are not packages), loaded once."""
    spec = importlib.util.spec_from_file_location("benchmark_brainmask_run", Path(__file__).with_name("run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _matrix(angles) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", angles, degrees=True).as_matrix()


def rotate(data: np.ndarray, angles, order: int) -> np.ndarray:
    """``data`` rotated by ``angles`` about the grid's centre (and shifted by :data:`SHIFT`); zero outside."""
    from scipy import ndimage as ndi

    r = _matrix(angles)
    c = (np.array(data.shape) - 1) / 2.0
    return ndi.affine_transform(np.asarray(data, np.float32), r.T, offset=c - r.T @ c + SHIFT, order=order,
                                mode="constant", cval=0.0)


def unrotate(data: np.ndarray, angles) -> np.ndarray:
    """The inverse of :func:`rotate` (linear): a mask made on the rotated image, back on the original grid."""
    from scipy import ndimage as ndi

    r = _matrix(angles)
    c = (np.array(data.shape) - 1) / 2.0
    return ndi.affine_transform(np.asarray(data, np.float32), r, offset=c - r @ (c + SHIFT), order=1,
                                mode="constant", cval=0.0)


def learned(img) -> np.ndarray:
    """The app's mask of a nibabel image (in this process)."""
    from bidsapp.models.brainmask import extract

    return extract(img).mask


def peer(method: str, work: Path):
    """A ``run.py`` method as a function of a nibabel image: written to ``work`` and run by ``run.py``'s
    worker, here in this process."""
    run = _run_module()

    class _Reply:
        def send(self, value):
            self.value = value

    def mask(img) -> np.ndarray:
        import nibabel as nib

        work.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(work / "rotated.nii.gz"))
        out, reply = work / f"mask_{method}.nii.gz", _Reply()
        run.method_worker(method, str(work / "rotated.nii.gz"), str(out), 2, None, reply)
        if reply.value[2]:
            raise RuntimeError(f"{method}: {reply.value[2]}")
        return np.asarray(nib.load(str(out)).dataobj) > 0

    return mask


def tilted_masks(n4_file: Path, angles_list, truth_file: Path | None = None, method=learned) -> list[dict]:
    """One row per rotation of one head (module docstring); ``method``: nibabel image -> boolean mask."""
    import nibabel as nib

    from bidsapp.metrics.overlap import dice

    img = nib.load(str(n4_file))
    data = np.asarray(img.dataobj, np.float32)
    truth = (np.asarray(nib.load(str(truth_file)).dataobj) > 0) if truth_file else None
    vox_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    masks, fovs = {}, {}
    for angles in angles_list:
        rotated = nib.Nifti1Image(rotate(data, angles, order=3).clip(0, None), img.affine, img.header)
        masks[angles] = unrotate(np.asarray(method(rotated), np.float32), angles) >= 0.5
        fovs[angles] = unrotate(np.ones(data.shape, np.float32), angles) >= 0.99
    fov = np.logical_and.reduce(list(fovs.values()))
    ref = masks[tuple(angles_list[0])] & fov
    rows = []
    for angles in angles_list:
        m = masks[angles] & fov
        row = {"angles": list(angles), "volume_ml": float(m.sum()) * vox_ml,
               "volume_change_pct": 100.0 * (float(m.sum()) / max(float(ref.sum()), 1.0) - 1.0),
               "dice_vs_first": dice(m, ref)}
        if truth is not None:
            t = truth & fov
            row["dice_vs_truth"] = dice(m, t)
            row["volume_error_pct"] = 100.0 * (float(m.sum()) / max(float(t.sum()), 1.0) - 1.0)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="run.py's cache of simulated images (default: "
                                                            "the same as run.py's)")
    ap.add_argument("--angles", nargs="+", default=None,
                    help="rotations as x,y,z degrees; the first is the reference (default: " +
                         " ".join(",".join(str(a) for a in t) for t in ANGLES) + ")")
    ap.add_argument("--no-registry", action="store_true", help="leave Colin 27 out")
    ap.add_argument("--methods", nargs="+", default=["learned"], choices=["learned", "template", "deepbet"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "brainmask_tilt.json")
    args = ap.parse_args(argv)
    angles_list = [tuple(float(x) for x in a.split(",")) for a in args.angles] if args.angles else list(ANGLES)
    run = _run_module()
    work = args.work or Path(tempfile.gettempdir()) / "scanbridge-bench-brainmask"
    from bidsapp.devdata import anatomy_dir

    cases = [c for c in run.simulated_cases(work, anatomy_dir(), run.HELDOUT, 0) if c["family"] == FAMILY]
    if not args.no_registry:
        cases += run.registry_cases(work)
    rows = []
    for case in cases:
        n4 = case["dir"] / "n4.nii.gz"
        if not n4.is_file():
            run.preprocess(case["raw"], case["dir"])
        truth = case["truth"] if case["set"] == "simulated" else None
        for name in args.methods:
            method = learned if name == "learned" else peer(name, case["dir"] / "tilt")
            for r in tilted_masks(n4, angles_list, truth, method):
                rows.append({"head": case["head"], "method": name, **r})
                print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
                      flush=True)
    print()
    print(f"{'method':>8} {'rotation (deg)':>16} {'volume change %':>16} {'Dice vs 0':>10} {'sim. Dice':>10} "
          f"{'sim. vol. error %':>18}")
    summary = []
    for name, angles in ((n, a) for n in args.methods for a in angles_list):
        sel = [r for r in rows if tuple(r["angles"]) == tuple(angles) and r["method"] == name]
        sim = [r for r in sel if "dice_vs_truth" in r]
        s = {"method": name, "angles": list(angles),
             "volume_change_pct_median": statistics.median(r["volume_change_pct"] for r in sel),
             "volume_change_pct_max_abs": max(abs(r["volume_change_pct"]) for r in sel),
             "dice_vs_first_median": statistics.median(r["dice_vs_first"] for r in sel)}
        if sim:
            s["dice_vs_truth_median"] = statistics.median(r["dice_vs_truth"] for r in sim)
            s["volume_error_pct_median"] = statistics.median(r["volume_error_pct"] for r in sim)
        summary.append(s)
        print(f"{name:>8} {','.join(f'{a:g}' for a in angles):>16} {s['volume_change_pct_median']:>+9.2f} ({s['volume_change_pct_max_abs']:.2f})"
              f" {s['dice_vs_first_median']:>10.4f} {s.get('dice_vs_truth_median', float('nan')):>10.4f}"
              f" {s.get('volume_error_pct_median', float('nan')):>+18.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
