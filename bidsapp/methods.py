"""The method protocol and the one registry of scanbridge's methods.

A :class:`Method` declares what it needs, what it produces and at which level it runs; the workflows
wire it from that declaration alone (:mod:`workflows.methods` for the session and subject levels,
:mod:`bidsapp.harmonize.pipeline` for the group level). Adding a method is one module (its Nipype
node, or its group function), one :func:`register` call and its tests.

Levels and what the ``factory`` returns:

``session``
    ``factory(name, options) -> nipype Node``, run once per session. Node inputs, by name:
    ``in_file`` (the session's preprocessed reference image: the T1w, or for a session without one its
    FLAIR, T2w or PDw), ``mask_file`` (its brain mask), ``<contrast>_file`` for every contrast in
    ``needs``/``optional`` (``t1w_file``, ``flair_file``, ... on the reference grid), ``priors`` and
    ``acquisition`` when listed in ``inputs``; a node with an ``in_contrast`` input is told which
    contrast ``in_file`` is. Outputs, by name: every kind in ``outputs`` (``probseg``: list in label
    order; ``dseg``; ``mask``; ``volumes_tsv``: long format method/label/volume_mm3[/count];
    ``stats``: one row per object, written as ``desc-<stats_desc>_stats.tsv``), plus ``metadata``
    (sidecar fields) and ``warnings``. When a method whose label set has ``counted_as`` makes a mask,
    the tissue methods' outputs of that session count its voxels as that tissue
    (:class:`workflows.interfaces.lesion.FillLesions`); with several such methods, the mask of the first
    that runs on the session (its main answer).
``subject``
    ``factory(name, options) -> nipype Node``, run once per subject on all its sessions that have what
    it needs. Inputs (lists, one entry per session, in session order; each connected only when the node
    has it): ``session_ids``, ``in_files`` (each session's image of the contrast every session has, the
    first of :data:`CONTRASTS`; the node's ``contrast`` input says which), ``mask_files``,
    ``volumes_files`` (each session's volume table), ``probseg_files`` (the main tissue answer's
    probabilities in label order, or ``[]``), ``lesion_files`` (the main lesion answer's mask, or ``""``),
    ``acquisitions`` (protocol keys, ``""`` when unknown), ``acquisition_records`` (the acquisition
    records as dicts, ``{}`` when unknown), ``acq_times``. Outputs: ``out_tsv`` (written as
    ``sub-<label>_desc-<desc>_<table_suffix>.tsv``), ``metadata``, ``warnings``, and optionally
    ``template``, ``figure``, ``to_subject_xfms``/``from_subject_xfms``
    (:func:`workflows.methods.init_subject_method_wf` names them).
``group``
    ``factory(ctx) -> list[Section]`` with a :class:`~bidsapp.harmonize.context.GroupContext`; runs once
    per group-level call, in registration order.

``options`` is a dict: ``omp_nthreads``, ``seed``, ``device``, ``template``, ``prior_weight``, ``mem_gb``.
A factory may be given as ``"module:function"`` so that registering costs no import.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Union

from bidsapp.labels import LESION, TISSUE, LabelSet

SESSION, SUBJECT, GROUP = "session", "subject", "group"
LEVELS = (SESSION, SUBJECT, GROUP)
CONTRASTS = ("T1w", "FLAIR", "T2w", "PDw")
"""Structural contrasts a session can have; the first present is the session's reference image."""
OUTPUT_KINDS = ("probseg", "dseg", "mask", "volumes", "stats")
EXTRA_INPUTS = ("priors", "acquisition")

Factory = Union[str, Callable]


@dataclass(frozen=True)
class Method:
    key: str
    """Name on the command line, in the volume table's ``method`` column and in plan lines."""
    level: str
    factory: Factory
    task: str = ""
    """What it answers (``tissue``, ``lesion``, ``harmonisation``): of the methods of one task that run,
    the first is the main answer (plain BIDS names) and the others keep ``desc-<desc>``."""
    needs: tuple[tuple[str, ...], ...] = ()
    """Contrasts required: each entry a tuple of alternatives, e.g. ``(("T1w",),)`` or
    ``(("FLAIR", "T2w", "PDw"),)``."""
    optional: tuple[str, ...] = ()
    """Contrasts used when the session has them."""
    inputs: tuple[str, ...] = ()
    """Further session inputs, among :data:`EXTRA_INPUTS`."""
    labels: LabelSet | None = None
    outputs: tuple[str, ...] = ()
    """Among :data:`OUTPUT_KINDS` (session level)."""
    desc: str = ""
    """``desc`` entity when it is not the main answer (letters and digits; default: its key's)."""
    table_suffix: str = "morph"
    """Suffix of a subject-level method's table."""
    min_sessions: int = 1
    """Subject level: fewest sessions it can run on."""
    default: bool = True
    """Runs unless the user selects otherwise (the methods of a :data:`SELECTABLE` task are chosen with its
    command-line option: ``--segmentation``, ``--lesion-methods``)."""
    mem_gb: float = 2.0
    summary: str = ""
    """One line for ``--help`` and the processing plan."""
    title: str = ""
    """Its name in reports and logs (default: the key)."""

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"method {self.key!r}: level must be one of {', '.join(LEVELS)}, not {self.level!r}")
        desc = self.desc or "".join(ch for ch in self.key if ch.isalnum())
        if not desc.isalnum():
            raise ValueError(f"method {self.key!r}: desc must be letters and digits, not {desc!r}")
        object.__setattr__(self, "desc", desc)
        object.__setattr__(self, "title", self.title or self.key)
        unknown = [c for alt in self.needs for c in alt if c not in CONTRASTS]
        unknown += [c for c in self.optional if c not in CONTRASTS]
        if unknown:
            raise ValueError(f"method {self.key!r}: unknown contrast(s) {', '.join(unknown)}; known: "
                             f"{', '.join(CONTRASTS)}")
        bad = [k for k in self.outputs if k not in OUTPUT_KINDS] + [i for i in self.inputs if i not in EXTRA_INPUTS]
        if bad:
            raise ValueError(f"method {self.key!r}: unknown output/input kind(s) {', '.join(bad)}")
        if self.labels is None and set(self.outputs) & {"probseg", "dseg", "mask"}:
            raise ValueError(f"method {self.key!r}: images need a label set")
        if "stats" in self.outputs and (self.labels is None or not self.labels.stats_desc):
            raise ValueError(f"method {self.key!r}: a stats table needs a label set with stats_desc")
        if "mask" in self.outputs and self.labels is not None and len(self.labels) != 1:
            raise ValueError(f"method {self.key!r}: a mask needs a one-label set")

    @property
    def ident(self) -> str:
        """The key as a Nipype-safe name (non-alphanumerics as ``_``): node and field names."""
        return "".join(ch if ch.isalnum() else "_" for ch in self.key)

    def build(self, *args, **kwargs):
        """Call the factory (importing it first when given as ``module:function``)."""
        factory = self.factory
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            factory = getattr(importlib.import_module(module), attr)
        return factory(*args, **kwargs)

    def contrasts_used(self, available) -> tuple[str, ...]:
        """The contrasts it will read from a session that has ``available`` (needs first, then optional)."""
        out = []
        for alternatives in self.needs:
            out += [c for c in alternatives if c in available][:1]
        out += [c for c in self.optional if c in available and c not in out]
        return tuple(out)

    def missing(self, available) -> list[str]:
        """Human-readable list of unmet needs (empty when it can run)."""
        return [" or ".join(alt) for alt in self.needs if not any(c in available for c in alt)]


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` available (replaces one of the same key)."""
    _REGISTRY[method.key] = method
    return method


def unregister(key: str) -> None:
    _REGISTRY.pop(key, None)


def registry(level: str | None = None, task: str | None = None) -> dict[str, Method]:
    """Registered methods, in registration order, optionally of one level and task."""
    return {k: m for k, m in _REGISTRY.items()
            if (level is None or m.level == level) and (task is None or m.task == task)}


def get(key: str) -> Method:
    try:
        return _REGISTRY[key]
    except KeyError:
        raise ValueError(f"unknown method {key!r}; known: {', '.join(_REGISTRY)}") from None


SELECTABLE = {TISSUE.key: "segmentation", LESION.key: "lesion"}
"""Tasks whose methods the user chooses (main answer first), and the word their messages use; the command
line has one option per task (``--segmentation``, ``--lesion-methods``)."""


def default_methods(task: str, level: str = SESSION) -> tuple[str, ...]:
    """The methods of ``task`` that run when the user names none, main answer first: for tissue
    :data:`DEFAULT_TISSUE`, for any other task its registered default methods in registration order."""
    if level == SESSION and task == TISSUE.key:
        return DEFAULT_TISSUE
    return tuple(k for k, m in registry(level, task).items() if m.default)


def _chosen(task: str, keys, reg: dict) -> tuple[str, ...]:
    """``keys`` (default: :func:`default_methods`) checked to be distinct methods of ``task``."""
    keys = tuple(keys or default_methods(task))
    word = SELECTABLE.get(task, task)
    unknown = [k for k in keys if k not in reg or reg[k].task != task]
    if unknown:
        known = ", ".join(k for k, m in reg.items() if m.task == task)
        raise ValueError(f"unknown {word} method(s) {', '.join(unknown)}; known: {known}")
    twice = [k for k in dict.fromkeys(keys) if keys.count(k) > 1]
    if twice:
        raise ValueError(f"{word} methods listed twice: {', '.join(twice)}")
    return keys


def select(tissue=None, extra=(), *, lesion=None, level: str = SESSION) -> tuple[str, ...]:
    """The keys of the ``level`` methods to run.

    For each task of :data:`SELECTABLE` the user's methods, main answer first (``tissue``: default
    :data:`DEFAULT_TISSUE`; ``lesion``: default every registered default lesion method, in registration
    order); every other default method of that level; then ``extra``. A selectable task's methods come
    together, in the user's order, where the task's first method was registered, so that on any session the
    first of them that can run is its main answer (:func:`main_answers`).
    """
    reg = registry(level)
    keys: list[str] = []
    if level == SESSION:
        given = {TISSUE.key: tissue, LESION.key: lesion}
        chosen = {task: _chosen(task, given.get(task), reg) for task in SELECTABLE}
        for k, m in reg.items():
            if m.task in chosen:
                keys += [c for c in chosen[m.task] if c not in keys]
            elif m.default:
                keys.append(k)
    else:
        keys += [k for k, m in reg.items() if m.default]
    for k in extra:
        if k not in reg:
            raise ValueError(f"unknown {level}-level method {k!r}; known: {', '.join(reg)}")
        if k not in keys:
            keys.append(k)
    return tuple(keys)


def main_answers(keys) -> dict[str, bool]:
    """``{key: True}`` for the first method of each task among ``keys`` (it gets plain BIDS names).

    Give it the methods that run on one session (:attr:`MethodPlan.run`): the main answer is decided per
    session, so a session where the user's first lesion method cannot run (a T2w-only session and
    ``wmh lesion``) has the next one as its main answer."""
    seen, out = set(), {}
    for k in keys:
        task = get(k).task or k
        out[k] = task not in seen
        seen.add(task)
    return out


@dataclass
class MethodPlan:
    """Which session methods run on a session with ``available`` contrasts, and why the others do not."""

    reference: str
    run: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """One plan line per method left out (``"atropos skipped: needs T1w (session has FLAIR)"``)."""


def plan_session(keys, available) -> MethodPlan:
    available = [c for c in CONTRASTS if c in set(available)]
    if not available:
        raise ValueError("a session needs at least one of " + ", ".join(CONTRASTS))
    plan = MethodPlan(reference=available[0])
    for k in keys:
        miss = get(k).missing(available)
        if miss:
            plan.skipped.append(f"{k} skipped: needs {', '.join(miss)} (session has {', '.join(available)})")
        else:
            plan.run.append(k)
    return plan


def plan_subject(keys, sessions_contrasts) -> tuple[list[str], list[str]]:
    """``(to run, plan lines)`` of the subject-level methods ``keys`` for a subject whose sessions have
    ``sessions_contrasts`` (one list of contrasts per session)."""
    run, skipped = [], []
    for k in keys:
        m = get(k)
        n = sum(not m.missing(c) for c in sessions_contrasts)
        if n >= m.min_sessions:
            run.append(k)
        else:
            need = " and ".join(" or ".join(alt) for alt in m.needs) if m.needs else "any image"
            skipped.append(f"{k} skipped: needs {m.min_sessions} session(s) with {need}, the subject has {n}")
    return run, skipped


# ---------------------------------------------------------------------------------------- built-ins
DEFAULT_TISSUE = ("unet-physics", "atropos")
"""Tissue methods run by default, main answer first."""

register(Method(
    "unet-physics", SESSION, "workflows.segmentation:unet_node", task=TISSUE.key, needs=(("T1w",),),
    inputs=("acquisition",), labels=TISSUE, outputs=("probseg", "dseg", "volumes"), desc="unet", mem_gb=3.0,
    summary="physics-aware tissue U-Net (the plain U-Net when the sequence parameters are unusable)"))
register(Method(
    "atropos", SESSION, "workflows.segmentation:atropos_node", task=TISSUE.key, needs=(("T1w",),),
    inputs=("priors",), labels=TISSUE, outputs=("probseg", "dseg", "volumes"), mem_gb=2.0,
    summary="ANTs Atropos with template priors (the classical baseline)"))
register(Method(
    "lesion", SESSION, "workflows.segmentation:lesion_node", task=LESION.key, needs=(("FLAIR", "T2w", "PDw"),),
    optional=("T1w", "FLAIR", "T2w", "PDw"), labels=LESION, outputs=("probseg", "mask", "volumes", "stats"),
    desc="ms", mem_gb=2.0, title="MS lesions",
    summary="scanner-invariant MS lesion U-Net on every contrast the session has (FLAIR, T2w or PDw needed)"))
register(Method(
    "wmh", SESSION, "workflows.segmentation:wmh_node", task=LESION.key, needs=(("FLAIR",),), labels=LESION,
    outputs=("probseg", "mask", "volumes", "stats"), desc="wmh", mem_gb=2.0, title="WMH (FLAIR)",
    summary="FLAIR-only white-matter hyperintensity U-Net trained with the Siamese content loss"))
register(Method(
    "longitudinal", SUBJECT, "workflows.interfaces.longitudinal:change_node", task="change",
    needs=(("T1w", "FLAIR", "T2w", "PDw"),), min_sessions=2, desc="change", table_suffix="morph", mem_gb=3.0,
    title="longitudinal change",
    summary="within-subject mid-space template and volume change between sessions (scanner changes flagged)"))
register(Method("combat", GROUP, "bidsapp.harmonize.combat:run", task="harmonisation", title="ComBat",
                summary="ComBat harmonisation of the volumes across acquisition groups"))
register(Method("mrainet", GROUP, "bidsapp.harmonize.mrainet_group:run", task="harmonisation", title="MRAI-NET",
                summary="MRAI-NET: acquisition-invariant tissue classification of the target scanners"))
register(Method("bridging", GROUP, "bidsapp.harmonize.bridging:run", task="harmonisation", title="protocol bridging",
                summary="protocol bridging of subjects whose protocol changed between sessions"))
register(Method("change", GROUP, "bidsapp.longitudinal.group:run", task="change", title="longitudinal change",
                summary="every subject's change rows (group_change.tsv) and change by acquisition-change status"))
