"""Worker processes die with the run that started them.

Nipype's MultiProc workers are children of a forkserver, which ``scanbridge`` starts. When a scheduler
kills ``scanbridge`` (``kill -9`` at a time limit, preemption) neither the forkserver nor its workers
notice: a worker finishes its node, writes into the work folder of a run that is gone, and then it and
the forkserver wait forever. :func:`exit_with_parent` gives a worker a thread that waits on the run's
main process (multiprocessing's parent sentinel) and, when that process ends, ends the forkserver and
the worker. It does nothing in the main process.
"""

from __future__ import annotations

import os
import signal
import threading

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
