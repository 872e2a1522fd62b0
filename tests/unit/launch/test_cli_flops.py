from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch.cli import main


def test_flops_json_resnet50(capsys):
    assert main(["flops", "resnet50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"model", "input_size", "params", "macs"} <= set(out)
    assert out["input_size"] == 224 and out["params"] == 25_557_032
    assert out["macs"] == pytest.approx(4.09e9, rel=0.01)


def test_flops_input_size_changes_macs(capsys):
    main(["flops", "resnet18", "--input-size", "448", "--json"])
    large = json.loads(capsys.readouterr().out)["macs"]
    main(["flops", "resnet18", "--json"])
    full = json.loads(capsys.readouterr().out)["macs"]
    assert large == pytest.approx(full * 4, rel=0.01)  # conv MACs scale with the pixel count


def test_unknown_model_is_one_line_error(capsys):
    assert main(["flops", "resnet9"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet9'" in err and "Traceback" not in err


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "flops", "resnet56"],
                          capture_output=True, text=True, check=True)
    assert "resnet56 @ 32px" in proc.stdout and "MACs 0.1255 G" in proc.stdout
