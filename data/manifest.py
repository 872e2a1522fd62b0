"""The shard set's `manifest.json`: what the writer promises and what the loader plans from.

Format (version 1)::

    {
      "format": "softprune-shards", "version": 1,
      "classes": ["n01440764", ...],            # label i is classes[i] (sorted wnids for ImageNet)
      "splits": {
        "train": {
          "shards": [{"name": "train-000000.tar", "samples": 1250, "bytes": 1.4e8, "sha256": "..."}],
          "samples": 1281167, "bytes": ..., "bad_files": [{"path": "train/n.../x.JPEG", "error": "..."}]
        },
        "val": {...}
      },
      "totals": {"shards": ..., "samples": ..., "bytes": ..., "bad_files": ...},
      "settings": {...}                          # how the shards were made (writer arguments)
    }

Shard names are relative to the manifest's location. Each shard is a plain (uncompressed) tar of
webdataset samples: `KEY.jpg` (JPEG bytes) and `KEY.cls` (the class index as ASCII digits).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FORMAT = "softprune-shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"


def shard_record(name: str, samples: int, nbytes: int, sha256: str) -> dict[str, Any]:
    """One shard's manifest entry."""
    return {"name": name, "samples": int(samples), "bytes": int(nbytes), "sha256": sha256}


def build_manifest(classes: list[str], splits: dict[str, dict[str, Any]],
                   settings: dict[str, Any]) -> dict[str, Any]:
    """Assemble a manifest from per-split `{"shards": [...], "bad_files": [...]}` and add totals."""
    out_splits = {}
    for name, split in splits.items():
        shards = sorted(split["shards"], key=lambda r: r["name"])
        out_splits[name] = {
            "shards": shards,
            "samples": sum(r["samples"] for r in shards),
            "bytes": sum(r["bytes"] for r in shards),
            "bad_files": list(split.get("bad_files", [])),
        }
    totals = {key: sum(s[key] for s in out_splits.values()) for key in ("samples", "bytes")}
    totals["shards"] = sum(len(s["shards"]) for s in out_splits.values())
    totals["bad_files"] = sum(len(s["bad_files"]) for s in out_splits.values())
    return {"format": FORMAT, "version": VERSION, "classes": list(classes),
            "num_classes": len(classes), "splits": out_splits, "totals": totals,
            "settings": settings}


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def validate_manifest(obj: Any, where: str) -> dict[str, Any]:
    """Check the structure the loader relies on; ValueError naming `where` otherwise."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{where} is not a softprune shard manifest (format != {FORMAT!r})")
    if obj.get("version") != VERSION:
        raise ValueError(f"{where}: unsupported manifest version {obj.get('version')!r}")
    splits = obj.get("splits")
    if not isinstance(splits, dict) or not isinstance(obj.get("classes"), list):
        raise ValueError(f"{where}: manifest lacks 'splits' or 'classes'")
    for name, split in splits.items():
        for rec in split.get("shards", []):
            if not {"name", "samples", "bytes", "sha256"} <= set(rec):
                raise ValueError(f"{where}: split {name!r} has a malformed shard entry {rec!r}")
    return obj


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate a local manifest file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read manifest {path}: {exc}") from exc
    return validate_manifest(obj, str(path))
