"""Reading webdataset samples out of one tar shard, by sample index, tolerating damage.

A sample is the run of consecutive members sharing a key (`dir/KEY.ext`, the key ending at the
basename's first dot). `read_range` yields one entry for EVERY index of the requested range, so
that callers can count positions exactly even when the shard is truncated or corrupt.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from typing import Union

from data.urlio import open_url

# An entry is a dict {ext: bytes, "__key__": str} (read), None (not wanted: data not read), or a
# str (the reason the sample at that index is unreadable).
Entry = Union[dict, None, str]


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, webdataset style."""
    dirname, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{dirname}/{stem}" if dirname else stem), ext.lower()


def _open_tar(stream) -> tarfile.TarFile:
    # Local files are opened seekable ("r:") so that skipped samples are seeked over, not read.
    seekable = isinstance(stream, io.BufferedReader) and stream.seekable()
    return tarfile.open(fileobj=stream, mode="r:" if seekable else "r|")


def _groups(tar: tarfile.TarFile, stop: int, want: Callable[[int], bool]) -> Iterator[tuple[int, Entry]]:
    """Yield (index, entry) per sample group until `stop`; raises on damage (caller handles)."""
    index, key, files = -1, None, None
    for member in tar:
        if not member.isfile():
            continue
        mkey, ext = split_name(member.name)
        if mkey != key:
            if index >= 0:
                yield index, files
            index, key = index + 1, mkey
            if index >= stop:
                return
            files = {"__key__": mkey} if want(index) else None
        if files is not None:
            files[ext] = tar.extractfile(member).read()
    if index >= 0:
        yield index, files


def read_range(url: str, start: int, stop: int,
               want: Callable[[int], bool] = lambda i: True) -> Iterator[tuple[int, Entry]]:
    """Yield (index, entry) for every sample index in [start, stop) of the shard at `url`.

    Indices below `start` are skipped without reading their data where the stream allows it.
    A truncated or damaged shard yields a reason string for each index it could not deliver.
    Opening errors (missing file, refused connection) propagate: they are not data damage.
    """
    stream = open_url(url)
    expected = start
    try:
        try:
            tar = _open_tar(stream)
            for index, entry in _groups(tar, stop, lambda i: i >= start and want(i)):
                if index >= start:
                    yield index, entry
                    expected = index + 1
            reason = "shard ends early: fewer samples than the manifest lists"
        except (tarfile.TarError, EOFError, OSError) as exc:
            reason = f"damaged shard ({type(exc).__name__}: {exc})"
        for index in range(expected, stop):
            yield index, reason
    finally:
        stream.close()


def count_samples(url: str) -> int:
    """Number of samples in a shard (reads every header; the data too for non-seekable URLs)."""
    stream = open_url(url)
    try:
        tar = _open_tar(stream)
        last = -1
        for index, _ in _groups(tar, 1 << 62, lambda i: False):
            last = index
        return last + 1
    except (tarfile.TarError, EOFError) as exc:
        raise ValueError(f"cannot count samples in {url}: {exc}") from exc
    finally:
        stream.close()
