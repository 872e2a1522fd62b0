"""`softprune export`: folded models keep the compacted model's function, and the exported files
load and run in a process that has only onnxruntime / torch (none of this project) on its path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from launch.cli import main
from models import Scatter, ShortcutA
from pruning import build_groups, compact, load_compact, save_compact
from pruning.export import SUFFIX
from pruning.fold import AddBase, ChannelGather, fold_for_export
from tests.unit.pruning.helpers import dense_model, random_masks

REPO = Path(__file__).resolve().parents[3]
SIZE = {"resnet20": 32, "resnet18": 40}  # 40 px: the small ImageNet-style case
# (model, policy, mode): both models, both modes, the Scatter policy (sfp) and the narrowing ones
CASES = [("resnet20", "sfp", "faithful"), ("resnet20", "pfec", "hard"),
         ("resnet18", "sfp", "hard"), ("resnet18", "coupled", "faithful")]
ALL_CASES = [(m, p, mode) for m in SIZE for p in ("sfp", "coupled", "pfec") for mode in ("hard", "faithful")]
# The isolated loader: the repo's root leaves sys.path (the editable install put it there), and
# nothing of ours may be importable or imported.
LOADER = """
import sys, importlib.util
sys.path = [p for p in sys.path if p.rstrip('/') != {repo!r}]
OURS = ('models', 'pruning', 'launch', 'data', 'orchestrator', 'tests')
assert all(importlib.util.find_spec(m) is None for m in OURS), 'the repo is importable'
import numpy as np
x = np.load('x.npy')
fmt, path = sys.argv[1], sys.argv[2]
if fmt == 'onnx':
    import onnxruntime as ort
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    y = sess.run(None, {{sess.get_inputs()[0].name: x}})[0]
else:
    import torch
    m = torch.jit.load(path) if fmt == 'torchscript' else torch.export.load(path).module()
    with torch.no_grad():
        y = m(torch.from_numpy(x)).numpy()
ours = [n for n in sys.modules if n.split('.')[0] in OURS]
assert not ours, ours
np.save('y.npy', y)
"""


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU: small convolutions lose to thread start-up
    yield
    torch.set_num_threads(before)


def _compacted(name: str, policy: str, mode: str, rate: float = 0.4):
    model = dense_model(name)
    groups = build_groups(model, policy)
    small, spec = compact(model, groups, random_masks(groups, rate, seed=len(policy)), mode, input_size=SIZE[name])
    return small.eval(), spec


@pytest.fixture(scope="module")
def compacted_dir(tmp_path_factory):
    made: dict[tuple, Path] = {}

    def get(case: tuple[str, str, str]) -> Path:
        if case not in made:
            small, spec = _compacted(*case)
            made[case] = save_compact(tmp_path_factory.mktemp("-".join(case)), small, spec, {"case": list(case)})
        return made[case]

    return get


def _run_isolated(fmt: str, path: Path, x: torch.Tensor, cwd: Path) -> torch.Tensor:
    np.save(cwd / "x.npy", x.numpy())
    proc = subprocess.run([sys.executable, "-I", "-c", LOADER.format(repo=str(REPO)), fmt, str(path)],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.from_numpy(np.load(cwd / "y.npy"))


@pytest.mark.parametrize("case", ALL_CASES, ids="-".join)
def test_fold_keeps_the_function_and_leaves_standard_modules_only(case):
    small, spec = _compacted(*case)
    folded = fold_for_export(small)
    kinds = {type(m) for m in folded.modules()}
    assert not kinds & {nn.BatchNorm2d, Scatter, ShortcutA}
    if case[1] == "sfp":
        assert spec["scatter"] and any(type(m).__name__ == "ChannelGather" for m in folded.modules())
    if case[2] == "faithful" and spec.get("const_input"):
        assert any(getattr(m, "const_kernel", None) is not None for m in folded.modules())
    size = SIZE[case[0]]
    for shape in ((1, 3, size, size), (3, 3, size + 3, size - 1)):  # odd borders for the const kernels
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
        with torch.no_grad():
            want, got = small(x), folded(x)
        assert want.abs().max() > 1e-2
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert small.training is False and any(isinstance(m, nn.BatchNorm2d) for m in small.modules())  # untouched


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c[1] == "sfp"], ids="-".join)
def test_scatters_fold_into_their_convs_and_keep_the_function(case):
    small, _ = _compacted(*case)
    folded = fold_for_export(small, scatter_into_conv=True)
    assert count(small, Scatter) > 0 and count(folded, AddBase) == count(small, Scatter)
    assert count(folded, ChannelGather) == count(small, ShortcutA)  # only the option-A shortcuts gather
    for conv, scatter in small.softprune_scatters().items():
        weight = folded.get_submodule(conv).weight
        empty = torch.ones(scatter.width, dtype=torch.bool)
        empty[scatter.index] = False
        assert weight.shape[0] == scatter.width and not weight[empty].any() and weight[~empty].any()
    size = SIZE[case[0]]
    for shape in ((1, 3, size, size), (3, 3, size + 3, size - 1)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
        with torch.no_grad():
            want, got = small(x), folded(x)
        assert want.abs().max() > 1e-2
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_faithful_cases_have_const_kernels_and_shortcuts_to_fold():
    """The cases above must exercise every layer the fold replaces."""
    _, spec = _compacted("resnet20", "sfp", "faithful")
    assert spec["const_input"] and spec["scatter"] and spec["shortcut_a"]
    _, spec = _compacted("resnet18", "coupled", "faithful")
    assert spec["const_input"] and not spec.get("scatter")


# Two cases run by default (every folded layer kind: Scatter, const kernels, ShortcutA, coupled
# narrowing); the other two are the `exhaustive` long tail (`make drills`).
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
@pytest.mark.parametrize("case", [c if c in (CASES[0], CASES[3]) else pytest.param(c, marks=pytest.mark.exhaustive)
                                  for c in CASES], ids="-".join)
def test_exported_file_runs_without_the_project(fmt, case, compacted_dir, tmp_path, capsys):
    src = compacted_dir(case)
    out = tmp_path / f"model.{fmt}"
    assert main(["export", str(src), "--format", fmt, "--out", str(out), "--no-latency"]) == 0
    assert "max |diff|" in capsys.readouterr().out
    assert out.is_file() and not Path(f"{out}.latency.json").exists()
    small, _, _ = load_compact(src)
    size = SIZE[case[0]]
    for batch in (1, 5):  # the batch axis is dynamic
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch + 10))
        with torch.no_grad():
            want = small(x)
        torch.testing.assert_close(_run_isolated(fmt, out, x, tmp_path), want, rtol=0, atol=1e-4)


def test_onnx_graph_has_standard_ops_only(compacted_dir, tmp_path):
    import onnx

    out = tmp_path / "m.onnx"
    assert main(["export", str(compacted_dir(CASES[0])), "--format", "onnx", "--out", str(out), "--no-latency"]) == 0
    model = onnx.load(str(out))
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}  # no custom op domains
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops and "Gather" in ops
    assert not list(model.graph.initializer[0].external_data)  # one self-contained file
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch


def test_onnx_export_of_an_sfp_resnet_has_no_channel_gather(compacted_dir, tmp_path):
    """Each scatter went into its conv: onnxruntime keeps the blocked conv layout through the
    block (a Gather on channels would reorder the whole stream out of it and back)."""
    import onnx

    out = tmp_path / "m.onnx"
    assert main(["export", str(compacted_dir(CASES[2])), "--format", "onnx", "--out", str(out), "--no-latency"]) == 0
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "Gather" not in ops and "ScatterND" not in ops
    assert ops.count("Conv") == sum(isinstance(m, nn.Conv2d) for m in dense_model("resnet18").modules())


def test_onnx_runner_takes_the_thread_count_asked_for(compacted_dir, tmp_path):
    from pruning.export import load_runner

    out = tmp_path / "m.onnx"
    assert main(["export", str(compacted_dir(CASES[0])), "--format", "onnx", "--out", str(out), "--no-latency"]) == 0
    one, default = load_runner("onnx", out, threads=1), load_runner("onnx", out)
    assert one.session.get_session_options().intra_op_num_threads == 1
    assert default.session.get_session_options().intra_op_num_threads == 0  # onnxruntime's own choice
    x = torch.randn(2, 3, SIZE[CASES[0][0]], SIZE[CASES[0][0]], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(one(x), default(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_latency_json_has_every_field(fmt, compacted_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    final = run_dir / "final"
    final.mkdir(parents=True)
    src = compacted_dir(CASES[0])
    for f in src.iterdir():
        (final / f.name).write_bytes(f.read_bytes())
    report_before = (final / "report.json").read_bytes()
    # a run dir: its final/ is exported, next to the compacted files
    assert main(["export", str(run_dir), "--format", fmt, "--batch", "4", "--repeats", "2", "--warmup", "1"]) == 0
    printed = capsys.readouterr().out
    out = final / f"model{SUFFIX[fmt]}"
    report = json.loads(Path(f"{out}.latency.json").read_text())
    assert report["format"] == fmt and report["model"] == "resnet20" and report["batches"] == [1, 4]
    assert report["macs"]["dense"] > report["macs"]["compact"] > 0
    assert report["macs"]["ratio"] == pytest.approx(report["macs"]["dense"] / report["macs"]["compact"])
    assert 0 <= report["max_abs_diff"] <= 1e-4
    assert len(report["latency"]) == 2 and "torch eager" in report["latency"]
    for runtime, rows in report["latency"].items():
        assert set(rows) == {"1", "4"}
        for row in rows.values():
            assert all(row[k] > 0 for k in ("dense_ms", "compact_ms", "speedup", "compact_img_per_s"))
            assert row["speedup"] == pytest.approx(row["dense_ms"] / row["compact_ms"])
        assert runtime in printed
    assert (final / "report.json").read_bytes() == report_before
    assert not [p for p in final.iterdir() if p.name.startswith(".dense-export-")]  # temp files gone


def test_latency_at_one_thread_times_both_runtimes_on_one(compacted_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite may run on one thread: make the option's effect visible
    try:
        _export_at_one_thread(compacted_dir, out, capsys)
    finally:
        torch.set_num_threads(before)


def _export_at_one_thread(compacted_dir, out: Path, capsys) -> None:
    args = ["export", str(compacted_dir(CASES[0])), "--format", "onnx", "--out", str(out), "--batch", "2",
            "--repeats", "1", "--warmup", "0", "--threads", "1"]
    assert main(args) == 0
    report = json.loads(Path(f"{out}.latency.json").read_text())
    assert report["threads"] == 1 and report["machine"]["torch_threads"] == 1
    assert torch.get_num_threads() == 2  # the caller's setting is back
    assert main(args[:-1] + ["-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--threads must be >= 0, got -1" in err and "\n" not in err


def test_missing_onnx_extra_is_one_line(compacted_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what Python does for an absent package
    assert main(["export", str(compacted_dir(CASES[0])), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert "onnxruntime" in err and "softprune[export]" in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("bad, message", [("nowhere", "no such directory"), (".", "neither a compacted model")])
def test_bad_directory_is_one_line(bad, message, tmp_path, capsys):
    target = tmp_path / bad if bad != "." else tmp_path
    assert main(["export", str(target), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
