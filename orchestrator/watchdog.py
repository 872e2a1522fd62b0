"""A per-rank deadline: a rank that makes no progress fails, so Ray restarts the group.

A hang (a loader worker deadlocked at start-up, a peer that died inside a collective, a storage
call that never returns) otherwise blocks a run for good: nothing raises, and Ray only retries
failures. The training thread reports progress with `beat()` at every step, evaluation batch,
pruning event and checkpoint; a daemon thread watches the time since the last beat. Past the
deadline it prints one line naming the rank, the phase and the seconds waited, then
1. raises `HangError` in the training thread (delivered as soon as that thread runs Python
   again: a loop waiting on a queue with a timeout, as DataLoader does, gets it within seconds);
2. if the thread is stuck inside C (a collective, a blocking read) and `grace_s` later still has
   not moved, ends the process with exit code `EXIT_CODE`; Ray sees the worker die.
Either way the failure counts against `max_failures` and the group resumes from the last
checkpoint. One watchdog per process (a Ray Train worker runs one training thread).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from contextlib import contextmanager

EXIT_CODE = 75  # EX_TEMPFAIL: a retryable failure


class HangError(RuntimeError):
    """A rank made no progress within the watchdog's deadline."""

    reason = "a rank made no progress within the watchdog's deadline"

    def __init__(self, *args):
        super().__init__(*(args or (self.reason,)))  # raised asynchronously as a bare class


class Watchdog:
    """Deadline on the time between `beat()` calls of one thread."""

    def __init__(self, timeout_s: float, rank: int, grace_s: float = 30.0, poll_s: float | None = None):
        self.timeout_s, self.rank, self.grace_s = float(timeout_s), rank, float(grace_s)
        self.poll_s = poll_s if poll_s is not None else min(5.0, self.timeout_s / 4)
        self.phase_name, self.limit = "setup", self.timeout_s
        self.last = time.monotonic()
        self.fired: str | None = None
        self._target = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="softprune-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def beat(self, phase: str | None = None, limit_s: float | None = None) -> None:
        """Progress: restart the clock (and name what the thread does now)."""
        if phase is not None:
            self.phase_name, self.limit = phase, float(limit_s or self.timeout_s)
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            waited = time.monotonic() - self.last
            if waited > self.limit:
                self._fire(waited)
                return

    def _fire(self, waited: float) -> None:
        self.fired = (f"watchdog: rank {self.rank} made no progress in {self.phase_name} for {waited:.0f} s "
                      f"(limit {self.limit:.0f} s); failing this rank so Ray restarts from the last checkpoint")
        print(self.fired, file=sys.stderr, flush=True)
        error = type("HangError", (HangError,), {"reason": self.fired})
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._target), ctypes.py_object(error))
        beat_at_fire = self.last
        if self._stop.wait(self.grace_s) or self.last != beat_at_fire:
            return  # the thread got the error (and the run loop stopped us) or moved again
        print(f"{self.fired}; still stuck {self.grace_s:.0f} s later (inside a C call?): exiting with code "
              f"{EXIT_CODE}", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)


_current: Watchdog | None = None


def start(timeout_s: float, rank: int, grace_s: float = 30.0) -> Watchdog:
    """Start this process's watchdog for the calling thread (replacing an earlier one)."""
    global _current
    stop()
    _current = Watchdog(timeout_s, rank, grace_s).start()
    return _current


def stop() -> None:
    global _current
    if _current is not None:
        _current.stop()
        _current = None


def beat(phase: str | None = None, limit_s: float | None = None) -> None:
    """Report progress to this process's watchdog (nothing when none runs)."""
    if _current is not None:
        _current.beat(phase, limit_s)


@contextmanager
def phase(name: str, limit_s: float | None = None):
    """Run a block as phase `name` (deadline `limit_s`, default the watchdog's), then go back to
    the enclosing phase."""
    dog = _current
    if dog is None:
        yield
        return
    outer = (dog.phase_name, dog.limit)
    dog.beat(name, limit_s)
    try:
        yield
    finally:
        dog.beat(*outer)
