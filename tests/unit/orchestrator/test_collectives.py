"""The backend -> device rule every collective follows, and the single-process behaviour."""

from __future__ import annotations

import pytest
import torch

from orchestrator.collectives import (all_gather_bytes, all_reduce_sum, broadcast_bytes, device_for_backend,
                                      run_on_rank)


@pytest.mark.parametrize("backend, device", [
    ("nccl", torch.device("cuda", 3)), ("NCCL", torch.device("cuda", 3)), ("gloo", torch.device("cpu")),
    ("cpu:gloo,cuda:nccl", torch.device("cpu")), ("mpi", torch.device("cpu")),
])
def test_device_for_backend(backend, device):
    assert device_for_backend(backend, 3) == device


def test_nccl_without_a_cuda_device_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        device_for_backend("nccl", None)


def test_single_process_collectives_are_identities():
    t = torch.arange(3.0)
    assert all_reduce_sum(t) is t
    assert broadcast_bytes(b"abc") == b"abc"
    assert all_gather_bytes(b"xy") == [b"xy"]
    assert run_on_rank(lambda: b"ok") == b"ok"
    with pytest.raises(ZeroDivisionError):  # alone, the original error comes back unchanged
        run_on_rank(lambda: bytes(1 // 0))
