"""A Nipype-style worker (forkserver child) and its forkserver die when the run that started them is
killed with kill -9."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

RUN = textwrap.dedent("""
    import multiprocessing, os, sys, time
    from concurrent.futures import ProcessPoolExecutor

    def work(path):
        import workflows.interfaces  # what a Nipype worker imports to run one of our nodes
        with open(path, "w") as fh:
            fh.write(f"{os.getpid()} {os.getppid()}")
        time.sleep(60)

    if __name__ == "__main__":
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"))
        pool.submit(work, sys.argv[1])
        while not os.path.exists(sys.argv[1]) or not open(sys.argv[1]).read():
            time.sleep(0.1)
        os.kill(os.getpid(), 9)  # what a scheduler does at the time limit
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_dies_with_a_killed_run(tmp_path):
    script, pid_file = tmp_path / "run.py", tmp_path / "worker.pid"
    script.write_text(RUN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path.parent), *sys.path])}
    proc = subprocess.run([sys.executable, str(script), str(pid_file)], env=env, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == -9
    worker, server = (int(x) for x in pid_file.read_text().split())
    deadline = time.time() + 15
    while (_alive(worker) or _alive(server)) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(worker), f"worker {worker} outlived the killed run"
    assert not _alive(server), f"forkserver {server} outlived the killed run"


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if marker.encode() in fh.read() and _alive(int(entry)):
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_the_run_says_what_finished_and_leaves_no_worker(tiny_session, tmp_path):
    import signal
    import uuid

    marker = f"SCANBRIDGE_TEST_RUN={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    cmd = [sys.executable, "-m", "bidsapp.cli", str(tiny_session["bids"]), str(tmp_path / "out"), "participant",
           "-w", str(tmp_path / "work"), "--nprocs", "2", "--omp-nthreads", "1", "--skip-bids-validation"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (tmp_path / "work" / "scanbridge_wf" / "sub_01_wf").exists():
        time.sleep(0.2)
    time.sleep(2)  # nodes are running in the workers now
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated; finished: no subject; rerun with the same --work-dir" in err and "Traceback" not in err
    deadline = time.time() + 15
    while _processes_with(marker) and time.time() < deadline:
        time.sleep(0.2)
    assert not _processes_with(marker), "worker processes outlived the terminated run"


def test_two_runs_never_work_on_one_subject_at_once_and_a_killed_run_leaves_no_lock(tmp_path):
    from bidsapp.lifecycle import WorkFolderBusy, work_lock

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from bidsapp.lifecycle import work_lock
        with work_lock({str(tmp_path)!r}, "sub-01"):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    import re

    with pytest.raises(WorkFolderBusy, match=re.escape(f"sub-01 is being processed by scanbridge (pid {holder.pid} ")):
        with work_lock(tmp_path, "sub-01"):
            pass
    with work_lock(tmp_path, "sub-02"):  # another subject in the same work folder is fine
        pass
    holder.kill()
    holder.wait()
    with work_lock(tmp_path, "sub-01"):  # the kernel released the killed run's lock
        pass


def test_participant_run_leaves_a_subject_another_run_holds(tmp_path, caplog):
    import json

    from bidsapp.cli import EXIT_FAILED, main
    from bidsapp.lifecycle import work_lock

    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.9.0"}))
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((32, 32, 32), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])),
             bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    work = tmp_path / "work"
    with work_lock(work, "sub-01"):
        code = main([str(bids), str(tmp_path / "out"), "participant", "-w", str(work), "--skip-bids-validation"])
    assert code == EXIT_FAILED
    assert "sub-01 not processed" in caplog.text and "is being processed by scanbridge" in caplog.text
    assert not (tmp_path / "out" / "sub-01.html").exists()  # the other run writes that report
