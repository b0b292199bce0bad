"""``scanbridge-simulate``: write a synthetic multi-site longitudinal BIDS dataset with ground truth.

    scanbridge-simulate OUT --subjects N --sites K --sessions S [--modalities T1w,FLAIR,...] [--lesions]
        [--decline-fraction F] [--protocol-change] [--resolution MM] [--psf FWHM] [--seed N] [--overwrite]
        [--anatomy-dir DIR] [--jobs N] [--quiet] [--list-sites]

Exit codes: 0 written; 2 bad arguments (one-line message, nothing written); 1 the simulation failed.
Public API: ``main(argv=None) -> int``, ``build_parser()``.
"""
from __future__ import annotations

import argparse
import sys

from .. import __version__
from .dataset import DEFAULT_JOBS, DatasetConfig, check_output_dir, write_dataset
from .protocols import MODALITIES, SITES

PROG = "scanbridge-simulate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Simulate a multi-site, longitudinal BIDS dataset (static MRI equations on tissue phantoms) "
                    "with its ground truth under derivatives/truth.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out", nargs="?", help="output BIDS directory (must not exist or be empty)")
    p.add_argument("--subjects", type=int, default=4, help="number of subjects")
    p.add_argument("--sites", type=int, default=2, help=f"number of sites (1-{len(SITES)}; see --list-sites)")
    p.add_argument("--sessions", type=int, default=2, help="sessions per subject (one year apart)")
    p.add_argument("--modalities", default="T1w", help=f"comma-separated, from {','.join(MODALITIES)}")
    p.add_argument("--lesions", action="store_true", help="add white-matter hyperintensity-like lesions")
    p.add_argument("--new-lesions-per-year", type=float, default=0.0,
                   help="with --lesions: mean number of new lesions per year after baseline (MS follow-up)")
    p.add_argument("--decline-fraction", type=float, default=0.5,
                   help="fraction of subjects with accelerated atrophy (trajectory 'decline')")
    p.add_argument("--protocol-change", action="store_true",
                   help="the second half of each subject's sessions uses the site's upgraded scanner/protocol")
    p.add_argument("--resolution", type=float, default=None,
                   help="isotropic voxel size in mm for every image (2D protocols keep thicker slices); "
                        "default: each protocol's own voxel size (about 1 mm)")
    p.add_argument("--psf", type=float, default=0.0, metavar="FWHM",
                   help="blur every image by a Gaussian point-spread function of this full width at half maximum "
                        "(in-plane voxels), as a scanner's finite k-space sampling does; default 0: none")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a previous simulator output")
    p.add_argument("--anatomy-dir", default=None,
                   help="folder of FreeSurfer-style label maps (*_dseg.nii.gz) used in turn as anatomies; "
                        "default: the ICBM152 2009a template shipped with nilearn")
    p.add_argument("--jobs", type=int, default=None,
                   help="subjects simulated at once, one process each (about 2.4 GB each at 1 mm); the output "
                        f"does not depend on it; default: the CPUs, at most {DEFAULT_JOBS}")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.add_argument("--list-sites", action="store_true", help="print the built-in sites and their protocols and exit")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def _list_sites() -> str:
    lines = []
    for s in SITES.values():
        lines.append(f"{s.name} ({s.institution})")
        for label, protos in (("", s.protocols), ("after --protocol-change: ", s.upgrade or {})):
            for mod, p in protos.items():
                lines.append(f"  {label}{mod}: {p.name} ({p.manufacturer} {p.model} {p.field_strength:g}T, {p.sequence})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_sites:
        print(_list_sites())
        return 0
    if not args.out:
        parser.error("the output directory OUT is required")
    mods = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    config = DatasetConfig(subjects=args.subjects, sites=args.sites, sessions=args.sessions, modalities=mods,
                           lesions=args.lesions, new_lesions_per_year=args.new_lesions_per_year,
                           decline_fraction=args.decline_fraction,
                           protocol_change=args.protocol_change, resolution=args.resolution, seed=args.seed,
                           anatomy_dir=args.anatomy_dir, psf_fwhm=args.psf)
    try:
        if args.jobs is not None and args.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
        config.validate()
        check_output_dir(args.out, args.overwrite)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        write_dataset(args.out, config, overwrite=args.overwrite, progress=progress, jobs=args.jobs)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
