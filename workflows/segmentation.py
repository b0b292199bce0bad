"""Tissue segmentation methods and the workflow that runs them side by side.

Every method is a Nipype node with the same contract (see :class:`workflows.interfaces.ants.Atropos`
and :class:`workflows.interfaces.tissue_model.TissueModel`):

- inputs ``in_file`` (preprocessed T1w), ``mask_file`` (brain mask), and optionally ``acquisition``
  (the T1w's acquisition record dict), ``priors`` (template CSF/GM/WM in subject space),
  ``num_threads``, ``seed``;
- outputs ``probseg`` (CSF, GM, WM), ``dseg`` (1 CSF, 2 GM, 3 WM), ``volumes_tsv`` (long format),
  ``method``, ``metadata`` (sidecar fields) and ``warnings``.

A method is made available with :func:`register_segmentation`; :func:`init_tissue_seg_wf` runs the
ones asked for. The first is the *main answer* (plain ``label-GM_probseg``, ``dseg``); the others
keep a ``desc-<desc>`` entity (``desc-atropos_dseg``), so Atropos stays as the baseline once a model
is the main answer. Their volume rows are merged into one ``desc-volumes_morph.tsv``.

Registered here: ``atropos`` (classical baseline, always available) and ``unet-physics`` (the
physics-aware U-Net of :mod:`workflows.interfaces.tissue_model`, falling back to the plain U-Net
when the sequence parameters are unusable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

DEFAULT_SEGMENTATION = ("atropos",)


@dataclass(frozen=True)
class SegmentationMethod:
    key: str
    """Name used on the command line and in :func:`init_tissue_seg_wf`."""
    desc: str
    """``desc`` entity of its outputs when it is not the main answer (letters and digits)."""
    make_node: Callable[[str, dict], pe.Node]
    """``(node_name, options) -> Node``; options: omp_nthreads, seed, device, template, mem_gb."""
    uses_priors: bool = False
    uses_acquisition: bool = False
    mem_gb: float = 2.0


_REGISTRY: dict[str, SegmentationMethod] = {}


def register_segmentation(key: str, make_node: Callable[[str, dict], pe.Node], *, desc: str | None = None,
                          uses_priors: bool = False, uses_acquisition: bool = False,
                          mem_gb: float = 2.0) -> SegmentationMethod:
    """Make a segmentation method available to :func:`init_tissue_seg_wf` (replaces one of that key)."""
    desc = desc or "".join(ch for ch in key if ch.isalnum())
    if not desc.isalnum():
        raise ValueError(f"segmentation desc must be letters and digits, not {desc!r}")
    method = SegmentationMethod(key, desc, make_node, uses_priors, uses_acquisition, mem_gb)
    _REGISTRY[key] = method
    return method


def segmentation_methods() -> dict[str, SegmentationMethod]:
    """The registered methods, by key."""
    return dict(_REGISTRY)


def _atropos_node(name: str, options: dict) -> pe.Node:
    from workflows.interfaces.ants import Atropos

    tpl = options.get("template") or {}
    node = pe.Node(
        Atropos(num_threads=options.get("omp_nthreads", 1), seed=options.get("seed", 0),
                prior_weight=options.get("prior_weight", 0.25),
                template={k: tpl[k] for k in ("name", "source", "resolution") if k in tpl}),
        name=name, n_procs=options.get("omp_nthreads", 1), mem_gb=options.get("mem_gb", 2.0),
    )
    return node


def _unet_node(name: str, options: dict) -> pe.Node:
    from workflows.interfaces.tissue_model import TissueModel

    return pe.Node(TissueModel(device=options.get("device", "auto")), name=name,
                   n_procs=options.get("omp_nthreads", 1), mem_gb=options.get("mem_gb", 3.0))


register_segmentation("atropos", _atropos_node, uses_priors=True, mem_gb=2.0)
register_segmentation("unet-physics", _unet_node, desc="unet", uses_acquisition=True, mem_gb=3.0)


def output_descs(methods) -> list[str | None]:
    """The ``desc`` entity of each method's outputs: None for the main answer (the first)."""
    reg = segmentation_methods()
    return [None if i == 0 else reg[m].desc for i, m in enumerate(methods)]


def check_methods(methods) -> tuple[str, ...]:
    methods = tuple(methods or DEFAULT_SEGMENTATION)
    reg = segmentation_methods()
    unknown = [m for m in methods if m not in reg]
    if unknown:
        raise ValueError(f"unknown segmentation method(s) {', '.join(unknown)}; known: {', '.join(sorted(reg))}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"segmentation methods listed twice: {', '.join(methods)}")
    return methods


def init_tissue_seg_wf(*, methods=DEFAULT_SEGMENTATION, omp_nthreads: int = 1, seed: int = 0,
                       device: str = "auto", template: dict | None = None, prior_weight: float = 0.25,
                       name: str = "tissue_seg_wf") -> pe.Workflow:
    """Run each segmentation method on the preprocessed T1w and merge their volume tables.

    Inputs (``inputnode``): ``t1w_preproc``, ``t1w_mask``, ``priors`` (subject-space CSF/GM/WM),
    ``acquisition``. Outputs (``outputnode``): ``seg<i>_probseg``, ``seg<i>_dseg``,
    ``seg<i>_metadata``, ``seg<i>_method`` and ``seg<i>_warnings`` for the i-th method, and
    ``volumes`` (the merged long-format table).
    """
    from workflows.interfaces.ants import MergeVolumes

    methods = check_methods(methods)
    reg = segmentation_methods()
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w_preproc", "t1w_mask", "priors", "acquisition"]),
                        name="inputnode")
    fields = ["volumes"]
    for i in range(len(methods)):
        fields += [f"seg{i}_{f}" for f in ("probseg", "dseg", "metadata", "method", "warnings")]
    outputnode = pe.Node(niu.IdentityInterface(fields=fields), name="outputnode")
    gather = pe.Node(niu.Merge(len(methods)), name="gather_volumes", run_without_submitting=True)
    merge = pe.Node(MergeVolumes(), name="merge_volumes", run_without_submitting=True)
    options = {"omp_nthreads": omp_nthreads, "seed": seed, "device": device, "template": template,
               "prior_weight": prior_weight}
    for i, key in enumerate(methods):
        m = reg[key]
        node = m.make_node("seg_" + "".join(ch if ch.isalnum() else "_" for ch in key),
                           {**options, "mem_gb": m.mem_gb})
        wf.connect([(inputnode, node, [("t1w_preproc", "in_file"), ("t1w_mask", "mask_file")])])
        if m.uses_priors:
            wf.connect(inputnode, "priors", node, "priors")
        if m.uses_acquisition:
            wf.connect(inputnode, "acquisition", node, "acquisition")
        wf.connect([
            (node, outputnode, [("probseg", f"seg{i}_probseg"), ("dseg", f"seg{i}_dseg"),
                                ("metadata", f"seg{i}_metadata"), ("method", f"seg{i}_method"),
                                ("warnings", f"seg{i}_warnings")]),
            (node, gather, [("volumes_tsv", f"in{i + 1}")]),
        ])
    wf.connect([(gather, merge, [("out", "in_files")]), (merge, outputnode, [("out_file", "volumes")])])
    return wf
