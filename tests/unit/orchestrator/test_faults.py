"""Fault injection: a stall holds its rank until its release file exists, and only as long as
its `seconds` allow; `once` fires a fault a single time."""

from __future__ import annotations

import threading

import pytest

from orchestrator import faults


def _stall_in_thread(monkeypatch, spec: str) -> threading.Thread:
    monkeypatch.setenv(faults.ENV, spec)
    thread = threading.Thread(target=faults.inject, args=("train", 0, 5), daemon=True)
    thread.start()
    return thread


def test_a_stall_holds_until_its_release_file_appears(monkeypatch, tmp_path):
    go = tmp_path / "go"
    thread = _stall_in_thread(monkeypatch, f"stall:rank=0:at=train:step=5:seconds=120:release={go}")
    thread.join(timeout=1.0)
    assert thread.is_alive()  # still held: nothing released it
    go.touch()
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_a_stall_ends_after_its_seconds_without_a_release(monkeypatch, tmp_path):
    thread = _stall_in_thread(monkeypatch, f"stall:rank=0:at=train:step=5:seconds=0.2:release={tmp_path / 'never'}")
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_a_stall_elsewhere_does_not_hold(monkeypatch, tmp_path):
    monkeypatch.setenv(faults.ENV, f"stall:rank=1:at=train:step=5:seconds=120:release={tmp_path / 'go'}")
    faults.inject("train", 0, 5)  # rank 0: not the stalled rank, returns at once
    faults.inject("train", 1, 6)  # another step


def test_once_fires_a_single_time(monkeypatch, tmp_path):
    marker = tmp_path / "fired"
    monkeypatch.setenv(faults.ENV, f"fail:rank=0:at=select:once={marker}")
    with pytest.raises(faults.InjectedFault):
        faults.inject("select", 0)
    faults.inject("select", 0)  # the marker exists now: nothing fires
    assert marker.exists()
