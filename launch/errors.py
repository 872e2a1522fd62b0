"""What a command line shows for a mistake the user can fix: `PROG: error: <one line>` on stderr,
exit status 2, no traceback. Every entry point (`softprune ...`, `launch/r101_asfp.py`) goes
through `run_cli`; anything that is not a user error still raises with its traceback (a bug).

User errors are:
  * ValueError: bad config, override, recipe, data source, storage, reused run name (every check
    before Ray raises one, with one line naming the field, file or URI);
  * OSError naming a file (no such file, permission denied, not a directory, ...);
  * a Ray Train run whose workers all failed with one of those or with a corrupt shard
    (`data.stream.CorruptShardError`). Ray has already printed each worker's traceback above;
    the line says which rank and what.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

USER_ERROR_EXIT = 2

# `module.ExceptionType: message`, the last line of a traceback text (torch's DataLoader
# re-raises a worker's exception with the worker's whole traceback as its message)
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): (.*)$")


def one_line(text: str) -> str:
    """`text` on one line: a traceback text becomes its final `Type: message` line's message."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    if len(lines) > 1 and any(line.startswith(("Traceback (most recent call last)", "Original Traceback"))
                              for line in lines):
        last = _EXCEPTION_LINE.match(lines[-1])
        return last.group(2) if last else lines[-1]
    return " ".join(lines)


def _os_error_line(exc: OSError) -> str | None:
    if exc.filename is None:
        return None
    names = " -> ".join(str(n) for n in (exc.filename, exc.filename2) if n is not None)
    return f"{names}: {exc.strerror or exc}"


def _worker_failures_line(exc: BaseException) -> str | None:
    """One line for a Ray Train run whose workers all failed with user errors, else None."""
    failures = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError, without importing ray
    if not isinstance(failures, dict) or not failures:
        return None
    by_message: dict[str, list[str]] = {}
    for rank, failure in sorted(failures.items()):
        line = _direct_line(failure) or _corrupt_shard_line(failure)
        if line is None:
            return None  # a bug on some rank: keep Ray's own error
        by_message.setdefault(line, []).append(str(rank))
    parts = [f"rank {','.join(ranks)}: {line}" for line, ranks in by_message.items()]
    return "training failed: " + "; ".join(parts)


def _corrupt_shard_line(exc: BaseException) -> str | None:
    if type(exc).__name__ != "CorruptShardError":
        return None
    from data.stream import CorruptShardError  # loaded already in a process that trained

    return one_line(str(exc)) if isinstance(exc, CorruptShardError) else None


def _direct_line(exc: BaseException) -> str | None:
    if isinstance(exc, ValueError):
        return one_line(str(exc))
    if isinstance(exc, OSError):
        return _os_error_line(exc)
    return None


def user_error_line(exc: BaseException) -> str | None:
    """The one line to show for `exc` if the user can fix it, else None."""
    return _direct_line(exc) or _corrupt_shard_line(exc) or _worker_failures_line(exc)


def run_cli(prog: str, func: Callable[[], int | None]) -> int:
    """Run a command; a user error becomes `prog: error: <line>` on stderr and exit status 2."""
    try:
        return int(func() or 0)
    except Exception as exc:
        line = user_error_line(exc)
        if line is None:
            raise
        print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
