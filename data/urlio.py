"""Opening shard URLs: local paths, `file://`, `http(s)://` and `pipe:` commands.

Every URL is opened by webdataset's `gopen` and its URL handlers: local paths and `file://` as
plain (seekable) files, `pipe:CMD` as the stdout of a shell command, `http(s)://` through `curl`
(so `curl` must be on PATH; `check_url` says so at start if it is not). What stays ours: which
URLs we accept (`url_kind`), the cheap start-up checks (stat, HTTP HEAD, `which`: `gopen` has no
such thing), and the handling of gopen's `Pipe`: `close_stream` (its `close` waits up to two hours
for a command still writing when a reader stops early, and raises on the exit status),
`raw_stream` (its `read` polls the process on every read) and `failed_status`/`command_failure`
(the exit status, checked once). See the top of `data/tario.py`.

Object stores are reached through `pipe:` commands that write the object to stdout, e.g.
`pipe:aws s3 cp s3://bucket/in1k/train-000000.tar -` or
`pipe:gcloud storage cat gs://bucket/in1k/train-000000.tar` (or `gsutil cat`). Plain `s3://` and
`gs://` URLs are rejected with a message that shows these forms.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

HTTP_TIMEOUT_S = 60
SIZE_MISMATCH = "the manifest lists"  # in the problem of a shard whose size differs from its record
PIPE_BUFFER = 1 << 20  # stdout buffer of pipe: commands and curl


def url_kind(url: str) -> str:
    """'pipe', 'http' or 'file'; ValueError for schemes that need a pipe: command."""
    if url.startswith("pipe:"):
        return "pipe"
    if url.startswith(("http://", "https://")):
        return "http"
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in ("", "file"):
        return "file"
    raise ValueError(f"unsupported shard URL {url!r}: read object stores through a pipe: command, "
                     f"e.g. 'pipe:aws s3 cp s3://bucket/train-000000.tar -' or "
                     f"'pipe:gcloud storage cat gs://bucket/train-000000.tar'")


def local_path(url: str) -> Path:
    return Path(url[len("file://"):] if url.startswith("file://") else url)


def open_url(url: str) -> BinaryIO:
    """A readable binary stream for `url` from webdataset's `gopen` (seekable for local files).

    Local files that cannot be opened raise here; a failing command or an unreachable HTTP host
    shows as an OSError on reading or in `close_stream(check=True)` (gopen runs them as processes).
    """
    # Imported on first use: importing webdataset imports torch, which `import data` avoids.
    from webdataset.gopen import gopen

    if url_kind(url) == "file":
        return gopen(local_path(url).absolute().as_uri(), "rb")
    return gopen(url, "rb", bufsize=PIPE_BUFFER)


def close_stream(stream, check: bool = False) -> None:
    """Close a stream from `open_url`. Without `check`, a command still running (the reader
    stopped early) is killed, not waited for, and its exit status ignored (readers account for
    missing data themselves). With `check` (the stream was read to its end), a command that failed
    raises OSError naming its status."""
    from webdataset.gopen import Pipe

    if not isinstance(stream, Pipe):
        stream.close()
        return
    if not check and stream.proc.poll() is None:
        stream.proc.kill()
    stream.ignore_errors = True  # else gopen raises from close (and again from __del__)
    stream.close()
    failure = command_failure(stream) if check else None
    if failure:
        raise OSError(failure)


def raw_stream(stream):
    """What to read a stream from `open_url` through: for a `gopen` pipe, the command's stdout
    itself. `Pipe.read` polls the process on every read (tarfile reads 10 KiB at a time: about 15%
    of a streamed shard's reading CPU); callers check the status once instead (`failed_status`)."""
    return getattr(stream, "stream", stream) if getattr(stream, "proc", None) is not None else stream


def failed_status(stream, wait_s: float = 0.0) -> int | None:
    """The exit status of the command behind a `gopen` pipe if it has failed (waiting up to
    `wait_s` for it to end), else None."""
    proc = getattr(stream, "proc", None)
    if proc is None:
        return None
    try:
        status = proc.wait(wait_s) if wait_s else proc.poll()
    except subprocess.TimeoutExpired:
        return None
    return None if status is None or status in stream.ignore_status else status


def command_failure(stream, wait_s: float = 0.0) -> str | None:
    """'command CMD exited with status N' if the command behind a `gopen` pipe failed (waiting up
    to `wait_s` for it to end), else None."""
    status = failed_status(stream, wait_s)
    if status is None:
        return None
    command = stream.args[0][0]  # Pipe keeps Popen's (args, kwargs)
    command = " ".join(command) if isinstance(command, list) else command
    return f"command {command!r} exited with status {status}"


def read_bytes(url: str) -> bytes:
    """The whole object at `url` (used for manifests); OSError if it cannot be read."""
    stream = open_url(url)
    try:
        data = stream.read()
    except OSError as exc:  # gopen's pipe raises as soon as it sees the command fail
        close_stream(stream)
        raise OSError(command_failure(stream) or str(exc)) from exc
    except BaseException:
        close_stream(stream)
        raise
    close_stream(stream, check=True)
    return data


def check_url(url: str, size: int | None = None) -> str | None:
    """None if `url` looks readable (and, when `size` is given and the source tells its length,
    holds `size` bytes), else why not. Cheap: stat, HTTP HEAD, or `which`."""
    kind = url_kind(url)
    if kind == "file":
        path = local_path(url)
        if not path.is_file():
            return "no such file" if not path.exists() else "not a regular file"
        return _size_problem(path.stat().st_size, size)
    if kind == "pipe":
        words = shlex.split(url[len("pipe:"):])
        if not words:
            return "empty pipe: command"
        return None if shutil.which(words[0]) else f"command {words[0]!r} not found on PATH"
    if not shutil.which("curl"):
        return "reading http(s) shards needs curl on PATH (webdataset's gopen uses it)"
    return http_problem(url, size)


def _size_problem(actual: int | None, expected: int | None) -> str | None:
    if actual is None or expected is None or actual == expected:
        return None
    return f"{actual} bytes, {SIZE_MISMATCH} {expected} (truncated or replaced?)"


def http_problem(url: str, size: int | None = None) -> str | None:
    """Why an http(s) URL cannot be fetched (HTTP status, refused connection) or, with `size`,
    has another Content-Length; None if it answers HEAD as expected."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            return _size_problem(int(length) if length and length.isdigit() else None, size)
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError) as exc:
        return f"unreachable ({getattr(exc, 'reason', exc)})"


def url_problems(urls: list[str], sizes: list[int] | None = None) -> list[tuple[str, str]]:
    """(url, problem) for every URL that `check_url` finds unusable, checked in parallel."""
    expected = sizes if sizes is not None else [None] * len(urls)
    with ThreadPoolExecutor(max_workers=16) as pool:
        return [(u, p) for u, p in zip(urls, pool.map(check_url, urls, expected)) if p]


def describe_problems(problems: list[tuple[str, str]], total: int, what: str) -> str:
    shown = "; ".join(f"{u}: {p}" for u, p in problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return f"{what}: {len(problems)} of {total} shards cannot be used: {shown}{more}"


def check_urls(urls: list[str], what: str) -> None:
    """Raise ValueError naming every shard that is missing or unreachable (checked in parallel)."""
    problems = url_problems(urls)
    if problems:
        raise ValueError(describe_problems(problems, len(urls), what))
