"""Architecture specs: JSON descriptions of a model's per-layer shape.

A spec is a dict:
```
{"model": "resnet50", "num_classes": 1000,
 "channels": {"conv1": 64, "layer1.0.conv1": 40, ...},       # output channels per conv
 "scatter": {"layer1.0.conv3": {"index": [...], "width": 256, "bias": false}},
 "const_input": ["layer1.0.conv2", ...],                       # convs with a const_kernel buffer
 "shortcut_a": {"layer2.0": {"src": [...], "dst": [...]}}}     # CIFAR option-A shortcuts
```
Only `model` is required; every absent entry means the dense default. Other top-level keys
(for example the kept indices that compaction records) are carried along and ignored here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .layers import Conv2d, Scatter

SPEC_KEYS = ("channels", "scatter", "const_input", "shortcut_a")


class SpecView:
    """Reads a spec while a model is being built, and rejects names the model does not have."""

    def __init__(self, spec: Mapping[str, Any] | None, model_name: str) -> None:
        spec = dict(spec or {})
        self.model_name = model_name
        self.channels: dict[str, int] = dict(spec.get("channels") or {})
        self.scatters: dict[str, dict] = dict(spec.get("scatter") or {})
        self.const_input: set[str] = set(spec.get("const_input") or [])
        self.shortcuts: dict[str, dict] = dict(spec.get("shortcut_a") or {})
        self._seen: set[str] = set()
        self._seen_blocks: set[str] = set()

    def out(self, conv: str, default: int) -> int:
        self._seen.add(conv)
        value = self.channels.get(conv, default)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"spec channels[{conv!r}] must be a positive int, got {value!r}")
        return value

    def conv(self, name: str, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0) -> Conv2d:
        return Conv2d(cin, cout, k, stride, padding, bias=False, const_input=name in self.const_input)

    def scatter(self, conv: str, cout: int) -> Scatter | None:
        entry = self.scatters.get(conv)
        if entry is None:
            return None
        if len(entry["index"]) != cout:
            raise ValueError(f"spec scatter[{conv!r}] has {len(entry['index'])} indices, conv has {cout}")
        return Scatter(entry["index"], int(entry["width"]), bias=bool(entry.get("bias", False)))

    def shortcut(self, block: str) -> dict | None:
        self._seen_blocks.add(block)
        return self.shortcuts.get(block)

    def check_all_used(self) -> None:
        """Fail loudly on names the model does not have (a spec from another model)."""
        unknown = (set(self.channels) | set(self.scatters) | self.const_input) - self._seen
        unknown |= set(self.shortcuts) - self._seen_blocks
        if unknown:
            names = ", ".join(sorted(unknown)[:5])
            raise ValueError(f"spec names layers that {self.model_name} does not have: {names}")


def spec_of(model: nn.Module) -> dict[str, Any]:
    """The spec of `model` as it is now (its actual layer shapes)."""
    from .layers import ShortcutA

    meta = model.softprune_meta
    modules = dict(model.named_modules())
    spec: dict[str, Any] = {"model": meta.name, "num_classes": meta.num_classes}
    spec["channels"] = {c: modules[c].out_channels for c in meta.convs}
    spec["scatter"] = {
        conv: {"index": mod.index.tolist(), "width": mod.width, "bias": mod.bias is not None}
        for conv, mod in getattr(model, "softprune_scatters", dict)().items()  # none: traced
    }
    spec["const_input"] = [c for c in meta.convs if getattr(modules[c], "const_kernel", None) is not None]
    spec["shortcut_a"] = {
        name[: -len(".shortcut")]: {"src": mod.src, "dst": mod.dst}
        for name, mod in modules.items()
        if isinstance(mod, ShortcutA)
    }
    return {k: v for k, v in spec.items() if v or k in ("model", "num_classes", "channels")}
