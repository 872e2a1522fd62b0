"""Turning a source string (manifest path/URL/command, or shard URLs) into a list of shards."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import braceexpand

from data.manifest import MANIFEST_NAME, load_manifest, validate_manifest
from data.tario import count_samples
from data.urlio import (
    SIZE_MISMATCH,
    check_url,
    check_urls,
    close_stream,
    describe_problems,
    http_problem,
    local_path,
    open_url,
    raw_stream,
    read_bytes,
    url_kind,
    url_problems,
)


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split, in manifest order, with their sample counts."""

    urls: list[str]
    counts: list[int]
    classes: list[str] | None = None
    source: str = ""
    split: str = ""
    bytes: list[int] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def digest(self) -> str:
        """Identifies the shard list (names and counts) for resume checks; not the hosts."""
        names = [u.rsplit("/", 1)[-1] for u in self.urls]
        blob = json.dumps([names, self.counts]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _split_fragment(source: str, default_split: str) -> tuple[str, str]:
    base, sep, frag = source.rpartition("#")
    if sep and frag and "/" not in frag and " " not in frag:
        return base, frag
    return source, default_split


def _is_manifest_source(source: str) -> bool:
    kind = url_kind(source)
    if kind == "file":
        path = local_path(source)
        return path.is_dir() or path.suffix == ".json"
    return source.rstrip().endswith(".json") or (kind == "pipe" and MANIFEST_NAME in source)


def _manifest_location(source: str) -> str:
    if url_kind(source) == "file" and local_path(source).is_dir():
        return str(local_path(source) / MANIFEST_NAME)
    return source


def _shard_url(manifest_url: str, name: str) -> str:
    kind = url_kind(manifest_url)
    if kind == "pipe":
        return manifest_url.replace(MANIFEST_NAME, name)
    if kind == "http":
        return urllib.parse.urljoin(manifest_url, name)
    return str(local_path(manifest_url).parent / name)


def _read_manifest(location: str) -> dict:
    if url_kind(location) == "file":
        if not local_path(location).is_file():
            raise ValueError(f"no manifest at {location}")
        return load_manifest(local_path(location))
    if url_kind(location) == "pipe" and (missing := check_url(location)):
        raise ValueError(f"cannot read manifest {location}: {missing}")  # e.g. the command is not installed
    try:
        obj = json.loads(read_bytes(location))
    except json.JSONDecodeError as exc:
        raise ValueError(f"manifest {location} is not JSON: {exc}") from None
    except OSError as exc:
        # curl's exit status says little; a HEAD request names the HTTP status or the refusal
        why = (http_problem(location) if url_kind(location) == "http" else None) or str(exc)
        raise ValueError(f"cannot read manifest {location}: {why}") from None
    return validate_manifest(obj, location)


def _from_manifest(source: str, split: str) -> ShardSet:
    location = _manifest_location(source)
    manifest = _read_manifest(location)
    if split not in manifest["splits"]:
        raise ValueError(f"{location} has no split {split!r} (it has {sorted(manifest['splits'])})")
    records = manifest["splits"][split]["shards"]
    if not records:
        raise ValueError(f"{location}: split {split!r} has no shards")
    return ShardSet(urls=[_shard_url(location, r["name"]) for r in records],
                    counts=[int(r["samples"]) for r in records], classes=manifest["classes"],
                    source=source, split=split, bytes=[int(r["bytes"]) for r in records],
                    sha256=[str(r["sha256"]) for r in records])


def expand_urls(source: str) -> list[str]:
    """Brace-expand `source`; several patterns may be joined with '::'."""
    urls = [u for part in source.split("::") for u in braceexpand.braceexpand(part.strip())]
    if not urls:
        raise ValueError(f"shard source {source!r} names no shards")
    return urls


def _from_urls(source: str) -> ShardSet:
    urls = expand_urls(source)
    check_urls(urls, source)
    with ThreadPoolExecutor(max_workers=8) as pool:  # one full read per shard: costly remotely
        counts = list(pool.map(count_samples, urls))
    return ShardSet(urls=urls, counts=counts, source=source)


def resolve_source(source: str, default_split: str, check: bool = True) -> ShardSet:
    """The shards named by `source` (see `DataConfig`); ValueError if any is missing."""
    base, split = _split_fragment(source, default_split)
    if not _is_manifest_source(base):
        return _from_urls(base)
    shards = _from_manifest(base, split)
    if check:
        check_urls(shards.urls, f"{source} ({split})")
    return shards


def relative_paths(source: str) -> list[str]:
    """The local paths of `source` that are relative (resolved against the reading process's
    working directory, which for a Ray worker is not the launching one)."""
    base, _ = _split_fragment(source, "")
    parts = [p.strip() for p in base.split("::")]
    return [p for p in parts if url_kind(p) == "file" and not p.startswith("file://")
            and not os.path.isabs(os.path.expanduser(p))]


def check_source(source: str, default_split: str) -> ShardSet | None:
    """The cheap start-up check of `source` (before any worker starts): its manifest is read and
    every shard is stat-ed or HEAD-ed, its size compared with the manifest's where the source
    tells it; shard URLs without a manifest are only checked to exist (counting their samples
    reads them whole). ValueError naming the source and shards otherwise. Returns the manifest's
    shards, or None without one. The workers' own check (`resolve_source`) compares no sizes: a
    damaged shard is the loader's to tolerate up to `max_bad_fraction`."""
    base, split = _split_fragment(source, default_split)
    if not _is_manifest_source(base):
        check_urls(expand_urls(base), base)
        return None
    shards = _from_manifest(base, split)
    problems = url_problems(shards.urls, shards.bytes)
    if problems:
        message = describe_problems(problems, len(shards.urls), f"{source} ({split})")
        if any(SIZE_MISMATCH in p for _, p in problems):
            message += ("; data.check_sources=false trains on them anyway (the loader skips what it "
                        "cannot read, up to data.max_bad_fraction of a shard)")
        raise ValueError(message)
    return shards


def verify_checksums(shards: ShardSet, workers: int = 8) -> None:
    """Read every shard whole and compare its sha256 with the manifest's; ValueError naming the
    shards that differ. A full read of the data set: an explicit opt-in, not a start-up default."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(_sha256, shards.urls))
    bad = [u for u, got, want in zip(shards.urls, digests, shards.sha256) if got != want]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ValueError(f"{shards.source} ({shards.split}): {len(bad)} of {len(shards.urls)} shards do not "
                         f"match the manifest's sha256: {', '.join(bad[:3])}{more}")


def _sha256(url: str) -> str:
    """The shard's sha256, or why it could not be read (which then differs from any digest)."""
    digest = hashlib.sha256()
    try:
        stream = open_url(url)
        try:
            reader = raw_stream(stream)
            while chunk := reader.read(1 << 20):
                digest.update(chunk)
        except BaseException:
            close_stream(stream)
            raise
        close_stream(stream, check=True)  # a failed command (curl, pipe:) is named, not hashed
    except OSError as exc:
        return f"unreadable: {exc}"
    return digest.hexdigest()
