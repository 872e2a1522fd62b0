"""The soak drill's verdict on its train passes (benchmarks/drill_soak.py `passes_steady`): the
first pass pays the loader workers' start-up; a run whose later passes slow down fails."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

from drill_soak import passes_steady


def test_steady_passes_pass_after_a_slow_first_one(capsys):
    seconds = [2.2] + [0.09, 0.1, 0.08] * 27
    assert passes_steady(seconds)
    line = capsys.readouterr().out
    assert "the first 2.20 s (loader start-up)" in line and "median 0.090 s over the first 10" in line


def test_passes_that_slow_down_fail(capsys):
    seconds = [2.2] + [0.1] * 40 + [0.5] * 10
    assert not passes_steady(seconds)
    assert "FAILED, the passes slowed down 5.0x" in capsys.readouterr().out
