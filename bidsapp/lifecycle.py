"""Worker processes die with the run that started them.

Nipype's MultiProc workers are children of a forkserver, which ``scanbridge`` starts. When a scheduler
kills ``scanbridge`` (``kill -9`` at a time limit, preemption) neither the forkserver nor its workers
notice: a worker finishes its node, writes into the work folder of a run that is gone, and then it and
the forkserver wait forever. :func:`exit_with_parent` gives a worker a thread that waits on the run's
main process (multiprocessing's parent sentinel) and, when that process ends, ends the forkserver and
the worker. It does nothing in the main process. :func:`work_lock` keeps two runs from working on
the same subject in one work folder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

_STARTED = False


def exit_with_parent() -> None:
    """In a multiprocessing child: end this process, and the forkserver between it and the run's main
    process, as soon as the main process ends (idempotent)."""
    global _STARTED
    import multiprocessing
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if _STARTED or parent is None or parent.sentinel is None:
        return
    _STARTED = True
    server = os.getppid() if os.getppid() not in (parent.pid, 1) else None

    def watch():
        wait([parent.sentinel])  # readable once the run's main process has ended
        if server is not None:
            try:
                os.kill(server, signal.SIGKILL)
            except OSError:
                pass
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class WorkFolderBusy(RuntimeError):
    """Another live process is working on the same part of the work folder."""


@contextlib.contextmanager
def work_lock(work_dir, name: str):
    """Hold ``<work_dir>/.locks/<name>.lock`` for the block, so that two runs never work on the same
    subject (or group level) in one work folder at once; runs on other subjects share it freely. The
    lock is the kernel's (``flock``): it goes with the process that held it, so a killed run leaves no
    stale lock behind."""
    import fcntl
    import socket

    folder = Path(work_dir) / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    fh = open(folder / f"{name}.lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise WorkFolderBusy(f"{work_dir}: {name} is being processed by {holder}; wait for that run to finish "
                             "or pass another --work-dir") from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"scanbridge (pid {os.getpid()} on {socket.gethostname()})")
        fh.flush()
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
