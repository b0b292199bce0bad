"""Quality-control nodes: the measures and verdict of :mod:`bidsapp.qc`, and the gate that fails a session.

``QualityControl`` writes a one-row table. Its BIDS-Derivatives name is
``<source entities>_desc-iqm_qc.tsv``: BIDS defines no suffix for image-quality measures (MRIQC puts
them in a JSON named like the image, and ``_T1w.tsv`` is not a valid T1w file), so the table is named
the way this app names its other tables, the suffix giving the kind of table (``morph``, ``stats``,
here ``qc``) and ``desc`` its content (``iqm``, image-quality measures); its sidecar describes every
column and records the rules applied.

``QualityControlGate`` raises when the verdict is ``fail``: the node fails like any other, so the
session is reported failed with one line naming the input and the reasons, the run exits non-zero,
and the other sessions and subjects go on. Nodes that do not depend on it still run, so a failed
session's outputs are written; the QC table and the report say they are not usable.
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)


def qc_metadata() -> dict:
    """Sidecar of the QC table: column descriptions (BIDS tabular sidecar form) and the rules."""
    from bidsapp import qc

    columns = {name: {"Description": desc, **({"Units": units} if units else {})}
               for name, (desc, units) in qc.MEASURES.items()}
    columns["verdict"] = {"Description": "pass, warn (usable, see reasons) or fail (not usable)",
                          "Levels": {"pass": "every applicable rule holds", "warn": "a warn rule is broken",
                                     "fail": "a fail rule is broken: results not usable"}}
    columns["reasons"] = {"Description": "one line per broken rule, separated by '; '"}
    return {"Description": "image-quality measures of the session's preprocessed reference image (with its "
                           "brain mask and main tissue segmentation) and the quality-control verdict",
            **columns, "QCRules": qc.rules_metadata()}


class _QualityControlInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="preprocessed reference image (N4, RAS)")
    mask_file = File(exists=True, mandatory=True, desc="its brain mask")
    dseg = File(exists=True, desc="main tissue segmentation (1 CSF, 2 GM, 3 WM) on the same grid")
    probseg = InputMultiObject(File(exists=True), desc="tissue probabilities CSF, GM, WM on the same grid")
    contrast = traits.Str(desc="the reference image's contrast (T1w, FLAIR, T2w, PDw): some rules are T1w only")


class _QualityControlOutputSpec(TraitedSpec):
    out_tsv = File(exists=True, desc="one-row table: the measures, verdict and reasons")
    verdict = traits.Enum("pass", "warn", "fail")
    reasons = traits.List(traits.Str, desc="one line per broken rule (the fail reasons for a fail)")
    warnings = traits.List(traits.Str, desc="the reasons of a warn verdict (empty otherwise)")


class QualityControl(SimpleInterface):
    """Image-quality measures and verdict of one session (:func:`bidsapp.qc.assess`)."""

    input_spec = _QualityControlInputSpec
    output_spec = _QualityControlOutputSpec

    def _run_interface(self, runtime):
        from bidsapp import qc
        from bidsapp.bids.derivatives import atomic_write_tsv

        ins = self.inputs
        result = qc.assess(ins.in_file, ins.mask_file,
                           dseg_file=ins.dseg if isdefined(ins.dseg) else None,
                           probseg_files=list(ins.probseg) if isdefined(ins.probseg) and ins.probseg else None,
                           contrast=ins.contrast if isdefined(ins.contrast) else None)
        out = Path(runtime.cwd) / "qc.tsv"
        atomic_write_tsv(out, [result.row()], columns=qc.COLUMNS)
        self._results.update(out_tsv=str(out), verdict=result.verdict, reasons=list(result.reasons),
                             warnings=list(result.reasons) if result.verdict == "warn" else [])
        return runtime


class _GateInputSpec(BaseInterfaceInputSpec):
    verdict = traits.Enum("pass", "warn", "fail", mandatory=True)
    reasons = traits.List(traits.Str, desc="why")
    source_file = traits.Str(mandatory=True, desc="the BIDS input image, named in the message")


class _GateOutputSpec(TraitedSpec):
    verdict = traits.Enum("pass", "warn", "fail")


class QualityControlGate(SimpleInterface):
    """Raise :class:`bidsapp.qc.QualityControlError` on a ``fail`` verdict; pass anything else through."""

    input_spec = _GateInputSpec
    output_spec = _GateOutputSpec

    def _run_interface(self, runtime):
        from bidsapp import qc

        reasons = list(self.inputs.reasons) if isdefined(self.inputs.reasons) else []
        qc.check_verdict(self.inputs.verdict, reasons, self.inputs.source_file)
        self._results["verdict"] = self.inputs.verdict
        return runtime
