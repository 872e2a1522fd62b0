"""Models that are not in the zoo: `package.module:factory`, a callable that returns an nn.Module.

The factory is imported like a recipe (from the launching directory, which Ray's local workers
also get on their path, or from PYTHONPATH), called with the user's keyword arguments, and the
model it returns gets its pruning dataflow from torch.fx (`attach_meta`, family "traced") at the
input size it will see. The meta's name is the factory reference itself, so every spec that
compaction writes names what rebuilds it (pruning/respec.py).

`num_classes`: when the run knows a class count (model.num_classes, else the manifest's) it is
passed as the keyword `num_classes` if the factory takes that keyword (or **kwargs) and the
user's kwargs do not set it already; otherwise the factory decides its classifier's width.

Every mistake is one ValueError line without the field name; callers prefix the field
(`model.name`, `--model`).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .macs import hw
from .trace import attach_meta


def is_factory(name: str) -> bool:
    """A `package.module:factory` reference rather than a registered model name."""
    return ":" in name


def _where(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f" ({Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno})" if tb is not None else ""


def _launch_dir_on_path() -> None:
    # `python -m`/`python script.py` put it there, the `softprune` entry point does not; Ray's
    # local workers get the driver's working directory on their path either way
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)


def resolve(name: str) -> Callable[..., nn.Module]:
    """The factory `name` refers to; one-line ValueError for a missing module or attribute."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ValueError(f"{name!r} is not of the form package.module:factory")
    _launch_dir_on_path()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ValueError(f"cannot import module {module_name!r}: no module named {exc.name!r} "
                             f"(run from the directory that holds it, or add it to PYTHONPATH)") from None
        raise ValueError(f"importing module {module_name!r} failed: {exc}{_where(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module raising at import time: one line
        raise ValueError(f"importing module {module_name!r} failed: {type(exc).__name__}: "
                         f"{exc}{_where(exc)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{module_name}.{attr} is not callable (it is of type {type(obj).__name__}); "
                         f"name a function or class that returns the model")
    return obj


def accepts(factory: Callable, keyword: str) -> bool:
    """Whether `factory` takes `keyword` as a keyword argument (named, or through **kwargs)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False
    return any(p.kind == p.VAR_KEYWORD or (p.name == keyword and p.kind != p.POSITIONAL_ONLY) for p in params)


def build(name: str, kwargs: Mapping[str, Any] | None = None, num_classes: int | None = None,
          input_size: int | tuple[int, int] = 224) -> nn.Module:
    """Call the factory and trace the model it returns at `input_size` (`model.softprune_meta`).
    A model the tracer cannot follow raises the trace's one-line ValueError (it names the fx
    node and its op)."""
    factory = resolve(name)
    call = dict(kwargs or {})
    if num_classes is not None and "num_classes" not in call and accepts(factory, "num_classes"):
        call["num_classes"] = num_classes
    try:
        model = factory(**call)
    except Exception as exc:  # noqa: BLE001 - whatever the user's factory raises: one line
        shown = ", ".join(f"{k}={v!r}" for k, v in call.items())
        raise ValueError(f"{name}({shown}) raised {type(exc).__name__}: {exc}{_where(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name} returned {type(model).__name__}, not a torch.nn.Module")
    h, w = hw(input_size)
    p = next(model.parameters(), None)
    x = torch.zeros(1, 3, h, w, dtype=p.dtype if p is not None else torch.float32,
                    device=p.device if p is not None else "cpu")
    attach_meta(model, x, name=name)
    return model
