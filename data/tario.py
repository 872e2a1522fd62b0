"""Reading webdataset samples out of one tar shard, by sample index, tolerating damage.

A sample is the run of consecutive members sharing a key, exactly as webdataset groups them
(`group_by_keys` with its `base_plus_ext`: `dir/KEY.ext`, the key ending at the basename's first
dot; members whose name has no such key, and `__meta__` members, belong to no sample).
`read_range` yields one entry for EVERY index of the requested range, so that callers can count
positions exactly even when the shard is truncated or corrupt.

Why some of our own I/O code stays
----------------------------------
From webdataset (1.0.x) we use:
  * `gopen.gopen` with its URL handlers opens every shard and manifest (`data.urlio.open_url`):
    local paths and `file://` as plain files, `pipe:` commands, `http(s)://` through `curl`.
  * `tariterators.tar_file_expander` / `tar_file_iterator` iterate the members of shards that
    arrive as a stream (`pipe:`, http): forward only, which is all such a source allows anyway.
  * `tariterators.group_by_keys` (with `base_plus_ext`) groups members into samples, on every
    path, so our sample indices are webdataset's (`WebDataset` over our shards sees the same
    samples in the same order, damaged members apart).
  * `writer.TarWriter` writes the tar members of each shard (`data.shardset_writer.write_tar`).
Kept as our own code, and why:
  * `_local_members`, the member iterator for local files. `tar_file_iterator` opens the tar as
    a stream (`r|*`) and reads the data of every member it passes, so resuming mid-shard would
    read the whole skipped prefix; ours opens local files seekable (`r:`, gopen's plain file) and
    reads only the data of wanted samples, seeking over the rest (resume, samples already emitted
    this epoch). It follows `tar_file_iterator`'s skip rules and feeds the same `group_by_keys`.
  * `read_range`'s index accounting: webdataset delivers samples, not positions, and on a damaged
    shard raises or (with a warning handler) silently skips; our plan needs an entry for every
    index of a range, with a reason naming the damage, for exact resume and per-shard bad-sample
    counts (the loader names the shard when there are too many).
  * In `data.urlio`: the start-up checks (stat, HTTP HEAD, `which`; gopen has none), and the
    handling of gopen's `Pipe` (commands and curl). Its `close` waits up to two hours for a command
    still writing when a reader stops early (a mid-epoch break) and raises on the exit status, so
    `close_stream` kills it; its `read` polls the process on every 10 KiB read, so we read the
    command's stdout directly (`raw_stream`) and check the exit status once, to name a failed
    command in the reason, or, for curl failing before any sample, to raise it as an opening
    error as before (it is not data damage).
  * `data.shardset_writer` around `TarWriter`: webdataset's `ShardWriter` rolls shards over by
    count or size, in sequence, writing in place under its final name. Our shard sets are planned
    up front (which samples go in which named shard), written by parallel workers in any order,
    renamed into place only when complete and recorded with their sha256, so that a re-run after a
    kill keeps finished shards and rewrites the rest; `ShardWriter` has none of that.
"""

from __future__ import annotations

import functools
import inspect
import io
import re
import tarfile
from collections.abc import Callable, Iterator
from typing import Union

from data.urlio import (
    close_stream,
    command_failure,
    failed_status,
    open_url,
    raw_stream,
    url_kind,
)

# An entry is a dict {ext: bytes, "__key__": str} (read), None (not wanted: data not read), or a
# str (the reason the sample at that index is unreadable).
Entry = Union[dict, None, str]

_NOT_READ = None  # value of a member whose sample is not wanted (its data is never read)


@functools.cache
def _wds():
    """webdataset's tar iterators, imported on first use: importing webdataset imports torch, which
    `import data` and shard writing otherwise avoid (the loader side has torch loaded anyway)."""
    from webdataset import tariterators

    return tariterators


@functools.cache
def _skip_meta() -> re.Pattern:
    # The members tar_file_iterator skips besides non-regular files: its `skip_meta` pattern
    # (r"__[^/]*__($|/)") and top-level names wrapped in "__".
    return re.compile(inspect.signature(_wds().tar_file_iterator).parameters["skip_meta"].default)


def _local_members(tar: tarfile.TarFile, url: str, stop: int, want: Callable[[int], bool],
                   split: list) -> Iterator[dict]:
    """webdataset-style file samples of a seekable tar, the data read only for wanted samples.

    Follows `tar_file_iterator`'s rules (regular files only, `__meta__` members skipped) and counts
    samples as `group_by_keys` will group them, so `want` and `stop` see the right index. `split`
    receives each name's (key, extension) for `group_by_keys` (saves splitting every name twice)."""
    index, key, base_plus_ext, skip_meta = -1, None, _wds().base_plus_ext, _skip_meta().match
    for member in tar:
        name = member.name
        if not member.isreg() or ("__" in name and _is_meta(name, skip_meta)):
            continue
        split[:] = name, base_plus_ext(name)
        mkey = split[1][0]
        if mkey is None:
            continue
        if mkey != key:
            index, key = index + 1, mkey
            if index >= stop:
                return
            wanted = want(index)
        yield {"fname": name, "data": tar.extractfile(member).read() if wanted else _NOT_READ, "__url__": url}


def _is_meta(name: str, skip_meta) -> bool:
    return ("/" not in name and name.startswith("__") and name.endswith("__")) or bool(skip_meta(name))


def _open_local(stream) -> tarfile.TarFile | None:
    # Local files (gopen gives a BufferedReader) are opened seekable so skipped samples are seeked over.
    if isinstance(stream, io.BufferedReader) and stream.seekable():
        return tarfile.open(fileobj=stream, mode="r:")
    return None


def _samples(stream, url: str, stop: int, want: Callable[[int], bool]) -> Iterator[tuple[int, Entry]]:
    """(index, entry) per sample until `stop`; raises on damage (caller handles)."""
    tar, wds = _open_local(stream), _wds()
    if tar is not None:
        split: list = [None, None]
        files = _local_members(tar, url, stop, want, split)

        def keys(name: str):
            return split[1] if name is split[0] else wds.base_plus_ext(name)
    else:  # a stream: webdataset's own member iterator (reads every member's data)
        files = wds.tar_file_expander([{"url": url, "stream": raw_stream(stream)}], eof_value=None)
        keys = wds.base_plus_ext
    for index, sample in enumerate(wds.group_by_keys(files, keys=keys)):
        if index >= stop:
            return
        del sample["__url__"]
        yield index, sample if want(index) else None  # (local: unwanted data was never read)
        if index + 1 >= stop:
            return


def _reason(exc: BaseException, stream) -> str:
    failure = command_failure(stream, wait_s=1)
    if failure:
        return f"damaged shard ({failure})"
    # webdataset appends the stream and URL to an exception's args; show the message only.
    message = exc.args[0] if exc.args else ""
    return f"damaged shard ({type(exc).__name__}: {message})"


def read_range(url: str, start: int, stop: int,
               want: Callable[[int], bool] = lambda i: True) -> Iterator[tuple[int, Entry]]:
    """Yield (index, entry) for every sample index in [start, stop) of the shard at `url`.

    Indices below `start` are skipped without reading their data where the stream allows it.
    A truncated or damaged shard yields a reason string for each index it could not deliver.
    Opening errors (missing file, refused connection) propagate: they are not data damage.
    """
    stream = open_url(url)
    expected, seen = start, False
    try:
        try:
            for index, entry in _samples(stream, url, stop, lambda i: i >= start and want(i)):
                seen = True
                if index >= start:
                    yield index, entry
                    expected = index + 1
            reason = "shard ends early: fewer samples than the manifest lists"
            failure = command_failure(stream, wait_s=1) if expected < stop else None
            if failure:  # a command (pipe:, curl) that stopped writing because it failed
                reason = f"damaged shard ({failure})"
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            status = failed_status(stream, wait_s=5) if not seen and url_kind(url) == "http" else None
            if status is not None:  # curl (gopen's http handler) could not fetch it: not data damage
                raise FileNotFoundError(f"cannot open {url}: curl exited with status {status}") from exc
            reason = _reason(exc, stream)
        for index in range(expected, stop):
            yield index, reason
    finally:
        close_stream(stream)


def count_samples(url: str) -> int:
    """Number of samples in a shard (reads every header; the data too for non-seekable URLs)."""
    stream = open_url(url)
    try:
        last = -1
        for index, _ in _samples(stream, url, 1 << 62, lambda i: False):
            last = index
        return last + 1
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ValueError(f"cannot count samples in {url}: {_reason(exc, stream)}") from exc
    finally:
        close_stream(stream)
