"""GM/WM/CSF signal against MPRAGE inversion time and against SPGR flip angle, at 1.5T and 3T.

MPRAGE: paper eq. 2 with the paper's TD 600 ms and tau 10 ms, TI 600-1200 ms.  SPGR: paper eq. 1 with
the two MRAI-NET protocols (1.5T: TR 13.8 ms, TE 2.8 ms; 3T: TR 7.9 ms, TE 4.5 ms), flip 1-90 degrees.
Signals are PD-weighted equation outputs (gain 1), tissue properties from bidsapp.physics.tissues.

    python benchmarks/physics/signal_curves.py      # -> benchmarks/results/physics_signal_curves.{png,json}
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bidsapp.physics import equations as eq  # noqa: E402
from bidsapp.physics.protocols import PROTOCOLS  # noqa: E402
from bidsapp.physics.tissues import properties  # noqa: E402

TISSUES = ("CSF", "GM", "WM")
COLOURS = {"CSF": "tab:blue", "GM": "tab:gray", "WM": "tab:orange"}


def curves() -> dict:
    ti = np.arange(0.600, 1.2001, 0.005)
    flips = np.arange(1.0, 90.01, 1.0)
    out = {"TI_s": ti.round(3).tolist(), "flip_deg": flips.tolist(), "MPRAGE": {}, "SPGR": {}}
    spgr = {1.5: PROTOCOLS["mrainet-1.5T-spgr"], 3.0: PROTOCOLS["mrainet-3T-spgr"]}
    for b0 in (1.5, 3.0):
        key = f"{b0:g}T"
        out["MPRAGE"][key], out["SPGR"][key] = {}, {}
        for t in TISSUES:
            p = properties(t, b0)
            out["MPRAGE"][key][t] = np.abs(eq.mprage(p.pd, p.t1, ti, 0.6, 0.01)).tolist()
            sp = spgr[b0]
            out["SPGR"][key][t] = eq.spgr(p.pd, p.t1, p.t2s, sp.tr, sp.te, flips).tolist()
    return out


def summary(c: dict) -> list[dict]:
    rows = []
    ti = np.array(c["TI_s"])
    flips = np.array(c["flip_deg"])
    for key in ("1.5T", "3T"):
        m = {t: np.array(c["MPRAGE"][key][t]) for t in TISSUES}
        wg = (m["WM"] - m["GM"]) / (m["WM"] + m["GM"])
        rows.append({"curve": f"MPRAGE {key}", "best": f"TI {ti[np.argmax(wg)] * 1000:.0f} ms",
                     "WM-GM contrast range": f"{wg.min():.3f}-{wg.max():.3f}",
                     "GM/WM at TI 900": f"{np.interp(0.9, ti, m['GM'] / m['WM']):.3f}"})
        s = {t: np.array(c["SPGR"][key][t]) for t in TISSUES}
        wg = (s["WM"] - s["GM"]) / (s["WM"] + s["GM"])
        rows.append({"curve": f"SPGR {key}", "best": f"flip {flips[np.argmax(wg)]:.0f} deg",
                     "WM-GM contrast range": f"{wg.min():.3f}-{wg.max():.3f}",
                     "GM/WM at TI 900": "-"})
    return rows


def plot(c: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), constrained_layout=True)
    for col, key in enumerate(("1.5T", "3T")):
        ax = axes[0, col]
        for t in TISSUES:
            ax.plot(np.array(c["TI_s"]) * 1000, c["MPRAGE"][key][t], label=t, color=COLOURS[t])
        ax.set(title=f"MPRAGE {key} (TD 600 ms, tau 10 ms)", xlabel="TI (ms)", ylabel="signal / PD units")
        ax.legend()
        ax = axes[1, col]
        for t in TISSUES:
            ax.plot(c["flip_deg"], c["SPGR"][key][t], label=t, color=COLOURS[t])
        p = PROTOCOLS["mrainet-1.5T-spgr" if key == "1.5T" else "mrainet-3T-spgr"]
        ax.axvline(p.flip_angle, color="k", lw=0.8, ls="--", label=f"MRAI-NET flip {p.flip_angle:g}")
        ax.set(title=f"SPGR {key} (TR {p.tr * 1000:g} ms, TE {p.te * 1000:g} ms)",
               xlabel="flip angle (deg)", ylabel="signal / PD units")
        ax.legend()
    fig.savefig(path, dpi=110)


def main() -> int:
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    c = curves()
    plot(c, res / "physics_signal_curves.png")
    rows = summary(c)
    (res / "physics_signal_curves.json").write_text(json.dumps({"curves": c, "summary": rows}, indent=1))
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[k]) for k in cols))
    print(f"wrote {res / 'physics_signal_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
