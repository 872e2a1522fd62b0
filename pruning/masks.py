"""Masks as data: one keep-vector per group, the epoch they were decided at, a stable hash, and
bit-packed bytes for transport (rank 0 decides, every rank unpacks and checks the hash)."""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .groups import GroupSet

_MAGIC = b"SPMK"
_HEADER = struct.Struct("<4sIq16s")  # magic, version, epoch, group-signature digest


def _signature(names, sizes) -> bytes:
    text = ";".join(f"{n}:{s}" for n, s in zip(names, sizes))
    return hashlib.sha256(text.encode()).digest()[:16]


@dataclass
class MaskSet:
    """Kept slots per group (`keep[name]` is a bool vector of the group's size)."""

    epoch: int
    keep: dict[str, Tensor]

    def __post_init__(self) -> None:
        for name, k in self.keep.items():
            if k.dtype != torch.bool or k.dim() != 1:
                raise ValueError(f"mask {name!r} must be a 1-D bool tensor, got {k.dtype} {tuple(k.shape)}")

    def _bits(self) -> bytes:
        if not self.keep:
            return b""
        flat = torch.cat([k.cpu() for k in self.keep.values()]).numpy()
        return np.packbits(flat, bitorder="little").tobytes()

    def _digest(self) -> bytes:
        return _signature(self.keep.keys(), (len(k) for k in self.keep.values()))

    def pack(self) -> bytes:
        """Header (epoch, digest of group names and sizes) + one bit per slot, in group order."""
        return _HEADER.pack(_MAGIC, 1, self.epoch, self._digest()) + self._bits()

    @classmethod
    def unpack(cls, data: bytes, groups: GroupSet) -> MaskSet:
        """Inverse of `pack`; fails if the masks were made for different groups."""
        if len(data) < _HEADER.size:
            raise ValueError(f"packed masks too short ({len(data)} bytes)")
        magic, version, epoch, digest = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != 1:
            raise ValueError("not packed softprune masks (bad magic or version)")
        if digest != _signature(groups.names(), groups.sizes()):
            raise ValueError("packed masks were made for different groups (names or sizes differ)")
        total = sum(groups.sizes())
        bits = np.unpackbits(np.frombuffer(data, np.uint8, offset=_HEADER.size), count=total,
                             bitorder="little").astype(bool)
        flat = torch.from_numpy(bits)
        keep = dict(zip(groups.names(), torch.split(flat, groups.sizes())))
        return cls(int(epoch), {k: v.clone() for k, v in keep.items()})

    def hash(self) -> str:
        """sha256 of the epoch, group names/sizes and bits: equal on every rank or a bug."""
        return hashlib.sha256(self.pack()).hexdigest()

    def churn_per_group(self, prev: MaskSet) -> dict[str, float]:
        """Per group: the fraction of its slots whose kept/pruned state changed since `prev`."""
        self.churn(prev)  # same groups, or ValueError
        return {n: float((k != prev.keep[n]).float().mean()) if len(k) else 0.0 for n, k in self.keep.items()}

    def churn(self, prev: MaskSet | None) -> float:
        """Fraction of slots whose kept/pruned state changed since `prev` (0.0 without one).
        A slot is one filter, or one channel of a whole residual stream under `coupled`."""
        if prev is None:
            return 0.0
        if list(prev.keep) != list(self.keep) or any(len(prev.keep[n]) != len(k) for n, k in self.keep.items()):
            raise ValueError("churn: masks belong to different groups")
        total = sum(len(k) for k in self.keep.values())
        changed = sum(int((k != prev.keep[n]).sum()) for n, k in self.keep.items())
        return changed / total if total else 0.0

    def kept_fraction(self) -> dict[str, float]:
        return {n: float(k.float().mean()) if len(k) else 1.0 for n, k in self.keep.items()}

    def kept_counts(self) -> dict[str, int]:
        return {n: int(k.sum()) for n, k in self.keep.items()}

    def to_state(self) -> dict:
        """JSON-able form for checkpoints (bits base64, so ResNet-101 masks stay ~5 KB)."""
        return {"epoch": self.epoch,
                "groups": {n: {"size": len(k), "bits": base64.b64encode(
                    np.packbits(k.cpu().numpy(), bitorder="little").tobytes()).decode()}
                    for n, k in self.keep.items()}}

    @classmethod
    def from_state(cls, state: Mapping) -> MaskSet:
        try:
            keep = {}
            for name, g in state["groups"].items():
                raw = np.frombuffer(base64.b64decode(g["bits"]), np.uint8)
                bits = np.unpackbits(raw, count=int(g["size"]), bitorder="little").astype(bool)
                keep[name] = torch.from_numpy(bits.copy())
            return cls(int(state["epoch"]), keep)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid mask state: {exc}") from exc

    def check(self, groups: GroupSet) -> None:
        """Raise unless these masks cover exactly `groups` (names, order, sizes)."""
        if list(self.keep) != groups.names() or [len(k) for k in self.keep.values()] != groups.sizes():
            raise ValueError("masks do not match the groups (names, order or sizes differ)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MaskSet) and self.pack() == other.pack()


def full_masks(groups: GroupSet, epoch: int = 0) -> MaskSet:
    """Everything kept: the masks of an unpruned model."""
    return MaskSet(epoch, {g.name: torch.ones(g.size, dtype=torch.bool) for g in groups})


def conv_keep(groups: GroupSet, masks: MaskSet) -> dict[str, Tensor]:
    """Per masked conv (and follower), a bool vector over its output channels. A follower of a
    concat gets its rows from each part's group, and keeps the rows no group holds."""
    out = {}
    for g in groups:
        k = masks.keep[g.name]
        for m in g.members:
            mk = k if m.slot is None else k[m.slot]
            if m.rows is None:
                out[m.conv] = mk
            else:
                if m.conv not in out:
                    out[m.conv] = torch.ones(m.channels, dtype=torch.bool, device=k.device)
                out[m.conv][m.rows.to(k.device)] = mk
    return out
