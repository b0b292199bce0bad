"""Write a node's result into the output folder under its BIDS-Derivatives name, with a JSON sidecar.

The naming, URI and atomic-writing rules live in :mod:`bidsapp.bids.derivatives`; this node only
maps Nipype inputs onto them. The sidecar is written before the data file, each atomically (temp
file in the destination folder, then ``os.replace``), so a killed run leaves either a complete
derivative or none under its final name (at worst a sidecar whose data never arrived).
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

_KNOWN_EXTENSIONS = (".nii.gz", ".nii", ".tsv", ".mat", ".h5", ".json", ".txt")


def _extension(path: str) -> str:
    name = Path(path).name
    for ext in _KNOWN_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return Path(path).suffix


class _DerivativesDataSinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the result to store")
    source_file = File(mandatory=True, desc="the BIDS input it derives from (gives sub/ses/acq/run)")
    output_dir = Directory(mandatory=True, desc="root of the derivatives dataset")
    bids_dir = Directory(mandatory=True, desc="root of the input dataset (for bids:raw: URIs)")
    suffix = traits.Str(mandatory=True, desc="BIDS suffix, e.g. T1w, mask, probseg, dseg, xfm, morph")
    extension = traits.Str(desc="file extension (default: that of in_file)")
    desc = traits.Either(None, traits.Str, default=None, usedefault=True, desc="desc entity")
    label = traits.Either(None, traits.Str, default=None, usedefault=True, desc="label entity")
    space = traits.Either(None, traits.Str, default=None, usedefault=True, desc="space entity")
    from_ = traits.Either(None, traits.Str, default=None, usedefault=True, desc="from entity")
    to = traits.Either(None, traits.Str, default=None, usedefault=True, desc="to entity")
    mode = traits.Either(None, traits.Str, default=None, usedefault=True, desc="mode entity")
    sources = traits.List(traits.Str, desc="files it was computed from (default: source_file)")
    subject_level = traits.Bool(False, usedefault=True,
                                desc="a result of all the subject's sessions: only the sub entity is kept")
    acquisition = traits.Dict(desc="acquisition record of the source image (AcquisitionRecord dict)")
    metadata = traits.Dict(desc="further sidecar fields (method, model, parameters ...)")
    dseg_labels = traits.Dict(traits.Int, traits.Str,
                              desc="{dseg value: label name}: also write the dseg look-up table (.tsv)")


class _DerivativesDataSinkOutputSpec(TraitedSpec):
    out_file = File(desc="the derivative's path")
    out_meta = File(desc="its JSON sidecar")


class DerivativesDataSink(SimpleInterface):
    """Copy ``in_file`` to ``output_dir/sub-X/[ses-Y/]anat/<BIDS name>`` with a JSON sidecar.

    Always runs (``_always_run``): copying is cheap, and a rerun restores outputs that were removed
    from the output folder while the working directory kept the results.
    """

    input_spec = _DerivativesDataSinkInputSpec
    output_spec = _DerivativesDataSinkOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        from bidsapp.bids.derivatives import (
            atomic_copy,
            bids_uri,
            derivative_path,
            sidecar_path,
            write_dseg_tsv,
            write_sidecar,
        )

        ins = self.inputs
        ext = ins.extension if isdefined(ins.extension) and ins.extension else _extension(ins.in_file)
        out = derivative_path(
            ins.output_dir, ins.source_file, suffix=ins.suffix, extension=ext, desc=ins.desc,
            label=ins.label, space=ins.space, from_=ins.from_, to=ins.to, mode=ins.mode,
            **({"keep": ("sub",)} if ins.subject_level else {}),
        )
        sources = list(ins.sources) if isdefined(ins.sources) and ins.sources else [ins.source_file]
        uris = []
        for src in sources:
            if src.startswith("bids:"):
                uris.append(src)
                continue
            try:
                uris.append(bids_uri(src, ins.bids_dir))
            except ValueError:
                uris.append(bids_uri(src, ins.output_dir, dataset=""))
        fields = dict(ins.metadata) if isdefined(ins.metadata) else {}
        acquisition = dict(ins.acquisition) if isdefined(ins.acquisition) and ins.acquisition else None
        meta = None
        if ext != ".json":
            meta = write_sidecar(out, Sources=uris, acquisition=acquisition, **fields)
        atomic_copy(ins.in_file, out)
        if isdefined(ins.dseg_labels) and ins.dseg_labels:
            write_dseg_tsv(out, dict(ins.dseg_labels))
        self._results["out_file"] = str(out)
        if meta is not None:
            self._results["out_meta"] = str(sidecar_path(out))
        return runtime
