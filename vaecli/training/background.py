"""Work that goes on while training continues: an ordered worker thread, and the registry that exit_now drains.

An epoch's outputs are written on a worker thread while the next epoch trains (see vaecli/training/run.py). The
process may only leave through os._exit (cli.exit_now) once that work is done: wait_for_pending_outputs()
waits for every worker still open. It is also called from a signal handler, which interrupts the main
thread anywhere, so nothing here makes the main thread hold a lock that a waiter then needs: tasks
travel through a SimpleQueue (whose put is reentrant), and each wait has its own Event.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

# How often a waiter checks that the worker still runs (it stops only when closed).
POLL_SECONDS = 0.05

# Workers started and not yet closed: what exit_now must wait for.
_open_workers: set[OrderedWorker] = set()


class OrderedWorker:
    """One thread that runs the tasks given to it one at a time, in the order given.

    After a task raises, the tasks after it are skipped (the run is stopping) but `drain` still runs, so
    work already started elsewhere (an asynchronous checkpoint) still completes; `check()` raises the error.
    """

    def __init__(self, name: str, drain: Callable[[], None] = lambda: None):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._drain = drain
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        _open_workers.add(self)

    def submit(self, task: Callable[[], None]) -> threading.Event:
        """Queue `task`; the Event is set once it has run (or been skipped after an earlier error)."""
        done = threading.Event()
        self._tasks.put((task, done))
        return done

    def wait_for(self, done: threading.Event) -> None:
        """Block until `done` is set, or the worker has stopped (a task queued after close never runs)."""
        while not done.wait(POLL_SECONDS):
            if not self._thread.is_alive():
                return

    def wait(self) -> None:
        """Block until every task queued so far has run and `drain` has finished; raises nothing."""
        self.wait_for(self.submit(self._drain))

    def check(self) -> None:
        """Raise the first error a task met, if one did."""
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Run what is queued and `drain`, then stop the thread; safe to call twice."""
        if self._thread.is_alive():
            self.wait()
            self.wait_for(self.submit(None))
            self._thread.join()
        _open_workers.discard(self)

    def _run(self) -> None:
        while True:
            task, done = self._tasks.get()
            try:
                if task is None:
                    return
                if self._error is None or task is self._drain:
                    task()
            except BaseException as error:  # kept for the main thread, which decides what stops
                if self._error is None:
                    self._error = error
            finally:
                done.set()


def wait_for_pending_outputs() -> None:
    """Wait until every open worker has written what it was given (called before os._exit)."""
    for worker in list(_open_workers):
        worker.wait()
