"""RNG states in a checkpoint: CPU generators restored exactly; CUDA's saved and put back per device.

No GPU here: the CUDA calls are replaced by a recorder, which checks the logic (what is saved,
which device gets which state, a node with fewer GPUs). A real GPU run restores the real states.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from orchestrator import checkpoint as ckpt


def test_cpu_generators_come_back_exactly():
    state = ckpt.rng_state()
    first = (torch.rand(3), np.random.rand(2), random.random())
    ckpt.set_rng_state(state)
    again = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
    assert ("cuda" in state) == torch.cuda.is_available()


def test_cuda_states_are_saved_and_restored_per_device(monkeypatch):
    saved = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]
    restored: dict[int, torch.Tensor] = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda value, index: restored.__setitem__(index, value))
    state = ckpt.rng_state()
    assert state["cuda"] is saved
    ckpt.set_rng_state(state)
    assert sorted(restored) == [0, 1] and torch.equal(restored[1], saved[1])
    restored.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # resumed on a node with one GPU
    ckpt.set_rng_state(state)
    assert sorted(restored) == [0]
