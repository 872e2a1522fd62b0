"""Bad input costs one line: `PROG: error: <line naming the field, file or URI>` on stderr, exit
status 2, no traceback, no Ray started, and nothing already written changes (the test's whole tmp
dir, which holds another run's directory, is byte-identical afterwards).

`softprune train` runs in-process (`launch.cli.main`); the r101 launcher in a subprocess. Damage
that only reading finds (corrupt, truncated shards) goes through the real loader, in-process and
with a worker process, and through the error Ray Train raises for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data.testing import write_indexed_shards
from tests.unit.launch import bad_input_helpers
from tests.unit.launch.bad_input_helpers import (
    assert_ray_not_started,
    closed_port,
    ray_state,
    serve_directory,
    snapshot,
    write_existing_run,
)

ROOT = Path(__file__).resolve().parents[3]
COUNTS = {"train": [16, 16], "val": [8]}
PREFIX = "softprune train: error: "


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A good shard set (its manifest); tests that damage shards copy it first."""
    return write_indexed_shards(tmp_path_factory.mktemp("shards"), COUNTS)


@pytest.fixture
def ray_tmp(tmp_path, monkeypatch) -> Path:
    """Where a Ray session would put its files if one were started (it must not be)."""
    path = tmp_path / "ray"
    monkeypatch.setenv("SOFTPRUNE_RAY_TMP", str(path))
    for name in ("RAY_ADDRESS", "RAY_JOB_ID"):  # workers are local: relative paths are refused
        monkeypatch.delenv(name, raising=False)
    return path


def tree(shards: Path, storage: Path, name: str = "run") -> dict:
    return {
        "name": name, "storage": str(storage), "epochs": 2, "seed": 1,
        "model": {"name": "resnet20"},
        "data": {"train": str(shards), "val": str(shards), "batch_size": 4, "image_size": 8,
                 "transform": "cifar", "num_workers": 0, "shuffle_buffer": 8},
        "optim": {"lr": 0.05}, "scaling": {"workers": 1},
        "tracking": {"wandb": False, "mode": "disabled"},
    }


@pytest.fixture
def setup(tmp_path, shards, ray_tmp):
    """A config file, its storage with another run already in it, and the Ray temp dir."""
    storage = tmp_path / "runs"
    write_existing_run(storage / "other", tree(shards, storage, "other"))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tree(shards, storage)))
    return config, storage


def refused(argv: list[str], capsys, tmp_path: Path, ray_tmp: Path, prefix: str = PREFIX) -> str:
    return bad_input_helpers.refused(argv, capsys, tmp_path, ray_tmp, prefix)


# -- config --------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, expected", [
    (["optim.lr=-0.1"], ["optim.lr", "greater than 0", "-0.1"]),
    (["epochs=0"], ["epochs", "greater than or equal to 1", "0"]),
    (["epochs=ten"], ["epochs", "valid integer", "'ten'"]),
    (["data.batch_size=1.5"], ["data.batch_size", "valid integer", "1.5"]),
    (["learning_rate=0.1"], ["learning_rate", "Extra inputs are not permitted"]),
    (["optim.momentun=0.5"], ["optim.momentun", "Extra inputs are not permitted"]),
    (["optimiser.lr=0.1"], ["optimiser", "Extra inputs are not permitted"]),
    (["epochs.max=3"], ["override 'epochs.max'", "'epochs' is a value, not a section"]),
    (["optim.lr"], ["override 'optim.lr'", "section.field=value"]),
    (["lr.milestones=[1, 2"], ["override 'lr.milestones=[1, 2'", "not valid YAML"]),
    (["model.name=resnet9"], ["model.name", "unknown model 'resnet9'"]),
    (["pruning.method=sfp", "pruning.freeze_epoch=5"], ["pruning.freeze_epoch=5", "after the last epoch (2)"]),
    (["scaling.precision=fp16"], ["scaling.precision='fp16' needs GPUs"]),
], ids=["negative-lr", "zero-epochs", "epochs-type", "batch-size-type", "unknown-field",
        "unknown-nested-field", "unknown-section", "override-into-a-value", "override-syntax",
        "override-yaml", "unknown-model", "freeze-after-last-epoch", "fp16-on-cpu"])
def test_bad_config_values(setup, tmp_path, ray_tmp, capsys, overrides, expected):
    config, _ = setup
    line = refused(["train", str(config), *overrides], capsys, tmp_path, ray_tmp)
    for part in expected:
        assert part in line, line


@pytest.mark.parametrize("content, expected", [
    (None, ["config file", "missing.yaml", "does not exist"]),
    ("- just\n- a list\n", ["config file", "bad.yaml", "must hold a mapping", "not list"]),
    ("epochs: [1, 2\nseed: 3\n", ["config file", "bad.yaml", "not valid YAML", "line 2"]),
], ids=["missing-file", "not-a-mapping", "malformed-yaml"])
def test_bad_config_files(setup, tmp_path, ray_tmp, capsys, content, expected):
    path = tmp_path / ("missing.yaml" if content is None else "bad.yaml")
    if content is not None:
        path.write_text(content)
    line = refused(["train", str(path)], capsys, tmp_path, ray_tmp)
    for part in expected:
        assert part in line, line


RECIPES = '''
def boom():
    return {"epochs": 1 // 0}

def number():
    return 42
'''


@pytest.mark.parametrize("recipe, expected", [
    ("softprune_no_such_recipes:make", "recipe 'softprune_no_such_recipes:make': no module named"),
    ("launch.recipes:resnet999", ("recipe 'launch.recipes:resnet999': module launch.recipes has no function "
                                  "'resnet999' (it has: ")),
    ("bad_recipes_for_test:boom", ("recipe 'bad_recipes_for_test:boom' failed: ZeroDivisionError: "
                                   "integer division or modulo by zero (bad_recipes_for_test.py:3)")),
    ("bad_recipes_for_test:number", "recipe 'bad_recipes_for_test:number' returned int, not a config"),
], ids=["no-module", "no-function", "function-raises", "returns-non-config"])
def test_bad_recipes(setup, tmp_path, ray_tmp, capsys, monkeypatch, recipe, expected):
    recipes_dir = tmp_path / "recipes"
    recipes_dir.mkdir()
    (recipes_dir / "bad_recipes_for_test.py").write_text(RECIPES)
    monkeypatch.syspath_prepend(str(recipes_dir))
    monkeypatch.delitem(sys.modules, "bad_recipes_for_test", raising=False)
    line = refused(["train", recipe], capsys, tmp_path, ray_tmp)
    assert expected in line, line


# -- data (checked before Ray) ---------------------------------------------------------------
def _copy_shards(shards: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in shards.parent.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest / shards.name


def _edit_manifest(manifest: Path, field: str, value) -> None:
    obj = json.loads(manifest.read_text())
    obj["splits"]["train"]["shards"][1][field] = value
    manifest.write_text(json.dumps(obj))


def test_local_shards_that_do_not_exist(setup, tmp_path, ray_tmp, capsys):
    config, _ = setup
    pattern = f"{tmp_path}/nowhere/train-{{000000..000001}}.tar"
    line = refused(["train", str(config), f"data.train={pattern}"], capsys, tmp_path, ray_tmp)
    assert line.startswith(PREFIX + "data.train: ")
    assert f"{tmp_path}/nowhere/train-000000.tar: no such file" in line and "2 of 2 shards" in line


def test_manifest_that_does_not_exist(setup, tmp_path, ray_tmp, capsys):
    config, _ = setup
    missing = tmp_path / "elsewhere" / "manifest.json"
    line = refused(["train", str(config), f"data.val={missing}"], capsys, tmp_path, ray_tmp)
    assert line == f"{PREFIX}data.val: no manifest at {missing}"


def test_relative_shard_path(setup, tmp_path, ray_tmp, capsys, monkeypatch, shards):
    config, _ = setup
    monkeypatch.chdir(shards.parent.parent)  # the path exists from here, not from a Ray worker
    relative = f"{shards.parent.name}/{shards.name}"
    line = refused(["train", str(config), f"data.train={relative}"], capsys, tmp_path, ray_tmp)
    assert f"data.train: {relative!r} is a relative path" in line and "absolute path" in line


def test_http_manifest_answering_404(setup, tmp_path, ray_tmp, capsys, shards):
    config, _ = setup
    with serve_directory(shards.parent) as base:
        url = f"{base}/missing/manifest.json"
        line = refused(["train", str(config), f"data.train={url}"], capsys, tmp_path, ray_tmp)
    assert line == f"{PREFIX}data.train: cannot read manifest {url}: HTTP 404 File not found"


def test_http_shard_answering_404(setup, tmp_path, ray_tmp, capsys, shards):
    config, _ = setup
    served = _copy_shards(shards, tmp_path / "served")
    (served.parent / "train-000001.tar").unlink()
    with serve_directory(served.parent) as base:
        line = refused(["train", str(config), f"data.train={base}/manifest.json"], capsys, tmp_path, ray_tmp)
    assert f"{base}/train-000001.tar: HTTP 404 File not found" in line and "1 of 2 shards" in line


def test_refused_connection(setup, tmp_path, ray_tmp, capsys):
    config, _ = setup
    url = f"http://127.0.0.1:{closed_port()}/in1k/manifest.json"
    line = refused(["train", str(config), f"data.val={url}"], capsys, tmp_path, ray_tmp)
    assert line.startswith(f"{PREFIX}data.val: cannot read manifest {url}: unreachable (")
    assert "Connection refused" in line


def test_pipe_manifest_command_not_installed(setup, tmp_path, ray_tmp, capsys):
    config, _ = setup
    source = "pipe:softprune-no-such-command s3://bucket/manifest.json"
    line = refused(["train", str(config), f"data.train={source}"], capsys, tmp_path, ray_tmp)
    assert line == (f"{PREFIX}data.train: cannot read manifest {source}: command 'softprune-no-such-command' "
                    f"not found on PATH")


def test_manifest_byte_count_that_does_not_match(setup, tmp_path, ray_tmp, capsys, shards):
    config, _ = setup
    manifest = _copy_shards(shards, tmp_path / "copy")
    size = (manifest.parent / "train-000001.tar").stat().st_size
    _edit_manifest(manifest, "bytes", size + 512)
    line = refused(["train", str(config), f"data.train={manifest}"], capsys, tmp_path, ray_tmp)
    assert f"train-000001.tar: {size} bytes, the manifest lists {size + 512}" in line
    assert "data.check_sources=false" in line


def test_truncated_shard_is_found_by_its_size(setup, tmp_path, ray_tmp, capsys, shards):
    config, _ = setup
    manifest = _copy_shards(shards, tmp_path / "copy")
    shard = manifest.parent / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    line = refused(["train", str(config), f"data.train={manifest}"], capsys, tmp_path, ray_tmp)
    assert f"{shard}: {len(data) // 2} bytes, the manifest lists {len(data)}" in line


def test_manifest_sha256_checked_only_on_request(setup, tmp_path, ray_tmp, capsys, shards):
    """Same size, other content: only a full read (--verify-shards) can tell."""
    from orchestrator.config import load_config
    from orchestrator.preflight import preflight

    config, _ = setup
    manifest = _copy_shards(shards, tmp_path / "copy")
    _edit_manifest(manifest, "sha256", "0" * 64)
    preflight(load_config(config, [f"data.train={manifest}"]))  # sizes match: passes
    line = refused(["train", str(config), f"data.train={manifest}", "--verify-shards"], capsys, tmp_path, ray_tmp)
    assert "1 of 2 shards do not match the manifest's sha256" in line
    assert str(manifest.parent / "train-000001.tar") in line


@pytest.mark.parametrize("overrides, expected", [
    (["data.batch_size=64"], "data.train: 32 samples"),
    (["model.num_classes=10"], "has 32 classes, more than model.num_classes=10"),
    (["model.pretrained=/no/such/weights.pt"], "model.pretrained: no such file '/no/such/weights.pt'"),
    (["pruning.method=sfp", "pruning.teacher=/no/such/run/final"],
     "pruning.teacher: '/no/such/run/final' is not a finished model directory"),
    (["pruning.method=sfp", "pruning.teacher=runs/x/final"], "pruning.teacher: 'runs/x/final' is a relative path"),
], ids=["batch-larger-than-data", "classes-beyond-classifier", "pretrained-missing", "teacher-missing",
        "teacher-relative"])
def test_data_that_does_not_fit_the_model(setup, tmp_path, ray_tmp, capsys, overrides, expected):
    config, _ = setup
    line = refused(["train", str(config), *overrides], capsys, tmp_path, ray_tmp)
    assert expected in line, line


# -- storage -----------------------------------------------------------------------------------
def test_storage_under_a_regular_file(setup, tmp_path, ray_tmp, capsys):
    config, _ = setup
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file")
    line = refused(["train", str(config), f"storage={blocker}/runs"], capsys, tmp_path, ray_tmp)
    assert str(blocker) in line


def test_storage_not_writable(setup, tmp_path, ray_tmp, capsys):
    config, _ = setup
    target = "/proc/softprune-runs"  # not writable even for root, unlike a chmod-ed folder
    line = refused(["train", str(config), f"storage={target}"], capsys, tmp_path, ray_tmp)
    assert target in line


# -- a run name reused with another config ----------------------------------------------------
def test_reused_name_with_other_values_is_refused_and_the_run_kept(setup, tmp_path, ray_tmp, capsys, shards):
    config, storage = setup
    write_existing_run(storage / "run", tree(shards, storage))
    line = refused(["train", str(config), "optim.lr=0.2", "epochs=3", "pruning.method=sfp"],
                   capsys, tmp_path, ray_tmp)
    assert line.startswith(f"{PREFIX}run {storage}/run already exists with another config "
                           f"({storage}/run/config.yaml): ")
    assert "epochs: 2 -> 3" in line and "optim.lr: 0.05 -> 0.2" in line
    assert "pruning.method: \"none\" -> \"sfp\"" in line and "--allow-config-change" in line


def test_reused_name_compared_with_the_checkpoint_without_config_yaml(setup, tmp_path, ray_tmp, capsys, shards):
    config, storage = setup
    write_existing_run(storage / "run", tree(shards, storage), with_config_yaml=False)
    line = refused(["train", str(config), "seed=7"], capsys, tmp_path, ray_tmp)
    assert "checkpoint_2026-01-01_00-00-00.000000): seed: 1 -> 7;" in line


def test_reused_name_saved_by_an_older_version(setup, tmp_path, ray_tmp, capsys, shards):
    """A saved config with a field this version no longer has: compared where both have the field."""
    config, storage = setup
    old = tree(shards, storage)
    old["data"]["retired_option"] = True
    write_existing_run(storage / "run", old)
    line = refused(["train", str(config), "data.image_size=16"], capsys, tmp_path, ray_tmp)
    assert "config.yaml): data.image_size: 8 -> 16; use another name" in line


def test_resume_settings_may_change(setup, tmp_path, shards):
    """Workers, loader processes, tracking, watchdog, checkpoint cadence, stop_after_epoch, the
    batches' memory layout: not refused."""
    from orchestrator.config import load_config
    from orchestrator.preflight import config_changes, preflight

    config, storage = setup
    write_existing_run(storage / "run", tree(shards, storage))
    before = snapshot(storage)
    cfg = load_config(config, ["scaling.workers=2", "scaling.cpus_per_worker=2", "data.num_workers=3",
                               "tracking.log_every=7", "watchdog.timeout_s=5", "checkpoint.keep=4",
                               "stop_after_epoch=1", "data.max_bad_fraction=0.2", "scaling.channels_last=true"])
    assert config_changes(yaml.safe_load((storage / "run" / "config.yaml").read_text()), cfg) == {}
    preflight(cfg)
    assert snapshot(storage) == before


def test_allowed_config_change_is_recorded_and_nothing_else_touched(setup, tmp_path, shards, capsys):
    from orchestrator.config import load_config
    from orchestrator.preflight import preflight

    config, storage = setup
    write_existing_run(storage / "run", tree(shards, storage))
    before = snapshot(storage)
    preflight(load_config(config, ["optim.lr=0.2"]), allow_config_change=True)
    after = snapshot(storage)
    added = set(after) - set(before)
    assert {k: after[k] for k in before} == before and len(added) == 1
    record = json.loads(after[added.pop()])
    assert record["changes"] == {"optim.lr": {"previous": 0.05, "new": 0.2}}
    assert "config change allowed" in capsys.readouterr().out


def test_run_training_checks_before_writing_or_starting_ray(setup, tmp_path, ray_tmp, shards):
    """The driver's own entry (scripts, tests) runs the same checks first."""
    from orchestrator.config import load_config
    from orchestrator.driver import run_training

    config, storage = setup
    write_existing_run(storage / "run", tree(shards, storage))
    before, ray_was_imported = snapshot(tmp_path), ray_state()
    with pytest.raises(ValueError, match=r"already exists with another config .*optim\.lr: 0\.05 -> 0\.5;"):
        run_training(load_config(config, ["optim.lr=0.5"]))
    assert_ray_not_started(ray_tmp, ray_was_imported)
    assert snapshot(tmp_path) == before


# -- the r101 launcher (a subprocess, as users run it) -----------------------------------------
def _r101(args: list[str], ray_tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SOFTPRUNE_RAY_TMP": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(ROOT / "launch" / "r101_asfp.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240, check=False)


def _r101_refused(args: list[str], tmp_path: Path, ray_tmp: Path) -> str:
    before = snapshot(tmp_path)
    proc = _r101(args, ray_tmp)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("r101_asfp: error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not ray_tmp.exists() and snapshot(tmp_path) == before
    return lines[0]


def test_r101_bad_override_and_missing_data(setup, tmp_path, ray_tmp):
    _, storage = setup
    common = ["--storage", str(storage), "--workers", "1", "--gpus-per-worker", "0"]
    line = _r101_refused([*common, "--data", "/x/manifest.json", "optim.lr=-1"], tmp_path, ray_tmp)
    assert "optim.lr: Input should be greater than 0 (got -1)" in line
    line = _r101_refused([*common, "--data", f"{tmp_path}/nothing/manifest.json"], tmp_path, ray_tmp)
    assert line == f"r101_asfp: error: data.train: no manifest at {tmp_path}/nothing/manifest.json"


def test_r101_reused_name_with_another_config(setup, tmp_path, ray_tmp, shards):
    from launch.r101_asfp import build_config, parse_args

    _, storage = setup
    args = ["--data", str(shards), "--val", str(shards), "--storage", str(storage), "--name", "r101",
            "--workers", "1", "--gpus-per-worker", "0", "data.batch_size=4"]
    earlier = build_config(parse_args([*args, "pruning.rate=0.4"]))
    write_existing_run(storage / "r101", earlier.model_dump(mode="json"))
    line = _r101_refused(args, tmp_path, ray_tmp)
    assert f"run {storage}/r101 already exists with another config" in line and "pruning.rate: 0.4 -> 0.3" in line


# -- other commands ------------------------------------------------------------------------------
def test_compact_of_a_missing_run(tmp_path, ray_tmp, capsys):
    line = refused(["compact", str(tmp_path / "no-run")], capsys, tmp_path, ray_tmp, "softprune compact: error: ")
    assert line.endswith(f"no complete softprune checkpoint under {tmp_path / 'no-run'}")


def test_shards_into_a_path_under_a_regular_file(tmp_path, ray_tmp, capsys):
    (tmp_path / "file").write_text("x")
    line = refused(["shards", "synthetic", str(tmp_path / "file" / "out"), "--classes", "2", "--train", "4",
                    "--val", "2", "--size", "8", "--no-progress"], capsys, tmp_path, ray_tmp,
                   "softprune shards: error: ")
    assert f"{tmp_path}/file/out" in line and "Not a directory" in line


# -- damage only reading finds: in the loader workers ------------------------------------------
def _damaged(tmp_path: Path, damage: str) -> Path:
    broken = {21, 22, 23} if damage == "corrupt" else set()
    manifest = write_indexed_shards(tmp_path / "damaged", {"train": [20, 20]}, broken=broken)
    if damage == "truncated":
        shard = manifest.parent / "train-000001.tar"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return manifest


def _loader_error(manifest: Path, workers: int) -> Exception:
    from data import DataConfig, make_train_loader

    cfg = DataConfig(train=str(manifest), image_size=8, transform="cifar", batch_size=4, num_workers=workers,
                     shuffle_buffer=8, max_bad_fraction=0.1)
    loader = make_train_loader(cfg, 0, 1)
    try:
        list(loader)
    except Exception as exc:  # the real error, as the training loop sees it
        return exc
    finally:
        loader.close()
    raise AssertionError("the damaged shard went unnoticed")


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_damaged_shard_in_the_loader(tmp_path, capsys, damage, workers):
    from launch.errors import run_cli

    manifest = _damaged(tmp_path, damage)
    exc = _loader_error(manifest, workers)

    def train():
        raise exc

    assert run_cli("softprune train", train) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX + "shard "), lines
    assert f"shard {manifest.parent / 'train-000001.tar'}: " in lines[0]
    assert "are unreadable, more than max_bad_fraction=0.1" in lines[0]
    assert ("shard ends early" if damage == "truncated" else "UnidentifiedImageError") in lines[0]


def test_damaged_shard_in_a_ray_run(tmp_path, capsys):
    """What `fit()` raises when a worker's loader meets a corrupt shard: Ray Train's WorkerGroupError
    holding each rank's exception (made here from the loader's real error, with a worker process)."""
    from ray.train import WorkerGroupError

    from launch.errors import run_cli

    manifest = _damaged(tmp_path, "corrupt")
    exc = _loader_error(manifest, 1)
    error = WorkerGroupError(f"[Rank 0,1 Error Snippet]:\n{exc}", {0: exc, 1: exc})

    def train():
        raise error

    assert run_cli("softprune train", train) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{PREFIX}training failed: rank 0,1: shard {manifest.parent / 'train-000001.tar'}: ")

    def buggy():
        raise WorkerGroupError("[Rank 0 Error Snippet]:\n...", {0: RuntimeError("a bug")})

    with pytest.raises(WorkerGroupError):  # not a user error: Ray's own error and traceback stay
        run_cli("softprune train", buggy)
