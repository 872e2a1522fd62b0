"""The driver's environment defaults: what a person reading a log file sees from Ray."""

from __future__ import annotations

import io
import os

from orchestrator.env import set_defaults


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_worker_lines_are_plain_in_a_log_file_and_coloured_on_a_terminal(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    monkeypatch.setattr("sys.stdout", io.StringIO())  # a pipe or a file: not a terminal
    set_defaults(cache=tmp_path)
    assert os.environ["RAY_COLOR_PREFIX"] == "0"
    monkeypatch.delenv("RAY_COLOR_PREFIX")
    monkeypatch.setattr("sys.stdout", _Terminal())
    set_defaults(cache=tmp_path)
    assert "RAY_COLOR_PREFIX" not in os.environ  # Ray's colours, as on any terminal
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")
    monkeypatch.setattr("sys.stdout", io.StringIO())
    set_defaults(cache=tmp_path)
    assert os.environ["RAY_COLOR_PREFIX"] == "1"  # the user's choice stands
