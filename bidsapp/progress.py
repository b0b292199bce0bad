"""Progress lines for a participant run, and each subject's end as soon as it comes.

All subjects of a participant run go to Nipype as one graph, so that one subject's serial moments (a
network that takes every thread, its subject-level step after its sessions) are filled with another
subject's work. Nipype calls ``status_callback(node, status)`` in the scheduling process when a node
starts, ends (or is found in the work folder's cache) and fails. :class:`RunProgress` turns that into
one line per finished step with its wall time, and calls ``on_subject_end(label)`` once every step of a
subject has ended, so that its report is written while the other subjects run.
:func:`subjects_in_turn` makes MultiProc start the ready steps of the first subjects first, so that
subjects finish one after another (reports appear as a run goes, and a run stopped half way leaves
finished subjects) rather than all together at the end.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Callable

LOG = logging.getLogger("scanbridge")


def _runs(node) -> bool:
    """Whether Nipype runs ``node``: it drops the plain IdentityInterface nodes from the graph it runs."""
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline.engine import JoinNode

    return not (isinstance(node.interface, IdentityInterface) and not isinstance(node, JoinNode))


def owner(node, names):
    """The entry of ``names`` (subject workflow names) in ``node``'s hierarchy, or, for a MapNode's
    parts (which have none), in its folder; None when the node is no subject's."""
    parts = node.fullname.split(".") + list(Path(getattr(node, "base_dir", None) or "").parts)
    return next((p for p in parts if p in names), None)


class RunProgress:
    """Nipype ``status_callback`` for a graph made of one workflow per subject.

    ``subjects`` maps a subject label to its workflow (built, not yet run); a node belongs to the
    subject whose workflow name appears in its hierarchy (or, for a MapNode's parts, its folder). Steps
    shorter than ``min_seconds`` (data sinks, field pickers) and steps found cached are counted
    without a line of their own.
    """

    def __init__(self, subjects: dict, on_subject_end: Callable[[str], None] | None = None,
                 min_seconds: float = 1.0):
        self._label = {wf.name: label for label, wf in subjects.items()}
        self._expected = {label: sum(map(_runs, wf._get_all_nodes())) for label, wf in subjects.items()}
        self._ended: dict[str, set] = {label: set() for label in subjects}
        self._started: dict[str, float] = {}
        self.failed: set[str] = set()
        self.complete: list[str] = []
        self._on_end = on_subject_end
        self._min = min_seconds
        self.total = sum(self._expected.values())
        self.done = 0

    def subject_of(self, node) -> str | None:
        name = owner(node, self._label)
        return None if name is None else self._label[name]

    @staticmethod
    def step_name(node) -> str:
        """``ses-1 registration`` for ``...sub_01_wf.ses_1_wf.anat_preproc_wf.registration``."""
        session = next((p[:-3].replace("_", "-", 1) for p in node.fullname.split(".")
                        if p.startswith("ses_") and p.endswith("_wf")), None)
        return f"{session} {node.name}" if session else node.name

    def __call__(self, node, status: str) -> None:
        key = node.fullname + "@" + str(getattr(node, "base_dir", ""))
        if status == "start":
            self._started[key] = time.monotonic()
            return
        began = self._started.pop(key, None)
        elapsed = time.monotonic() - began if began is not None else 0.0
        label = self.subject_of(node)
        if label is None:
            return
        if status == "exception":
            self.failed.add(label)
            LOG.error("sub-%s %s failed after %.1f s", label, self.step_name(node), elapsed)
            return
        if status != "end" or node.name.startswith("_") or key in self._ended[label]:
            return  # a MapNode's part: the MapNode itself ends after its parts
        self._ended[label].add(key)
        self.done += 1
        if elapsed >= self._min:
            LOG.info("sub-%s %s: %.1f s  [%d/%d steps]", label, self.step_name(node), elapsed, self.done, self.total)
        if (len(self._ended[label]) == self._expected[label] and label not in self.failed
                and label not in self.complete):
            self.complete.append(label)
            if self._on_end is not None:
                self._on_end(label)


def subjects_in_turn(plugin_args: dict, order: list[str]):
    """A MultiProc plugin that starts the ready step of the earliest subject in ``order`` (workflow
    names) first; within a subject, Nipype's own (topological) order is kept. Every free slot is still
    filled: only the choice among ready steps changes."""
    from nipype.pipeline.plugins.multiproc import MultiProcPlugin

    rank = {name: i for i, name in enumerate(order)}

    def place(node) -> int:
        return rank.get(owner(node, rank), len(rank))

    class SubjectsInTurnMultiProcPlugin(MultiProcPlugin):
        def _sort_jobs(self, jobids, scheduler="tsort"):
            return sorted(super()._sort_jobs(jobids, scheduler), key=lambda j: place(self.procs[j]))

        def run(self, graph, config, updatehash=False):
            # MultiProc runs a full garbage collection before every submission; over the objects of a
            # whole participant graph each took 0.1 s (13 s of a 53 s demo subject, during which
            # nothing was scheduled). Frozen, the graph's objects are left out of those collections.
            gc.freeze()
            try:
                return super().run(graph, config, updatehash=updatehash)
            finally:
                gc.unfreeze()

    return SubjectsInTurnMultiProcPlugin(plugin_args=plugin_args)
