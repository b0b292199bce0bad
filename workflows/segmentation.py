"""Node factories of the built-in tissue segmentation methods (registered in :mod:`bidsapp.methods`).

``atropos``: the classical baseline (ANTs Atropos with template priors, always available).
``unet-physics``: the physics-aware U-Net of :mod:`workflows.interfaces.tissue_model`, falling back to
the plain U-Net when the sequence parameters are unusable. Both honour the session-method contract of
:mod:`bidsapp.methods` (``in_file``, ``mask_file`` in; ``probseg``, ``dseg``, ``volumes_tsv``,
``metadata``, ``warnings`` out).
``lesion``: the scanner-invariant MS lesion U-Net and ``wmh``: the FLAIR-only white-matter-hyperintensity
network, both through :class:`workflows.interfaces.lesion.LesionSegment` (its ``model`` input chooses).
"""

from __future__ import annotations

from nipype.pipeline import engine as pe


def atropos_node(name: str, options: dict) -> pe.Node:
    from workflows.interfaces.ants import ITK_THREADS, Atropos

    tpl = options.get("template") or {}
    return pe.Node(
        Atropos(num_threads=ITK_THREADS, seed=options.get("seed", 0),
                prior_weight=options.get("prior_weight", 0.25),
                template={k: tpl[k] for k in ("name", "source", "resolution") if k in tpl}),
        name=name, n_procs=ITK_THREADS, mem_gb=options.get("mem_gb", 2.0),
    )


def unet_node(name: str, options: dict) -> pe.Node:
    from workflows.interfaces.tissue_model import TissueModel

    threads = options.get("omp_nthreads", 1)
    return pe.Node(TissueModel(device=options.get("device", "auto"), num_threads=threads), name=name,
                   n_procs=threads, mem_gb=options.get("mem_gb", 3.0))


def _lesion_segment_node(name: str, options: dict, key: str) -> pe.Node:
    """The lesion method ``key``: its model (``model``) is the one of the same name."""
    from workflows.interfaces.lesion import LesionSegment

    threads = options.get("omp_nthreads", 1)
    node = pe.Node(LesionSegment(device=options.get("device", "auto"), method=key, model=key,
                                 num_threads=threads), name=name, n_procs=threads, mem_gb=options.get("mem_gb", 2.0))
    if options.get("lesion_threshold") is not None:
        node.inputs.threshold = float(options["lesion_threshold"])
    return node


def lesion_node(name: str, options: dict) -> pe.Node:
    return _lesion_segment_node(name, options, "lesion")


def wmh_node(name: str, options: dict) -> pe.Node:
    return _lesion_segment_node(name, options, "wmh")
