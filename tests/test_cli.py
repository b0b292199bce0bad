"""The BIDS-App command line: flags, one-line errors for user mistakes, exit codes."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bidsapp import __version__
from bidsapp.cli import EXIT_FAILED, EXIT_USAGE, build_parser, main


@pytest.fixture
def tiny_bids(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    for sub in ("01", "02"):
        anat = root / f"sub-{sub}" / "anat"
        anat.mkdir(parents=True)
        data = np.random.default_rng(0).random((8, 8, 8)).astype("float32")
        nib.save(nib.Nifti1Image(data, np.eye(4)), anat / f"sub-{sub}_T1w.nii.gz")
        (anat / f"sub-{sub}_T1w.json").write_text(json.dumps({"RepetitionTime": 2.3, "InversionTime": 0.9}))
    return root


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("flag", ["--participant-label", "--participant_label"])
def test_both_label_spellings(flag, tmp_path):
    opts = build_parser().parse_args(["b", "o", "participant", flag, "01", "sub-02"])
    assert opts.participant_label == ["01", "sub-02"]


def test_bids_app_flags_parse(tmp_path):
    opts = build_parser().parse_args([
        "b", "o", "participant", "--session-label", "1", "-w", str(tmp_path), "--nprocs", "2",
        "--omp-nthreads", "1", "--mem-gb", "4", "--skip-bids-validation", "--bids-filter-file", "f.json",
        "--plugin", "SLURM", "--plugin-args", '{"sbatch_args": "-p short"}', "--device", "cpu",
    ])
    assert opts.session_label == ["1"] and opts.nprocs == 2 and opts.plugin == "SLURM"
    assert opts.skip_bids_validation and opts.device == "cpu"


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_nonexistent_bids_dir(capsys, tmp_path):
    code, _, err = run_cli(capsys, tmp_path / "nope", tmp_path / "out", "participant")
    assert code == EXIT_USAGE
    assert "nope" in err and "does not exist" in err and "Traceback" not in err


def test_not_a_bids_dataset(capsys, tmp_path):
    (tmp_path / "plain").mkdir()
    code, _, err = run_cli(capsys, tmp_path / "plain", tmp_path / "out", "participant")
    assert code == EXIT_USAGE and "dataset_description.json" in err


def test_a_derivatives_dataset_is_named_as_such(capsys, tmp_path):
    root = tmp_path / "fmriprep"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "x", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "fMRIPrep"}]}))
    code, _, err = run_cli(capsys, root, tmp_path / "out", "participant", "--skip-bids-validation")
    assert code == EXIT_USAGE and not (tmp_path / "out").exists()
    assert err.strip() == (f"scanbridge: error: {root}: a derivatives dataset (DatasetType \"derivative\", made by "
                           "fMRIPrep), not raw BIDS data; give the raw dataset's folder as bids_dir")


def test_nothing_to_process_writes_nothing(capsys, tiny_bids, tmp_path):
    """tiny_bids' images (8 mm across) cannot hold a head: both subjects are skipped at discovery."""
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, tiny_bids, out, "participant", "-w", tmp_path / "work", "--skip-bids-validation")
    assert code == EXIT_FAILED and not out.exists()
    assert "cannot hold a head" in stdout and "nothing to process" in err and "Traceback" not in err


def test_nipype_crash_records_keep_their_first_lines_on_the_terminal():
    import logging

    from bidsapp.cli import _NoTraceback

    rec = logging.LogRecord("nipype.workflow", logging.ERROR, __file__, 1, "Saving crash info to %s\n%s", (
        "/w/crash/crash-1.txt", "Traceback (most recent call last):\n  File x\nValueError: boom"), None)
    assert _NoTraceback().filter(rec) and rec.getMessage() == "Saving crash info to /w/crash/crash-1.txt"


def test_output_inside_bids_dir(capsys, tiny_bids):
    code, _, err = run_cli(capsys, tiny_bids, tiny_bids / "derivatives" / "scanbridge", "participant")
    assert code == EXIT_USAGE and "inside" in err


@pytest.mark.parametrize("label, words", [("99", "not found"), ("../01", "path separator")])
def test_bad_participant_labels(capsys, tiny_bids, tmp_path, label, words):
    code, _, err = run_cli(capsys, tiny_bids, tmp_path / "out", "participant", "--skip-bids-validation",
                           "-w", tmp_path / "work", "--participant-label", label)
    assert code == EXIT_USAGE and words in err and "Traceback" not in err


def test_unknown_session_label(capsys, tiny_bids, tmp_path):
    code, _, err = run_cli(capsys, tiny_bids, tmp_path / "out", "participant", "--skip-bids-validation",
                           "-w", tmp_path / "work", "--session-label", "7")
    assert code == EXIT_USAGE and "7" in err


def test_bad_plugin_args(capsys, tiny_bids, tmp_path):
    code, _, err = run_cli(capsys, tiny_bids, tmp_path / "out", "participant", "-w", tmp_path / "work",
                           "--plugin-args", "{nope")
    assert code == EXIT_USAGE and "--plugin-args" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists(), "nothing is written before the arguments are checked"


@pytest.mark.parametrize("argv, words", [
    (["--mem-gb", "-1"], "must be a positive number of GB"),
    (["--mem-gb", "0"], "must be a positive number of GB"),
    (["--mem-gb", "nan"], "must be a positive number of GB"),
    (["--nprocs", "-3"], "--nprocs"),
    (["--nprocs", "0"], "must be at least 1"),
    (["--omp-nthreads", "-2"], "--omp-nthreads"),
    (["--target-labels-per-tissue", "0"], "must be at least 1"),
])
def test_impossible_numbers_are_refused_at_the_command_line(capsys, tmp_path, argv, words):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([str(tmp_path), str(tmp_path / "out"), "participant", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == EXIT_USAGE and words in err and "Traceback" not in err


def test_unwritable_output_or_work_folder_is_one_line_and_exit_2(capsys, tiny_bids, tmp_path):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("permissions are not enforced for this user")
        code, _, err = run_cli(capsys, tiny_bids, locked / "out", "participant", "-w", tmp_path / "work")
        assert code == EXIT_USAGE and "output folder is not writable" in err and "Traceback" not in err
        code, _, err = run_cli(capsys, tiny_bids, tmp_path / "out", "participant", "-w", locked / "work")
        assert code == EXIT_USAGE and "work folder is not writable" in err
    finally:
        locked.chmod(0o755)


def test_cuda_without_a_cuda_device_stops_before_anything_runs(capsys, tiny_bids, tmp_path, monkeypatch):
    from bidsapp import devices

    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    code, _, err = run_cli(capsys, tiny_bids, tmp_path / "out", "participant", "-w", tmp_path / "work",
                           "--device", "cuda")
    assert code == EXIT_USAGE and "no CUDA device" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_unknown_precision_stops_before_anything_runs(capsys, tiny_bids, tmp_path, monkeypatch):
    monkeypatch.setenv("SCANBRIDGE_PRECISION", "half")
    code, _, err = run_cli(capsys, tiny_bids, tmp_path / "out", "participant", "-w", tmp_path / "work")
    assert code == EXIT_USAGE and "SCANBRIDGE_PRECISION='half' is not a precision" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_group_without_participant_results(capsys, tiny_bids, tmp_path):
    code, _, err = run_cli(capsys, tiny_bids, tmp_path / "out", "group", "-w", tmp_path / "work")
    assert code == EXIT_USAGE and "participant level first" in err


@pytest.mark.parametrize("verbose, level", [(0, 30), (1, 20)])
def test_nipype_workers_get_the_cli_log_level(tmp_path, monkeypatch, verbose, level):
    """MultiProc workers import Nipype afresh; they must read the CLI's level, not Nipype's INFO default."""
    import os
    import subprocess
    import sys

    from bidsapp.cli import _configure_nipype_workers

    monkeypatch.delenv("NIPYPE_CONFIG_DIR", raising=False)
    _configure_nipype_workers(tmp_path, verbose)
    env = dict(os.environ)
    assert env["NIPYPE_CONFIG_DIR"] == str(tmp_path / "nipype")
    code = "from nipype import logging; print(logging.getLogger('nipype.workflow').level)"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == str(level)


def test_user_nipype_config_dir_is_respected(tmp_path, monkeypatch):
    from bidsapp.cli import _configure_nipype_workers

    monkeypatch.setenv("NIPYPE_CONFIG_DIR", str(tmp_path / "mine"))
    _configure_nipype_workers(tmp_path, 0)
    assert not (tmp_path / "nipype").exists()
