"""Where results go: DerivativesDataSink nodes that give each result its BIDS-Derivatives name.

Kept apart from the computation (as sMRIPrep does), so naming can change without touching, or
invalidating the cache of, any processing node. Every sink writes atomically (see
:mod:`workflows.interfaces.derivatives`).
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bidsapp import methods as M
from workflows.interfaces.derivatives import DerivativesDataSink


def sink(name: str, output_dir, bids_dir, **kwargs) -> pe.Node:
    return pe.Node(DerivativesDataSink(output_dir=str(output_dir), bids_dir=str(bids_dir), **kwargs),
                   name=name, run_without_submitting=True, mem_gb=0.1)


def qc_sink(output_dir, bids_dir, name: str = "ds_qc") -> pe.Node:
    """The session's quality-control table ``desc-iqm_qc.tsv`` (the name is explained in
    :mod:`workflows.interfaces.qc`), its sidecar describing the columns and the rules."""
    from bidsapp import qc
    from workflows.interfaces.qc import qc_metadata

    return sink(name, output_dir, bids_dir, suffix=qc.QC_SUFFIX, desc=qc.QC_DESC, extension=".tsv",
                metadata=qc_metadata())


def _template_meta(template: dict) -> dict:
    keep = ("name", "requested", "source", "resolution", "description", "version")
    return {k: template[k] for k in keep if k in template}


def _xfm_meta(template: dict, direction: str, registration: str) -> dict:
    kind = "HDF5 composite (affine + SyN displacement field)" if registration == "SyN" else f"ITK {registration} (.mat)"
    return {
        "Template": _template_meta(template),
        # TemplateFlow file names, not paths: the copy the run used lies in its work folder
        "TemplateFiles": {k: Path(v).name for k, v in (template.get("files") or {}).items()},
        "Registration": {"Software": "antspyx (ants.registration)", "Type": registration,
                         "Format": kind},
        "Description": (f"ITK/ANTs transform resampling images {direction}: "
                        "ants.apply_transforms(fixed=<reference of the target space>, moving=<image>, "
                        "transformlist=[this file])"),
    }


def init_anat_derivatives_wf(*, output_dir, bids_dir, template: dict, suffix: str = "T1w", methods=(),
                             registration: str = "SyN", name: str = "anat_derivatives_wf") -> pe.Workflow:
    """Write one session's reference-image derivatives: the preprocessed image, its brain mask, the
    session's volume table (``methods``: the keys of the methods whose rows it holds; none, no table)
    and, for a T1w reference, the transforms to and from the template and the image in template space.

    Method images are written by :func:`workflows.methods.init_method_derivatives_wf`.
    """
    tpl = template["name"]
    with_template = suffix == "T1w"
    wf = pe.Workflow(name=name)
    fields = ["source_file", "acquisition", "anat_preproc", "anat_mask", "anat_mask_metadata", "template_xfm",
              "template_inv_xfm", "anat_template", "volumes"]
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")

    described = "RAS+ reoriented, N4 bias-field corrected " + suffix
    sinks = {
        "ds_preproc": (sink("ds_preproc", output_dir, bids_dir, suffix=suffix, desc="preproc",
                            metadata={"SkullStripped": False, "Description": described}), "anat_preproc"),
        "ds_mask": (sink("ds_mask", output_dir, bids_dir, suffix="mask", desc="brain"), "anat_mask"),
    }
    if with_template:
        sinks.update({
            "ds_xfm_fwd": (sink("ds_xfm_fwd", output_dir, bids_dir, suffix="xfm", from_="T1w", to=tpl, mode="image",
                                metadata=_xfm_meta(template, f"from T1w space into {tpl}", registration)),
                           "template_xfm"),
            "ds_xfm_inv": (sink("ds_xfm_inv", output_dir, bids_dir, suffix="xfm", from_=tpl, to="T1w", mode="image",
                                metadata=_xfm_meta(template, f"from {tpl} into T1w space", registration)),
                           "template_inv_xfm"),
            "ds_template": (sink("ds_template", output_dir, bids_dir, suffix="T1w", space=tpl, desc="preproc",
                                 metadata={"SkullStripped": True, "Template": _template_meta(template)}),
                            "anat_template"),
        })
    if methods:
        volumes = sink("ds_volumes", output_dir, bids_dir, suffix="morph", desc="volumes", extension=".tsv",
                       metadata={"Description": "volumes by method (long format) inside the brain mask: "
                                                "a tissue's summed map where the method's sidecar says "
                                                "VolumesFromFractions (the refinement's fractions, or a "
                                                "network's probabilities on voxels finer than its own), "
                                                "else its dseg voxel count; brain = brain-mask volume",
                                 "Methods": list(methods)})
        sinks["ds_volumes"] = (volumes, "volumes")
    for node, field in sinks.values():
        wf.connect(inputnode, "source_file", node, "source_file")
        wf.connect(inputnode, field, node, "in_file")
    for key in ("ds_preproc", "ds_template"):
        if key in sinks:
            wf.connect(inputnode, "acquisition", sinks[key][0], "acquisition")
    wf.connect(inputnode, "anat_mask_metadata", sinks["ds_mask"][0], "metadata")  # method, model, fallback
    return wf


def init_coreg_derivatives_wf(*, output_dir, bids_dir, suffix: str, name: str, reference: str = "T1w") -> pe.Workflow:
    """Write a co-registered contrast (``space-<reference>_desc-preproc_<suffix>``) and its rigid transform."""
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["source_file", "reference_source", "acquisition", "out_file",
                                                      "out_xfm"]), name="inputnode")
    ds_img = sink("ds_coreg", output_dir, bids_dir, suffix=suffix, space=reference, desc="preproc",
                  metadata={"SkullStripped": False,
                            "Description": f"N4-corrected {suffix}, rigidly registered (6 dof, Mattes MI) to the "
                                           f"session's preprocessed {reference} and resampled onto its grid (linear)"})
    ds_xfm = sink("ds_coreg_xfm", output_dir, bids_dir, suffix="xfm", from_=suffix, to=reference, mode="image",
                  metadata={"Registration": {"Software": "antspyx (ants.registration)", "Type": "Rigid",
                                             "Format": "ITK (.mat)"},
                            "Description": f"resamples the {suffix} (RAS-reoriented) into {reference} space"})
    merge_sources = pe.Node(niu.Merge(2), name="sources", run_without_submitting=True)
    wf.connect([
        (inputnode, merge_sources, [("source_file", "in1"), ("reference_source", "in2")]),
        (inputnode, ds_img, [("source_file", "source_file"), ("acquisition", "acquisition"),
                             ("out_file", "in_file")]),
        (merge_sources, ds_img, [("out", "sources")]),
        (inputnode, ds_xfm, [("source_file", "source_file"), ("out_xfm", "in_file")]),
        (merge_sources, ds_xfm, [("out", "sources")]),
    ])
    return wf


def init_method_derivatives_wf(method: M.Method, *, main: bool, output_dir, bids_dir,
                               name: str | None = None) -> pe.Workflow:
    """Write one session method's images with BIDS-Derivatives names taken from its label set.

    Main answer: ``label-<name>_probseg``, ``[desc-<main_desc>_]dseg`` (+ look-up table),
    ``desc-<main_desc or key>_mask`` and a per-object table ``desc-<stats_desc>_stats.tsv``; any other
    method of the task is written beside it under its own ``desc`` (``label-GM_desc-atropos_probseg``,
    ``desc-atropos_dseg``; ``label-lesion_desc-wmh_probseg``, ``desc-wmh_mask``, ``desc-wmh_stats.tsv``).
    Inputs: ``source_file``, ``acquisition``, ``metadata`` and the method's outputs by kind (``probseg``,
    ``dseg``, ``mask``, ``stats``).
    """
    labels = method.labels
    kinds = [k for k in method.outputs if k != "volumes"]
    if not main and method.desc in {labels.main_desc, labels.stats_desc} and {"mask", "stats"} & set(kinds):
        raise ValueError(f"method {method.key}: desc {method.desc!r} would give it the main answer's names; "
                         "register it with another desc")
    wf = pe.Workflow(name=name or f"ds_{method.ident}_wf")
    inputnode = pe.Node(niu.IdentityInterface(fields=["source_file", "acquisition", "metadata", *kinds]),
                        name="inputnode")
    common = [("source_file", "source_file"), ("acquisition", "acquisition"), ("metadata", "metadata")]
    if "probseg" in kinds:
        for k, lab in enumerate(labels):
            pick = pe.Node(niu.Select(index=k), name=f"pick_{lab.name}", run_without_submitting=True)
            ds = sink(f"ds_probseg_{lab.name}", output_dir, bids_dir, suffix="probseg", label=lab.name,
                      desc=None if main else method.desc)
            wf.connect([(inputnode, pick, [("probseg", "inlist")]), (pick, ds, [("out", "in_file")]),
                        (inputnode, ds, common)])
    if "dseg" in kinds:
        ds = sink("ds_dseg", output_dir, bids_dir, suffix="dseg", dseg_labels=labels.by_value(),
                  desc=labels.main_desc if main else method.desc)
        wf.connect([(inputnode, ds, [("dseg", "in_file"), *common])])
    if "mask" in kinds:
        own = labels.main_desc or labels.key
        ds = sink("ds_mask", output_dir, bids_dir, suffix="mask", desc=own if main else method.desc)
        wf.connect([(inputnode, ds, [("mask", "in_file"), *common])])
    if "stats" in kinds:
        ds = sink("ds_stats", output_dir, bids_dir, suffix="stats", extension=".tsv",
                  desc=labels.stats_desc if main else method.desc)
        wf.connect([(inputnode, ds, [("stats", "in_file"), ("source_file", "source_file"),
                                     ("metadata", "metadata")])])
    return wf

