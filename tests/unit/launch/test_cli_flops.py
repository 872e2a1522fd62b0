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


def test_flops_of_a_factory_model_counts_what_it_builds(capsys):
    args = ["flops", "tests.user_models:small_net", "--model-kwargs", '{"width": 4}', "--input-size", "32", "--json"]
    assert main(args) == 0
    narrow = json.loads(capsys.readouterr().out)
    assert main([*args[:3], '{"width": 8}', *args[4:]]) == 0
    wide = json.loads(capsys.readouterr().out)
    assert narrow["model"] == "tests.user_models:small_net" and narrow["input_size"] == 32
    assert 3 * narrow["macs"] < wide["macs"] < 5 * narrow["macs"]  # conv MACs grow with width squared


def test_flops_refuses_kwargs_for_a_registered_model(capsys):
    assert main(["flops", "resnet20", "--model-kwargs", '{"width": 4}']) == 2
    assert "--model-kwargs are for a model factory" in capsys.readouterr().err
