"""Where results go: DerivativesDataSink nodes that give each result its BIDS-Derivatives name.

Kept apart from the computation (as sMRIPrep does), so naming can change without touching, or
invalidating the cache of, any processing node. Every sink writes atomically (see
:mod:`workflows.interfaces.derivatives`).
"""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from workflows.interfaces.ants import TISSUES
from workflows.interfaces.derivatives import DerivativesDataSink


def _sink(name: str, output_dir, bids_dir, **kwargs) -> pe.Node:
    return pe.Node(DerivativesDataSink(output_dir=str(output_dir), bids_dir=str(bids_dir), **kwargs),
                   name=name, run_without_submitting=True, mem_gb=0.1)


def _template_meta(template: dict) -> dict:
    keep = ("name", "requested", "source", "resolution", "description", "version")
    return {k: template[k] for k in keep if k in template}


def _xfm_meta(template: dict, direction: str, registration: str) -> dict:
    kind = "HDF5 composite (affine + SyN displacement field)" if registration == "SyN" else f"ITK {registration} (.mat)"
    return {
        "Template": _template_meta(template),
        "TemplateFiles": {k: v for k, v in (template.get("files") or {}).items()},
        "Registration": {"Software": "antspyx (ants.registration)", "Type": registration,
                         "Format": kind},
        "Description": (f"ITK/ANTs transform resampling images {direction}: "
                        "ants.apply_transforms(fixed=<reference of the target space>, moving=<image>, "
                        "transformlist=[this file])"),
    }


def init_anat_derivatives_wf(*, output_dir, bids_dir, template: dict, seg_descs, seg_keys=None,
                             registration: str = "SyN", name: str = "anat_derivatives_wf") -> pe.Workflow:
    """Write one session's T1w-based derivatives.

    ``seg_descs``: the desc entity of each segmentation method's outputs (None for the main answer),
    in the order of :func:`workflows.segmentation.init_tissue_seg_wf`'s ``seg<i>`` outputs.
    """
    tpl = template["name"]
    seg_keys = list(seg_keys or [None] * len(seg_descs))
    wf = pe.Workflow(name=name)
    fields = ["source_file", "acquisition", "t1w_preproc", "t1w_mask", "t1w_mask_metadata", "template_xfm",
              "template_inv_xfm", "t1w_template", "volumes"]
    for i in range(len(seg_descs)):
        fields += [f"seg{i}_probseg", f"seg{i}_dseg", f"seg{i}_metadata"]
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_files"]), name="outputnode")

    sinks = {
        "ds_t1w_preproc": (_sink("ds_t1w_preproc", output_dir, bids_dir, suffix="T1w", desc="preproc",
                                 metadata={"SkullStripped": False,
                                           "Description": "RAS+ reoriented, N4 bias-field corrected T1w"}),
                           "t1w_preproc"),
        "ds_t1w_mask": (_sink("ds_t1w_mask", output_dir, bids_dir, suffix="mask", desc="brain"), "t1w_mask"),
        "ds_xfm_fwd": (_sink("ds_xfm_fwd", output_dir, bids_dir, suffix="xfm", from_="T1w", to=tpl, mode="image",
                             metadata=_xfm_meta(template, f"from T1w space into {tpl}", registration)),
                       "template_xfm"),
        "ds_xfm_inv": (_sink("ds_xfm_inv", output_dir, bids_dir, suffix="xfm", from_=tpl, to="T1w", mode="image",
                             metadata=_xfm_meta(template, f"from {tpl} into T1w space", registration)),
                       "template_inv_xfm"),
        "ds_t1w_template": (_sink("ds_t1w_template", output_dir, bids_dir, suffix="T1w", space=tpl,
                                  desc="preproc",
                                  metadata={"SkullStripped": True, "Template": _template_meta(template)}),
                            "t1w_template"),
    }
    volumes = _sink("ds_volumes", output_dir, bids_dir, suffix="morph", desc="volumes", extension=".tsv",
                    metadata={"Description": "tissue volumes by segmentation method (long format); CSF/GM/WM "
                                             "from dseg voxel counts, brain = brain-mask volume",
                              "Methods": [k for k in seg_keys if k]})
    sinks["ds_volumes"] = (volumes, "volumes")

    collect = pe.Node(niu.Merge(len(sinks) + 4 * len(seg_descs)), name="collect_outputs",
                      run_without_submitting=True)
    slot = 1
    for node_name, (node, field) in sinks.items():
        wf.connect([
            (inputnode, node, [("source_file", "source_file"), (field, "in_file")]),
            (node, collect, [("out_file", f"in{slot}")]),
        ])
        slot += 1
    for node in (sinks["ds_t1w_preproc"][0], sinks["ds_t1w_template"][0]):
        wf.connect(inputnode, "acquisition", node, "acquisition")
    wf.connect(inputnode, "t1w_mask_metadata", sinks["ds_t1w_mask"][0], "metadata")  # method, model, fallback

    for i, desc in enumerate(seg_descs):
        suffix_desc = desc  # None: main answer
        for k, label in enumerate(TISSUES):
            pick = pe.Node(niu.Select(index=k), name=f"seg{i}_pick_{label}", run_without_submitting=True)
            ds = _sink(f"ds_seg{i}_{label}", output_dir, bids_dir, suffix="probseg", label=label, desc=suffix_desc)
            wf.connect([
                (inputnode, pick, [(f"seg{i}_probseg", "inlist")]),
                (pick, ds, [("out", "in_file")]),
                (inputnode, ds, [("source_file", "source_file"), ("acquisition", "acquisition"),
                                 (f"seg{i}_metadata", "metadata")]),
                (ds, collect, [("out_file", f"in{slot}")]),
            ])
            slot += 1
        ds = _sink(f"ds_seg{i}_dseg", output_dir, bids_dir, suffix="dseg", desc=suffix_desc, dseg_labels=True)
        wf.connect([
            (inputnode, ds, [("source_file", "source_file"), ("acquisition", "acquisition"),
                             (f"seg{i}_dseg", "in_file"), (f"seg{i}_metadata", "metadata")]),
            (ds, collect, [("out_file", f"in{slot}")]),
        ])
        slot += 1
    wf.connect(collect, "out", outputnode, "out_files")
    return wf


def init_coreg_derivatives_wf(*, output_dir, bids_dir, suffix: str, name: str) -> pe.Workflow:
    """Write a co-registered contrast (``space-T1w_desc-preproc_<suffix>``) and its rigid transform."""
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["source_file", "t1w_source", "acquisition", "out_file",
                                                      "out_xfm"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_files"]), name="outputnode")
    ds_img = _sink("ds_coreg", output_dir, bids_dir, suffix=suffix, space="T1w", desc="preproc",
                   metadata={"SkullStripped": False,
                             "Description": f"N4-corrected {suffix}, rigidly registered (6 dof, Mattes MI) to the "
                                            "session's preprocessed T1w and resampled onto its grid (linear)"})
    ds_xfm = _sink("ds_coreg_xfm", output_dir, bids_dir, suffix="xfm", from_=suffix, to="T1w", mode="image",
                   metadata={"Registration": {"Software": "antspyx (ants.registration)", "Type": "Rigid",
                                              "Format": "ITK (.mat)"},
                             "Description": f"resamples the {suffix} (RAS-reoriented) into T1w space"})
    merge_sources = pe.Node(niu.Merge(2), name="sources", run_without_submitting=True)
    collect = pe.Node(niu.Merge(2), name="collect_outputs", run_without_submitting=True)
    wf.connect([
        (inputnode, merge_sources, [("source_file", "in1"), ("t1w_source", "in2")]),
        (inputnode, ds_img, [("source_file", "source_file"), ("acquisition", "acquisition"),
                             ("out_file", "in_file")]),
        (merge_sources, ds_img, [("out", "sources")]),
        (inputnode, ds_xfm, [("source_file", "source_file"), ("out_xfm", "in_file")]),
        (merge_sources, ds_xfm, [("out", "sources")]),
        (ds_img, collect, [("out_file", "in1")]),
        (ds_xfm, collect, [("out_file", "in2")]),
        (collect, outputnode, [("out", "out_files")]),
    ])
    return wf
