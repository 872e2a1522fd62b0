"""Compacted models on disk: `model.safetensors` + `arch.json` + `report.json` in one directory.

Each file is written to a temporary name and renamed into place (atomic on POSIX), and
`report.json` goes last: a directory with a report is complete, one without it is not.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

FILES = ("model.safetensors", "arch.json", "report.json")


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj: Any) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n"))


def save_compact(out_dir: str | Path, model: nn.Module, spec: dict, report: dict) -> Path:
    """Write the three files into `out_dir` (created if needed); returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").unlink(missing_ok=True)  # incomplete until the new report lands
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _write_json(out / "arch.json", spec)
    _write_json(out / "report.json", report)
    return out


def load_compact(out_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, dict, dict]:
    """Rebuild the compacted model from `arch.json` (through the model registry, or a user model's
    factory: pruning/respec.py) and load its weights strictly; returns (model in eval mode, spec, report)."""
    from .respec import build

    out = Path(out_dir)
    missing = [f for f in FILES if not (out / f).is_file()]
    if missing:
        raise ValueError(f"{out} is not a complete compacted model (missing {', '.join(missing)})")
    spec = json.loads((out / "arch.json").read_text())
    report = json.loads((out / "report.json").read_text())
    model = build(spec, device)
    model.load_state_dict(load_file(out / "model.safetensors", device=device), strict=True)
    return model.eval(), spec, report
