"""Every collective softprune issues, on the device its backend needs.

NCCL takes CUDA tensors only (a CPU tensor fails with "no backend for device cpu"); gloo takes
CPU tensors. Evaluation counts, BN buffers, mask bytes and agreement digests all travel through
the helpers here, which move a tensor to `comm_device()` and back, so no caller has to know the
backend. `all_gather_object` is avoided: under NCCL it silently uses whatever CUDA device is
current. Every function is a sync point when the world is larger than one.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


class RankFailure(RuntimeError):
    """Another rank raised inside a step that every rank waits on; carries its message."""


class RankDisagreement(RuntimeError):
    """Ranks that should hold the same thing do not; names the ranks."""


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device_for_backend(backend: str, cuda_index: int | None) -> torch.device:
    """The device collectives need under `backend` ("gloo", "nccl", "cpu:gloo,cuda:nccl", ...).

    A mixed backend string serves CPU tensors through gloo, so CPU is used there too: it needs no
    copy. Pure NCCL needs the rank's CUDA device.
    """
    names = {part.split(":")[-1] for part in backend.lower().split(",")}
    if names == {"nccl"}:
        if cuda_index is None:
            raise RuntimeError(f"backend {backend!r} needs a CUDA device, but this process has none")
        return torch.device("cuda", cuda_index)
    return torch.device("cpu")


def comm_device() -> torch.device:
    """The device this process's collectives must use (CPU outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    cuda = torch.cuda.current_device() if torch.cuda.is_available() else None
    return device_for_backend(str(dist.get_backend()), cuda)


def _distributed() -> bool:
    return rank_world()[1] > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over ranks, returned on the tensor's own device and dtype. Sync point."""
    if not _distributed():
        return tensor
    wire = tensor.detach().to(comm_device(), copy=True)
    dist.all_reduce(wire)
    return wire.to(tensor.device, tensor.dtype)


def barrier() -> None:
    """Wait for every rank, on the backend's device (NCCL's own barrier guesses the device)."""
    all_reduce_sum(torch.zeros(1))


def broadcast_bytes(payload: bytes | None, src: int = 0) -> bytes:
    """`src`'s payload on every rank (length first, then the bytes). Sync point."""
    rank, world = rank_world()
    if world == 1:
        assert payload is not None
        return payload
    device = comm_device()
    size = torch.tensor([len(payload) if rank == src else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    if rank == src:
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src)
    return payload if rank == src else bytes(buf.cpu().numpy().tobytes())


def all_gather_bytes(payload: bytes) -> list[bytes]:
    """Every rank's payload, in rank order, on every rank. Sync point (two all-gathers)."""
    _, world = rank_world()
    if world == 1:
        return [payload]
    device = comm_device()
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    if payload:
        buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    bufs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf)
    return [bytes(b[: int(s.item())].cpu().numpy().tobytes()) for b, s in zip(bufs, sizes)]


def run_on_rank(fn: Callable[[], bytes], src: int = 0, what: str = "work") -> bytes:
    """`fn()` runs on `src` only; its bytes reach every rank, and so does its exception.

    Without this a failure on `src` leaves the other ranks in the broadcast until the process
    group's timeout (30 minutes by default); here every rank raises `RankFailure` with `src`'s
    error at once, so Ray restarts the group from the last checkpoint. Sync point.
    """
    rank, _ = rank_world()
    outcome = None
    if rank == src:  # rank-dependent: only src computes
        try:
            outcome = pickle.dumps(("ok", fn()))
        except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks
            text = f"{type(exc).__name__}: {exc}"
            outcome = pickle.dumps(("error", text, traceback.format_exc()))
            if not _distributed():
                raise
    status, *rest = pickle.loads(broadcast_bytes(outcome, src))
    if status == "ok":
        return rest[0]
    raise RankFailure(f"rank {src} failed during {what}: {rest[0]}" + ("" if rank != src else f"\n{rest[1]}"))


def check_agree(value: str, what: str) -> list[str]:
    """All-gather every rank's `value`; raise naming the ranks that differ from rank 0. Sync point."""
    values = [v.decode() for v in all_gather_bytes(value.encode())]
    bad = [r for r, v in enumerate(values) if v != values[0]]
    if bad:
        raise RankDisagreement(f"{what} differs between ranks: ranks {bad} differ from rank 0 ({values[0]}): "
                               + ", ".join(f"rank {r}={values[r]}" for r in bad))
    return values


def gather_to_all(value: Any) -> list[Any]:
    """Every rank's small picklable `value`, in rank order, on every rank. Sync point."""
    return [pickle.loads(b) for b in all_gather_bytes(pickle.dumps(value))]
