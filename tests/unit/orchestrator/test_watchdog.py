"""The watchdog turns a thread that stops making progress into an error, or ends the process.

Each case runs in a fresh interpreter: one of them must end its process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from orchestrator.watchdog import EXIT_CODE

PRELUDE = """
import sys, time
from orchestrator import watchdog
dog = watchdog.start(timeout_s=1.0, rank=3, grace_s=1.0)
dog.poll_s = 0.1
"""


def _run(body: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.monotonic() - start


def test_a_stall_in_python_raises_in_the_stuck_thread_naming_rank_and_phase():
    proc, _ = _run("""
        try:
            with watchdog.phase("evaluation"):
                while True:          # waits like a DataLoader polling its queue
                    time.sleep(0.05)
        except watchdog.HangError as exc:
            watchdog.stop()
            print("CAUGHT", exc)
            sys.exit(0)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "CAUGHT watchdog: rank 3 made no progress in evaluation for" in proc.stdout
    assert "limit 1 s" in proc.stdout


def test_a_stall_inside_c_ends_the_process_after_the_grace_period():
    proc, seconds = _run("""
        with watchdog.phase("train step"):
            time.sleep(30)           # one C call: the asynchronous error cannot be delivered
        print("NOT REACHED")
    """)
    assert proc.returncode == EXIT_CODE, (proc.returncode, proc.stderr)
    assert "NOT REACHED" not in proc.stdout
    assert "rank 3 made no progress in train step" in proc.stderr and "exiting with code" in proc.stderr
    assert seconds < 20


def test_beats_keep_a_long_run_alive_and_stop_ends_the_watch():
    proc, _ = _run("""
        for _ in range(40):          # 4 s in all, 0.1 s between beats
            time.sleep(0.1)
            watchdog.beat("train step")
        watchdog.stop()
        time.sleep(2.5)              # past the deadline, but nobody watches any more
        print("DONE", dog.fired)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "DONE None" in proc.stdout


def test_a_phase_may_have_its_own_longer_limit():
    proc, _ = _run("""
        with watchdog.phase("checkpoint", 4.0):
            time.sleep(2.0)          # over the 1 s default, under the phase's 4 s
        watchdog.stop()
        print("DONE", dog.fired)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "DONE None" in proc.stdout
