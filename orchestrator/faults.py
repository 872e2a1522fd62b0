"""Fault injection for drills and tests, driven by the `SOFTPRUNE_FAULTS` environment variable.

The variable holds `;`-separated faults, each `kind:key=value:...`:
- `stall:rank=1:at=train:step=3:seconds=600` sleeps (in Python, in short naps) at that point;
  with `release=PATH` it ends as soon as PATH exists (a drill holds a rank until its fault is
  set up, however slow the machine, and `seconds` bounds the wait);
- `fail:rank=0:at=select` raises `InjectedFault` there;
- `kill:rank=0:at=checkpoint:step=16` ends the process with SIGKILL there (a reclaimed VM);
- `trace:rank=0:at=train:path=FILE` appends "time step pid" to FILE (drills measure steps lost).
`once=PATH` makes a fault fire only if PATH does not exist yet (it is created when firing), so a
restarted worker group runs clean. Points: `train` (after an optimizer step; `step` is the global
step), `eval` (before an evaluation pass), `select` (rank 0 choosing masks), `checkpoint` (rank
0 halfway through writing a checkpoint: model.pt written, the state file not yet). Unset, every call is
a dictionary lookup: nothing to pay in a real run.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "SOFTPRUNE_FAULTS"


class InjectedFault(RuntimeError):
    """Raised by a `fail` fault."""


def _parse(text: str) -> list[dict[str, str]]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, *pairs = item.split(":")
        fault = {"kind": kind}
        for pair in pairs:
            key, _, value = pair.partition("=")
            fault[key] = value
        faults.append(fault)
    return faults


def _matches(fault: dict[str, str], at: str, rank: int, step: int | None) -> bool:
    if fault.get("at") != at or int(fault.get("rank", rank)) != rank:
        return False
    if "step" in fault and (step is None or int(fault["step"]) != step):
        return False
    once = fault.get("once")
    if once:
        if Path(once).exists():
            return False
        Path(once).parent.mkdir(parents=True, exist_ok=True)
        Path(once).write_text(f"rank {rank} at {at} step {step}\n")
    return True


def inject(at: str, rank: int, step: int | None = None) -> None:
    """Fire the faults configured for this point, if any."""
    text = os.environ.get(ENV)
    if not text:
        return
    for fault in _parse(text):
        if not _matches(fault, at, rank, step):
            continue
        if fault["kind"] == "fail":
            raise InjectedFault(f"injected failure at {at} on rank {rank}")
        if fault["kind"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault["kind"] == "trace":
            with open(fault["path"], "a") as f:
                f.write(f"{time.time():.3f} {step} {os.getpid()}\n")
        if fault["kind"] == "stall":
            _stall(float(fault.get("seconds", 3600)), fault.get("release"))


def _stall(seconds: float, release: str | None) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:  # short naps: Python runs between them (see watchdog)
        if release and Path(release).exists():
            return
        time.sleep(0.05)
