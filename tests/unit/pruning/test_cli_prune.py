"""`softprune prune`: outputs, summary line, and one-line errors (exit code 2)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from launch.cli import main
from models import build_from_spec, create_model
from pruning import count_flops, load_compact


def test_prune_writes_a_loadable_model_whose_counts_match_the_report(tmp_path, capsys):
    dense = create_model("resnet20")
    save_file(dense.state_dict(), tmp_path / "w.safetensors")
    out = tmp_path / "out"
    rc = main(["prune", "--model", "resnet20", "--weights", str(tmp_path / "w.safetensors"),
               "--policy", "coupled", "--criterion", "l1", "--rate", "0.4", "--out", str(out)])
    assert rc == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "params" in line and "MACs" in line and str(out) in line
    model, spec, report = load_compact(out)
    counts = count_flops(model, spec["input_size"])
    assert counts.macs == report["macs"] == report["predicted"]["macs"] < report["dense"]["macs"]
    assert spec["model"] == "resnet20" and set(spec["kept"]) == set(dense.softprune_meta.convs)
    assert build_from_spec(spec).fc.in_features == model.fc.in_features


def test_prune_with_a_preset(tmp_path):
    rc = main(["prune", "--model", "resnet56", "--policy", "pfec", "--preset", "resnet56-B",
               "--criterion", "l1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    assert rc == 0 and 1 - report["conv_macs"] / report["dense"]["conv_macs"] == pytest.approx(0.276, abs=0.006)


@pytest.mark.parametrize("argv,needle", [
    (["--model", "resnet20", "--rate", "1.0"], "--rate must be in [0, 1)"),
    (["--model", "resnet21"], "unknown model 'resnet21'"),
    (["--model", "resnet56", "--policy", "pfec", "--preset", "resnet99-Z"], "unknown preset"),
    (["--model", "resnet56", "--policy", "sfp", "--preset", "resnet56-A"], "--policy pfec"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    assert main(["prune", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_weights_that_do_not_fit(tmp_path, capsys):
    torch.save(create_model("resnet32").state_dict(), tmp_path / "r32.pt")
    assert main(["prune", "--model", "resnet20", "--weights", str(tmp_path / "r32.pt"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "do not fit resnet20: unexpected layer1.3" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["prune", "--model", "resnet20", "--weights", str(tmp_path / "junk.pt"),
                 "--out", str(tmp_path / "o")]) == 2
