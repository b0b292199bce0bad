"""Time and memory of the subject level on one subject's participant outputs.

Reads ``OUT/sub-<label>/ses-*/anat`` (the preprocessed reference images, brain masks and tissue
probabilities the participant level wrote) and runs :func:`bidsapp.longitudinal.subject.subject_change`
on them, as the subject-level node does. Prints seconds and peak memory; the issue's target is at most
2 min per session pair on 2 CPU cores and 4 GB.

    python benchmarks/longitudinal/speed.py --out benchmarks/results/longitudinal-work/atrophy/out --subject 01
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path


def sessions_of(out: Path, subject: str):
    from bidsapp.labels import TISSUE
    from bidsapp.longitudinal.subject import SessionInput

    found = []
    for ses in sorted((out / f"sub-{subject}").glob("ses-*")):
        anat = ses / "anat"
        stem = f"sub-{subject}_{ses.name}"
        image = next(iter(sorted(anat.glob(f"{stem}_desc-preproc_*.nii.gz"))), None)
        if image is None:
            continue
        tissue = {c: str(anat / f"{stem}_label-{c}_probseg.nii.gz") for c in TISSUE.names}
        found.append(SessionInput(ses.name, str(image), str(anat / f"{stem}_desc-brain_mask.nii.gz"),
                                  tissue if all(Path(p).is_file() for p in tissue.values()) else None,
                                  acquisition="one"))
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="participant output folder")
    ap.add_argument("--subject", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import os

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    from bidsapp.longitudinal.subject import subject_change

    sessions = sessions_of(Path(args.out), args.subject.removeprefix("sub-"))
    if len(sessions) < 2:
        print(f"{args.out}: sub-{args.subject} has fewer than two processed sessions", file=sys.stderr)
        return 2
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        result = subject_change(sessions, work_dir=work)
    seconds = time.perf_counter() - t
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    pairs = len(result.table[["ses_from", "ses_to"]].drop_duplicates())
    print(f"sub-{args.subject}: {len(sessions)} sessions, {pairs} pair(s): {seconds:.1f} s, peak {peak_gb:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
