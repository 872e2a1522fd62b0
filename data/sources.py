"""Turning a source string (manifest path/URL/command, or shard URLs) into a list of shards."""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import braceexpand

from data.manifest import MANIFEST_NAME, load_manifest, validate_manifest
from data.tario import count_samples
from data.urlio import check_urls, local_path, read_bytes, url_kind


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split, in manifest order, with their sample counts."""

    urls: list[str]
    counts: list[int]
    classes: list[str] | None = None
    source: str = ""
    split: str = ""
    bytes: list[int] = field(default_factory=list)

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
    try:
        obj = json.loads(read_bytes(location))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read manifest {location}: {exc}") from exc
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
                    source=source, split=split, bytes=[int(r["bytes"]) for r in records])


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

