"""Opening shard URLs: local paths, `file://`, `http(s)://` and `pipe:` commands.

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


class _PipeReader:
    """stdout of a shell command as a binary stream; reports a failed command on close."""

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
        self.returncode: int | None = None

    def read(self, n: int = -1) -> bytes:
        return self.proc.stdout.read(n)

    def close(self) -> None:
        if self.proc.poll() is None:  # stopped early (mid-epoch break): do not wait for the rest
            self.proc.kill()
        self.proc.stdout.close()
        self.returncode = self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_url(url: str) -> BinaryIO:
    """A readable binary stream for `url` (seekable for local files)."""
    kind = url_kind(url)
    if kind == "pipe":
        return _PipeReader(url[len("pipe:"):])
    if kind == "http":
        try:
            return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
        except (urllib.error.URLError, OSError) as exc:
            raise FileNotFoundError(f"cannot open {url}: {exc}") from exc
    return open(local_path(url), "rb")


def read_bytes(url: str) -> bytes:
    """The whole object at `url` (used for manifests)."""
    stream = open_url(url)
    try:
        data = stream.read()
    finally:
        stream.close()
    code = getattr(stream, "returncode", 0)
    if code:
        raise ValueError(f"command {url!r} exited with status {code}")
    return data


def check_url(url: str) -> str | None:
    """None if `url` looks readable, else why not. Cheap: stat, HTTP HEAD, or `which`."""
    kind = url_kind(url)
    if kind == "file":
        return None if local_path(url).is_file() else "no such file"
    if kind == "pipe":
        words = shlex.split(url[len("pipe:"):])
        if not words:
            return "empty pipe: command"
        return None if shutil.which(words[0]) else f"command {words[0]!r} not found on PATH"
    return _check_http(url)


def _check_http(url: str) -> str | None:
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S):
            return None
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError) as exc:
        return f"unreachable ({getattr(exc, 'reason', exc)})"


def check_urls(urls: list[str], what: str) -> None:
    """Raise ValueError naming every shard that is missing or unreachable (checked in parallel)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        problems = [(u, p) for u, p in zip(urls, pool.map(check_url, urls)) if p]
    if problems:
        shown = "; ".join(f"{u}: {p}" for u, p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{what}: {len(problems)} of {len(urls)} shards cannot be read: {shown}{more}")
