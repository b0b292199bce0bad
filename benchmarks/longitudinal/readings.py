"""Why the subject level reads change with a boundary-shift integral: the same pairs read other ways.

Re-reads the subject-level inputs of a finished ``change.py`` or ``real_heads.py`` run (each subject's
mid-space is rebuilt from the inputs its Nipype node kept in the run's work folder, so the pipeline is
not run again) with the shipped reading and three alternatives, and compares each with the truth:

``bsi``               the shipped reading (:func:`bidsapp.longitudinal.change.pair_volumes`): tissue
                      fractions from intensity, boundary-shift integral over the brain masks, divided by
                      the first session's segmented GM + WM (its tissue maps);
``bsi-boundary``      the same integral summed only within 2 mm of the tissue maps' parenchyma edge
                      (the "XOR" region of KN-BSI), which leaves out the dura and vessels of the mask's rim;
``bsi-intensity``     the shipped integral divided by the first session's summed intensity fractions
                      instead (the reading before; on real heads that sum also counts the mask's rim,
                      which is not brain);
``jacobian``          (``--jacobian``) Jacobian integration: the later session registered onto the earlier
                      one with ANTs SyN (cross-correlation, 4 and 2 mm levels), the determinant of the
                      deformation averaged over the parenchyma. Slow: about a minute per pair on 2 cores.

Printed per kind of pair (rescan, scanner change, atrophy): median |error| in percentage points, and
for atrophy the median and range of measured / true brain change.

``--phase F`` shifts the mid-space grid by a fraction F of a voxel (along 1, 0.7, 0.4 of its axes)
before the pairs are read, and ``--interpolator`` resamples the session images another way (ANTs'
names; default the shipped :data:`bidsapp.longitudinal.midspace.IMAGE_INTERPOLATOR`): a reading should
not depend on where the grid's points fall between the sessions' voxels.

    python benchmarks/longitudinal/real_heads.py --work RUN        # or change.py --work RUN
    python benchmarks/longitudinal/readings.py --work RUN --jacobian
    python benchmarks/longitudinal/readings.py --work RUN --phase 0.5 --interpolator linear
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
BOUNDARY_MM = 2.0
READINGS = ("bsi", "bsi-boundary", "bsi-intensity", "jacobian")


# ------------------------------------------------------------------------------------ the readings
def boundary_region(parenchyma: np.ndarray, region: np.ndarray, spacing, mm: float = BOUNDARY_MM) -> np.ndarray:
    """Voxels of ``region`` within ``mm`` of the edge of ``parenchyma`` (either side)."""
    from scipy import ndimage as ndi

    inside = np.asarray(parenchyma, bool)
    near_in = ndi.distance_transform_edt(inside, sampling=spacing) <= mm
    near_out = ndi.distance_transform_edt(~inside, sampling=spacing) <= mm
    return region & np.where(inside, near_in, near_out)


def shift_grid(fraction: float) -> None:
    """Make every mid-space grid built from now on start ``fraction`` of a voxel further along (1, 0.7, 0.4)
    of its axes: the same images, sampled at other points."""
    from bidsapp.longitudinal import midspace as MS

    build = MS._grid

    def shifted(images, masks, to_session):
        import ants

        g = build(images, masks, to_session)
        d = np.asarray(g.direction, float)
        origin = np.asarray(g.origin) + d @ (np.array([1.0, 0.7, 0.4]) * fraction * g.spacing[0])
        return ants.make_image(g.shape, 0.0, spacing=g.spacing, origin=tuple(origin), direction=d, pixeltype="float")

    MS._grid = shifted


def jacobian_change(a: np.ndarray, b: np.ndarray, weight: np.ndarray, mask: np.ndarray, spacing) -> float:
    """Percent volume change from ``a`` to ``b`` (same grid) by Jacobian integration: ``b`` registered onto
    ``a`` (SyN, cross-correlation, inside ``mask``), the determinant averaged with ``weight``."""
    import ants

    fixed = ants.from_numpy(np.asarray(a * mask, np.float32), spacing=tuple(map(float, spacing)))
    moving = ants.from_numpy(np.asarray(b * mask, np.float32), spacing=tuple(map(float, spacing)))
    reg = ants.registration(fixed=fixed, moving=moving, type_of_transform="SyNOnly", initial_transform="Identity",
                            syn_metric="CC", syn_sampling=2, grad_step=0.2, flow_sigma=3, total_sigma=0,
                            reg_iterations=(40, 20, 0))
    jac = ants.create_jacobian_determinant_image(fixed, reg["fwdtransforms"][0]).numpy()
    return float((weight * (jac - 1.0)).sum() / max(float(weight.sum()), 1e-6) * 100.0)


class Subject:
    """One subject of a finished run, on its mid-space grid, with what every pair's readings share."""

    def __init__(self, node: Path, work: Path):
        from nipype.utils.filemanip import loadpkl

        from bidsapp.longitudinal import subject as S
        from workflows.interfaces.longitudinal import session_inputs

        self.mid = S.in_midspace(session_inputs(loadpkl(str(node / "_inputs.pklz"))), seed=0, work_dir=work)
        if any(t is None for t in self.mid.tissues):
            raise SystemExit(f"error: {node}: a session without tissue maps (the readings need them)")
        common = self.mid.common
        self.spacing = tuple(self.mid.midspace.grid.spacing)
        self.parenchyma = np.mean([t["GM"] + t["WM"] for t in self.mid.tissues], 0) * common.region
        self.boundary = boundary_region(self.parenchyma > 0.5, common.region, self.spacing)

    def read_pair(self, i: int, j: int, jacobian: bool = False) -> dict:
        """Brain change (%) from session ``i`` to ``j`` by every reading (module docstring)."""
        from scipy import ndimage as ndi

        from bidsapp.longitudinal import change as C
        from bidsapp.longitudinal import subject as S

        mid, common = self.mid, self.mid.common
        a, b = mid.sessions[i], mid.sessions[j]
        # as the subject level reads a pair: unknown acquisitions count as changed
        res = C.pair_volumes(mid.norm[i], mid.norm[j], common, changed=S.acquisition_changed(a, b) is not False,
                             csf_inverted=(a.csf_inverted, b.csf_inverted), tissue_a=mid.tissues[i])
        intensity = C.pair_volumes(mid.norm[i], mid.norm[j], common, changed=S.acquisition_changed(a, b) is not False,
                                   csf_inverted=(a.csf_inverted, b.csf_inverted))
        vol, v = res.volume_from["brain"], common.voxel_mm3
        moved = float(res.shift.sum(dtype=np.float64)) * v
        summed = intensity.volume_from["brain"]
        out = {"bsi": C.percent(vol, vol + moved),
               "bsi-boundary": C.percent(vol, vol + float(res.shift[self.boundary].sum(dtype=np.float64)) * v),
               "bsi-intensity": C.percent(summed, summed + moved)}
        if jacobian:
            mask = ndi.binary_dilation(common.region, iterations=3).astype(np.float32)
            out["jacobian"] = jacobian_change(mid.norm[i], mid.norm[j], self.parenchyma, mask, self.spacing)
        return out


def nodes(run: Path):
    """(dataset folder, subject label, node folder) of every subject-level node under a benchmark run."""
    for node in sorted(run.glob("**/work/scanbridge_wf/sub_*_wf/longitudinal_wf/subj_longitudinal")):
        dataset = node.parents[4]
        yield dataset, "sub-" + node.parents[1].name[len("sub_"):-len("_wf")], node


def truth_of(dataset: Path):
    """A function (subject, ses_from, ses_to) -> true brain change (%), from the dataset's truth folder."""
    injected = dataset / "bids" / "derivatives" / "truth" / "injected.tsv"
    if injected.is_file():  # real_heads.py
        from benchmark_real_heads import true_change

        loss = pd.read_csv(injected, sep="\t").set_index("participant_id").loss_percent
        return lambda sub, a, b: (true_change(loss[sub], a, b), "rescan" if b == "ses-2" and a == "ses-1" else "atrophy")
    vols = pd.read_csv(dataset / "bids" / "derivatives" / "truth" / "volumes.tsv", sep="\t").set_index(
        ["participant_id", "session_id"])
    kind = dataset.name  # change.py: rescan, scanner, atrophy
    return lambda sub, a, b: ((vols.loc[(sub, b)]["brain"] / vols.loc[(sub, a)]["brain"] - 1.0) * 100.0, kind)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for reading in [r for r in READINGS if r in df.columns]:
        row = {"reading": reading}
        for kind, d in df.groupby("kind"):
            row[f"{kind} |error|"] = float(np.median(np.abs(d[reading] - d.true)))
            big = d[np.abs(d.true) > 0.25]
            if kind == "atrophy" and len(big):
                ratio = big[reading] / big.true
                row["atrophy measured/true"] = float(np.median(ratio))
                row["atrophy min"], row["atrophy max"] = float(ratio.min()), float(ratio.max())
        rows.append(row)
    return pd.DataFrame(rows)


def _sibling(name: str):
    """``benchmarks/longitudinal/<name>.py`` as a module (the benchmark folders are not packages)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="the --work folder of a finished change.py or "
                                                              "real_heads.py run")
    ap.add_argument("--jacobian", action="store_true", help="also read by Jacobian integration (slow)")
    ap.add_argument("--out", type=Path, default=None, help="JSON to write (default: none)")
    ap.add_argument("--phase", type=float, default=0.0, help="shift the mid-space grid by this fraction of a voxel")
    ap.add_argument("--interpolator", default=None, help="resample the session images this way (ANTs' name; "
                                                         "default: the shipped one)")
    args = ap.parse_args(argv)
    from bidsapp.longitudinal import midspace as MS

    if args.phase:
        shift_grid(args.phase)
    if args.interpolator:
        MS.IMAGE_INTERPOLATOR = args.interpolator
    sys.modules.setdefault("benchmark_real_heads", _sibling("real_heads"))
    rows = []
    found = list(nodes(args.work))
    if not found:
        print(f"error: no subject-level node under {args.work}/**/work (run change.py or real_heads.py with "
              f"--work first)", file=sys.stderr)
        return 2
    from bidsapp.longitudinal.subject import pairs

    for dataset, sub, node in found:
        truth = truth_of(dataset)
        subject = Subject(node, args.work / "readings" / f"phase{args.phase:g}" / dataset.name / sub)
        labels = [s.label for s in subject.mid.sessions]
        for i, j in pairs(len(labels)):
            true, kind = truth(sub, labels[i], labels[j])
            got = subject.read_pair(i, j, jacobian=args.jacobian)
            rows.append({"dataset": dataset.name, "participant_id": sub, "pair": f"{labels[i]}>{labels[j]}",
                         "kind": kind, "true": true, **got})
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
                  flush=True)
    df = pd.DataFrame(rows)
    table = summarise(df)
    print()
    print(table.round(2).to_string(index=False))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"pairs": df.to_dict("records"), "summary": table.to_dict("records")},
                                       indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
