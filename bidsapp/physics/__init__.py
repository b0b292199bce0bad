"""physics: static-equation MRI simulation with known ground truth.

Modules (each documents its public API in its docstring):
- ``equations``: SPGR (paper eq. 1), MPRAGE (eq. 2), spin echo, FLAIR; numpy or torch; ``signal()`` dispatch.
- ``tissues``: PD/T1/T2/T2* per tissue class at 1.5T, 3T, 7T (cited), between-subject variation,
  the physics gold-standard R1 reference.
- ``protocols``: ``Protocol`` (validated, BIDS sidecar), presets (MRAI-NET SPGRs, MPRAGE, FLAIR, T2w,
  PDw) and multi-scanner ``SITES``.
- ``phantom``: ``Phantom`` tissue-fraction maps from label maps or the ICBM152 2009a template,
  resampling with exact partial volume, random deformations, quantitative maps.
- ``simulator``: ``simulate()`` (partial volume, gain, bias field, Rician noise, voxel size,
  orientation) and the torch path for on-the-fly training.
- ``gold_standard``: the paper's R1-based physics gold standard.
- ``lesions``, ``atrophy``, ``qmri``, ``dataset``, ``cli``: lesion and atrophy models, synthesis from
  BIDS qMRI maps, and the ``scanbridge-simulate`` dataset writer.
"""

from .equations import flair, mprage, signal, spgr, spin_echo  # noqa: E402,F401
from .gold_standard import physics_gold_standard  # noqa: E402,F401
from .phantom import Phantom, from_icbm152, from_label_map, make_subject, sphere_phantom  # noqa: E402,F401
from .protocols import PROTOCOLS, SITES, Protocol, get_protocol  # noqa: E402,F401
from .simulator import Simulation, simulate, simulate_torch  # noqa: E402,F401
