"""Reading the ILSVRC-2012 folder layouts into (relative path, label) lists.

Accepted layouts under SRC:
- `train/<wnid>/*.JPEG` (class index = position of the wnid in the sorted list, as ImageFolder);
- `val/<wnid>/*.JPEG`, or a flat `val/*.JPEG` plus a labels file: `--val-labels FILE`, or one of
  `LOC_val_solution.csv`, `val_labels.txt`, `val_labels.csv` in SRC or SRC/val. A labels file is
  either Kaggle's CSV (`ImageId,PredictionString` whose first word is the wnid) or lines of
  `NAME LABEL` / `NAME,LABEL` where NAME is the file name (extension optional) and LABEL a wnid
  or a 0-based index into the sorted wnids.
Image files are `.jpeg`, `.jpg` or `.png` in any letter case; other files are ignored.
"""

from __future__ import annotations

import csv
from pathlib import Path

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
LABEL_FILE_NAMES = ("LOC_val_solution.csv", "val_labels.txt", "val_labels.csv")

Item = tuple[str, int]  # (path relative to SRC, class index)


def _images(folder: Path) -> list[Path]:
    # `not is_dir()` rather than `is_file()`: a listed path that cannot be read is reported as a bad
    # file when the shards are written, instead of silently vanishing from the plan.
    return sorted(p for p in folder.iterdir() if not p.is_dir() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_class_tree(src: Path, split: str, classes: list[str]) -> list[Item]:
    """Images of `src/split/<wnid>/`; ValueError for a wnid outside `classes`."""
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for folder in _class_dirs(src / split):
        if folder.name not in index:
            raise ValueError(f"{folder}: class {folder.name!r} is not among the train classes")
        items += [(str(p.relative_to(src)), index[folder.name]) for p in _images(folder)]
    return items


def find_label_file(src: Path, explicit: str | Path | None) -> Path | None:
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ValueError(f"--val-labels {path}: no such file")
        return path
    for folder in (src, src / "val"):
        for name in LABEL_FILE_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def _label_of(value: str, index: dict[str, int], where: str) -> int:
    value = value.strip()
    if value in index:
        return index[value]
    if value.isdigit() and int(value) < len(index):
        return int(value)
    raise ValueError(f"{where}: label {value!r} is neither a known wnid nor a class index")


def read_label_file(path: Path, classes: list[str]) -> dict[str, int]:
    """Map image stem -> class index from a labels file (formats in the module docstring)."""
    index = {c: i for i, c in enumerate(classes)}
    text = path.read_text().splitlines()
    labels: dict[str, int] = {}
    if text and text[0].replace(" ", "").startswith("ImageId,PredictionString"):
        for row in csv.DictReader(text):
            labels[Path(row["ImageId"]).stem] = _label_of(row["PredictionString"].split()[0], index, str(path))
        return labels
    for number, line in enumerate(text, 1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected 'NAME LABEL', got {line!r}")
        labels[Path(parts[0]).stem] = _label_of(parts[1], index, f"{path}:{number}")
    return labels


def scan_flat_val(src: Path, classes: list[str], label_file: str | Path | None) -> list[Item]:
    path = find_label_file(src, label_file)
    if path is None:
        raise ValueError(f"{src / 'val'} holds images but no class folders, and no labels file was "
                         f"found: pass --val-labels FILE or add one of {', '.join(LABEL_FILE_NAMES)}")
    labels = read_label_file(path, classes)
    items, missing = [], []
    for p in _images(src / "val"):
        if p.stem in labels:
            items.append((str(p.relative_to(src)), labels[p.stem]))
        else:
            missing.append(p.name)
    if missing:
        raise ValueError(f"{path} has no label for {len(missing)} val images, e.g. {missing[:3]}")
    return items


def _classes(src: Path, val_labels) -> list[str]:
    for split in ("train", "val"):
        if (src / split).is_dir() and _class_dirs(src / split):
            return [p.name for p in _class_dirs(src / split)]
    path = find_label_file(src, val_labels)
    if path is not None:  # flat val only: the classes are the wnids the labels file names
        words = {w for line in path.read_text().splitlines()[1:] for w in line.replace(",", " ").split()}
        return sorted(w for w in words if w.startswith("n") and w[1:].isdigit())
    raise ValueError(f"{src}: no class folders found; expected {src}/train/<wnid>/*.JPEG, "
                     f"val/<wnid>/*.JPEG, or a flat val/ with a labels file (--val-labels FILE or "
                     f"one of {', '.join(LABEL_FILE_NAMES)})")


def scan_imagenet(src: str | Path, val_labels: str | Path | None = None) -> tuple[list[str], dict[str, list[Item]]]:
    """(sorted wnids, {"train": items, "val": items}) for the splits present; ValueError if none."""
    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"ImageNet source {src} is not a directory")
    present = [s for s in ("train", "val") if (src / s).is_dir()]
    if not present:
        found = sorted(p.name for p in src.iterdir())[:10]
        raise ValueError(f"{src} has neither train/ nor val/ (found {found}); expected "
                         f"train/<wnid>/*.JPEG and val/<wnid>/*.JPEG or a flat val/ with a labels file")
    classes = _classes(src, val_labels)
    splits = {}
    for split in present:
        if _class_dirs(src / split):
            splits[split] = scan_class_tree(src, split, classes)
        elif split == "val":
            splits[split] = scan_flat_val(src, classes, val_labels)
        else:
            raise ValueError(f"{src / split} has no class folders (<wnid>/*.JPEG)")
        if not splits[split]:
            raise ValueError(f"{src / split} contains no images (.JPEG/.jpg/.png)")
    return classes, splits
