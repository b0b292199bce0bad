"""One Nipype graph for all subjects: each subject's end is seen when it comes, a failure stays its own."""

import logging

import pytest


def _double(x):
    return 2 * x


def _fail(x):
    raise ValueError(f"broken input {x}")


def _subject_wf(label: str, fail: bool = False):
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    wf = pe.Workflow(name=f"sub_{label}_wf")
    inputnode = pe.Node(niu.IdentityInterface(fields=["x"]), name="inputnode")  # dropped by Nipype
    inputnode.inputs.x = 1
    ses = pe.Workflow(name="ses_1_wf")
    first = pe.Node(niu.Function(function=_double, input_names=["x"], output_names=["y"]), name="first")
    second = pe.Node(niu.Function(function=_fail if fail else _double, input_names=["x"], output_names=["y"]),
                     name="second")
    ses.connect(first, "y", second, "x")
    last = pe.Node(niu.Function(function=_double, input_names=["x"], output_names=["y"]), name="subject_step")
    wf.connect([(inputnode, ses, [("x", "first.x")]), (ses, last, [("second.y", "x")])])
    return wf


@pytest.mark.parametrize("plugin", ["Linear", "MultiProc"])
def test_each_subject_ends_once_and_a_failure_stays_with_its_subject(tmp_path, caplog, plugin):
    from nipype.pipeline import engine as pe

    from bidsapp.progress import RunProgress

    subjects = {"01": _subject_wf("01"), "02": _subject_wf("02", fail=True), "03": _subject_wf("03")}
    ended = []
    progress = RunProgress(subjects, ended.append, min_seconds=0.0)
    assert progress.total == 9  # three steps a subject: the IdentityInterface node is not run
    top = pe.Workflow(name="scanbridge_wf", base_dir=str(tmp_path))
    top.add_nodes(list(subjects.values()))
    top.config["execution"]["crashdump_dir"] = str(tmp_path / "crash")
    args = {"status_callback": progress} | ({"n_procs": 2} if plugin == "MultiProc" else {})
    with caplog.at_level(logging.INFO, logger="scanbridge"), pytest.raises(RuntimeError):
        top.run(plugin=plugin, plugin_args=args)
    assert sorted(ended) == ["01", "03"] and progress.complete == ended
    assert progress.failed == {"02"}
    assert "sub-02 ses-1 second failed after" in caplog.text
    assert "sub-01 ses-1 first:" in caplog.text and "sub-03 subject_step:" in caplog.text

    # a rerun finds every finished step cached: the subjects end again, nothing runs twice
    again = []
    rerun = RunProgress({k: v for k, v in subjects.items() if k != "02"}, again.append)
    top2 = pe.Workflow(name="scanbridge_wf", base_dir=str(tmp_path))
    top2.add_nodes([subjects["01"], subjects["03"]])
    top2.run(plugin="Linear", plugin_args={"status_callback": rerun})
    assert sorted(again) == ["01", "03"]


def test_step_names_say_session_and_step():
    from types import SimpleNamespace

    from bidsapp.progress import RunProgress

    node = SimpleNamespace(fullname="scanbridge_wf.sub_01_wf.ses_pre_wf.anat_preproc_wf.registration",
                           name="registration")
    assert RunProgress.step_name(node) == "ses-pre registration"
    node = SimpleNamespace(fullname="scanbridge_wf.sub_01_wf.longitudinal_wf.subj_longitudinal",
                           name="subj_longitudinal")
    assert RunProgress.step_name(node) == "subj_longitudinal"


def test_subjects_in_turn_finishes_subjects_one_after_another(tmp_path):
    from nipype.pipeline import engine as pe

    from bidsapp.progress import RunProgress, subjects_in_turn

    subjects = {label: _subject_wf(label) for label in ("01", "02", "03")}
    ended, started = [], []
    progress = RunProgress(subjects, ended.append)

    def callback(node, status):
        if status == "start":
            started.append(progress.subject_of(node))
        progress(node, status)

    top = pe.Workflow(name="scanbridge_wf", base_dir=str(tmp_path))
    top.add_nodes(list(subjects.values()))
    args = {"n_procs": 1, "status_callback": callback}
    top.run(plugin=subjects_in_turn(args, [wf.name for wf in subjects.values()]), plugin_args=args)
    assert started == ["01"] * 3 + ["02"] * 3 + ["03"] * 3  # Nipype alone starts every subject's first step first
    assert ended == ["01", "02", "03"]
