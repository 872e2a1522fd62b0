"""Run storage: the check made before Ray starts (local paths and a real S3-compatible server on
127.0.0.1, tests/s3server.py), directories to and from object storage, wandb files synced into
the run's storage, and `softprune compact s3://...` on a real checkpoint uploaded to the server."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator import storage
from orchestrator.storage import StorageError, check_storage

ROOT = Path(__file__).resolve().parents[3]


# -- local paths ---------------------------------------------------------------------------------
def test_a_missing_local_storage_is_created_and_left_clean(tmp_path):
    target = tmp_path / "a" / "b" / "runs"
    check_storage(str(target))
    assert target.is_dir() and list(target.iterdir()) == []  # the probe file is gone


def _check_as_unprivileged(path: Path) -> subprocess.CompletedProcess:
    """check_storage in a child process; as root (who may write anywhere) the child runs without
    the capabilities that override file modes, so a directory's mode bits apply to it too."""
    code = ("import sys; from orchestrator.storage import check_storage, StorageError\n"
            "try:\n    check_storage(sys.argv[1])\nexcept StorageError as e:\n    print(e); sys.exit(3)\n")
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    return subprocess.run([*drop, sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_a_local_storage_without_write_permission_is_refused_in_one_line(tmp_path):
    storage_dir = tmp_path / "runs"
    storage_dir.mkdir()
    os.chmod(storage_dir, 0o755)
    assert _check_as_unprivileged(storage_dir).returncode == 0  # writable: accepted
    os.chmod(storage_dir, 0o555)
    try:
        refused = _check_as_unprivileged(storage_dir)
    finally:
        os.chmod(storage_dir, 0o755)
    assert refused.returncode == 3, refused.stderr[-2000:]
    assert refused.stdout.strip() == f"storage {str(storage_dir)!r} is not writable: Permission denied"
    missing_under_it = storage_dir / "new"
    os.chmod(storage_dir, 0o555)
    try:
        refused = _check_as_unprivileged(missing_under_it)
    finally:
        os.chmod(storage_dir, 0o755)
    assert refused.stdout.strip() == f"storage {str(missing_under_it)!r} is not writable: Permission denied"


def test_a_local_storage_under_a_regular_file_is_refused(tmp_path):
    regular = tmp_path / "file.txt"
    regular.write_text("x")
    with pytest.raises(StorageError) as below:
        check_storage(str(regular / "runs"))
    assert str(below.value) == f"storage {str(regular / 'runs')!r} is not writable: Not a directory"
    with pytest.raises(StorageError) as itself:
        check_storage(str(regular))
    assert str(itself.value) == f"storage {str(regular)!r} is not writable: it is a file, not a directory"
    assert regular.read_text() == "x"


# -- s3 -----------------------------------------------------------------------------------------
def test_s3_storage_is_accepted_and_the_probe_object_removed(s3):
    check_storage(s3.uri("runs"))
    assert not [k for k in s3.keys() if storage.PROBE_PREFIX in k]


def test_s3_without_credentials_is_refused_before_any_request(s3, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError) as err:
        check_storage(s3.uri("runs"))
    assert str(err.value) == (f"storage {s3.uri('runs')!r}: no AWS credentials (set AWS_ACCESS_KEY_ID and "
                              f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")


def test_s3_with_wrong_credentials_is_refused(s3, monkeypatch):
    good_key, _ = s3.server.user(allow_s3=True)
    for key, secret in (("AKIANOSUCHKEY0000000", "not-a-secret"), (good_key, "the-wrong-secret")):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        with s3.server.enforcing_credentials(), pytest.raises(StorageError) as err:
            check_storage(s3.uri("runs"))
        assert str(err.value) == (f"storage {s3.uri('runs')!r} is not writable: the credentials were rejected "
                                  f"(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
        assert secret not in str(err.value)


def test_s3_access_denied_and_allowed_users(s3, monkeypatch):
    for allowed in (False, True):
        key, secret = s3.server.user(allow_s3=allowed)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        with s3.server.enforcing_credentials():
            if allowed:
                check_storage(s3.uri("runs"))
                continue
            with pytest.raises(StorageError) as err:
                check_storage(s3.uri("runs"))
        assert str(err.value) == f"storage {s3.uri('runs')!r} is not writable: access denied"


def test_s3_missing_bucket_is_named(s3):
    with pytest.raises(StorageError) as err:
        check_storage("s3://softprune-no-such-bucket/runs")
    assert str(err.value) == "storage 's3://softprune-no-such-bucket/runs': bucket 'softprune-no-such-bucket' does not exist"


def test_s3_unreachable_endpoint_is_named(s3, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    with pytest.raises(StorageError) as err:
        check_storage(s3.uri("runs"))
    assert str(err.value) == f"storage {s3.uri('runs')!r}: endpoint {dead} is unreachable"


def test_s3_specific_endpoint_variable_wins(s3, monkeypatch):
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    check_storage(s3.uri("runs"))


# -- directories to and from object storage -----------------------------------------------------
def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def test_upload_download_round_trip(s3, tmp_path):
    src = tmp_path / "src"
    (src / "deep" / "er").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 7))  # several read chunks
    (src / "deep" / "b.txt").write_text("b")
    (src / "deep" / "er" / "report.json").write_text("{}")
    (src / "link-to-deep").symlink_to(src / "deep")  # like wandb's latest-run: not followed
    (src / "link.txt").symlink_to(src / "deep" / "b.txt")
    order = storage.upload_dir(src, s3.uri("x", "dir"), last=["deep/er/report.json"])
    assert order[-1] == "deep/er/report.json" and len(order) == 3
    assert [k for k in s3.keys("x/dir/") if not k.endswith("/")] == ["x/dir/a.bin", "x/dir/deep/b.txt",
                                                                      "x/dir/deep/er/report.json"]
    back = storage.download_dir(s3.uri("x", "dir"), tmp_path / "back")
    assert _tree(back) == _tree(src)
    assert storage.list_dirs(s3.uri("x")) == ["dir"] and storage.list_dirs(s3.uri("nothing")) == []


def test_publish_replaces_the_outputs_whole(s3, tmp_path):
    for target in (s3.uri("run", "final"), str(tmp_path / "run" / "final")):
        first, second = tmp_path / "first", tmp_path / "second"
        for d, files in ((first, {"model.safetensors": "1", "old.png": "o", "report.json": "{\"v\": 1}"}),
                         (second, {"model.safetensors": "2", "report.json": "{\"v\": 2}"})):
            d.mkdir(exist_ok=True)
            for name, text in files.items():
                (d / name).write_text(text)
        storage.publish_dir(first, target)
        storage.publish_dir(second, target)
        local = storage.download_dir(target, tmp_path / "seen") if storage.is_uri(target) else Path(target)
        assert _tree(local) == {"model.safetensors": b"2", "report.json": b"{\"v\": 2}"}, target
        shutil.rmtree(tmp_path / "seen", ignore_errors=True)
        shutil.rmtree(first)
        shutil.rmtree(second)


def test_ray_gets_our_filesystem_without_credentials_in_it(s3):
    import pyarrow.fs as pafs

    args = storage.ray_storage(s3.uri("runs"))
    assert args["storage_path"] == f"{s3.name}/runs" and isinstance(args["storage_filesystem"], pafs.S3FileSystem)
    blob = pickle.dumps(args["storage_filesystem"])  # what Ray ships to the controller and workers
    assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in blob
    assert os.environ["AWS_ENDPOINT_URL"].split("//")[1].encode() in blob
    with pickle.loads(blob).open_output_stream(f"{s3.name}/runs/x") as out:  # and it reaches the server
        out.write(b"x")
    assert "runs/x" in s3.keys("runs/")
    assert storage.location_of(s3.uri("runs"), f"{s3.name}/runs/n/checkpoint_1") == s3.uri("runs", "n", "checkpoint_1")
    assert storage.ray_storage("rel/runs")["storage_path"] == str(Path("rel/runs").resolve())


def test_workers_get_the_aws_settings(s3):
    from orchestrator.env import worker_env

    env = worker_env()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
        assert env[key] == os.environ[key], key


# -- wandb files under the run's storage ------------------------------------------------------
def _cfg(storage_location: str, name: str = "trk", **tracking):
    from orchestrator.config import load_config

    return load_config({"name": name, "storage": storage_location, "data": {"train": "unused"},
                        "tracking": {"mode": "offline", **tracking}})


def test_tracking_dir_is_inside_a_local_run_storage(tmp_path):
    from orchestrator.tracking import sync_tracking, tracking_dir

    cfg = _cfg(str(tmp_path / "runs"))
    assert tracking_dir(cfg) == str(tmp_path / "runs" / "trk")
    sync_tracking(cfg, tracking_dir(cfg))  # a local target: nothing to copy, nothing raised
    own = _cfg(str(tmp_path / "runs"), dir="rel/wandb_here")
    assert own.tracking.dir == str(Path("rel/wandb_here").resolve())  # absolute before Ray sees it


def test_wandb_files_of_a_uri_storage_are_synced_into_it(s3, monkeypatch):
    from orchestrator.tracking import make_logger, stored_run_dir, sync_tracking, tracking_dir

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = _cfg(s3.uri("runs"), name=f"trk-{s3.name}")
    local = tracking_dir(cfg)
    assert not storage.is_uri(local) and Path(local).is_dir() and tracking_dir(cfg) == local  # stable
    logger = make_logger(cfg.tracking, 0, cfg.name, {"a": 1}, None, local)
    logger.log({"epoch": 0, "val/top1": 0.5}, step=1)
    sync_tracking(cfg, local)  # as at a checkpoint: the run so far
    prefix = f"runs/{cfg.name}/wandb/"
    mid = [k for k in s3.keys(prefix) if not k.endswith("/")]
    assert any(k.endswith(".wandb") for k in mid), mid
    assert not any("latest-run" in k for k in mid)  # the symlink is not followed
    logger.finish()
    sync_tracking(cfg, local)  # at the end
    run_dir = stored_run_dir(cfg, str(Path(logger.run_dir).parent))
    assert run_dir.startswith(s3.uri("runs", cfg.name, "wandb", "offline-run-"))
    back = storage.download_dir(run_dir, Path(local).parent / f"back-{s3.name}")
    try:  # the finished run's whole .wandb file is in the bucket
        assert next(back.glob("*.wandb")).read_bytes() == next(Path(logger.run_dir).parent.glob("*.wandb")).read_bytes()
    finally:
        shutil.rmtree(back)
        shutil.rmtree(local)  # the staging copy (under .cache)


def test_a_failed_wandb_sync_does_not_raise(s3, monkeypatch, capsys):
    from orchestrator.tracking import sync_tracking, tracking_dir

    cfg = _cfg("s3://softprune-no-such-bucket/runs")
    local = Path(tracking_dir(cfg))
    (local / "wandb").mkdir(exist_ok=True)
    (local / "wandb" / "f.txt").write_text("x")
    try:
        sync_tracking(cfg, str(local))
    finally:
        shutil.rmtree(local)
    assert "wandb files not uploaded to s3://softprune-no-such-bucket/runs/trk/wandb" in capsys.readouterr().out


# -- `softprune compact s3://...` ------------------------------------------------------------------
def _write_checkpoint(rank: int, out: str) -> None:
    """A real checkpoint (DeepSpeed engine, the run's own `checkpoint.save`) of a masked
    resnet20 on one gloo rank, in a process of its own."""
    import torch.distributed as dist

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=0, world_size=1)
    try:
        from models import create_model
        from orchestrator import checkpoint as ckpt
        from orchestrator.config import load_config
        from orchestrator.engine import build_engine, init_distributed
        from pruning import count_flops, groups_from_config, make_chooser

        init_distributed()
        cfg = load_config({"data": {"train": "unused", "image_size": 16}, "model": {"name": "resnet20", "num_classes": 4},
                           "pruning": {"method": "sfp", "rate": 0.5}, "scaling": {"workers": 1}})
        torch.manual_seed(0)
        engine = build_engine(create_model("resnet20", 4), cfg, 1)
        groups = groups_from_config(engine.module, cfg.pruning)
        masks = make_chooser(groups, cfg.pruning)(dict(engine.module.named_parameters()), 0.5, 1)
        dense = count_flops(engine.module, 16)
        state = ckpt.RunState(epoch=2, global_step=8, world_size=1, config=cfg.model_dump(mode="json"),
                              algorithm={"masks": masks.to_state(), "frozen": False},
                              dense_counts={"params": int(dense.params), "macs": int(dense.macs)})
        local = ckpt.save(engine, state, 0, carry=None, root=out)
        shutil.move(local, Path(out) / "run" / "checkpoint_000001")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """`<storage>/<name>` of a run with one complete checkpoint (epoch 2), and a newer one whose
    upload was cut short (its state file is there, a rank's part is not)."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("saved")
    (out / "run").mkdir()
    mp.start_processes(_write_checkpoint, args=(str(out),), nprocs=1, join=True, start_method="spawn")
    run = out / "run"
    cut = run / "checkpoint_000002"
    shutil.copytree(run / "checkpoint_000001", cut)
    state = json.loads((cut / "softprune_state.json").read_text())
    state.update(epoch=3, global_step=12)
    (cut / "softprune_state.json").write_text(json.dumps(state))
    (cut / "rank_0.pt").unlink()
    (run / "final").mkdir()  # not a checkpoint: passed over
    (run / "config.yaml").write_text("name: run\n")
    return run


def test_compact_a_run_in_object_storage(s3, saved_run, tmp_path, capsys):
    from launch.cli import main
    from orchestrator.saved_runs import compact_checkpoint
    from pruning import load_compact

    run_uri = s3.uri("runs", "run")
    storage.upload_dir(saved_run, run_uri)
    assert main(["compact", run_uri]) == 0
    assert f"-> {run_uri}/compact-hard" in capsys.readouterr().out
    names = [k.rsplit("/", 1)[1] for k in s3.keys("runs/run/compact-hard/") if not k.endswith("/")]
    assert sorted(names) == ["arch.json", "model.safetensors", "report.json"]
    remote = storage.download_dir(f"{run_uri}/compact-hard", tmp_path / "remote")
    report = json.loads((remote / "report.json").read_text())
    assert report["checkpoint"] == f"{run_uri}/checkpoint_000001"  # the latest complete one
    assert report["epoch"] == 2 and report["pruned"]["params"] < report["dense"]["params"]
    # the same checkpoint compacted from the local directory gives the same network
    local_out, local_report = compact_checkpoint(saved_run, tmp_path / "local", "hard")
    assert local_report["pruned"] == report["pruned"]
    remote_model, _, _ = load_compact(remote)
    local_model, _, _ = load_compact(local_out)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(remote_model.eval()(x), local_model.eval()(x))
    # --out to another URI; nothing is left in the local temp directory
    scratch = Path(os.environ["TMPDIR"])
    before = {p.name for p in scratch.iterdir() if p.name.startswith(("sp_ckpt_dl_", "sp_compact_"))}
    assert main(["compact", run_uri, "--mode", "faithful", "--out", s3.uri("exports", "faithful")]) == 0
    assert "exports/faithful/report.json" in s3.keys("exports/")
    after = {p.name for p in scratch.iterdir() if p.name.startswith(("sp_ckpt_dl_", "sp_compact_"))}
    assert after == before


def test_compact_of_a_missing_run_or_bucket_is_one_line(s3, capsys):
    from launch.cli import main

    assert main(["compact", s3.uri("runs", "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"softprune compact: error: no complete softprune checkpoint under {s3.uri('runs', 'none')}"
    assert main(["compact", "s3://softprune-no-such-bucket/runs/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("softprune compact: error: ") and "\n" not in err and "softprune-no-such-bucket" in err
